"""The routing table: a Snapshot in, and for each (Host header, path) the Route a request takes."""

from __future__ import annotations

import pytest

from discovery.model import ServiceRoutes, Snapshot
from discovery.snapshot import build_snapshot
from discovery.tags import parse_route_tag
from proxy.table import Route, RoutingTable, normalize_host


def table(**services: list[str]) -> RoutingTable:
    """A table from {service: [route tags]}; services are put in name order, as build_snapshot does."""
    return RoutingTable.from_snapshot(
        Snapshot(
            services=tuple(
                ServiceRoutes(name, tuple(parse_route_tag(t) for t in tags), ())
                for name, tags in sorted(services.items())
            )
        )
    )


# One table holding every kind of route; each service name says which route it stands for.
WORLD = table(
    exact_root=["urlprefix-api.example.com/"],
    exact_v1=["urlprefix-api.example.com/v1"],
    shop_cart=["urlprefix-shop.example.com/cart"],
    wild=["urlprefix-*.example.com/"],
    wild_eu=["urlprefix-*.eu.example.com/"],
    wild_eu_admin=["urlprefix-*.admin.eu.example.com/admin"],
    any_root=["urlprefix-/"],
    any_api=["urlprefix-/api"],
    any_api_v2=["urlprefix-/api/v2"],
)

PRECEDENCE = [
    ("api.example.com", "/", "exact_root", "exact-host"),
    ("api.example.com", "/v1/users", "exact_v1", "exact-host-longest-prefix"),
    ("api.example.com", "/api", "exact_root", "exact-host-beats-any-host-longer-path"),
    ("a.example.com", "/x", "wild", "wildcard"),
    ("a.b.example.com", "/x", "wild", "wildcard-matches-several-labels"),
    ("a.eu.example.com", "/x", "wild_eu", "longest-wildcard-suffix-first"),
    ("x.admin.eu.example.com", "/admin/users", "wild_eu_admin", "longest-wildcard-with-path"),
    ("x.admin.eu.example.com", "/other", "wild_eu", "wildcard-without-path-falls-to-shorter-wildcard"),
    ("shop.example.com", "/cart/items", "shop_cart", "exact-host-path"),
    ("shop.example.com", "/home", "wild", "exact-host-without-path-falls-to-wildcard"),
    ("example.com", "/x", "any_root", "wildcard-does-not-match-bare-domain"),
    ("other.org", "/api/x", "any_api", "unknown-host-uses-any-host"),
    ("other.org", "/api/v2/x", "any_api_v2", "any-host-longest-prefix"),
    (None, "/api", "any_api", "no-host-header"),
    ("", "/x", "any_root", "empty-host-header"),
    ("API.Example.COM", "/v1", "exact_v1", "host-case-insensitive"),
    ("api.example.com:8080", "/v1", "exact_v1", "host-port-ignored"),
    ("api.example.com.", "/v1", "exact_v1", "host-trailing-dot-ignored"),
    ("A.EU.Example.com:443", "/", "wild_eu", "wildcard-case-and-port"),
    ("[::1]:8080", "/api", "any_api", "ipv6-literal-with-port"),
    ("127.0.0.1:8080", "/", "any_root", "ipv4-literal-with-port"),
]

SEGMENTS = [
    ("/api", "any_api", "exact-prefix"),
    ("/api/", "any_api", "prefix-with-trailing-slash"),
    ("/api/x", "any_api", "below-prefix"),
    ("/api/x/y/z", "any_api", "deep-below-prefix"),
    ("/apix", "any_root", "not-on-segment-boundary"),
    ("/api.json", "any_root", "suffix-not-a-segment"),
    ("/API", "any_root", "path-case-sensitive"),
    ("/api/v2", "any_api_v2", "longer-prefix-wins"),
    ("/api/v20", "any_api", "longer-prefix-on-boundary-only"),
    ("/", "any_root", "root"),
    ("/anything/at/all", "any_root", "root-catches-all"),
    ("", "any_root", "empty-path"),
]


class TestLookupPrecedence:
    """Exact host beats wildcard (longest suffix first), which beats any host; a level without the path falls
    through to the next."""

    @pytest.mark.parametrize(
        ("host", "path", "service"), [c[:3] for c in PRECEDENCE], ids=[c[3] for c in PRECEDENCE]
    )
    def test_lookup(self, host: str | None, path: str, service: str) -> None:
        route = WORLD.lookup(host, path)
        assert route is not None and route.service == service


class TestPathPrefix:
    """Within a host level the longest path prefix on a segment boundary wins; `/` catches everything."""

    @pytest.mark.parametrize(("path", "service"), [c[:2] for c in SEGMENTS], ids=[c[2] for c in SEGMENTS])
    def test_lookup(self, path: str, service: str) -> None:
        route = WORLD.lookup("other.org", path)
        assert route is not None and route.service == service


class TestNoRoute:
    """A request no route covers gets None (the server answers 404)."""

    @pytest.mark.parametrize(
        ("routes", "host", "path"),
        [
            ({}, "a.example.com", "/"),
            ({"api": ["urlprefix-/api"]}, "a.example.com", "/apix"),
            ({"api": ["urlprefix-/api"]}, "a.example.com", "/"),
            ({"wild": ["urlprefix-*.example.com/"]}, "example.com", "/"),
            ({"wild": ["urlprefix-*.example.com/"]}, "a.example.org", "/"),
            ({"exact": ["urlprefix-a.example.com/"]}, "b.example.com", "/"),
            ({"exact": ["urlprefix-a.example.com/"]}, None, "/"),
            ({"exact": ["urlprefix-a.example.com/v1"]}, "a.example.com", "/v2"),
        ],
        ids=[
            "empty-table", "not-on-segment-boundary", "shorter-than-prefix", "wildcard-not-bare-domain",
            "wildcard-other-domain", "other-exact-host", "no-host-header-only-host-routes",
            "exact-host-other-path",
        ],
    )
    def test_no_route(self, routes: dict[str, list[str]], host: str | None, path: str) -> None:
        assert table(**routes).lookup(host, path) is None


class TestNormalizeHost:
    """The Host header becomes a table key: lower case, no port, no trailing dot, IPv6 brackets kept."""

    @pytest.mark.parametrize(
        ("header", "key"),
        [
            ("Example.COM", "example.com"),
            ("example.com:8080", "example.com"),
            ("example.com.", "example.com"),
            (" example.com ", "example.com"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("[2001:DB8::1]:443", "[2001:db8::1]"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("", ""),
            (None, ""),
        ],
        ids=["case", "port", "trailing-dot", "blanks", "ipv6-with-port", "ipv6", "ipv6-upper-case",
             "ipv4-with-port", "empty", "missing"],
    )
    def test_normalize_host(self, header: str | None, key: str) -> None:
        assert normalize_host(header) == key


class TestSharing:
    """Two services declaring the same host and path share it, as Fabio's targets do (issue 15, hazard 8); one
    service declaring it twice with other options is a conflict, the first by options order winning."""

    def test_services_share_whatever_the_catalog_order(self) -> None:
        snapshot = build_snapshot(
            {"zeta": ["urlprefix-/shared", "urlprefix-/zeta"], "alpha": ["urlprefix-/shared/"]},
            {"zeta": [], "alpha": []},
        )
        routes = RoutingTable.from_snapshot(snapshot)
        shared = routes.lookup("h", "/shared")
        assert shared is not None and [s.service for s in shared.shares] == ["alpha", "zeta"]
        assert shared.id == "alpha+zeta@*any*/shared"
        zeta = routes.lookup("h", "/zeta")
        assert zeta is not None and zeta.service == "zeta"
        assert routes.conflicts == ()

    @pytest.mark.parametrize(
        ("tag_a", "tag_b"),
        [
            ("urlprefix-x.example.com/p", "urlprefix-X.example.com/p/"),
            ("urlprefix-*.example.com/p", "urlprefix-*.example.com/p"),
        ],
        ids=["exact-host-same-after-normalizing", "wildcard-host"],
    )
    def test_shared_on_every_host_level(self, tag_a: str, tag_b: str) -> None:
        routes = table(a=[tag_a], b=[tag_b])
        assert [[s.service for s in r.shares] for r in routes.routes] == [["a", "b"]]
        assert routes.conflicts == ()

    def test_one_service_twice_is_a_conflict(self) -> None:
        routes = table(a=["urlprefix-/p", "urlprefix-/p strip=/p"])
        assert [r.id for r in routes.routes] == ["a@*any*/p"] and [p.service for p in routes.conflicts] == ["a"]

    def test_a_port_makes_another_route(self) -> None:
        routes = table(a=["urlprefix-x.example.com:80/ redirect=301,https://x.example.com$path"],
                       b=["urlprefix-x.example.com/"])
        assert routes.conflicts == ()
        assert routes.lookup("x.example.com", "/", None, 80) == routes.routes[0]
        other = routes.lookup("x.example.com", "/", None, 443)
        assert other is not None and other.service == "b"

    @pytest.mark.parametrize(
        ("tag_a", "tag_b"),
        [
            ("urlprefix-x.example.com/p", "urlprefix-/p"),
            ("urlprefix-/p", "urlprefix-/p/q"),
            ("urlprefix-*.example.com/p", "urlprefix-x.example.com/p"),
        ],
        ids=["different-host", "different-path", "wildcard-and-exact"],
    )
    def test_no_conflict(self, tag_a: str, tag_b: str) -> None:
        routes = table(a=[tag_a], b=[tag_b])
        assert routes.conflicts == ()
        assert {r.service for r in routes.routes} == {"a", "b"}


class TestRouteFromSpec:
    """A route carries what the forwarder needs from the tag: strip prefix, scheme and TLS verification."""

    @pytest.mark.parametrize(
        ("tag", "expected"),
        [
            ("urlprefix-/", Route(id="svc@*any*/", service="svc", host="", path="/")),
            (
                "urlprefix-a.example.com/v1 strip=/v1",
                Route(id="svc@a.example.com/v1", service="svc", host="a.example.com", path="/v1",
                      strip="/v1"),
            ),
            (
                "urlprefix-*.example.com/ proto=https tlsskipverify=true",
                Route(id="svc@*.example.com/", service="svc", host="*.example.com", path="/", scheme="https",
                      tls_skip_verify=True),
            ),
            (
                "urlprefix-/ proto=https tlsskipverify=false",
                Route(id="svc@*any*/", service="svc", host="", path="/", scheme="https"),
            ),
        ],
        ids=["plain", "strip", "https-skip-verify", "https-verify"],
    )
    def test_route(self, tag: str, expected: Route) -> None:
        assert table(svc=[tag]).routes == (expected,)

    def test_generation_is_kept(self) -> None:
        assert RoutingTable.from_snapshot(Snapshot(), generation=7).generation == 7


STRIP = [
    ("/v1", "/v1/x?q=1", "/x?q=1", "strip-keeps-query"),
    ("/v1", "/v1/x", "/x", "strip-path"),
    ("/v1", "/v1", "/", "strip-whole-path-gives-root"),
    ("/v1", "/v1/", "/", "strip-with-trailing-slash"),
    ("/v1", "/v1?q=1", "/?q=1", "strip-whole-path-keeps-query"),
    ("/v1", "/v1/a%2Fb?x=%20", "/a%2Fb?x=%20", "strip-keeps-percent-encoding"),
    ("/v1", "/v1x/y", "/v1x/y", "no-strip-off-segment-boundary"),
    ("/v1", "/v1/x?next=/v1/y", "/x?next=/v1/y", "query-never-stripped"),
    ("/api/v1", "/api/v1/users", "/users", "multi-segment-strip"),
    (None, "/v1/x?q=1", "/v1/x?q=1", "no-strip-unchanged"),
    (None, "/a%2Fb/%7Euser?q=a+b&r=%26", "/a%2Fb/%7Euser?q=a+b&r=%26", "no-strip-keeps-exact-bytes"),
]


class TestUpstreamTarget:
    """The target sent upstream is the client's, byte for byte, minus the route's strip prefix if any."""

    @pytest.mark.parametrize(
        ("strip", "target", "upstream"), [c[:3] for c in STRIP], ids=[c[3] for c in STRIP]
    )
    def test_upstream_target(self, strip: str | None, target: str, upstream: str) -> None:
        route = Route(id="r", service="svc", host="", path=strip or "/", strip=strip)
        assert route.upstream_target(target) == upstream
