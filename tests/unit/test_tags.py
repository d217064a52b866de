"""Route tags in Fabio's syntax: a tag in, a RouteSpec out, or a TagError that says what is wrong."""

from __future__ import annotations

import pytest

from discovery.model import RouteSpec
from discovery.tags import TagError, is_route_tag, normalize_prefix, parse_route_tag, unknown_options

VALID = [
    ("urlprefix-/api lb=least_conn", RouteSpec(host="", path="/api", options=(("lb", "least_conn"),)),
     "lb-option"),
    ("urlprefix-/api lb=hash hash_key=cookie:session",
     RouteSpec(host="", path="/api", options=(("lb", "hash"), ("hash_key", "cookie:session"))), "hash-on-cookie"),
    ("urlprefix-/api", RouteSpec(host="", path="/api"), "any-host-path-prefix"),
    ("urlprefix-/", RouteSpec(host="", path="/"), "any-host-every-path"),
    ("urlprefix-api.example.com/", RouteSpec(host="api.example.com", path="/"), "one-host-every-path"),
    (
        "urlprefix-*.example.com/v1 strip=/v1",
        RouteSpec(host="*.example.com", path="/v1", options=(("strip", "/v1"),)),
        "wildcard-host-with-strip",
    ),
    ("urlprefix-api.example.com:8443/", RouteSpec(host="api.example.com", path="/"), "host-port-dropped"),
    ("urlprefix-API.Example.COM/", RouteSpec(host="api.example.com", path="/"), "host-lower-cased"),
    ("urlprefix-*.Example.com/", RouteSpec(host="*.example.com", path="/"), "wildcard-host-lower-cased"),
    ("urlprefix-/Api/V1", RouteSpec(host="", path="/Api/V1"), "path-case-kept"),
    ("urlprefix-/api/", RouteSpec(host="", path="/api"), "trailing-slash-normalized"),
    (
        "urlprefix-/api/ strip=/api/",
        RouteSpec(host="", path="/api", options=(("strip", "/api"),)),
        "strip-trailing-slash-normalized",
    ),
    (
        "urlprefix-/api/v1 strip=/api",
        RouteSpec(host="", path="/api/v1", options=(("strip", "/api"),)),
        "strip-shorter-than-path",
    ),
    ("urlprefix-/ proto=https", RouteSpec(host="", path="/", options=(("proto", "https"),)), "proto-https"),
    ("urlprefix-/ proto=http", RouteSpec(host="", path="/", options=(("proto", "http"),)), "proto-http"),
    (
        "urlprefix-/ proto=https tlsskipverify=true",
        RouteSpec(host="", path="/", options=(("proto", "https"), ("tlsskipverify", "true"))),
        "tlsskipverify-true",
    ),
    (
        "urlprefix-/ tlsskipverify=false",
        RouteSpec(host="", path="/", options=(("tlsskipverify", "false"),)),
        "tlsskipverify-false",
    ),
    (
        "urlprefix-/api auth=basic",
        RouteSpec(host="", path="/api", options=(("auth", "basic"),)),
        "unknown-option-kept",
    ),
    ("urlprefix-/api   strip=/api", RouteSpec("", "/api", (("strip", "/api"),)), "several-blanks"),
    ("urlprefix-svc_a.internal/", RouteSpec(host="svc_a.internal", path="/"), "underscore-in-host"),
    ("urlprefix-/.well-known", RouteSpec(host="", path="/.well-known"), "dot-in-segment-is-not-dot-segment"),
]

MALFORMED = [
    ("urlprefix-/api sticky=a;b", "sticky='a;b' must be a cookie name", "sticky-not-a-cookie-name"),
    ("urlprefix-/api lb=fastest", "lb='fastest' must be one of round_robin", "unknown-lb"),
    ("urlprefix-/api lb=hash hash_key=body", "hash_key='body' must be ip, header:NAME or cookie:NAME",
     "bad-hash-key"),
    ("urlprefix-/api lb=hash hash_key=header:", "must be ip, header:NAME or cookie:NAME", "hash-key-without-name"),
    ("urlprefix-", "empty route", "empty"),
    ("urlprefix-   ", "empty route", "only-blanks"),
    ("urlprefix-foo", "has no path: write foo/", "no-path"),
    ("urlprefix-:3306 proto=tcp", "TCP routes", "tcp-route"),
    ("urlprefix-/api strip", "option 'strip' is not key=value", "option-without-equals"),
    ("urlprefix-/api =x", "is not key=value", "option-without-name"),
    ("urlprefix-/api Strip=/api", "option name 'Strip' is invalid", "option-name-upper-case"),
    ("urlprefix-/api strip=/api strip=/api", "option 'strip' is given twice", "duplicate-option"),
    ("urlprefix-/api strip=/v1", "strip='/v1' is not a prefix of the route path '/api'", "strip-not-prefix"),
    ("urlprefix-/apix strip=/api", "is not a prefix", "strip-not-on-segment-boundary"),
    ("urlprefix-/api strip=api", "strip='api' must start with '/'", "strip-without-slash"),
    ("urlprefix-/api strip=/", "strips nothing", "strip-root"),
    ("urlprefix-/ proto=ftp", "proto='ftp' must be http or https", "proto-ftp"),
    ("urlprefix-/ proto=tcp", "not supported", "proto-tcp"),
    ("urlprefix-/ proto=grpc", "not supported", "proto-grpc"),
    ("urlprefix-/ tlsskipverify=yes", "must be true or false", "tlsskipverify-not-boolean"),
    ("urlprefix-ex!ample.com/", "invalid host 'ex!ample.com'", "bad-host-char"),
    ("urlprefix-a..b/", "invalid host", "empty-host-label"),
    ("urlprefix-*.*.example.com/", "invalid host", "double-wildcard"),
    ("urlprefix-*/", "invalid host", "bare-wildcard"),
    ("urlprefix-host:99999/", "invalid port", "port-out-of-range"),
    ("urlprefix-host:http/", "invalid port", "port-not-a-number"),
    ("urlprefix-/a/../b", "dot-segments", "dot-dot-segment"),
    ("urlprefix-/a/./b", "dot-segments", "dot-segment"),
    ("urlprefix-/a/..", "dot-segments", "trailing-dot-dot-segment"),
    ("urlprefix-/a?x=1", "invalid path '/a?x=1'", "query-in-path"),
    ("urlprefix-/a#frag", "invalid path", "fragment-in-path"),
    ("fabio-/api", "not a route tag", "wrong-prefix"),
]


class TestParseValidTags:
    """A well-formed tag becomes a RouteSpec with a lower-case host, a normalized prefix and its options."""

    @pytest.mark.parametrize(("tag", "expected"), [(t, s) for t, s, _ in VALID], ids=[i for *_, i in VALID])
    def test_tag_to_route_spec(self, tag: str, expected: RouteSpec) -> None:
        assert parse_route_tag(tag) == expected

    def test_custom_prefix(self) -> None:
        assert parse_route_tag("route=/api", prefix="route=") == RouteSpec(host="", path="/api")

    def test_strip_option_is_exposed(self) -> None:
        assert parse_route_tag("urlprefix-/v1 strip=/v1").strip == "/v1"
        assert parse_route_tag("urlprefix-/v1").strip is None


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


class TestUnknownOptions:
    """Options Ferryman does not implement are kept in the spec and reported by name, in tag order."""

    @pytest.mark.parametrize(
        ("tag", "unknown"),
        [
            ("urlprefix-/api", []),
            ("urlprefix-/api strip=/api proto=https tlsskipverify=true", []),
            ("urlprefix-/api auth=basic", ["auth"]),
            ("urlprefix-/api tls=auto strip=/api auth=basic", ["tls", "auth"]),
        ],
        ids=["no-options", "only-known", "one-unknown", "unknown-in-tag-order"],
    )
    def test_reports_unknown(self, tag: str, unknown: list[str]) -> None:
        assert unknown_options(parse_route_tag(tag)) == unknown


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
