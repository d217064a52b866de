"""/api/routes and the status page's routes: every service a route sends to, with its weight and instances."""

from __future__ import annotations

from typing import Any

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.admin import routes_document, status_document
from proxy.listener import Router
from proxy.pool import Pools
from proxy.state import Report
from proxy.table import RoutingTable


def world(*services: tuple[str, str, int]) -> tuple[Router, Pools]:
    """A router and pools for (service, route tag, number of instances)."""
    snapshot = Snapshot(services=tuple(
        ServiceRoutes(name, (parse_route_tag(tag),),
                      tuple(Endpoint(name, f"{name}-{i}", "10.0.0.1", 8000 + i, "n1") for i in range(count)))
        for name, tag, count in services
    ))
    pools = Pools()
    pools.reconcile(snapshot)
    return Router(RoutingTable.from_snapshot(snapshot, 1)), pools


def sides(route: dict[str, Any]) -> list[tuple[str, Any, float, list[str]]]:
    return [(s["name"], s["weight"], s["share"], [i["id"] for i in s["instances"]]) for s in route["services"]]


class TestSharedRoutes:
    """A route several services declare lists each of them, not only the first."""

    def test_shared_by_instance_count(self) -> None:
        """blue (1 instance) and green (3) share by instance count: 25% and 75%, every instance listed."""
        router, pools = world(("blue", "urlprefix-/shop", 1), ("green", "urlprefix-/shop", 3))
        (route,) = routes_document(router, pools)["routes"]
        assert route["id"] == "blue+green@*any*/shop"
        assert sides(route) == [("blue", None, 0.25, ["blue-0"]),
                                ("green", None, 0.75, ["green-0", "green-1", "green-2"])]
        assert [(i["service"], i["id"]) for i in route["instances"]] == [
            ("blue", "blue-0"), ("green", "green-0"), ("green", "green-1"), ("green", "green-2")]

    def test_shared_with_a_fixed_weight(self) -> None:
        """`weight=0.1` on green's tag: green 10%, blue the rest; the weight is shown beside the share."""
        router, pools = world(("blue", "urlprefix-/shop", 2), ("green", "urlprefix-/shop weight=0.1", 1))
        (route,) = routes_document(router, pools)["routes"]
        assert sides(route) == [("blue", None, 0.9, ["blue-0", "blue-1"]), ("green", 0.1, 0.1, ["green-0"])]

    def test_a_side_without_instances_takes_no_share(self) -> None:
        """A side with no healthy instance is listed with a share of 0 and no instances."""
        router, pools = world(("blue", "urlprefix-/shop", 0), ("green", "urlprefix-/shop", 2))
        (route,) = routes_document(router, pools)["routes"]
        assert sides(route) == [("blue", None, 0.0, []), ("green", None, 1.0, ["green-0", "green-1"])]

    def test_a_route_of_one_service_lists_it(self) -> None:
        """The usual route: one service, its share whole, `service` as before."""
        router, pools = world(("web", "urlprefix-/", 1))
        (route,) = routes_document(router, pools)["routes"]
        assert (route["service"], sides(route), route["matcher"]) == ("web", [("web", None, 1.0, ["web-0"])],
                                                                      "prefix")

    def test_the_status_page_names_every_side(self) -> None:
        """/api/status (the status page's data) lists the sides and their weights too."""
        router, _ = world(("blue", "urlprefix-/shop", 1), ("green", "urlprefix-/shop weight=0.25", 1))
        report = Report(synced=True, generation=1, routes=1)
        (route,) = status_document(router, report, "", 0.0, 0.0)["routes"]
        assert route["services"] == [{"name": "blue", "weight": None}, {"name": "green", "weight": 0.25}]
