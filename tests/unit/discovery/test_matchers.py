"""Route conditions (method, header, cookie, query, exact path, priority) and their precedence, table-driven."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from discovery.matchers import parse_conditions, parse_methods
from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import TagError, parse_route_tag
from proxy.table import RoutingTable


@dataclass
class Req:
    method: str = "GET"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    target: bytes = b"/"


def table(*routes: tuple[str, str]) -> RoutingTable:
    by_service: dict[str, list[str]] = {}
    for service, tag in routes:
        by_service.setdefault(service, []).append(tag)
    return RoutingTable.from_snapshot(Snapshot(tuple(
        ServiceRoutes(name, tuple(parse_route_tag("urlprefix-" + t) for t in tags),
                      (Endpoint(name, f"{name}-1", "127.0.0.1", 1),))
        for name, tags in sorted(by_service.items())
    )), 1)


WORLD = table(
    ("stable", "/app"),
    ("canary", "/app header=X-Canary:1"),
    ("curl", "/app header=User-Agent~^curl/"),
    ("beta", "/app cookie=beta:1"),
    ("writer", "/app method=POST|PUT"),
    ("v2", "/app query=v:2"),
    ("both", "/app header=X-Canary:1;X-Region:eu"),
    ("exact", "/app/health exact=true"),
    ("health-prefix", "/app/health"),
    ("low", "/prio priority=-5 header=X-A"),
    ("high", "/prio priority=5 header=X-B"),
    ("shop", "shop.example.com/app header=X-Canary:1"),
)


@pytest.mark.parametrize("host, path, req, service", [
    ("any", "/app", Req(), "stable"),
    ("any", "/app", Req(headers=[(b"X-Canary", b"1")]), "canary"),
    ("any", "/app", Req(headers=[(b"x-canary", b"1"), (b"X-Region", b"eu")]), "both"),  # more conditions first
    ("any", "/app", Req(headers=[(b"X-Canary", b"2")]), "stable"),
    ("any", "/app", Req(headers=[(b"User-Agent", b"curl/8.0")]), "curl"),
    ("any", "/app", Req(headers=[(b"User-Agent", b"Mozilla curl/8.0")]), "stable"),
    ("any", "/app", Req(headers=[(b"Cookie", b"a=b; beta=1")]), "beta"),
    ("any", "/app", Req(headers=[(b"Cookie", b"beta=0")]), "stable"),
    ("any", "/app", Req(method="PUT"), "writer"),
    ("any", "/app", Req(target=b"/app?v=2&x=1"), "v2"),
    ("any", "/app", Req(target=b"/app?v=3"), "stable"),
    ("any", "/app/health", Req(), "exact"),
    ("any", "/app/health/x", Req(), "health-prefix"),
    ("any", "/prio", Req(headers=[(b"X-A", b""), (b"X-B", b"")]), "high"),  # equal conditions: priority
    ("any", "/prio", Req(headers=[(b"X-A", b"")]), "low"),
    ("shop.example.com", "/app", Req(headers=[(b"X-Canary", b"1")]), "shop"),
    ("shop.example.com", "/app", Req(), "stable"),  # the host level has no route for it: falls through
])
def test_conditions_and_precedence(host: str, path: str, req: Req, service: str) -> None:
    route = WORLD.lookup(host, path, req)
    assert route is not None and route.service == service


def test_answers_with_conditions_are_not_memoized() -> None:
    world = table(("stable", "/m"), ("canary", "/m header=X-Canary:1"))
    routes = [world.lookup("h", "/m", Req()), world.lookup("h", "/m", Req(headers=[(b"X-Canary", b"1")])),
              world.lookup("h", "/m", None)]
    assert [route.service if route else None for route in routes] == ["stable", "canary", "stable"]


def test_routes_are_listed_in_match_order_and_ids_name_the_conditions() -> None:
    ids = [r.id for r in WORLD.routes]
    assert ids.index("shop@shop.example.com/app[header:x-canary:1]") == 0  # exact host first
    assert ids.index("exact@*any*/app/health[exact]") < ids.index("health-prefix@*any*/app/health")
    both, canary = "both@*any*/app[header:x-canary:1,header:x-region:eu]", "canary@*any*/app[header:x-canary:1]"
    assert ids.index(both) < ids.index(canary)
    assert ids[-1] == "stable@*any*/app"


def test_same_conditions_twice_is_shared_different_ones_are_not() -> None:
    world = table(("a", "/c header=X:1"), ("b", "/c header=X:1"), ("c", "/c header=X:2"))
    assert world.conflicts == ()
    assert sorted(r.id for r in world.routes) == ["a+b@*any*/c[header:x:1]", "c@*any*/c[header:x:2]"]


@pytest.mark.parametrize("tag, error", [
    ("urlprefix-/x method=GET|", "is not a method"),
    ("urlprefix-/x header=X~(", "bad regular expression"),
    ("urlprefix-/x header=", "empty condition"),
    ("urlprefix-/x cookie=a~b", "regular expressions are for headers only"),
    ("urlprefix-/x exact=yes", "must be true or false"),
    ("urlprefix-/x priority=high", "whole number"),
    ("urlprefix-/x header=bad name", "not key=value"),
])
def test_bad_conditions_are_tag_errors(tag: str, error: str) -> None:
    with pytest.raises(TagError, match=error):
        parse_route_tag(tag)


def test_parsing() -> None:
    assert parse_methods("get|Post") == frozenset({"GET", "POST"})
    (a, b, c) = parse_conditions("header", "X-A;X-B:1;X-C~^v")
    assert (a.op, b.op, b.value, c.op, c.name) == ("present", "equals", "1", "regex", "x-c")


def test_redirect_option() -> None:
    route = table(("old", "/old redirect=301,https://new.example.com$path")).lookup("h", "/old/x", None)
    assert route is not None and route.redirect == (301, "https://new.example.com$path")
    assert route.location("/old/x", "q=1", "h") == b"https://new.example.com/old/x?q=1"
    for bad in ("redirect=300,https://x", "redirect=https://x", "redirect=301,ftp://x", "redirect=301,"):
        with pytest.raises(TagError, match="redirect="):
            parse_route_tag(f"urlprefix-/old {bad}")
