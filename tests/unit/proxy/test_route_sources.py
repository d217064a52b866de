"""Route sources: each (Consul KV, the config file, tags and meta) is a whole part of the routed world; one pure
merge takes them in order of precedence, KV > file > tags, and the first declaration of a route wins."""

from __future__ import annotations

import pytest

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.config import parse_route_entry
from proxy.table import Route, RoutedWorld, RoutePart, RoutingTable, merge_routes


def route(service: str, tag: str) -> Route:
    return Route.from_spec(service, parse_route_tag("urlprefix-" + tag))


def part(source: str, *routes: tuple[str, str]) -> RoutePart:
    return RoutePart(source, tuple(route(service, tag) for service, tag in routes))


class TestMerge:
    """Parts in, merged routes and conflicts out."""

    @pytest.mark.parametrize(
        ("parts", "kept", "conflicts"),
        [
            ([part("tags", ("web", "/"), ("api", "/api"))], ["web@*any*/", "api@*any*/api"], []),
            ([part("tags", ("shop-old", "/shop")), part("file", ("shop", "/shop"))],
             ["shop@*any*/shop"], ["shop-old@*any*/shop"]),
            ([part("tags", ("a", "/x")), part("file", ("b", "/x")), part("kv", ("c", "/x"))],
             ["c@*any*/x"], ["b@*any*/x", "a@*any*/x"]),
            ([part("kv", ("c", "/x")), part("tags", ("a", "/x")), part("file", ("b", "/x"))],
             ["c@*any*/x"], ["b@*any*/x", "a@*any*/x"]),
            ([part("tags", ("a", "/x")), part("kv", ("c", "/x header=X-Canary:1"))],
             ["c@*any*/x[header:x-canary:1]", "a@*any*/x"], []),
            ([part("tags", ("a", "/x"), ("a", "/x strip=/x"))], ["a@*any*/x"], ["a@*any*/x"]),
            ([part("file", ("a", "h.example.com/x")), part("tags", ("b", "/x"))],
             ["a@h.example.com/x", "b@*any*/x"], []),
            ([part("kv"), part("file"), part("tags")], [], []),
        ],
        ids=["tags-alone", "file-over-tags", "kv-over-file-over-tags", "precedence-whatever-the-order",
             "other-conditions-do-not-conflict", "first-in-a-part-wins", "other-host-does-not-conflict",
             "empty-parts"],
    )
    def test_merge(self, parts: list[RoutePart], kept: list[str], conflicts: list[str]) -> None:
        routes, problems = merge_routes(parts)
        assert [r.id for r in routes] == kept
        assert [p.item for p in problems] == conflicts
        assert all(p.kind == "route_conflict" for p in problems)


SNAPSHOT = Snapshot((
    ServiceRoutes("shop", (parse_route_tag("urlprefix-/shop"),), (Endpoint("shop", "s1", "127.0.0.1", 1),)),
))


class TestRoutedWorld:
    """The world is one value: the snapshot, and each declared part replaced as a whole."""

    def test_table_is_built_from_the_world_alone(self) -> None:
        kv = RoutePart.declared("kv", [parse_route_entry({"route": "/shop", "split": {"shop": 9, "canary": 1}}, "k")])
        world = RoutedWorld(SNAPSHOT).with_part(kv)
        table = RoutingTable.from_snapshot(world, 4)
        shop = table.lookup("h", "/shop")
        assert shop is not None and shop.split and table.generation == 4
        assert [p.item for p in table.conflicts] == ["shop@*any*/shop"]

    def test_a_new_part_replaces_that_source_only(self) -> None:
        world = RoutedWorld(SNAPSHOT, (part("file", ("a", "/a")), part("kv", ("b", "/b"))))
        world = world.with_part(part("kv", ("c", "/c")))
        assert sorted(p.source for p in world.parts) == ["file", "kv"]
        assert world.named == {"a", "c"}

    def test_named_services_include_every_service_of_a_split(self) -> None:
        entry = parse_route_entry({"route": "/x", "split": {"blue": 1, "green": 1}}, "f")
        assert RoutedWorld(parts=(RoutePart.declared("file", [entry]),)).named == {"blue", "green"}

    def test_tags_are_not_named(self) -> None:
        """Services routed by their tags are followed by the watcher already; only declared parts are named."""
        assert RoutedWorld(SNAPSHOT).named == frozenset()
