"""Incremental updates: a table and pools updated by a SnapshotDelta are the table and pools a whole rebuild
gives, while only the changed services are touched."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.model import Endpoint, ServiceRoutes, Snapshot, SnapshotDelta
from discovery.tags import parse_route_tag
from proxy.pool import Pools
from proxy.table import RoutingTable

HOSTS = ("", "a.example.com", "*.example.com")
PATHS = ("/", "/api", "/api/v1", "/web")


def service(name: str, routes: list[tuple[str, str, str]], instances: int) -> ServiceRoutes:
    specs = tuple(sorted({parse_route_tag(f"urlprefix-{h}{p}{' ' + o if o else ''}") for h, p, o in routes},
                         key=lambda s: s.order_key()))
    endpoints = tuple(Endpoint(name, f"{name}-{i}", "127.0.0.1", 9000 + i) for i in range(instances))
    return ServiceRoutes(name, specs, endpoints)


routes_st = st.lists(st.tuples(st.sampled_from(HOSTS), st.sampled_from(PATHS),
                               st.sampled_from(("", "exact=true", "method=GET", "priority=5"))),
                     min_size=1, max_size=3)
services_st = st.dictionaries(st.sampled_from([f"s{i}" for i in range(8)]),
                              st.tuples(routes_st, st.integers(0, 3)), max_size=8)


def snapshot(spec: dict[str, tuple[list[tuple[str, str, str]], int]]) -> Snapshot:
    return Snapshot(tuple(service(n, r, k) for n, (r, k) in sorted(spec.items())))


class TestTable:
    """table.updated(before, delta) == RoutingTable.from_snapshot(before.apply(delta))."""

    @settings(max_examples=200, deadline=None)
    @given(before=services_st, after=services_st)
    def test_update_equals_rebuild(self, before: dict[str, tuple[list[tuple[str, str, str]], int]],
                                   after: dict[str, tuple[list[tuple[str, str, str]], int]]) -> None:
        old, new = snapshot(before), snapshot(after)
        delta = old.delta_to(new)
        assert old.apply(delta) == new
        updated = RoutingTable.from_snapshot(old, 1).updated(old, delta, 2)
        rebuilt = RoutingTable.from_snapshot(new, 2)
        assert (updated.exact, updated.wildcard, updated.any_host) == (rebuilt.exact, rebuilt.wildcard,
                                                                        rebuilt.any_host)
        assert updated.routes == rebuilt.routes
        assert set(updated.conflicts) == set(rebuilt.conflicts)
        for host in ("a.example.com", "b.example.com", "other.org", None):
            for path in ("/", "/api", "/api/v1/x", "/web/y", "/none"):
                assert updated.lookup(host, path) == rebuilt.lookup(host, path)

    def test_untouched_levels_are_shared(self) -> None:
        old = Snapshot(tuple(service(f"s{i}", [(f"h{i}.example.com", "/", "")], 1) for i in range(50)))
        table = RoutingTable.from_snapshot(old, 1)
        delta = SnapshotDelta((service("s7", [("h7.example.com", "/x", "")], 1),), ())
        updated = table.updated(old, delta, 2)
        assert updated.exact["h8.example.com"] is table.exact["h8.example.com"]
        assert updated.lookup("h7.example.com", "/x/1") is not None
        assert updated.lookup("h7.example.com", "/") is None


class TestPools:
    """pools.update(delta) leaves the pools a reconcile of the whole snapshot would, keeping runtime state."""

    def test_update_equals_reconcile(self) -> None:
        rng = random.Random(5)
        old = snapshot({f"s{i}": ([("", f"/p{i}", "")], rng.randint(1, 3)) for i in range(20)})
        new = snapshot({f"s{i}": ([("", f"/p{i}", "")], rng.randint(0, 3)) for i in range(3, 25)})
        by_update, by_reconcile = Pools(), Pools()
        by_update.reconcile(old)
        by_reconcile.reconcile(old)
        kept = by_update.get("s5")
        assert kept is not None
        kept.begin(0.0)  # runtime state must survive an update
        changes = by_update.update(old.delta_to(new))
        by_reconcile.reconcile(new)
        assert {p.service: p.endpoints for p in by_update} == {p.service: p.endpoints for p in by_reconcile}
        assert set(changes.removed) == {"s0", "s1", "s2"} and set(changes.added) >= {"s20", "s24"}
        assert by_update.get("s5") is kept and kept.active == 1

    def test_idle_connections_close_only_for_addresses_no_pool_uses(self) -> None:
        shared = Endpoint("a", "a-1", "127.0.0.1", 9000)
        pools = Pools()
        pools.reconcile(Snapshot((ServiceRoutes("a", (), (shared,)),
                                  ServiceRoutes("b", (), (Endpoint("b", "b-1", "127.0.0.1", 9000),)))))
        pools.take_gone()
        pools.update(SnapshotDelta((), ("a",)))
        assert pools.take_gone() == set()  # b still sends to 127.0.0.1:9000
        pools.update(SnapshotDelta((), ("b",)))
        assert pools.take_gone() == {("127.0.0.1", 9000)}
