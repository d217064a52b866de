"""The watcher: two blocking queries per datacenter (catalog, state/any) as triggers, non-blocking reads of the
services they name, the first Snapshot handed over whole and then SnapshotDeltas naming only what changed;
Consul failures keep the last good state."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from discovery.consul import ConsulError
from discovery.follow import RateLimit
from discovery.model import RouteSpec, Snapshot, SnapshotDelta
from discovery.snapshot import build_dc_snapshot, build_snapshot
from discovery.triggers import StateAny
from discovery.watcher import CatalogSource, Watcher

WAIT_S = 5.0  # an upper bound so a broken watcher fails the test instead of hanging it; never asserted on

Entry = dict[str, Any]
Health = dict[str, list[Entry]]

NODES = {"node-1": "10.0.0.1", "node-2": "10.0.0.2"}
TAGS: dict[str, list[str]] = {
    "web": ["urlprefix-/"],
    "api": ["urlprefix-/api strip=/api", "urlprefix-bad tag"],
    "plain": ["metrics"],
    "legacy": ["urlprefix-/legacy"],
    "shop": ["urlprefix-shop.example.com/"],
}


def instance(
    service: str,
    instance_id: str,
    port: int,
    status: str = "passing",
    *,
    node: str = "node-1",
    tags: list[str] | None = None,
    kind: str | None = None,
    own_check: bool = True,
) -> Entry:
    """One /v1/health/service/<service> entry: the node's serfHealth and, unless `own_check` is off, the
    instance's own check; its tags are the service's usual ones unless given."""
    svc: dict[str, Any] = {"ID": instance_id, "Service": service, "Address": "10.0.0.5", "Port": port,
                           "Tags": list(TAGS.get(service, []) if tags is None else tags)}
    if kind is not None:
        svc["Kind"] = kind
    checks = [{"CheckID": "serfHealth", "Status": "passing", "ServiceID": ""}]
    if own_check:
        checks.append({"CheckID": f"service:{instance_id}", "Status": status, "ServiceID": instance_id})
    return {"Node": {"Node": node, "Address": NODES.get(node, "10.0.0.9")}, "Service": svc, "Checks": checks}


def catalog_of(health: Mapping[str, list[Entry]]) -> dict[str, list[str]]:
    """/v1/catalog/services as Consul derives it: every service with an instance, the union of their tags."""
    catalog: dict[str, list[str]] = {}
    for name, entries in health.items():
        if not entries:
            continue
        tags = catalog.setdefault(name, [])
        for entry in entries:
            tags.extend(t for t in entry["Service"].get("Tags") or [] if t not in tags)
    return catalog


def check_rows(health: Mapping[str, list[Entry]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """/v1/health/state/any as Consul derives it, keyed by (node, service id, check id), ModifyIndex left out:
    each node's own checks once (ServiceName ""), and each instance's checks with its service's name, its ID
    and its tags."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, entries in health.items():
        for entry in entries:
            node = entry["Node"]["Node"]
            for check in entry["Checks"]:
                view = {"Node": node, "CheckID": check["CheckID"], "Status": check["Status"], "Output": ""}
                sid = check.get("ServiceID") or ""
                if sid:
                    view.update(ServiceID=sid, ServiceName=name, ServiceTags=list(entry["Service"].get("Tags") or []))
                else:
                    view.update(ServiceID="", ServiceName="", ServiceTags=[])
                rows[(node, sid, check["CheckID"])] = view
    return rows


def instances_of(health: Mapping[str, list[Entry]]) -> dict[tuple[str, str], Any]:
    """Every instance as the catalog holds it, keyed by (node, service id): what a registration writes."""
    return {(e["Node"]["Node"], e["Service"]["ID"]): copy.deepcopy(e["Service"])
            for entries in health.values() for e in entries}


HEALTH: Health = {
    "web": [instance("web", "web-1", 8001), instance("web", "web-2", 8002, node="node-2")],
    "api": [instance("api", "api-1", 9001)],
    "plain": [instance("plain", "plain-1", 7001, node="node-2")],
}


class FakeConsul:
    """An in-memory CatalogSource for one datacenter that answers like Consul.

    `entries` is the truth (service -> health entries); the catalog and state/any are derived from it, as
    Consul derives them, so a service with no instance is not in the catalog. Like Consul, each table has its
    index: a write moves the catalog's when it changes an instance (even one that changes nothing the catalog
    shows), and state/any's (and the ModifyIndex of each check it rewrites) when it changes a check or
    re-registers its instance. `services` and `checks` block while asked with their table's index (index 0
    answers at once); `health` reads are counted per service in `reads`. While `down`, every query fails; a
    query named in `broken` ("catalog", "checks") fails alone; a service in `forbidden` fails its reads like
    an ACL denial; a service in `held` has its read wait until released. `waiting` shows which queries are in
    flight, and at which index."""

    datacenters: tuple[str, ...] = ("",)

    def __init__(self, health: Health) -> None:
        self.index = 100  # the last write's (Raft) index
        self.entries: Health = copy.deepcopy(health)
        self.tables = {"catalog": self.index, "checks": self.index}
        self._rows = check_rows(self.entries)
        self._modified = dict.fromkeys(self._rows, self.index)
        self._instances = instances_of(self.entries)
        self._written: dict[str, int] = {}  # instance ID -> the index it was last (re-)registered at
        self.down = False
        self.broken: set[str] = set()
        self.forbidden: set[str] = set()
        self.held: set[str] = set()
        self.waiting: dict[str, int] = {}
        self.refused: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()
        self.blocking_reads: list[str] = []  # services read with an index (the watcher never should)
        self._expiry = 0
        self._changed = asyncio.Event()

    # CatalogSource

    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]:
        assert dc == "", dc
        await self._answer("catalog", index)
        return self.tables["catalog"], catalog_of(self.entries)

    async def checks(self, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        assert dc == "", dc
        await self._answer("checks", index)
        return self.tables["checks"], [{**row, "ModifyIndex": self._modified[key]} for key, row in self._rows.items()]

    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        assert dc == "", dc
        if index:
            self.blocking_reads.append(service)
        self.reads[service] += 1
        await self._answer(f"health:{service}", 0, service)
        return self.index, copy.deepcopy(self.entries.get(service, []))

    async def nodes(self, dc: str = "") -> list[str]:
        assert dc == "", dc
        await self._answer("nodes", 0)
        self.reads["<nodes>"] += 1
        return sorted({e["Node"]["Node"] for entries in self.entries.values() for e in entries})

    async def node_services(self, node: str, dc: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """/v1/catalog/node/<node>: the node and every instance on it (each with the ModifyIndex of its last
        write, as Consul lists them)."""
        assert dc == "", dc
        await self._answer("nodes", 0)
        self.reads[f"<node {node}>"] += 1
        on = [e for entries in self.entries.values() for e in entries if e["Node"]["Node"] == node]
        return (copy.deepcopy(on[0]["Node"]) if on else {},
                [{**copy.deepcopy(e["Service"]), "ModifyIndex": self._written.get(e["Service"]["ID"], 0)} for e in on])

    # What the test does to "Consul"

    def change(self, **services: list[Entry]) -> None:
        """One write: these services' instances replaced (an empty list deregisters the service)."""
        for name, entries in services.items():
            if entries:
                self.entries[name] = copy.deepcopy(entries)
            else:
                self.entries.pop(name, None)
        self._write()

    def set_node(self, node: str, status: str) -> None:
        """The node's serfHealth turns `status`, in every instance on it (as Consul reports it)."""
        for entries in self.entries.values():
            for entry in entries:
                if entry["Node"]["Node"] == node:
                    for check in entry["Checks"]:
                        if check["CheckID"] == "serfHealth":
                            check["Status"] = status
        self._write()

    def rewrite(self) -> None:
        """A write that changes nothing anyone reads (a node re-registered as it was): the catalog's index
        moves, nothing else."""
        self.index += 1
        self.tables["catalog"] = self.index
        self._wake()

    def expire(self) -> None:
        """Blocked queries reach their `wait` and answer with the same index and the same data."""
        self._expiry += 1
        self._wake()

    def release(self, service: str) -> None:
        self.held.discard(service)
        self._wake()

    def go_down(self) -> None:
        self.down = True
        self._wake()

    def come_back(self) -> None:
        self.down = False
        self._wake()

    def mend(self, query: str) -> None:
        self.broken.discard(query)
        self._wake()

    def settled(self) -> bool:
        """Both blocking queries wait at their table's index: every earlier answer has been handled."""
        return all(self.waiting.get(q) == self.tables[q] for q in ("catalog", "checks"))

    def _write(self) -> None:
        self.index += 1
        instances, rows = instances_of(self.entries), check_rows(self.entries)
        moved = {key for key, row in rows.items() if self._rows.get(key) != row
                 or (key[1] and instances.get(key[:2]) != self._instances.get(key[:2]))}
        if instances != self._instances:
            self.tables["catalog"] = self.index
        if moved or rows.keys() != self._rows.keys():
            self.tables["checks"] = self.index
        self._modified = {key: self.index if key in moved else self._modified[key] for key in rows}
        self._written |= {key[1]: self.index for key, svc in instances.items() if self._instances.get(key) != svc}
        self._instances, self._rows = instances, rows
        self._wake()

    async def _answer(self, query: str, index: int, service: str | None = None) -> None:
        self.waiting[query] = index
        expiry = self._expiry
        try:
            while True:
                if self.down or query in self.broken:
                    self.refused[query] += 1
                    raise ConsulError("unreachable", "connection refused")
                if service in self.forbidden:
                    raise ConsulError("forbidden", "Permission denied")
                blocking = 0 < index >= self.tables.get(query, 0) and expiry == self._expiry
                if not blocking and service not in self.held:
                    return
                await self._changed.wait()
        finally:
            self.waiting.pop(query, None)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class FakeDatacenters:
    """Several FakeConsuls behind one CatalogSource, one per datacenter, named in order of preference."""

    def __init__(self, **dcs: FakeConsul) -> None:
        self.dcs = dcs
        self.datacenters = tuple(dcs)

    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]:
        return await self.dcs[dc].services(index)

    async def checks(self, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        return await self.dcs[dc].checks(index)

    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        return await self.dcs[dc].health(service, index)

    async def nodes(self, dc: str = "") -> list[str]:
        return await self.dcs[dc].nodes()

    async def node_services(self, node: str, dc: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return await self.dcs[dc].node_services(node)


class Harness:
    """A Watcher on fake datacenters. Each hand-over is turned into a whole Snapshot (a delta applied to the
    last one) and queued; the raw hand-overs are kept in `handed`."""

    def __init__(self, source: CatalogSource, *fakes: FakeConsul, min_interval: float = 0.0) -> None:
        self.fakes = fakes
        self.snapshots: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.handed: list[Snapshot | SnapshotDelta] = []
        self.current: Snapshot | None = None
        self.errors: list[str] = []
        self.watcher = Watcher(source, self._on_change, on_error=self.errors.append, backoff_base=0.001,
                               backoff_cap=0.01, limit=RateLimit.unlimited(), min_interval=min_interval,
                               explain_max=0.6)
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def single(cls, health: Health = HEALTH, min_interval: float = 0.0) -> Harness:
        consul = FakeConsul(health)
        return cls(consul, consul, min_interval=min_interval)

    @property
    def consul(self) -> FakeConsul:
        return self.fakes[0]

    @property
    def deltas(self) -> list[SnapshotDelta]:
        return [h for h in self.handed if isinstance(h, SnapshotDelta)]

    def _on_change(self, value: Snapshot | SnapshotDelta) -> None:
        self.handed.append(value)
        if isinstance(value, Snapshot):
            self.current = value
        elif self.current is not None:
            self.current = self.current.apply(value)
        if self.current is not None:
            self.snapshots.put_nowait(self.current)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.watcher.run())

    async def started(self) -> Snapshot:
        """Start the watcher, take its first snapshot and wait until it has nothing left to do."""
        self.start()
        first = await self.next_snapshot()
        await self.settle()
        return first

    async def next_snapshot(self) -> Snapshot:
        return await asyncio.wait_for(self.snapshots.get(), WAIT_S)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async def poll() -> None:
            # Polled: the watcher's `idle` has no event to wait on, and polling keeps the fakes simple.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.001)

        await asyncio.wait_for(poll(), WAIT_S)

    async def settle(self) -> None:
        """Until every blocking query waits at its datacenter's current index and the watcher is idle."""
        await self.until(lambda: all(f.settled() for f in self.fakes) and self.watcher.idle)

    def reads(self) -> Counter[str]:
        return sum((f.reads for f in self.fakes), Counter())

    def nothing_handed_over(self) -> bool:
        return self.snapshots.empty()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, WAIT_S)
        assert all(not f.blocking_reads for f in self.fakes), "a service was read with a blocking query"
        kinds = [type(h).__name__ for h in self.handed]
        assert kinds[:1] in ([], ["Snapshot"]) and "Snapshot" not in kinds[1:], kinds  # whole first, then deltas


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness.single()
    try:
        yield h
    finally:
        await h.stop()


@contextlib.asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Harness]:
    try:
        yield h
    finally:
        await h.stop()


def with_health(health: Health, **services: list[Entry]) -> Health:
    """`health` with these services' instances replaced (an empty list: the service is gone)."""
    out = {**health, **services}
    return {name: entries for name, entries in out.items() if entries}


def expected(health: Health) -> Snapshot:
    return build_snapshot(catalog_of(health), health)


class TestFirstSnapshot:
    """The first hand-over is a whole Snapshot, once every routed service has been read."""

    async def test_waits_for_every_routed_service(self, harness: Harness) -> None:
        harness.consul.held.add("api")
        harness.start()
        await harness.until(lambda: harness.consul.settled() and "health:api" in harness.consul.waiting)

        assert harness.nothing_handed_over()
        assert harness.watcher.last_snapshot is None
        assert not harness.watcher.synced.is_set()

        harness.consul.release("api")
        first = await harness.next_snapshot()

        assert first == expected(HEALTH)
        assert [s.name for s in first.services] == ["api", "web"]
        assert isinstance(harness.handed[0], Snapshot)
        assert harness.watcher.last_snapshot == first
        assert harness.watcher.synced.is_set()

    async def test_a_service_whose_health_cannot_be_read_does_not_hold_back_the_others(self) -> None:
        health = {**HEALTH, "secret": [instance("secret", "secret-1", 5001, tags=["urlprefix-/secret"])]}
        async with running(Harness.single(health)) as h:
            h.consul.forbidden.add("secret")
            h.start()
            first = await h.next_snapshot()
            assert [s.name for s in first.services] == ["api", "web"]
            assert "forbidden" in h.errors

            h.consul.forbidden.clear()  # the read is retried: the service joins once it can be read
            later = await h.next_snapshot()
            assert [s.name for s in later.services] == ["api", "secret", "web"]

    async def test_only_routed_services_are_read_once_each(self, harness: Harness) -> None:
        await harness.started()
        assert harness.reads() == Counter({"api": 1, "web": 1})

    async def test_no_routed_service_gives_an_empty_snapshot(self) -> None:
        async with running(Harness.single({"plain": HEALTH["plain"]})) as h:
            h.start()
            assert await h.next_snapshot() == Snapshot()

    async def test_cancelling_stops_every_query(self, harness: Harness) -> None:
        await harness.started()
        await harness.stop()
        assert harness.consul.waiting == {}


def many(count: int, nodes: int) -> Health:
    """`count` routed services of two instances each, spread over `nodes` nodes; every third one's second
    instance failing its check."""
    return {f"s{n:03d}": [instance(f"s{n:03d}", f"s{n:03d}-{i}", 8000 + n, "critical" if i and n % 3 == 0 else
                                   "passing", node=f"n{(n + i) % nodes}", tags=[f"urlprefix-/s{n:03d}"])
                          for i in range(2)] for n in range(count)}


class TestReadByNode:
    """A large datacenter is read at start by node (its nodes' catalogs and state/any), not service by service,
    when it has fewer nodes than half the services; the snapshot is the one reads by service give."""

    async def test_many_services_on_few_nodes_are_read_by_node(self) -> None:
        """80 services on 3 nodes: 4 requests instead of 80, and the same snapshot."""
        health = many(80, nodes=3)
        async with running(Harness.single(health)) as h:
            first = await h.started()
            assert first == expected(health)
            assert h.reads() == Counter({"<nodes>": 1, "<node n0>": 1, "<node n1>": 1, "<node n2>": 1})

    async def test_as_many_nodes_as_services_are_read_by_service(self) -> None:
        """80 services on 80 nodes: node reads would not be fewer, so each service is read alone."""
        health = many(80, nodes=80)
        async with running(Harness.single(health)) as h:
            first = await h.started()
            assert first == expected(health)
            assert h.reads()["<nodes>"] == 1 and not any(k.startswith("<node ") for k in h.reads())
            assert sum(v for k, v in h.reads().items() if not k.startswith("<")) == 80

    async def test_failing_node_reads_fall_back_to_reads_by_service(self) -> None:
        """Node reads that fail leave each service to a read of its own; nothing is missing."""
        health = many(80, nodes=3)
        async with running(Harness.single(health)) as h:
            h.consul.broken.add("nodes")
            first = await h.started()
            assert first == expected(health)
            assert sum(v for k, v in h.reads().items() if not k.startswith("<")) == 80

    async def test_changes_after_the_read_by_node_are_followed(self) -> None:
        """After the read by node, a change to one service is read alone and handed over as a delta."""
        health = many(80, nodes=3)
        async with running(Harness.single(health)) as h:
            await h.started()
            changed = with_health(health, s005=[health["s005"][0]])
            h.consul.change(s005=changed["s005"])
            assert await h.next_snapshot() == expected(changed)
            await h.settle()
            assert h.reads()["s005"] == 1


class RawConsul(FakeConsul):
    """A FakeConsul whose state/any answers come as Consul sends them (bytes, read as a StateAny)."""

    async def checks(self, index: int, dc: str = "") -> tuple[int, StateAny]:  # type: ignore[override]
        returned, rows = await super().checks(index, dc)
        return returned, StateAny(json.dumps(rows, separators=(",", ":")).encode())


class TestRawStateAny:
    """Answers kept as Consul sent them are compared on their text; what the watcher hands over is the same."""

    async def test_changes_are_followed_from_raw_answers(self) -> None:
        """A check turning critical and an instance going are each read alone and handed over."""
        consul = RawConsul(HEALTH)
        async with running(Harness(consul, consul)) as h:
            await h.started()
            reads = h.reads()
            consul.change(api=[instance("api", "api-1", 9001, "critical")])
            await h.until(lambda: h.current == expected(with_health(HEALTH, api=[
                instance("api", "api-1", 9001, "critical")])))
            consul.change(web=[HEALTH["web"][0]])
            await h.until(lambda: h.current == expected(with_health(HEALTH, web=[HEALTH["web"][0]], api=[
                instance("api", "api-1", 9001, "critical")])))
            await h.settle()
            assert h.reads() - reads == Counter({"api": 1, "web": 1})

    async def test_an_unexplained_catalog_move_in_a_large_datacenter_is_read_by_node(self) -> None:
        """80 services on 3 nodes, a move nothing explains: read again by node (4 requests), not 80 reads."""
        health = many(80, nodes=3)
        consul = RawConsul(health)
        async with running(Harness(consul, consul)) as h:
            await h.started()
            reads = h.reads()
            with capture_logs() as logs:
                consul.rewrite()
                await h.until(lambda: any(e["event"] == "read_by_node" for e in logs))
                await h.settle()
            assert h.reads() - reads == Counter({"<nodes>": 1, "<node n0>": 1, "<node n1>": 1, "<node n2>": 1})
            assert h.nothing_handed_over()


class SlowNodes(RawConsul):
    """A RawConsul whose node reads, while `gate` is set to an unset Event, answer with what Consul held when
    asked, but arrive only once the gate opens."""

    gate: asyncio.Event | None = None

    async def node_services(self, node: str, dc: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        answer = await super().node_services(node, dc)
        if self.gate is not None:
            await self.gate.wait()
        return answer


class TestResyncByNode:
    """A resync by node takes time; what happens meanwhile is not undone by its answers, and not lost."""

    async def test_a_service_read_alone_meanwhile_keeps_that_read(self) -> None:
        """s001-1 deregistered while node reads are under way: its read alone is handed over, and the node
        answers, older, do not bring the instance back."""
        health = many(80, nodes=3)
        consul = SlowNodes(health)
        async with running(Harness(consul, consul)) as h:
            await h.started()
            consul.gate = asyncio.Event()
            consul.rewrite()
            await h.until(lambda: consul.reads["<node n0>"] == 2)

            changed = with_health(health, s001=[health["s001"][0]])
            consul.change(s001=changed["s001"])
            await h.until(lambda: h.current == expected(changed))
            consul.gate.set()
            await h.settle()  # (not idle while the resync is under way)

            assert h.current == expected(changed)

    async def test_a_move_nothing_explains_during_a_resync_is_read_again_after_it(self) -> None:
        """legacy-2 (no check of its own) goes while node reads asked before are under way: once they are
        applied, the datacenter is read by node again, and legacy-2 leaves."""
        legacy = [instance("legacy", "legacy-1", 5001, node="n0", own_check=False),
                  instance("legacy", "legacy-2", 5002, node="n1", own_check=False)]
        health = with_health(many(80, nodes=3), legacy=legacy)
        consul = SlowNodes(health)
        async with running(Harness(consul, consul)) as h:
            await h.started()
            consul.gate = asyncio.Event()
            with capture_logs() as logs:
                consul.rewrite()
                await h.until(lambda: consul.reads["<node n1>"] == 2)
                consul.change(legacy=[legacy[0]])
                await h.until(lambda: sum(e["event"] == "catalog_resync" for e in logs) == 2)
                consul.gate.set()

                await h.until(lambda: h.current == expected(with_health(health, legacy=[legacy[0]])))


class TestChanges:
    """Each change hands over one delta naming only the services that changed; an unchanged answer hands over
    nothing and reads nothing."""

    async def test_an_unchanged_answer_reads_and_hands_over_nothing(self, harness: Harness) -> None:
        first = await harness.started()
        reads = harness.reads()

        harness.consul.expire()
        await harness.settle()

        assert harness.reads() == reads
        assert harness.nothing_handed_over()
        assert harness.watcher.last_snapshot == first

    async def test_a_health_change_hands_over_one_delta_with_that_service(self, harness: Harness) -> None:
        await harness.started()
        reads = harness.reads()

        web = [instance("web", "web-1", 8001, "critical"), HEALTH["web"][1]]
        harness.consul.change(web=web)
        second = await harness.next_snapshot()
        await harness.settle()

        assert second == expected(with_health(HEALTH, web=web))
        assert [e.instance_id for e in second.services[1].endpoints] == ["web-2"]
        assert harness.reads() - reads == Counter({"web": 1})
        assert [(tuple(s.name for s in d.changed), d.removed) for d in harness.deltas] == [(("web",), ())]
        assert harness.nothing_handed_over()

    async def test_a_change_to_an_unrouted_service_reads_nothing(self, harness: Harness) -> None:
        await harness.started()
        reads = harness.reads()

        harness.consul.change(plain=[instance("plain", "plain-1", 7001, "critical", node="node-2",
                                              tags=["metrics", "v2"])])
        await harness.settle()

        assert harness.reads() == reads
        assert harness.nothing_handed_over()

    async def test_a_new_service_appears_once_read(self, harness: Harness) -> None:
        await harness.started()
        harness.consul.held.add("shop")

        shop = [instance("shop", "shop-1", 6001)]
        harness.consul.change(shop=shop)
        await harness.until(lambda: harness.consul.settled() and "health:shop" in harness.consul.waiting)
        assert harness.nothing_handed_over()

        harness.consul.release("shop")
        snapshot = await harness.next_snapshot()
        assert snapshot == expected(with_health(HEALTH, shop=shop))
        assert [s.name for d in harness.deltas for s in d.changed] == ["shop"]

    async def test_a_removed_service_leaves_and_is_read_no_more(self, harness: Harness) -> None:
        await harness.started()

        harness.consul.change(api=[])
        snapshot = await harness.next_snapshot()
        await harness.settle()
        reads = harness.reads()
        harness.consul.set_node("node-1", "critical")  # api-1 ran there too
        await harness.next_snapshot()
        await harness.settle()

        assert [s.name for s in snapshot.services] == ["web"]
        gone = harness.deltas[0]
        assert (gone.changed, gone.removed) == ((), ("api",))
        assert harness.reads() - reads == Counter({"web": 1})

    async def test_a_service_whose_route_tags_go_leaves(self, harness: Harness) -> None:
        await harness.started()

        harness.consul.change(web=[instance("web", "web-1", 8001, tags=["v2"]),
                                   instance("web", "web-2", 8002, node="node-2", tags=["v2"])])
        snapshot = await harness.next_snapshot()

        assert [s.name for s in snapshot.services] == ["api"]

    async def test_malformed_tag_logged_once(self, harness: Harness) -> None:
        with capture_logs() as logs:
            await harness.started()
            harness.consul.change(api=[instance("api", "api-1", 9001, "critical")])
            await harness.next_snapshot()
            await harness.settle()

        invalid = [e for e in logs if e["event"] == "route_tag_invalid"]
        assert [(e["service"], e["tag"], e["log_level"]) for e in invalid] == [
            ("api", "urlprefix-bad tag", "warning")
        ]


MANY: Health = {f"svc-{n:02}": [instance(f"svc-{n:02}", f"svc-{n:02}-1", 10_000 + n, tags=[f"urlprefix-/s{n}"])]
                for n in range(40)}


class TestWorkFollowsChanges:
    """Issue 14: the work per change is proportional to what changed, and nothing is read while nothing
    changes."""

    async def test_a_change_to_one_of_many_services_reads_only_it(self) -> None:
        async with running(Harness.single(MANY)) as h:
            await h.started()
            reads = h.reads()

            down = [instance("svc-17", "svc-17-1", 10_017, "critical", tags=["urlprefix-/s17"])]
            h.consul.change(**{"svc-17": down})
            snapshot = await h.next_snapshot()
            await h.settle()

            assert h.reads() - reads == Counter({"svc-17": 1})
            assert [tuple(s.name for s in d.changed) for d in h.deltas] == [("svc-17",)]
            assert snapshot == expected(with_health(MANY, **{"svc-17": down}))

    async def test_nothing_changing_reads_nothing(self) -> None:
        async with running(Harness.single(MANY)) as h:
            await h.started()
            reads = h.reads()
            for _ in range(3):
                h.consul.expire()
                await h.settle()
            assert h.reads() == reads
            assert len(h.handed) == 1

    async def test_a_burst_is_coalesced_into_few_hand_overs(self) -> None:
        """Twenty services failing one after the other, each seen by its own answer, within `min_interval`."""
        async with running(Harness.single(MANY, min_interval=0.2)) as h:
            await h.started()
            failing = {name: [instance(name, f"{name}-1", 10_000 + n, "critical", tags=[f"urlprefix-/s{n}"])]
                       for n, name in enumerate(sorted(MANY)) if n < 20}
            for name, entries in failing.items():
                h.consul.change(**{name: entries})
                await h.until(lambda: h.consul.waiting.get("checks") == h.consul.tables["checks"])
            await h.settle()

            assert 1 <= len(h.deltas) <= 2  # one per change without the throttle: twenty
            assert h.current == expected(with_health(MANY, **failing))
            assert {s.name for d in h.deltas for s in d.changed} == set(failing)

    async def test_a_check_only_change_reads_that_service_only(self, harness: Harness) -> None:
        await harness.started()
        reads = harness.reads()

        harness.consul.change(api=[instance("api", "api-1", 9001, "warning")])
        snapshot = await harness.next_snapshot()
        await harness.settle()

        assert harness.reads() - reads == Counter({"api": 1})
        api = snapshot.service("api")
        assert api is not None and api.endpoints == ()

    async def test_a_node_check_change_reads_the_services_on_that_node(self, harness: Harness) -> None:
        """node-2 runs web-2 and plain-1 (unrouted); api runs on node-1 only and is not read."""
        await harness.started()
        reads = harness.reads()

        harness.consul.set_node("node-2", "critical")
        snapshot = await harness.next_snapshot()
        await harness.settle()

        assert harness.reads() - reads == Counter({"web": 1})
        web = snapshot.service("web")
        assert web is not None and [e.instance_id for e in web.endpoints] == ["web-1"]

    async def test_an_instance_without_checks_is_picked_up_when_the_catalog_moves_unexplained(self) -> None:
        """legacy's instances have no check of their own: a new one on a known node moves the catalog's
        index, neither its content nor any check."""
        legacy = [instance("legacy", "legacy-1", 5001, own_check=False)]
        async with running(Harness.single(with_health(HEALTH, legacy=legacy))) as h:
            await h.started()

            more = [*legacy, instance("legacy", "legacy-2", 5002, own_check=False)]
            h.consul.change(legacy=more)
            snapshot = await h.next_snapshot()

            svc = snapshot.service("legacy")
            assert svc is not None and [e.instance_id for e in svc.endpoints] == ["legacy-1", "legacy-2"]

    async def test_an_unexplained_catalog_move_is_not_explained_by_a_later_check_change(self) -> None:
        """A check that changes in a later write is no explanation for the catalog's earlier move: the new
        instance without checks must still be found."""
        legacy = [instance("legacy", "legacy-1", 5001, own_check=False)]
        async with running(Harness.single(with_health(HEALTH, legacy=legacy))) as h:
            await h.started()

            more = [*legacy, instance("legacy", "legacy-2", 5002, own_check=False)]
            h.consul.change(legacy=more)
            h.consul.change(api=[instance("api", "api-1", 9001, "critical")])
            await h.until(lambda: h.current == expected(with_health(HEALTH, legacy=more, api=[
                instance("api", "api-1", 9001, "critical")])))

    async def test_an_unexplained_catalog_move_reads_every_routed_service_before_idle(self) -> None:
        """Nothing says which service gained or lost an instance without checks, so every routed one is
        read again; until then the watcher is not idle (reads are due)."""
        async with running(Harness.single()) as h:
            await h.started()
            reads = h.reads()

            h.consul.rewrite()
            await h.settle()

            assert h.reads() - reads == Counter({"api": 1, "web": 1})
            assert h.nothing_handed_over()

    async def test_a_deregistration_coalesced_with_a_later_change_is_read_again_as_unexplained(self) -> None:
        """web-2 deregistered, then api's check changed, both before state/any answers: the deregistration's
        index is in neither answer, so nothing tells it from an instance without checks going at that index,
        and every routed service is read again; both changes are handed over."""
        async with running(Harness.single()) as h:
            await h.started()
            reads = h.reads()

            with capture_logs() as logs:
                h.consul.change(web=[HEALTH["web"][0]])
                h.consul.change(api=[instance("api", "api-1", 9001, "critical")])
                await h.until(lambda: h.current == expected(with_health(
                    HEALTH, web=[HEALTH["web"][0]], api=[instance("api", "api-1", 9001, "critical")])))
                await h.until(lambda: any(e["event"] == "catalog_resync" for e in logs))
                await h.settle()

            assert h.reads() - reads == Counter({"web": 2, "api": 2})

    async def test_an_instance_without_checks_going_is_not_hidden_by_another_removal(self) -> None:
        """legacy-2 (no check of its own) goes and the catalog answers at its index; then web-2 goes and
        state/any answers once, past both: web-2's removal does not explain legacy-2's, which is found."""
        legacy = [instance("legacy", "legacy-1", 5001, own_check=False),
                  instance("legacy", "legacy-2", 5002, own_check=False)]
        base = with_health(HEALTH, legacy=legacy)
        async with running(Harness.single(base)) as h:
            await h.started()

            h.consul.change(legacy=[legacy[0]])
            await h.until(lambda: h.consul.waiting.get("catalog") == h.consul.tables["catalog"])
            h.consul.change(web=[HEALTH["web"][0]])

            await h.until(lambda: h.current == expected(with_health(base, legacy=[legacy[0]],
                                                                    web=[HEALTH["web"][0]])))

    async def test_a_re_registration_reads_only_that_service(self, harness: Harness) -> None:
        """A new port rewrites the instance's checks (their ModifyIndex): the catalog's move is explained."""
        await harness.started()
        reads = harness.reads()

        web = [instance("web", "web-1", 8101), HEALTH["web"][1]]
        harness.consul.change(web=web)
        snapshot = await harness.next_snapshot()
        await harness.settle()

        assert snapshot == expected(with_health(HEALTH, web=web))
        assert harness.reads() - reads == Counter({"web": 1})

    async def test_a_query_that_ends_at_its_wait_reads_nothing_even_with_checkless_instances(self) -> None:
        """An answer at the same index is no change: re-reading the services without checks at every `wait`
        would cost as many reads as there are such services, while nothing changes."""
        legacy = [instance("legacy", "legacy-1", 5001, own_check=False)]
        async with running(Harness.single(with_health(HEALTH, legacy=legacy))) as h:
            await h.started()
            reads = h.reads()

            h.consul.expire()
            await h.settle()

            assert h.reads() == reads


class TestRoutesPerInstance:
    """An instance takes a route's traffic only if it declares the route; Connect proxies are not instances."""

    async def test_an_instance_without_the_route_tag_gets_none_of_its_traffic(self, harness: Harness) -> None:
        await harness.started()

        web = [instance("web", "web-1", 8001), instance("web", "web-2", 8002, node="node-2",
                                                         tags=["urlprefix-/", "urlprefix-/beta"])]
        harness.consul.change(web=web)
        snapshot = await harness.next_snapshot()

        assert snapshot == expected(with_health(HEALTH, web=web))
        svc = snapshot.service("web")
        assert svc is not None and svc.routes == (RouteSpec("", "/"), RouteSpec("", "/beta"))
        assert svc.members_of(RouteSpec("", "/beta")) == frozenset({"node-2/web-2"})
        assert svc.members_of(RouteSpec("", "/")) is None

    async def test_connect_kinds_among_the_instances_take_no_traffic(self, harness: Harness) -> None:
        await harness.started()

        gateway = instance("web", "web-gw", 8443, kind="ingress-gateway", tags=["urlprefix-/", "urlprefix-/gw"])
        harness.consul.change(web=[*HEALTH["web"], gateway])
        await harness.settle()

        assert harness.current == expected(HEALTH)
        assert harness.nothing_handed_over()

    @pytest.mark.parametrize("kind", ["connect-proxy", "mesh-gateway", "ingress-gateway", "terminating-gateway"])
    async def test_a_sidecar_service_with_copied_tags_makes_no_route(self, harness: Harness, kind: str) -> None:
        """A sidecar registers as a service of its own (web-sidecar-proxy) that copies its parent's tags."""
        await harness.started()

        sidecar = [instance("web-sidecar-proxy", "web-1-sidecar", 21000, kind=kind, tags=TAGS["web"])]
        harness.consul.change(**{"web-sidecar-proxy": sidecar})
        await harness.settle()

        assert harness.current is not None and harness.current.service("web-sidecar-proxy") is None
        assert harness.current == expected(HEALTH)


class TestConsulFailures:
    """While Consul fails the last state keeps serving; outage and recovery are each logged once."""

    async def test_outage_keeps_the_last_state_and_logs_once(self, harness: Harness) -> None:
        first = await harness.started()

        with capture_logs() as logs:
            harness.consul.go_down()
            await harness.until(lambda: all(harness.consul.refused[q] >= 3 for q in ("catalog", "checks")))
            harness.consul.come_back()
            await harness.settle()

        assert harness.nothing_handed_over()
        assert harness.watcher.last_snapshot == first
        assert harness.watcher.reachable
        assert [e["event"] for e in logs if e["event"].startswith("consul_")] == [
            "consul_unreachable", "consul_recovered"
        ]
        unreachable = next(e for e in logs if e["event"] == "consul_unreachable")
        assert (unreachable["reason"], unreachable["log_level"]) == ("unreachable", "warning")
        assert len(harness.errors) >= 6 and set(harness.errors) == {"unreachable"}

    async def test_change_during_outage_arrives_after_recovery(self, harness: Harness) -> None:
        await harness.started()

        harness.consul.go_down()
        await harness.until(lambda: all(harness.consul.refused[q] >= 2 for q in ("catalog", "checks")))
        harness.consul.change(api=[instance("api", "api-1", 9001, "critical")])
        harness.consul.come_back()
        snapshot = await harness.next_snapshot()

        api = snapshot.service("api")
        assert api is not None and api.endpoints == ()

    async def test_unreachable_at_start_hands_over_nothing_until_recovery(self, harness: Harness) -> None:
        harness.consul.down = True
        with capture_logs() as logs:
            harness.start()
            await harness.until(lambda: harness.consul.refused["catalog"] >= 3)
            assert harness.nothing_handed_over()
            assert harness.watcher.last_snapshot is None
            harness.consul.come_back()
            first = await harness.next_snapshot()

        assert first == expected(HEALTH)
        assert [e["event"] for e in logs if e["event"].startswith("consul_")] == [
            "consul_unreachable", "consul_recovered"
        ]

    async def test_a_change_before_the_checks_query_first_answers_is_not_missed(self, harness: Harness) -> None:
        """The catalog answered and every service was read while state/any failed; a check changes; when
        state/any answers at last, that change must still reach the snapshot."""
        harness.consul.broken.add("checks")
        harness.start()
        await harness.next_snapshot()
        await harness.until(lambda: harness.consul.waiting.get("checks") is None
                            and harness.watcher.idle)

        harness.consul.change(api=[instance("api", "api-1", 9001, "critical")])
        await harness.until(lambda: harness.consul.waiting.get("checks") is None
                            and harness.watcher.idle)
        harness.consul.mend("checks")
        await harness.settle()

        assert harness.current == expected(with_health(HEALTH, api=[instance("api", "api-1", 9001, "critical")]))


DC1: Health = {"web": [instance("web", "web-1", 8001), instance("web", "web-2", 8002)],
               "api": [instance("api", "api-1", 9001, tags=["urlprefix-/api"])]}
DC2: Health = {"web": [instance("web", "web-9", 8009)], "api": [instance("api", "api-9", 9009, tags=["v2"])],
               "shop": [instance("shop", "shop-9", 6009, tags=["urlprefix-/shop"])]}


def dc_expected(dc1: Health, dc2: Health, read: Mapping[str, set[str]]) -> Snapshot:
    """What the watcher should hand over when `read[dc]` names the services it read in each datacenter."""
    health = {name: {dc: h[name] for dc, h in (("dc1", dc1), ("dc2", dc2)) if name in h and name in read[dc]}
              for name in {*dc1, *dc2}}
    return build_dc_snapshot(("dc1", "dc2"), {"dc1": catalog_of(dc1), "dc2": catalog_of(dc2)}, health)


class DcHarness(Harness):
    """A Watcher following two fake datacenters, dc1 preferred."""

    def __init__(self) -> None:
        self.dc1, self.dc2 = FakeConsul(DC1), FakeConsul(DC2)
        super().__init__(FakeDatacenters(dc1=self.dc1, dc2=self.dc2), self.dc1, self.dc2)


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
    order of preference) with a healthy instance; the switch is one hand-over and one log line."""

    async def test_first_snapshot_waits_for_every_datacenter_and_prefers_the_first(self, dcs: DcHarness) -> None:
        first = await dcs.started()

        assert first == dc_expected(DC1, DC2, {"dc1": {"web", "api"}, "dc2": {"web", "shop"}})
        assert served(first, "web") == [("dc1", "web-1"), ("dc1", "web-2")]
        assert served(first, "api") == [("dc1", "api-1")]
        assert served(first, "shop") == [("dc2", "shop-9")]  # only dc2 has it: dc2 was waited for
        web = first.service("web")
        assert web is not None and web.endpoints[0].key == "dc1/node-1/web-1"

    async def test_each_datacenter_reads_the_routed_services_its_own_catalog_lists(self, dcs: DcHarness) -> None:
        """api's route tag is in dc1 only: its dc2 instances declare no route, so they are not read."""
        await dcs.started()
        assert (dcs.dc1.reads, dcs.dc2.reads) == (Counter({"web": 1, "api": 1}), Counter({"web": 1, "shop": 1}))

        dcs.dc1.change(api=[instance("api", "api-1", 9001, tags=["v1"])])  # api's only route tag leaves
        snapshot = await dcs.next_snapshot()
        await dcs.settle()

        assert [s.name for s in snapshot.services] == ["shop", "web"]
        assert "api" not in dcs.dc2.reads

    async def test_losing_the_last_healthy_instance_switches_datacenter_in_one_hand_over(
        self, dcs: DcHarness
    ) -> None:
        await dcs.started()
        critical = [instance("web", "web-1", 8001, "critical"), instance("web", "web-2", 8002, "critical")]
        with capture_logs() as logs:
            dcs.dc1.change(web=[critical[0], DC1["web"][1]])
            assert served(await dcs.next_snapshot(), "web") == [("dc1", "web-2")]
            dcs.dc1.change(web=critical)
            # dc2's instances were already known: the very next hand-over has them, never an empty pool.
            assert served(await dcs.next_snapshot(), "web") == [("dc2", "web-9")]
            await dcs.settle()
            assert dcs.nothing_handed_over()
            dcs.dc1.change(web=DC1["web"])
            back = await dcs.next_snapshot()

        assert served(back, "web") == [("dc1", "web-1"), ("dc1", "web-2")]
        assert served(back, "api") == [("dc1", "api-1")]
        assert [tuple(s.name for s in d.changed) for d in dcs.deltas] == [("web",)] * 3
        assert failovers(logs) == [("web", "dc1", "dc2", "info"), ("web", "dc2", "dc1", "info")]

    async def test_no_healthy_instance_anywhere_then_the_next_datacenter_recovers(self, dcs: DcHarness) -> None:
        await dcs.started()
        with capture_logs() as logs:
            dcs.dc2.change(web=[instance("web", "web-9", 8009, "critical")])  # dc1 still serves: no change
            await dcs.settle()
            assert dcs.nothing_handed_over()
            dcs.dc1.change(web=[instance("web", "web-1", 8001, "critical")])
            assert served(await dcs.next_snapshot(), "web") == []  # the route stays: 503, not 404
            dcs.dc2.change(web=DC2["web"])
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
            await dcs.settle()

        assert dcs.current == dc_expected(DC1, DC2, {"dc1": {"web", "api"}, "dc2": {"web", "shop"}})
        events = [(e["event"], e.get("query")) for e in logs if e["event"].startswith("consul_")]
        assert events == [("consul_unreachable", "catalog@dc2"), ("consul_recovered", None)]
        assert failovers(logs) == []

    async def test_a_datacenter_going_down_keeps_its_last_known_instances(self, dcs: DcHarness) -> None:
        """Failures never empty the table, per datacenter too: dc2's last answer still stands in for it."""
        await dcs.started()
        dcs.dc2.go_down()
        await dcs.until(lambda: all(dcs.dc2.refused[q] >= 2 for q in ("catalog", "checks")))
        dcs.dc1.change(web=[instance("web", "web-1", 8001, "critical"), instance("web", "web-2", 8002, "critical")])
        assert served(await dcs.next_snapshot(), "web") == [("dc2", "web-9")]
        assert not dcs.watcher.reachable

    async def test_the_preferred_datacenter_unreachable_keeps_serving_from_it(self, dcs: DcHarness) -> None:
        first = await dcs.started()
        dcs.dc1.go_down()
        await dcs.until(lambda: all(dcs.dc1.refused[q] >= 3 for q in ("catalog", "checks")))
        dcs.dc1.come_back()
        await dcs.settle()
        assert dcs.nothing_handed_over() and dcs.watcher.last_snapshot == first
        assert set(dcs.errors) == {"unreachable"}
