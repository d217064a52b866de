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
    ("urlprefix-/pkg.Service proto=grpc", spec("/pkg.Service", proto="grpc"), "proto-grpc"),
    ("urlprefix-/pkg.Service proto=grpcs tlsskipverify=true sni=api.internal",
     spec("/pkg.Service", proto="grpcs", tls_skip_verify=True, sni="api.internal"), "proto-grpcs-with-tls-options"),
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
    ("urlprefix-/admin auth=ops-team.1", spec("/admin", auth="ops-team.1"), "fabio-auth-realm"),
    ("urlprefix-/api gzip=on", spec("/api", gzip=True), "gzip-on"),
    ("urlprefix-/api gzip=off", spec("/api", gzip=False), "gzip-off"),
    ("urlprefix-/api gzip=true", spec("/api", gzip=True), "gzip-true-is-on"),
]

MALFORMED = [
    ("urlprefix-/api allow=ip:10.0.0.0/8 deny=ip:10.1.0.0/16", "allow= and deny= on the same route",
     "allow-and-deny"),
    ("urlprefix-/api allow=ip:nonsense", "is not ip:ADDRESS or ip:CIDR", "allow-not-an-address"),
    ("urlprefix-/api allow=host:example.com", "is not ip:ADDRESS or ip:CIDR", "allow-unknown-kind"),
    ("urlprefix-/api weight=25", "weight='25' must be a share from 0 to 1", "weight-percent-not-share"),
    ("urlprefix-/api gzip=br", "gzip='br' must be on or off", "gzip-not-on-or-off"),
    ("urlprefix-/api weight=nan", "weight='nan' must be a share", "weight-nan"),
    ("urlprefix-/api auth=a;b", "auth='a;b' must name a realm", "auth-not-a-realm-name"),
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
    ("urlprefix-/ proto=ftp", "proto='ftp' must be http, https, grpc, grpcs or tcp", "proto-ftp"),
    ("urlprefix-/ proto=GRPC", "must be http, https, grpc, grpcs or tcp", "proto-grpc-upper-case"),
    ("urlprefix-/ proto=tcp", "write :PORT (a TCP listener) or HOST/", "proto-tcp-without-port-or-host"),
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
            ("urlprefix-/api strip=/api tls=auto", "tls="),
            ("urlprefix-/api register=web", "register="),
            ("urlprefix-/api pxyproto=true", "pxyproto="),
            ("urlprefix-/api health_path=/health", "health_path="),
        ],
        ids=["unknown-after-known", "fabio-register", "fabio-pxyproto", "service-setting"],
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


# Path matchers: the tag's matcher= (Ferryman's; Fabio has only the global proxy.matcher), else the global one.
MATCHER_TAGS = [
    ("urlprefix-/foo/* matcher=glob", "prefix", "/foo/*", "glob", "option"),
    ("urlprefix-/foo/*", "glob", "/foo/*", "glob", "global"),
    ("urlprefix-/foo/ matcher=glob", "prefix", "/foo/", "glob", "glob-keeps-trailing-slash"),
    ("urlprefix-/foo/", "iprefix", "/foo", "iprefix", "iprefix-normalized-as-a-prefix"),
    ("urlprefix-/fo? matcher=glob", "prefix", "/fo?", "glob", "glob-question-mark"),
    ("urlprefix-/Foo matcher=prefix", "glob", "/Foo", "prefix", "option-beats-global"),
    ("urlprefix-/x exact=true", "glob", "/x", "prefix", "exact-whatever-the-global"),
]


class TestMatchers:
    """A route's path matcher, from its tag or the global path_matcher, and patterns refused at the tag."""

    @pytest.mark.parametrize(("tag", "default", "path", "matcher"), [c[:4] for c in MATCHER_TAGS],
                             ids=[c[4] for c in MATCHER_TAGS])
    def test_matcher_of_a_tag(self, tag: str, default: str, path: str, matcher: str) -> None:
        """The route keeps its path as the matcher reads it, and says which matcher it is."""
        route = parse_route_tag(tag, matcher=default)
        assert (route.path, route.options.matcher) == (path, matcher)

    @pytest.mark.parametrize(("tag", "default", "message"), [
        ("urlprefix-/a[ matcher=glob", "prefix", "matcher=glob"),
        ("urlprefix-/a[", "glob", "path_matcher = glob"),
        ("urlprefix-/a matcher=regex", "prefix", "matcher='regex' must be one of prefix, glob, iprefix"),
        ("urlprefix-/a exact=true matcher=glob", "prefix", "exact=true and matcher=glob"),
        ("urlprefix-/a? matcher=iprefix", "prefix", "'?'"),
    ], ids=["bad-glob-names-the-option", "bad-glob-names-the-setting", "unknown-matcher", "exact-and-glob",
            "question-mark-outside-a-glob"])
    def test_refused(self, tag: str, default: str, message: str) -> None:
        """A route whose pattern cannot be compiled, or whose matcher is unknown, is refused naming it."""
        with pytest.raises(TagError) as info:
            parse_route_tag(tag, matcher=default)
        assert message in str(info.value)

    def test_a_bad_glob_is_a_fine_prefix(self) -> None:
        """Under the default prefix matcher, `[` is an ordinary character of a path, as before."""
        assert parse_route_tag("urlprefix-/a[").path == "/a["


DC1 = {"DC": "dc1"}
# Fabio's registry/consul/routecmd_test.go TestParseTag cases with variables, with Fabio's one variable, $DC.
VARIABLE_TAGS = [
    ("urlprefix-$DC.example.com/", DC1, "dc1.example.com", "/", "host"),
    ("urlprefix-${DC}.example.com/", DC1, "dc1.example.com", "/", "host-braces"),
    ("urlprefix-/$DC/api", {"DC": "EU-1"}, "", "/EU-1/api", "path-keeps-case"),
    ("urlprefix-$DC.example.com/$DC", {"DC": "EU-1"}, "eu-1.example.com", "/EU-1", "host-lower-cased"),
    ("urlprefix-/a$/b", DC1, "", "/a$/b", "dollar-without-a-name-kept"),
    ("urlprefix-/a$", None, "", "/a$", "dollar-at-the-end-kept"),
]


class TestVariables:
    """Fabio's variable expansion in a route's host and path: `$DC`, the declaring instance's datacenter."""

    @pytest.mark.parametrize(("tag", "env", "host", "path"), [c[:4] for c in VARIABLE_TAGS],
                             ids=[c[4] for c in VARIABLE_TAGS])
    def test_expanded(self, tag: str, env: dict[str, str] | None, host: str, path: str) -> None:
        """`$DC` and `${DC}` become the datacenter; the host is lower-cased after, as in Fabio."""
        route = parse_route_tag(tag, env=env)
        assert (route.host, route.path) == (host, path)

    @pytest.mark.parametrize(("tag", "env", "message"), [
        ("urlprefix-/$x", DC1, "$x in '/$x' is not a variable Fabio expands"),
        ("urlprefix-/${HOME}/a", DC1, "$HOME"),
        ("urlprefix-/$1", DC1, "$1"),
        ("urlprefix-/$DCX", DC1, "$DCX"),
        ("urlprefix-/${}", DC1, "'${' without a name"),
        ("urlprefix-/${DC", DC1, "'${' without a name"),
        ("urlprefix-/$DC", None, "known only for routes of instances read from Consul"),
    ], ids=["unknown-name", "unknown-braced", "special-variable", "longer-name", "empty-braces", "open-braces",
            "no-instance"])
    def test_refused_naming_the_variable(self, tag: str, env: dict[str, str] | None, message: str) -> None:
        """A name Fabio does not expand would become "" there (another route): refused, naming it."""
        with pytest.raises(TagError) as info:
            parse_route_tag(tag, env=env)
        assert message in str(info.value)

    def test_redirect_targets_keep_their_request_time_variables(self) -> None:
        """Options are not expanded (Fabio expands host and path only): `$path` and `$host` stay for the request."""
        route = parse_route_tag("urlprefix-$DC.example.com/ redirect=301,https://$host$path", env=DC1)
        assert route.options.redirect == (301, "https://$host$path")
