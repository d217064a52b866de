"""Fabio's path matchers in the routing table: prefix, iprefix and glob, globally (path_matcher) and per route
(matcher=), tried in Fabio's order (route paths in reverse lexicographic order within a host)."""

from __future__ import annotations

import pytest

from discovery.model import ServiceRoutes, Snapshot, SnapshotDelta
from discovery.tags import parse_route_tag
from proxy.levels import Level, PatternLevel
from proxy.table import RoutingTable


def service(name: str, *tags: str, matcher: str = "prefix") -> ServiceRoutes:
    return ServiceRoutes(name, tuple(parse_route_tag(t, matcher=matcher) for t in tags), ())


def table(*services: ServiceRoutes) -> RoutingTable:
    return RoutingTable.from_snapshot(Snapshot(services=services))


def served(world: RoutingTable, path: str, host: str = "h.test") -> str | None:
    route = world.lookup(host, path)
    return route.service if route is not None else None


# Fabio's route/matcher_test.go, one route per case: (matcher, route path, request path, matches, differs).
# `differs`: why Ferryman answers otherwise (its prefix matchers stop at a segment boundary, on purpose).
FABIO_MATCHER_TABLE = [
    ("prefix", "/foo", "/foo", True, ""),
    ("prefix", "/foo", "/fools", False, "Fabio: a string prefix matches /fools; Ferryman: segment boundary"),
    ("prefix", "/foo", "/fo", False, ""),
    ("prefix", "/foo", "/bar", False, ""),
    ("iprefix", "/fool", "/foo", False, ""),
    ("iprefix", "/foo", "/foo", True, ""),
    ("iprefix", "/foo", "/Fool", False, "Fabio: a string prefix matches /Fool; Ferryman: segment boundary"),
    ("iprefix", "/Foo", "/foo", True, ""),
    ("glob", "/foo", "/foo", True, ""),
    ("glob", "/foo?", "/fool", True, ""),
    ("glob", "/foo*", "/fool", True, ""),
    ("glob", "/foo*", "/fools", True, ""),
    ("glob", "/foo/*/bar", "/foo/x/bar", True, ""),
    ("glob", "/foo/**", "/foo/x/y/z/w/bar", True, ""),
    ("glob", "/foo/**/bar", "/foo/x/y/z/w/bar", True, ""),
    ("glob", "/foo", "/fo", False, ""),
    ("glob", "/foo", "/fools", False, ""),
    ("glob", "/foo*", "/fo", False, ""),
    ("glob", "/foo.*", "/fools", False, ""),
    ("glob", "/foo/**/bar", "/foo/x/y/z/w/baz", False, ""),
    # Beyond Fabio's table: what iprefix adds to prefix.
    ("iprefix", "/foo", "/FOO/bar", True, ""),
    ("iprefix", "/API/v1", "/api/V1/users", True, ""),
]


class TestFabioMatcherTable:
    """Every row of Fabio's matcher tables, as a route in a table (globally and per route)."""

    @pytest.mark.parametrize("matcher, route, path, matches, differs", FABIO_MATCHER_TABLE,
                             ids=[f"{m}:{r}~{p}" for m, r, p, _, _ in FABIO_MATCHER_TABLE])
    def test_global_matcher(self, matcher: str, route: str, path: str, matches: bool, differs: str) -> None:
        """With `path_matcher` set, a plain tag matches as that matcher does."""
        world = table(service("hit", f"urlprefix-h.test{route}", matcher=matcher))
        assert (served(world, path) == "hit") is matches

    @pytest.mark.parametrize("matcher, route, path, matches, differs", FABIO_MATCHER_TABLE,
                             ids=[f"{m}:{r}~{p}" for m, r, p, _, _ in FABIO_MATCHER_TABLE])
    def test_route_option(self, matcher: str, route: str, path: str, matches: bool, differs: str) -> None:
        """`matcher=` on the tag does the same whatever the global matcher."""
        world = table(service("hit", f"urlprefix-h.test{route} matcher={matcher}", matcher="prefix"))
        assert (served(world, path) == "hit") is matches


# Fabio sorts a host's routes by path text, descending, and takes the first that matches.
GLOB_ORDER = table(
    service("foo-bar", "urlprefix-/foo/bar", matcher="glob"),
    service("foo-star", "urlprefix-/foo/*", matcher="glob"),
    service("foo-super", "urlprefix-/foo/**/z", matcher="glob"),
    service("star", "urlprefix-/*", matcher="glob"),
    service("api", "urlprefix-/api", matcher="glob"),
)


@pytest.mark.parametrize("path, expected", [
    ("/foo/bar", "foo-bar"),  # "/foo/bar" > "/foo/**/z" > "/foo/*"
    ("/foo/x/z", "foo-super"),
    ("/foo/x", "foo-star"),
    ("/api", "api"),
    ("/api/x", "star"),  # a glob matches the whole path: /api is not a prefix here
    ("/", "star"),
], ids=["literal-first", "super-before-star", "star", "literal-whole-path", "glob-is-not-a-prefix", "catch-all"])
def test_glob_routes_are_tried_in_fabios_order(path: str, expected: str) -> None:
    """Glob routes of a host are tried by path text, descending, as Fabio sorts them."""
    assert served(GLOB_ORDER, path) == expected


def test_iprefix_routes_are_tried_in_fabios_order_even_where_not_the_longest() -> None:
    """Fabio orders iprefix routes by their text as written, descending: `/foo` comes before `/Foo/Bar` ('f' is
    above 'F'), so a request for /FOO/BAR/x takes `/foo` there, and here too."""
    world = table(service("short", "urlprefix-/foo", matcher="iprefix"),
                  service("long", "urlprefix-/Foo/Bar", matcher="iprefix"))
    assert served(world, "/FOO/BAR/x") == "short"
    same_case = table(service("short", "urlprefix-/foo", matcher="iprefix"),
                      service("long", "urlprefix-/foo/bar", matcher="iprefix"))
    assert served(same_case, "/FOO/BAR/x") == "long"


@pytest.mark.parametrize("path, expected", [
    ("/api/v1/users", "users"),
    ("/api/v1/other", "api"),
    ("/API/x", "legacy"),
    ("/other", "catch-all"),
    ("/api", "api"),
], ids=["glob-sorts-before-shorter-prefix", "prefix-when-glob-misses", "iprefix", "glob-catch-all-last",
        "prefix-before-catch-all"])
def test_mixed_matchers_in_one_level_follow_one_order(path: str, expected: str) -> None:
    """Per-route matchers share a level: every path text in descending order, whatever its matcher."""
    world = table(
        service("api", "urlprefix-/api"),
        service("users", "urlprefix-/api/*/users matcher=glob"),
        service("legacy", "urlprefix-/API matcher=iprefix"),
        service("catch-all", "urlprefix-/* matcher=glob"),
    )
    assert served(world, path) == expected


def test_host_levels_keep_their_order_with_patterns() -> None:
    """A host's glob routes come before the routes for any host; a host level without a match falls through."""
    world = table(service("host-glob", "urlprefix-h.test/a* matcher=glob"), service("any", "urlprefix-/"))
    assert [served(world, p) for p in ("/abc", "/b")] == ["host-glob", "any"]
    assert served(world, "/abc", host="other.test") == "any"


def test_levels_without_patterns_keep_the_dictionary_lookup() -> None:
    """Only a level holding glob or iprefix routes is a PatternLevel: prefix levels are looked up as before."""
    world = table(service("api", "urlprefix-/api"), service("g", "urlprefix-g.test/x* matcher=glob"))
    assert type(world.any_host) is Level
    assert isinstance(world.exact["g.test"], PatternLevel)


def test_conditions_order_routes_at_one_glob() -> None:
    """At one glob, a route with conditions is tried first, as at a prefix."""
    world = table(service("plain", "urlprefix-/g/* matcher=glob"),
                  service("canary", "urlprefix-/g/* matcher=glob header=X-Canary:1"))
    assert served(world, "/g/x") == "plain"
    assert world.routes[0].service == "canary"


def test_route_ids_say_the_matcher() -> None:
    """A glob and a prefix route with the same text are two routes, and their ids tell them apart."""
    world = table(service("a", "urlprefix-/x"), service("b", "urlprefix-/x matcher=glob"))
    assert sorted(r.id for r in world.routes) == ["a@*any*/x", "b@*any*/x[glob]"]
    assert world.conflicts == ()


def test_an_update_with_pattern_routes_equals_a_rebuild() -> None:
    """Adding and removing glob and iprefix routes by delta answers as a table built whole."""
    before = Snapshot(services=(service("api", "urlprefix-/api"),))
    added = (service("g", "urlprefix-/a* matcher=glob"), service("i", "urlprefix-/API/v matcher=iprefix"))
    after = before.apply(SnapshotDelta(changed=added))
    updated = table(*before.services).updated(before, SnapshotDelta(changed=added), 2)
    rebuilt = RoutingTable.from_snapshot(after, 2)
    paths = ("/api", "/api/v/x", "/abc", "/API/V", "/x")
    # "/api" sorts above "/API/v": the prefix route is tried first for /api/v/x, as Fabio would.
    assert [served(updated, p) for p in paths] == [served(rebuilt, p) for p in paths] == ["api", "api", "g", "i", None]
    gone = updated.updated(after, SnapshotDelta(removed=("g", "i")), 3)
    assert [served(gone, p) for p in paths] == ["api", "api", None, None, None]
    assert type(gone.any_host) is Level
