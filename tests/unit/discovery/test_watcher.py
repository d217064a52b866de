"""The watcher: blocking-query answers in, a new Snapshot out only when the routed world changed; Consul
failures keep the last good snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from discovery.consul import ConsulError
from discovery.model import Snapshot
from discovery.snapshot import build_dc_snapshot, build_snapshot
from discovery.watcher import Watcher

WAIT_S = 5.0  # an upper bound so a broken watcher fails the test instead of hanging it; never asserted on


def instance(service: str, instance_id: str, port: int, status: str = "passing") -> dict[str, Any]:
    return {
        "Node": {"Node": "node-1", "Address": "10.0.0.1"},
        "Service": {"ID": instance_id, "Service": service, "Address": "10.0.0.5", "Port": port},
        "Checks": [
            {"CheckID": "serfHealth", "Status": "passing"},
            {"CheckID": f"service:{instance_id}", "Status": status},
        ],
    }


CATALOG: dict[str, list[str]] = {
    "web": ["urlprefix-/"],
    "api": ["urlprefix-/api strip=/api", "urlprefix-bad tag"],
    "plain": ["metrics"],
}
HEALTH: dict[str, list[dict[str, Any]]] = {
    "web": [instance("web", "web-1", 8001), instance("web", "web-2", 8002)],
    "api": [instance("api", "api-1", 9001)],
    "plain": [instance("plain", "plain-1", 7001)],
}
ROUTED = ("catalog", "health:api", "health:web")


class FakeConsul:
    """An in-memory CatalogSource that answers like Consul's blocking queries.

    A query whose index is the current one waits until something changes; index 0 answers at once. While
    `down`, every query (waiting ones included) fails with ConsulError. A service in `held` has its health
    query wait until released, like a slow first answer. `waiting` shows which queries are blocked, and at
    which index, so a test can tell that every loop has processed the last answer. One datacenter: the
    agent's own (`dc=""`); FakeDatacenters puts several together.
    """

    datacenters: tuple[str, ...] = ("",)

    def __init__(self, catalog: dict[str, list[str]], health: dict[str, list[dict[str, Any]]]) -> None:
        self.index = 100
        self.catalog = copy.deepcopy(catalog)
        self.entries = copy.deepcopy(health)
        self.down = False
        self.held: set[str] = set()
        self.forbidden: set[str] = set()  # services whose health query fails like an ACL denial
        self.waiting: dict[str, int] = {}
        self.refused: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self._progress = asyncio.Event()

    # CatalogSource

    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]:
        assert dc == "", dc
        await self._answer("catalog", index)
        return self.index, copy.deepcopy(self.catalog)

    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        assert dc == "", dc
        await self._answer(f"health:{service}", index, service)
        return self.index, copy.deepcopy(self.entries.get(service, []))

    # What the test does to "Consul"

    def change(self, *, catalog: dict[str, list[str]] | None = None, **health: list[dict[str, Any]]) -> None:
        if catalog is not None:
            self.catalog = copy.deepcopy(catalog)
        self.entries.update(copy.deepcopy(health))
        self.touch()

    def touch(self) -> None:
        """Raise the index without changing any data (Consul does this on unrelated writes)."""
        self.index += 1
        self._wake()

    def release(self, service: str) -> None:
        self.held.discard(service)
        self._wake()

    def go_down(self) -> None:
        self.down = True
        self._wake()

    def come_back(self) -> None:
        self.down = False
        self.touch()

    # What the test waits for

    def settled(self, *queries: str) -> bool:
        """Every given query is blocked at the current index: its loop has handled every earlier answer."""
        return all(self.waiting.get(q) == self.index for q in queries)

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._progress.wait()

    async def _answer(self, query: str, index: int, service: str | None = None) -> None:
        self.waiting[query] = index
        self._signal()
        try:
            while True:
                if self.down:
                    self.refused[query] += 1
                    raise ConsulError("unreachable", "connection refused")
                if service in self.forbidden:
                    raise ConsulError("forbidden", "Permission denied")
                blocking = index > 0 and index >= self.index
                if not blocking and service not in self.held:
                    return
                await self._changed.wait()
        finally:
            self.waiting.pop(query, None)
            self._signal()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._signal()

    def _signal(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()


class Harness:
    """A Watcher on a FakeConsul, with every snapshot it hands over queued and every error reason counted."""

    def __init__(self, consul: FakeConsul) -> None:
        self.consul = consul
        self.published: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.errors: list[str] = []
        self.watcher = Watcher(
            consul,
            self.published.put_nowait,
            on_error=self.errors.append,
            backoff_base=0.001,
            backoff_cap=0.01,
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.watcher.run())

    async def next_snapshot(self) -> Snapshot:
        return await asyncio.wait_for(self.published.get(), WAIT_S)

    async def until(self, predicate: Callable[[], bool]) -> None:
        await asyncio.wait_for(self.consul.until(predicate), WAIT_S)

    async def settle(self, *queries: str) -> None:
        await self.until(lambda: self.consul.settled(*queries))

    def nothing_published(self) -> bool:
        return self.published.empty()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, WAIT_S)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness(FakeConsul(CATALOG, HEALTH))
    try:
        yield h
    finally:
        await h.stop()


async def started(h: Harness) -> Snapshot:
    """Start the watcher, take its first snapshot and wait until every loop blocks on the current index."""
    h.start()
    first = await h.next_snapshot()
    await h.settle(*ROUTED)
    return first


class TestFirstSnapshot:
    """The first snapshot is handed over only once every routed service's health is known."""

    async def test_waits_for_every_routed_service(self, harness: Harness) -> None:
        harness.consul.held.add("api")
        harness.start()
        await harness.settle("catalog", "health:web")
        await harness.until(lambda: "health:api" in harness.consul.waiting)

        assert harness.nothing_published()
        assert harness.watcher.last_snapshot is None
        assert not harness.watcher.synced.is_set()

        harness.consul.release("api")
        first = await harness.next_snapshot()

        assert first == build_snapshot(CATALOG, HEALTH)
        assert [s.name for s in first.services] == ["api", "web"]
        assert harness.watcher.last_snapshot == first
        assert harness.watcher.synced.is_set()

    async def test_a_service_whose_health_cannot_be_read_does_not_hold_back_the_others(self) -> None:
        catalog = {**CATALOG, "secret": ["urlprefix-/secret"]}
        h = Harness(FakeConsul(catalog, HEALTH))
        h.consul.forbidden.add("secret")
        try:
            h.start()
            first = await h.next_snapshot()
            assert [s.name for s in first.services] == ["api", "web"]
            assert "forbidden" in h.errors
        finally:
            await h.stop()

    async def test_health_of_unrouted_services_is_not_followed(self, harness: Harness) -> None:
        await started(harness)
        assert set(harness.consul.waiting) == set(ROUTED)

    async def test_no_routed_service_gives_an_empty_snapshot(self) -> None:
        h = Harness(FakeConsul({"plain": ["metrics"]}, {}))
        try:
            h.start()
            assert await h.next_snapshot() == Snapshot()
        finally:
            await h.stop()

    async def test_cancelling_stops_every_query(self, harness: Harness) -> None:
        await started(harness)
        await harness.stop()
        assert harness.consul.waiting == {}


class TestChanges:
    """Each change in Consul gives exactly one new snapshot; an unchanged answer gives none."""

    async def test_unchanged_answer_publishes_nothing(self, harness: Harness) -> None:
        first = await started(harness)

        harness.consul.touch()
        await harness.settle(*ROUTED)

        assert harness.nothing_published()
        assert harness.watcher.last_snapshot == first

    async def test_health_change_publishes_one_snapshot(self, harness: Harness) -> None:
        await started(harness)

        web_1_failing = instance("web", "web-1", 8001, "critical")
        harness.consul.change(web=[web_1_failing, instance("web", "web-2", 8002)])
        second = await harness.next_snapshot()
        await harness.settle(*ROUTED)

        web = second.service("web")
        assert web is not None and [e.instance_id for e in web.endpoints] == ["web-2"]
        assert harness.nothing_published()

    async def test_change_of_unrouted_service_publishes_nothing(self, harness: Harness) -> None:
        await started(harness)

        harness.consul.change(catalog={**CATALOG, "plain": ["metrics", "v2"]}, plain=[])
        await harness.settle(*ROUTED)

        assert harness.nothing_published()

    async def test_new_service_appears_once_its_health_is_known(self, harness: Harness) -> None:
        await started(harness)
        harness.consul.held.add("shop")

        harness.consul.change(catalog={**CATALOG, "shop": ["urlprefix-shop.example.com/"]},
                              shop=[instance("shop", "shop-1", 6001)])
        await harness.settle(*ROUTED)
        await harness.until(lambda: "health:shop" in harness.consul.waiting)
        assert harness.nothing_published()

        harness.consul.release("shop")
        snapshot = await harness.next_snapshot()
        shop = snapshot.service("shop")
        assert shop is not None and len(shop.endpoints) == 1

    async def test_removed_service_leaves_and_its_query_stops(self, harness: Harness) -> None:
        await started(harness)

        harness.consul.change(catalog={"web": CATALOG["web"]})
        snapshot = await harness.next_snapshot()
        await harness.settle("catalog", "health:web")

        assert [s.name for s in snapshot.services] == ["web"]
        assert "health:api" not in harness.consul.waiting

    async def test_malformed_tag_logged_once(self, harness: Harness) -> None:
        with capture_logs() as logs:
            await started(harness)
            harness.consul.change(web=[instance("web", "web-1", 8001)])
            await harness.next_snapshot()
            await harness.settle(*ROUTED)

        invalid = [e for e in logs if e["event"] == "route_tag_invalid"]
        assert [(e["service"], e["tag"], e["log_level"]) for e in invalid] == [
            ("api", "urlprefix-bad tag", "warning")
        ]


class TestConsulFailures:
    """While Consul fails the last snapshot keeps serving; outage and recovery are each logged once."""

    async def test_outage_keeps_last_snapshot_and_logs_once(self, harness: Harness) -> None:
        first = await started(harness)

        with capture_logs() as logs:
            harness.consul.go_down()
            await harness.until(lambda: all(harness.consul.refused[q] >= 3 for q in ROUTED))
            harness.consul.come_back()
            await harness.settle(*ROUTED)

        assert harness.nothing_published()
        assert harness.watcher.last_snapshot == first
        assert [e["event"] for e in logs if e["event"].startswith("consul_")] == [
            "consul_unreachable", "consul_recovered"
        ]
        unreachable = next(e for e in logs if e["event"] == "consul_unreachable")
        assert (unreachable["reason"], unreachable["log_level"]) == ("unreachable", "warning")
        assert len(harness.errors) >= 9 and set(harness.errors) == {"unreachable"}

    async def test_change_during_outage_arrives_after_recovery(self, harness: Harness) -> None:
        await started(harness)

        harness.consul.go_down()
        await harness.until(lambda: all(harness.consul.refused[q] >= 2 for q in ROUTED))
        harness.consul.entries["api"] = []
        harness.consul.come_back()
        snapshot = await harness.next_snapshot()

        api = snapshot.service("api")
        assert api is not None and api.endpoints == ()

    async def test_unreachable_at_start_publishes_nothing_until_recovery(self, harness: Harness) -> None:
        harness.consul.down = True
        with capture_logs() as logs:
            harness.start()
            await harness.until(lambda: harness.consul.refused["catalog"] >= 3)
            assert harness.nothing_published()
            assert harness.watcher.last_snapshot is None
            harness.consul.come_back()
            first = await harness.next_snapshot()

        assert first == build_snapshot(CATALOG, HEALTH)
        assert [e["event"] for e in logs if e["event"].startswith("consul_")] == [
            "consul_unreachable", "consul_recovered"
        ]


class FakeDatacenters:
    """Several FakeConsuls behind one CatalogSource, one per datacenter, named in order of preference."""

    def __init__(self, **dcs: FakeConsul) -> None:
        self.dcs = dcs
        self.datacenters = tuple(dcs)

    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]:
        return await self.dcs[dc].services(index)

    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        return await self.dcs[dc].health(service, index)


DC1_CATALOG: dict[str, list[str]] = {"web": ["urlprefix-/"], "api": ["urlprefix-/api"]}
DC2_CATALOG: dict[str, list[str]] = {"web": ["urlprefix-/"], "api": ["v2"], "shop": ["urlprefix-/shop"]}
DC1_HEALTH = {"web": [instance("web", "web-1", 8001), instance("web", "web-2", 8002)],
              "api": [instance("api", "api-1", 9001)]}
DC2_HEALTH = {"web": [instance("web", "web-9", 8009)], "api": [instance("api", "api-9", 9009)],
              "shop": [instance("shop", "shop-9", 6009)]}
DC1_QUERIES = ("catalog", "health:api", "health:web")
DC2_QUERIES = ("catalog", "health:api", "health:shop", "health:web")


class DcHarness:
    """A Watcher following two fake datacenters, dc1 preferred."""

    def __init__(self) -> None:
        self.dc1 = FakeConsul(DC1_CATALOG, DC1_HEALTH)
        self.dc2 = FakeConsul(DC2_CATALOG, DC2_HEALTH)
        self.published: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.errors: list[str] = []
        self.watcher = Watcher(FakeDatacenters(dc1=self.dc1, dc2=self.dc2), self.published.put_nowait,
                               on_error=self.errors.append, backoff_base=0.001, backoff_cap=0.01)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.watcher.run())

    async def next_snapshot(self) -> Snapshot:
        return await asyncio.wait_for(self.published.get(), WAIT_S)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async def watch() -> None:
            while not predicate():
                waits = [asyncio.ensure_future(fake._progress.wait()) for fake in (self.dc1, self.dc2)]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
        await asyncio.wait_for(watch(), WAIT_S)

    async def settle(self) -> None:
        await self.until(lambda: self.dc1.settled(*DC1_QUERIES) and self.dc2.settled(*DC2_QUERIES))

    async def started(self) -> Snapshot:
        self.start()
        first = await self.next_snapshot()
        await self.settle()
        return first

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, WAIT_S)


@pytest.fixture
async def dcs() -> AsyncIterator[DcHarness]:
    h = DcHarness()
    try:
        yield h
    finally:
        await h.stop()


def served(snapshot: Snapshot, service: str) -> list[tuple[str, str]]:
    svc = snapshot.service(service)
    assert svc is not None, f"{service} is not in the snapshot"
    return [(e.dc, e.instance_id) for e in svc.endpoints]


def failovers(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(e["service"], e["from"], e["to"], e["log_level"]) for e in logs if e["event"] == "datacenter_failover"]


class TestDatacenters:
    """Several datacenters: each is followed all the time, and a service is served from the first one (in
    order of preference) with a healthy instance; the switch is one snapshot and one log line."""

    async def test_first_snapshot_waits_for_every_datacenter_and_prefers_the_first(self, dcs: DcHarness) -> None:
        first = await dcs.started()

        assert first == build_dc_snapshot(("dc1", "dc2"), {"dc1": DC1_CATALOG, "dc2": DC2_CATALOG}, {
            name: {dc: h[name] for dc, h in (("dc1", DC1_HEALTH), ("dc2", DC2_HEALTH)) if name in h}
            for name in ("web", "api", "shop")
        })
        assert served(first, "web") == [("dc1", "web-1"), ("dc1", "web-2")]
        assert served(first, "api") == [("dc1", "api-1")]
        assert served(first, "shop") == [("dc2", "shop-9")]  # only dc2 has it: dc2 was waited for
        web = first.service("web")
        assert web is not None and web.endpoints[0].key == "dc1/node-1/web-1"

    async def test_each_datacenter_follows_the_routed_services_its_catalog_lists(self, dcs: DcHarness) -> None:
        await dcs.started()
        # api's route tag is in dc1 only, yet dc2's api instances are followed too: a route is the service's.
        assert set(dcs.dc1.waiting) == set(DC1_QUERIES) and set(dcs.dc2.waiting) == set(DC2_QUERIES)

        dcs.dc1.change(catalog={"web": DC1_CATALOG["web"]})  # api's only route tag leaves
        snapshot = await dcs.next_snapshot()
        await dcs.until(lambda: dcs.dc1.settled("catalog", "health:web")
                        and dcs.dc2.settled("catalog", "health:shop", "health:web"))

        assert [s.name for s in snapshot.services] == ["shop", "web"]
        assert "health:api" not in dcs.dc1.waiting and "health:api" not in dcs.dc2.waiting

    async def test_losing_the_last_healthy_instance_switches_datacenter_in_one_snapshot(
        self, dcs: DcHarness
    ) -> None:
        await dcs.started()
        critical = [instance("web", "web-1", 8001, "critical"), instance("web", "web-2", 8002, "critical")]
        with capture_logs() as logs:
            dcs.dc1.change(web=[critical[0], instance("web", "web-2", 8002)])
            assert served(await dcs.next_snapshot(), "web") == [("dc1", "web-2")]
            dcs.dc1.change(web=critical)
            # dc2's instances were already known: the very next snapshot has them, never an empty pool.
            assert served(await dcs.next_snapshot(), "web") == [("dc2", "web-9")]
            await dcs.settle()
            assert dcs.published.empty()
            dcs.dc1.change(web=DC1_HEALTH["web"])
            back = await dcs.next_snapshot()

        assert served(back, "web") == [("dc1", "web-1"), ("dc1", "web-2")]
        assert served(back, "api") == [("dc1", "api-1")]
        assert failovers(logs) == [("web", "dc1", "dc2", "info"), ("web", "dc2", "dc1", "info")]

    async def test_no_healthy_instance_anywhere_then_the_next_datacenter_recovers(self, dcs: DcHarness) -> None:
        await dcs.started()
        with capture_logs() as logs:
            dcs.dc2.change(web=[instance("web", "web-9", 8009, "critical")])  # dc1 still serves: no change
            await dcs.settle()
            assert dcs.published.empty()
            dcs.dc1.change(web=[instance("web", "web-1", 8001, "critical")])
            assert served(await dcs.next_snapshot(), "web") == []  # the route stays: 503, not 404
            dcs.dc2.change(web=DC2_HEALTH["web"])
            assert served(await dcs.next_snapshot(), "web") == [("dc2", "web-9")]

        assert failovers(logs) == [("web", "dc1", "dc2", "info")]  # from the datacenter that last served it

    async def test_a_datacenter_unreachable_at_start_does_not_hold_back_the_others(self, dcs: DcHarness) -> None:
        dcs.dc2.down = True
        with capture_logs() as logs:
            dcs.start()
            first = await dcs.next_snapshot()
            assert [s.name for s in first.services] == ["api", "web"]
            assert served(first, "web") == [("dc1", "web-1"), ("dc1", "web-2")]
            dcs.dc2.come_back()
            second = await dcs.next_snapshot()
            await dcs.settle()

        assert served(second, "shop") == [("dc2", "shop-9")]
        events = [(e["event"], e.get("query")) for e in logs if e["event"].startswith("consul_")]
        assert events == [("consul_unreachable", "catalog@dc2"), ("consul_recovered", None)]
        assert failovers(logs) == []

    async def test_a_datacenter_going_down_keeps_its_last_known_instances(self, dcs: DcHarness) -> None:
        """Failures never empty the table, per datacenter too: dc2's last answer still stands in for it."""
        await dcs.started()
        dcs.dc2.go_down()
        await dcs.until(lambda: all(dcs.dc2.refused[q] >= 2 for q in DC2_QUERIES))
        dcs.dc1.change(web=[instance("web", "web-1", 8001, "critical"), instance("web", "web-2", 8002, "critical")])
        assert served(await dcs.next_snapshot(), "web") == [("dc2", "web-9")]
        assert not dcs.watcher.reachable

    async def test_the_preferred_datacenter_unreachable_keeps_serving_from_it(self, dcs: DcHarness) -> None:
        first = await dcs.started()
        dcs.dc1.go_down()
        await dcs.until(lambda: all(dcs.dc1.refused[q] >= 3 for q in DC1_QUERIES))
        dcs.dc1.come_back()
        await dcs.settle()
        assert dcs.published.empty() and dcs.watcher.last_snapshot == first
        assert set(dcs.errors) == {"unreachable"}
