"""Route tags in Fabio's syntax: a tag in, a RouteSpec out, or a TagError that says what is wrong."""

from __future__ import annotations

import re
from typing import Any

import pytest

from discovery.matchers import parse_conditions
from discovery.model import RouteOptions, RouteSpec, ServiceSettings
from discovery.tags import (
    TagError,
    is_route_tag,
    normalize_prefix,
    parse_route_tag,
    with_service_setting,
)


def spec(path: str, host: str = "", /, **options: Any) -> RouteSpec:
    """The RouteSpec a tag should give (positional host, so that `host=` is the upstream Host option)."""
    return RouteSpec(host=host, path=path, options=RouteOptions(**options))


VALID = [
    # Host and path.
    ("urlprefix-/api", spec("/api"), "any-host-path-prefix"),
    ("urlprefix-/", spec("/"), "any-host-every-path"),
    ("urlprefix-api.example.com/", spec("/", "api.example.com"), "one-host-every-path"),
    ("urlprefix-*.example.com/v1 strip=/v1", spec("/v1", "*.example.com", strip="/v1"), "wildcard-host-with-strip"),
    ("urlprefix-api.example.com:8443/", RouteSpec("api.example.com", "/", port=8443), "host-port-kept"),
    ("urlprefix-API.Example.COM/", spec("/", "api.example.com"), "host-lower-cased"),
    ("urlprefix-*.Example.com/", spec("/", "*.example.com"), "wildcard-host-lower-cased"),
    ("urlprefix-/Api/V1", spec("/Api/V1"), "path-case-kept"),
    ("urlprefix-/api/", spec("/api"), "trailing-slash-normalized"),
    ("urlprefix-svc_a.internal/", spec("/", "svc_a.internal"), "underscore-in-host"),
    ("urlprefix-/.well-known", spec("/.well-known"), "dot-in-segment-is-not-dot-segment"),
    ("urlprefix-/api   strip=/api", spec("/api", strip="/api"), "several-blanks"),
    # One branch per option: the option's text in, its typed field out.
    ("urlprefix-/api/ strip=/api/", spec("/api", strip="/api"), "strip-trailing-slash-normalized"),
    ("urlprefix-/api/v1 strip=/api", spec("/api/v1", strip="/api"), "strip-shorter-than-path"),
    ("urlprefix-/ proto=https", spec("/", proto="https"), "proto-https"),
    ("urlprefix-/ proto=http", spec("/"), "proto-http-is-the-default"),
    ("urlprefix-/ proto=https tlsskipverify=true", spec("/", proto="https", tls_skip_verify=True),
     "tlsskipverify-true"),
    ("urlprefix-/ tlsskipverify=false", spec("/"), "tlsskipverify-false-is-the-default"),
    ("urlprefix-/api lb=least_conn", spec("/api", lb="least_conn"), "lb"),
    ("urlprefix-/api lb=hash hash_key=cookie:Session", spec("/api", lb="hash", hash_on=("cookie", "Session")),
     "hash-on-cookie-case-kept"),
    ("urlprefix-/api hash_key=header:X-User", spec("/api", hash_on=("header", "x-user")),
     "hash-on-header-lower-cased"),
    ("urlprefix-/api hash_key=ip", spec("/api", hash_on=("ip", "")), "hash-on-client-address"),
    ("urlprefix-/api sticky=srv", spec("/api", sticky="srv"), "sticky"),
    ("urlprefix-/up maxbody=10m", spec("/up", max_body=10 * 1024**2), "maxbody-in-bytes"),
    ("urlprefix-/up maxbody=0", spec("/up"), "maxbody-zero-is-the-default"),
    ("urlprefix-/ proto=https sni=Api.Internal", spec("/", proto="https", sni="Api.Internal"), "sni-as-written"),
    ("urlprefix-/api method=get|POST", spec("/api", methods=frozenset({"GET", "POST"})), "methods-upper-cased"),
    ("urlprefix-/api header=X-Canary:1", spec("/api", conditions=parse_conditions("header", "X-Canary:1")),
     "header-condition"),
    ("urlprefix-/api query=v:2 cookie=beta header=X-A;X-B~^v",
     spec("/api", conditions=(*parse_conditions("header", "X-A;X-B~^v"), *parse_conditions("cookie", "beta"),
                              *parse_conditions("query", "v:2"))),
     "conditions-header-cookie-query-order"),
    ("urlprefix-/api exact=true", spec("/api", exact=True), "exact"),
    ("urlprefix-/api priority=-7", spec("/api", priority=-7), "negative-priority"),
    ("urlprefix-/old redirect=301,https://new.example.com$path", spec("/old", redirect=(301, "https://new.example.com$path")),
     "redirect"),
    ("urlprefix-/api prepend=/v2/", spec("/api", prepend="/v2/"), "prepend"),
    ("urlprefix-/api host=Backend.Internal:8443", spec("/api", host="Backend.Internal:8443"), "upstream-host"),
    ("urlprefix-/api host=dst", spec("/api", host="dst"), "upstream-host-is-the-instance"),
    ("  urlprefix-/foo ", spec("/foo"), "blanks-around-trimmed"),
    ("urlprefix-shop.example.com:80/ redirect=301,https://shop.example.com$path",
     RouteSpec("shop.example.com", "/", RouteOptions(redirect=(301, "https://shop.example.com$path")), port=80),
     "host-port-restricts-listener"),
    ("urlprefix-*:80/", RouteSpec("", "/", port=80), "any-host-on-port-80"),
    ("urlprefix-*/", spec("/"), "star-is-any-host"),
    ("urlprefix-/api allow=ip:10.0.0.0/8,ip:fe80::/10", spec("/api", access=("allow", ("10.0.0.0/8", "fe80::/10"))),
     "allow-cidrs"),
    ("urlprefix-/api deny=ip:1.2.3.4,ip:fe80::1234", spec("/api", access=("deny", ("1.2.3.4/32", "fe80::1234/128"))),
     "deny-bare-addresses-are-hosts"),
    ("urlprefix-/api deny=100.123.0.0/16", spec("/api", access=("deny", ("100.123.0.0/16",))),
     "deny-without-ip-kind"),
    ("urlprefix-/api weight=0.25", spec("/api", weight=0.25), "weight"),
]

MALFORMED = [
    ("urlprefix-$DC.example.com/", "variables in a route", "fabio-variable-not-yet"),
    ("urlprefix-/api allow=ip:10.0.0.0/8 deny=ip:10.1.0.0/16", "allow= and deny= on the same route",
     "allow-and-deny"),
    ("urlprefix-/api allow=ip:nonsense", "is not ip:ADDRESS or ip:CIDR", "allow-not-an-address"),
    ("urlprefix-/api allow=host:example.com", "is not ip:ADDRESS or ip:CIDR", "allow-unknown-kind"),
    ("urlprefix-/api weight=25", "weight='25' must be a share from 0 to 1", "weight-percent-not-share"),
    ("urlprefix-/api weight=nan", "weight='nan' must be a share", "weight-nan"),
    ("urlprefix-/api auth=basic", "option auth= is not supported", "fabio-auth-not-yet"),
    ("urlprefix-/api health_path=/h", "health_path= is a service setting", "service-setting-in-a-tag"),
    ("urlprefix-/api sticky=a;b", "sticky='a;b' must be a cookie name", "sticky-not-a-cookie-name"),
    ("urlprefix-/api lb=fastest", "lb='fastest' must be one of round_robin", "unknown-lb"),
    ("urlprefix-/api lb=hash hash_key=body", "hash_key='body' must be ip, header:NAME or cookie:NAME",
     "bad-hash-key"),
    ("urlprefix-/api lb=hash hash_key=header:", "must be ip, header:NAME or cookie:NAME", "hash-key-without-name"),
    ("urlprefix-", "empty route", "empty"),
    ("urlprefix-   ", "empty route", "only-blanks"),
    ("urlprefix-foo", "has no path: write foo/", "no-path"),
    ("urlprefix-:3306", "a TCP route needs proto=tcp", "tcp-route-without-proto"),
    ("urlprefix-/api strip", "option 'strip' is not key=value", "option-without-equals"),
    ("urlprefix-/api =x", "is not key=value", "option-without-name"),
    ("urlprefix-/api Strip=/api", "option name 'Strip' is invalid", "option-name-upper-case"),
    ("urlprefix-/api strip=/api strip=/api", "option 'strip' is given twice", "duplicate-option"),
    ("urlprefix-/api strip=/v1", "strip='/v1' is not a prefix of the route path '/api'", "strip-not-prefix"),
    ("urlprefix-/apix strip=/api", "is not a prefix", "strip-not-on-segment-boundary"),
    ("urlprefix-/api strip=api", "strip='api' must start with '/'", "strip-without-slash"),
    ("urlprefix-/api strip=/", "strips nothing", "strip-root"),
    ("urlprefix-/ proto=ftp", "proto='ftp' must be http, https or tcp", "proto-ftp"),
    ("urlprefix-/ proto=tcp", "write :PORT (a TCP listener) or HOST/", "proto-tcp-without-port-or-host"),
    ("urlprefix-/ proto=grpc", "not supported", "proto-grpc"),
    ("urlprefix-/ tlsskipverify=yes", "must be true or false", "tlsskipverify-not-boolean"),
    ("urlprefix-ex!ample.com/", "invalid host 'ex!ample.com'", "bad-host-char"),
    ("urlprefix-a..b/", "invalid host", "empty-host-label"),
    ("urlprefix-*.*.example.com/", "invalid host", "double-wildcard"),
    ("urlprefix-host:99999/", "invalid port", "port-out-of-range"),
    ("urlprefix-host:http/", "invalid port", "port-not-a-number"),
    ("urlprefix-/a/../b", "dot-segments", "dot-dot-segment"),
    ("urlprefix-/a/./b", "dot-segments", "dot-segment"),
    ("urlprefix-/a/..", "dot-segments", "trailing-dot-dot-segment"),
    ("urlprefix-/a?x=1", "invalid path '/a?x=1'", "query-in-path"),
    ("urlprefix-/a#frag", "invalid path", "fragment-in-path"),
    ("fabio-/api", "not a route tag", "wrong-prefix"),
    ("urlprefix-/api sni=*.example.com", "sni='*.example.com' must be a host name", "sni-wildcard"),
    ("urlprefix-/api method=GET|", "method='GET|': '' is not a method", "empty-method"),
    ("urlprefix-/api cookie=a~x", "regular expressions are for headers only", "cookie-regex"),
    ("urlprefix-/api header=X-A~(", "bad regular expression", "bad-header-regex"),
    ("urlprefix-/old redirect=200,/new", "redirect='200,/new' must be CODE,URL with CODE one of 301",
     "redirect-code"),
    ("urlprefix-/old redirect=301,new", "the target must be an http(s) URL or a path", "redirect-target"),
    ("urlprefix-/api prepend=/a/../b", "prepend='/a/../b' must be a path starting with '/'", "prepend-dot-segment"),
    ("urlprefix-/api host=*.example.com", "host='*.example.com' must be a host name", "host-wildcard"),
    ("urlprefix-/api exact=yes", "exact='yes' must be true or false", "exact-not-boolean"),
    ("urlprefix-/api priority=1001", "priority='1001' must be a whole number from -1000 to 1000",
     "priority-out-of-range"),
    ("urlprefix-/api priority=--5", "priority='--5' must be a whole number", "priority-two-signs"),
    ("urlprefix-/api maxbody=lots", "'lots' is not a size", "maxbody-not-a-size"),
    ("urlprefix-/api health_path=h", "health_path= is a service setting", "service-setting-in-a-tag-refused"),
]


class TestParseValidTags:
    """A well-formed tag becomes a RouteSpec with a lower-case host, a normalized prefix and its options."""

    @pytest.mark.parametrize(("tag", "expected"), [(t, s) for t, s, _ in VALID], ids=[i for *_, i in VALID])
    def test_tag_to_route_spec(self, tag: str, expected: RouteSpec) -> None:
        assert parse_route_tag(tag) == expected

    def test_custom_prefix(self) -> None:
        assert parse_route_tag("route=/api", prefix="route=") == RouteSpec(host="", path="/api")

    def test_same_options_in_another_order_are_the_same_spec(self) -> None:
        assert parse_route_tag("urlprefix-/v1 strip=/v1 proto=https") == parse_route_tag(
            "urlprefix-/v1 proto=https strip=/v1")


class TestParseMalformedTags:
    """A malformed tag raises TagError whose message names the offending part."""

    @pytest.mark.parametrize(
        ("tag", "message"), [(t, m) for t, m, _ in MALFORMED], ids=[i for *_, i in MALFORMED]
    )
    def test_raises_with_helpful_message(self, tag: str, message: str) -> None:
        with pytest.raises(TagError) as info:
            parse_route_tag(tag)
        assert message in str(info.value)

    def test_tag_error_is_a_value_error(self) -> None:
        assert issubclass(TagError, ValueError)


def tcp(host: str = "", port: int = 0, /, **options: Any) -> RouteSpec:
    """The RouteSpec of a TCP route (no path)."""
    return RouteSpec(host=host, path="", options=RouteOptions(proto="tcp", **options), port=port)


class TestTcpRoutes:
    """`proto=tcp` routes (Fabio's syntax): `:PORT` for a TCP listener, `HOST/` for an SNI listener."""

    @pytest.mark.parametrize(
        ("tag", "expected"),
        [
            ("urlprefix-:6379 proto=tcp", tcp("", 6379)),
            ("urlprefix-:6379   proto=tcp lb=hash", tcp("", 6379, lb="hash")),
            ("urlprefix-Db.Example.com/ proto=tcp", tcp("db.example.com")),
            ("urlprefix-*.example.com/ proto=tcp", tcp("*.example.com")),
            ("urlprefix-:5432 proto=tcp pxyproto=v2", tcp("", 5432, proxy_protocol=2)),
            ("urlprefix-:5432 proto=tcp pxyproto=v1", tcp("", 5432, proxy_protocol=1)),
            ("urlprefix-:5432 proto=tcp pxyproto=true", tcp("", 5432, proxy_protocol=1)),
            ("urlprefix-:5432 proto=tcp connect_timeout=0.5", tcp("", 5432, connect_timeout=0.5)),
            ("urlprefix-:5432 proto=tcp allow=ip:10.0.0.0/8", tcp("", 5432, access=("allow", ("10.0.0.0/8",)))),
            ("urlprefix-:5432 proto=tcp lb=hash hash_key=ip", tcp("", 5432, lb="hash", hash_on=("ip", ""))),
            ("urlprefix-:5432 proto=tcp weight=0.25", tcp("", 5432, weight=0.25)),
        ],
        ids=["port", "port-with-lb", "sni-host-lower-cased", "sni-wildcard", "pxyproto-v2", "pxyproto-v1",
             "pxyproto-true-is-fabio-v1", "connect-timeout", "allow", "hash-on-ip", "weight"],
    )
    def test_tcp_tag_to_route_spec(self, tag: str, expected: RouteSpec) -> None:
        """A TCP route tag parses to a RouteSpec without a path."""
        assert parse_route_tag(tag) == expected

    @pytest.mark.parametrize(
        ("tag", "message"),
        [
            ("urlprefix-:6379 proto=tcp strip=/a", "strip= has no meaning on a TCP route"),
            ("urlprefix-:6379 proto=tcp header=X-A:1", "header= has no meaning on a TCP route"),
            ("urlprefix-db.example.com/x proto=tcp", "a byte stream has no path"),
            ("urlprefix-db.example.com proto=tcp", "write :PORT (a TCP listener) or HOST/"),
            ("urlprefix-db.example.com:443/ proto=tcp", "write :PORT (a TCP listener) or HOST/"),
            ("urlprefix-:0 proto=tcp", "invalid port"),
            ("urlprefix-:6379 proto=tcp hash_key=header:x", "hash_key= on a TCP route can only be ip"),
            ("urlprefix-:6379 proto=tcp pxyproto=v3", "pxyproto='v3' must be v1 or v2"),
            ("urlprefix-/api pxyproto=v1", "the PROXY header is for TCP routes"),
        ],
        ids=["strip", "condition", "sni-with-path", "sni-without-slash", "sni-with-port", "port-zero",
             "hash-on-header", "pxyproto-v3", "pxyproto-on-http"],
    )
    def test_refused(self, tag: str, message: str) -> None:
        """A TCP route with an option a byte stream cannot honour, or a malformed target, is refused by name."""
        with pytest.raises(TagError, match=re.escape(message)):
            parse_route_tag(tag)


class TestUnknownOptions:
    """An option Ferryman does not implement makes the whole tag invalid, with a message naming it: a Fabio tag
    means the same here or is refused, never a route that quietly behaves otherwise."""

    @pytest.mark.parametrize(
        ("tag", "named"),
        [
            ("urlprefix-/api auth=basic", "auth="),
            ("urlprefix-/api strip=/api tls=auto", "tls="),
            ("urlprefix-/api register=web", "register="),
            ("urlprefix-/api pxyproto=true", "pxyproto="),
            ("urlprefix-/api health_path=/health", "health_path="),
        ],
        ids=["fabio-auth", "unknown-after-known", "fabio-register", "fabio-pxyproto", "service-setting"],
    )
    def test_refuses_unknown(self, tag: str, named: str) -> None:
        with pytest.raises(TagError, match=named):
            parse_route_tag(tag)


class TestHelpers:
    """Tag recognition and prefix normalization used by the snapshot builder."""

    @pytest.mark.parametrize(
        ("tag", "expected"),
        [
            ("urlprefix-/api", True),
            ("urlprefix-bad tag", True),
            ("metrics", False),
            ("URLPREFIX-/api", False),
        ],
        ids=["route", "malformed-route-still-a-route-tag", "plain-tag", "prefix-is-case-sensitive"],
    )
    def test_is_route_tag(self, tag: str, expected: bool) -> None:
        assert is_route_tag(tag) is expected

    @pytest.mark.parametrize(
        ("path", "expected"),
        [("/", "/"), ("/api", "/api"), ("/api/", "/api"), ("/api//", "/api"), ("//", "/")],
        ids=["root", "plain", "trailing-slash", "trailing-slashes", "only-slashes"],
    )
    def test_normalize_prefix(self, path: str, expected: str) -> None:
        assert normalize_prefix(path) == expected


SERVICE_SETTINGS = [
    ("lb", "weighted", ServiceSettings(lb="weighted"), "lb"),
    ("hash_key", "header:X-User", ServiceSettings(hash_on=("header", "x-user")), "hash-key-header-lower-cased"),
    ("hash_key", "cookie:Sid", ServiceSettings(hash_on=("cookie", "Sid")), "hash-key-cookie"),
    ("sticky", "srv", ServiceSettings(sticky="srv"), "sticky"),
    ("health_path", "/healthz?full=1", ServiceSettings(health_path="/healthz?full=1"), "health-path-with-query"),
    ("max_body_size", "512k", ServiceSettings(max_body=512 * 1024), "max-body-size-in-bytes"),
    ("max_concurrent", "0", ServiceSettings(max_concurrent=0), "max-concurrent-zero-is-set"),
    ("read_timeout", "360", ServiceSettings(read_timeout=360.0), "read-timeout-seconds"),
    ("read_timeout", "0.5", ServiceSettings(read_timeout=0.5), "read-timeout-fraction"),
    ("connect_timeout", "2", ServiceSettings(connect_timeout=2.0), "connect-timeout-seconds"),
]
BAD_SERVICE_SETTINGS = [
    ("lb", "fastest", "lb='fastest' must be one of round_robin", "unknown-lb"),
    ("hash_key", "body", "hash_key='body' must be ip, header:NAME or cookie:NAME", "bad-hash-key"),
    ("sticky", "a b", "sticky='a b' must be a cookie name", "sticky-not-a-cookie-name"),
    ("health_path", "healthz", "health_path='healthz' must be a path starting with '/'", "health-path-relative"),
    ("max_body_size", "lots", "'lots' is not a size", "max-body-size-not-a-size"),
    ("max_concurrent", "²", "max_concurrent='²' must be a whole number (0: no limit)", "max-concurrent-superscript"),
    ("weight", "3", "unknown service setting 'weight': one of lb, hash_key", "unknown-setting"),
    ("read_timeout", "0", "read_timeout='0' must be a number of seconds above 0", "read-timeout-zero"),
    ("read_timeout", "-5", "read_timeout='-5' must be a number of seconds above 0", "read-timeout-negative"),
    ("read_timeout", "nan", "read_timeout='nan' must be a number of seconds", "read-timeout-nan"),
    ("read_timeout", "inf", "read_timeout='inf' must be a number of seconds", "read-timeout-infinite"),
    ("read_timeout", "86401", "at most 86400", "read-timeout-over-a-day"),
    ("connect_timeout", "5s", "connect_timeout='5s' must be a number of seconds", "connect-timeout-with-unit"),
    ("connect_timeout", " 5", "connect_timeout=' 5' must be a number of seconds", "connect-timeout-blank"),
]


class TestServiceSettings:
    """A per-service setting (service meta, a config file's [services.NAME]) in, a typed ServiceSettings out."""

    @pytest.mark.parametrize(("key", "value", "expected"), [c[:3] for c in SERVICE_SETTINGS],
                             ids=[c[3] for c in SERVICE_SETTINGS])
    def test_setting_to_service_settings(self, key: str, value: str, expected: ServiceSettings) -> None:
        assert with_service_setting(ServiceSettings(), key, value) == expected

    @pytest.mark.parametrize(("key", "value", "message"), [c[:3] for c in BAD_SERVICE_SETTINGS],
                             ids=[c[3] for c in BAD_SERVICE_SETTINGS])
    def test_bad_setting_raises_with_helpful_message(self, key: str, value: str, message: str) -> None:
        with pytest.raises(TagError) as info:
            with_service_setting(ServiceSettings(), key, value)
        assert message in str(info.value)

    def test_settings_accumulate(self) -> None:
        settings = with_service_setting(ServiceSettings(lb="hash"), "sticky", "s")
        assert settings == ServiceSettings(lb="hash", sticky="s")
