"""Follow Consul for a whole host with a constant number of blocking queries, and hand over what changed.

Per datacenter, two blocking queries whatever the number of services: /v1/catalog/services (which services
exist, with their tags) and /v1/health/state/any (every check). When either answers, `triggers.py` names the
services whose instances must be read again, and only those are read, with /v1/health/service/<name> (a few
at a time: `fetch_concurrency`). Each service is rebuilt alone (`snapshot.build_service`) and the services
that changed go out as one `SnapshotDelta`; a burst (a deploy replacing 500 instances) is coalesced: at most
one hand-over per `min_interval`, the first at once (`handover.py`). While nothing changes the two queries
block for `wait` and nothing else is asked of Consul. A large datacenter (more routed services than twice its
nodes) is read by node at start, and again when a catalog move nothing explains makes every service due
(`_NodeReads`, `nodes.py`): a few requests instead of one per service; a service read alone while the node
reads were under way keeps that read, and a move during them reads by node once more after them. state/any
answers are compared on their raw text (`triggers.StateAny`), so a change among 30,000 checks costs tens of
milliseconds, not the decoding of all.

Every loop is the blocking-query loop of `follow.py` (index rules, backoff, token-bucket rate limit), and all
share one outage bookkeeping: the first failure of an outage logs `consul_unreachable`, the moment every
failing query has answered again logs `consul_recovered`. Failures never empty the table: the last good
state stays until Consul answers again, and a service whose read failed is read again.

Several datacenters (`datacenters`, in order of preference): both loops run per datacenter; a service is read
in every datacenter whose catalog lists it, so when the preferred one loses a service's last healthy instance
the next one's instances are already known and take over in the same hand-over; `datacenter_failover` is
logged once per switch. Nothing is handed over before every datacenter's catalog answered (or failed) and the
services it routes were read once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import structlog

from .consul import ConsulError
from .follow import DEFAULT_LIMIT, Backoff, Outage, RateLimit, follow
from .handover import OnChange as OnChange  # (proxy/app.py takes it from here)
from .handover import Services
from .model import Problem, Snapshot
from .nodes import entries_from_nodes
from .tags import DEFAULT_PREFIX
from .tasks import start_task
from .triggers import Checks, CheckView, StateAny, catalog_changes, changed_checks, health_changes, routed

log = structlog.get_logger("ferryman.discovery")

T = TypeVar("T")
# A catalog change that shows nothing new is explained by a check written at the same index (an instance with a
# check came, went or changed: both answers carry that index). Until state/any has answered at or past that index
# the question stays open (asked again every _EXPLAIN_WAIT_S); when it has not after _EXPLAIN_MAX_S, no check
# moved with the change: an instance without checks of its own changed.
_EXPLAIN_WAIT_S = 0.5
_EXPLAIN_MAX_S = 3.0
# From this many services to read at start, a datacenter is read by node (nodes.py) when it has at most half as
# many nodes as services to read: a few requests instead of one per service.
NODE_READS_FROM: Final = 64


class CatalogSource(Protocol):
    """What the watcher reads. `datacenters`: the names to follow in order of preference; `("",)` reads the
    agent's own datacenter (and a query's `dc=""` means that one)."""

    @property
    def datacenters(self) -> tuple[str, ...]: ...
    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]: ...
    async def checks(self, index: int, dc: str = "") -> tuple[int, Sequence[dict[str, Any]] | None]:
        """None: the same index as asked (the wait ran out), nothing to read."""
    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]: ...
    async def nodes(self, dc: str = "") -> list[str]: ...
    async def node_services(self, node: str, dc: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]: ...


async def _timed(on_request: Callable[[str, float], None], what: str, call: Awaitable[T]) -> T:
    started = time.monotonic()
    answer = await call
    on_request(what, time.monotonic() - started)
    return answer


def _query(what: str, dc: str) -> str:
    """A loop's name in logs and in the outage bookkeeping: `catalog`, `checks@dc2`, `health`."""
    return f"{what}@{dc}" if dc else what


class _NodeReads(Services):
    """Most of a large datacenter read by node, with a state/any answer (nodes.py), instead of one read per
    service: at start (the services wait in `_by_node`, and in `_unread`, meanwhile), and when a catalog move
    nothing explains makes every routed service due again (`_resync`)."""

    _source: CatalogSource
    _reading: set[tuple[str, str]]
    _wanted: dict[str, set[str]]
    _wake: asyncio.Event
    _fetch_concurrency: int
    _on_request: Callable[[str, float], None]
    _on_error: Callable[[str], None]
    _by_node: dict[str, set[str]]  # per datacenter: the services its first read by node is to read
    _first_checks: dict[str, tuple[int, list[dict[str, Any]]]]  # per datacenter: state/any's first answer
    _first_answers: dict[str, asyncio.Event]  # per datacenter: its first catalog and checks answers are in
    _raw: dict[str, StateAny]  # per datacenter: state/any as last read
    _checks_at: dict[str, int]
    _raw_at: dict[str, int]  # per datacenter: the index of that answer
    _resyncing: set[str]  # datacenters being read again by node
    _resync_again: set[str]  # datacenters asked to resync while they were: once more after it
    _reads_done: itertools.count[int]
    _side_tasks: set[asyncio.Task[None]]

    def _by_service(self, dc: str, names: set[str] | None = None) -> None:
        """Read these services one by one after all (reading by node failed, or is not worth it)."""
        names = self._by_node.pop(dc, set()) if names is None else names
        self._dirty |= {(name, dc) for name in names if name in self._wanted.get(dc, ())}
        self._wake.set()

    async def _first_read(self, dc: str) -> None:
        """Once the datacenter's catalog and state/any have answered: the services waiting in `_by_node` read
        by node, the few that changed meanwhile alone."""
        await self._first_answers[dc].wait()
        names, first = self._by_node.get(dc), self._first_checks.pop(dc, None)
        if not names:
            return
        if first is None:  # state/any failed: no checks to put the entries together with
            self._by_service(dc)
            return
        await self._read_by_node(dc, names, *first, start=True, mark=next(self._reads_done))

    def _resync(self, dc: str) -> None:
        """Every routed service of the datacenter is due again: read by node when it is large and state/any's
        last answer is at hand as Consul sent it, else one by one (rate-limited by the readers)."""
        if dc in self._resyncing:
            # Its node reads may have been answered before the move that asks for this: once more after it.
            self._resync_again.add(dc)
            return
        wanted = self._wanted.get(dc, set())
        raw, index = self._raw.get(dc), self._raw_at.get(dc, 0)
        if raw is None or len(wanted) < NODE_READS_FROM:
            self._by_service(dc, wanted)
            return
        self._resyncing.add(dc)
        mark = next(self._reads_done)  # a service read alone after this is newer than what the nodes may say

        async def again() -> None:
            try:
                await self._read_by_node(dc, set(wanted), index, raw.checks(), start=False, mark=mark)
            except ValueError:  # an answer that does not decode (the checks loop said so already)
                self._resync_again.discard(dc)
                self._by_service(dc, wanted)
            finally:
                self._resyncing.discard(dc)
            if dc in self._resync_again:
                self._resync_again.discard(dc)
                self._resync(dc)

        task = start_task(again(), _query("consul-resync", dc))
        self._side_tasks.add(task)  # (cancelled with the watcher)
        task.add_done_callback(self._side_tasks.discard)

    async def _read_by_node(self, dc: str, names: set[str], index: int, checks: list[dict[str, Any]], *,
                            start: bool, mark: int) -> None:
        """Read `names` by node with state/any's answer `checks` (read at `index`); `start`: the first read,
        which fills in the services not read yet (`_unread`); else those whose entries differ. A service read
        alone since `mark` (taken before the node reads), or about to be, keeps that read: the nodes may have
        answered before it (an instance deregistered meanwhile would come back, and nothing would take it
        out again)."""
        try:
            nodes = await _timed(self._on_request, "nodes", self._source.nodes(dc))
            if len(nodes) * 2 > len(names):
                log.info("read_by_service", datacenter=dc or None, services=len(names), nodes=len(nodes))
                self._by_service(dc, self._by_node.pop(dc, set()) if start else names)
                return
            limit = asyncio.Semaphore(self._fetch_concurrency)

            async def one(node: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
                async with limit:
                    return await _timed(self._on_request, "node", self._source.node_services(node, dc))

            read = await asyncio.gather(*(one(node) for node in nodes))
        except ConsulError as exc:
            self._on_error(exc.reason)
            log.warning("read_by_node_failed", datacenter=dc or None, reason=exc.reason, error=exc.detail)
            self._by_service(dc, self._by_node.pop(dc, set()) if start else names)
            return
        if start:
            names = self._by_node.pop(dc, set())
        entries, alone = entries_from_nodes(names, read, checks, index)
        wanted = self._wanted.get(dc, set())
        busy = self._dirty | self._reading
        for count, (name, found) in enumerate(sorted(entries.items()), 1):
            due = (name, dc) in self._unread if start else self._health.get(name, {}).get(dc) != found
            newer = (name, dc) in busy or self._read_at.get((name, dc), -1) > mark
            if name in wanted and due and not newer:
                self._read(name, dc, found)
                self._unread.discard((name, dc))
            if count % 1000 == 0:
                await asyncio.sleep(0)  # 10,000 services build in seconds: let the loops and readers run
        log.info("read_by_node", datacenter=dc or None, services=len(entries), nodes=len(nodes),
                 read_alone=len(alone))
        self._by_service(dc, alone)
        self._maybe_hand_over()


class Watcher(_NodeReads):
    """Runs the blocking-query loops and the reads they trigger; calls `on_change` (synchronously, on the
    loop) with the first Snapshot, then with each SnapshotDelta. A discovery `Source`."""

    def __init__(
        self,
        source: CatalogSource,
        on_change: OnChange,
        *,
        prefix: str = DEFAULT_PREFIX,
        matcher: str = "prefix",
        on_error: Callable[[str], None] | None = None,
        on_request: Callable[[str, float], None] | None = None,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        limit: RateLimit = DEFAULT_LIMIT,
        fetch_concurrency: int = 4,
        min_interval: float = 0.1,
        explain_max: float = _EXPLAIN_MAX_S,
    ) -> None:
        super().__init__(on_change, min_interval)
        self._source = source
        self._on_error = on_error or (lambda reason: None)
        self._on_request = on_request or (lambda query, seconds: None)
        self._prefix, self._matcher = prefix, matcher  # the tag prefix and the global path_matcher
        self.also: frozenset[str] = frozenset()  # services followed without route tags (config and KV routes)
        self._backoff_base, self._backoff_cap, self._limit = backoff_base, backoff_cap, limit
        self._datacenters: tuple[str, ...] = tuple(source.datacenters) or ("",)
        self._catalogs: dict[str, dict[str, list[str]]] = {}  # per datacenter, once it answered
        self._catalog_pending: set[str] = set(self._datacenters)  # datacenters whose first catalog is due
        self._checks: dict[str, Checks] = {}  # per datacenter: state/any as last read (a source of decoded lists)
        self._raw: dict[str, StateAny] = {}  # per datacenter: state/any as last read, as Consul sent it
        self._raw_at: dict[str, int] = {}  # and the index it answered at
        self._catalog_index: dict[str, int] = {}  # per datacenter: the index of the catalog last read
        self._check_writes: dict[str, set[int]] = {}  # per datacenter: indexes checks were written at
        self._check_answers: dict[str, collections.deque[int]] = {}  # and the indexes state/any answered at
        self._checks_at: dict[str, int] = {}  # the highest index state/any answered at
        self._explaining: set[tuple[str, int]] = set()  # catalog changes waiting to be explained
        self._wanted: dict[str, set[str]] = {}  # per datacenter: the services it routes (from its catalog)
        self._read_checks: dict[str, dict[str, frozenset[CheckView]]] = {}  # what each read showed of checks
        self._retrying: set[tuple[str, str]] = set()  # reads that failed, due again after a pause
        self._health: dict[str, dict[str, list[dict[str, Any]]]] = {}  # service -> datacenter -> entries
        self._on_node: dict[str, dict[str, set[str]]] = {}  # datacenter -> node -> services with instances there
        self._dirty: set[tuple[str, str]] = set()  # (service, datacenter) to read again
        self._reading: set[tuple[str, str]] = set()
        self._unread: set[tuple[str, str]] = set()  # routed, never read yet: nothing is handed over before
        self._fetch_concurrency = fetch_concurrency
        self._wake = asyncio.Event()
        self._explain_max = explain_max
        self._known_problems: dict[str, set[Problem]] = {}
        self._outage = Outage()  # every loop's: an outage lasts while any of them is failing
        self._by_node: dict[str, set[str]] = {}
        self._first_checks: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._first_answers = {dc: asyncio.Event() for dc in self._datacenters}
        self._resyncing: set[str] = set()
        self._resync_again: set[str] = set()
        self._reads_done = itertools.count()  # completed reads alone, counted (`_read_at`)
        self._read_at: dict[tuple[str, str], int] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._answered: dict[str, set[str]] = {dc: set() for dc in self._datacenters}  # which first answers came
        self.synced = asyncio.Event()

    @property
    def last_snapshot(self) -> Snapshot | None:
        return self._last

    @property
    def last_success(self) -> float | None:
        return self._outage.last_success

    @property
    def reachable(self) -> bool:
        """Consul answered the last query of every loop (no outage under way)."""
        return self.last_success is not None and not self._outage.failing

    @property
    def idle(self) -> bool:
        """Nothing to read and nothing waiting to be handed over (what tests wait for)."""
        return not (self._dirty or self._reading or self._pending or self._flush_handle is not None
                    or self._explaining or self._retrying or any(self._by_node.values()) or self._resyncing)

    def reload(self) -> None:
        """Nothing to re-read: Consul is followed continuously."""

    async def run(self) -> None:
        """Run until cancelled; cancelling stops every loop. A loop that crashes ends it with that exception
        (the owner's done-callback says so), instead of leaving a part of the world unfollowed unnoticed."""
        tasks = [start_task(self._catalog_loop(dc), _query("consul-catalog", dc)) for dc in self._datacenters]
        tasks += [start_task(self._checks_loop(dc), _query("consul-checks", dc)) for dc in self._datacenters]
        tasks += [start_task(self._reader(), f"consul-reader-{n}") for n in range(self._fetch_concurrency)]
        tasks += [start_task(self._first_read(dc), _query("consul-first-read", dc)) for dc in self._datacenters]
        try:
            await asyncio.gather(*tasks)
        finally:
            tasks += self._side_tasks
            for task in tasks:
                task.cancel()
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _backoff(self) -> Backoff:
        return Backoff(self._backoff_base, self._backoff_cap)

    def _first_answer(self, dc: str, what: str) -> None:
        """The datacenter's first `catalog` or `checks` answer (or failure) is in."""
        self._answered[dc].add(what)
        if self._answered[dc] >= {"catalog", "checks"}:
            self._first_answers[dc].set()

    # --- the two blocking queries per datacenter ---
    async def _catalog_loop(self, dc: str) -> None:
        def failed(exc: ConsulError) -> None:
            self._on_error(exc.reason)
            self._first_answer(dc, "catalog")
            if dc in self._catalog_pending:
                # A datacenter out of reach must not hold back the others: its services join when it answers.
                self._catalog_pending.discard(dc)
                self._maybe_hand_over()

        def answered(answer: tuple[int, dict[str, list[str]]]) -> None:
            index, services = answer
            before = self._catalogs.get(dc, {})
            first = dc not in self._catalogs  # (a first query that failed already left _catalog_pending)
            self._catalogs[dc] = services
            self._catalog_pending.discard(dc)
            self._catalog_changed(dc, before, services, first)
            self._first_answer(dc, "catalog")
            if not first and before == services and index > self._catalog_index.get(dc, 0):
                # The catalog moved and shows nothing new: an instance came or went. If no check moved with it
                # (state/any stays behind this index), it has no check of its own: look again (below).
                self._explaining.add((dc, index))
                loop = asyncio.get_running_loop()
                loop.call_later(_EXPLAIN_WAIT_S, self._explain, dc, index, loop.time() + self._explain_max)
            self._catalog_index[dc] = index

        async def fetch(index: int) -> tuple[int, tuple[int, dict[str, list[str]]]]:
            returned, services = await _timed(self._on_request, "catalog", self._source.services(index, dc=dc))
            return returned, (returned, services)

        await follow(fetch, answered, query=_query("catalog", dc), outage=self._outage, limit=self._limit,
                     backoff=self._backoff(), on_failure=failed)

    def _catalog_changed(self, dc: str, before: dict[str, list[str]], after: dict[str, list[str]],
                         first: bool) -> None:
        wanted = self._wanted[dc] = routed(after, self._prefix, self.also)
        read, dropped = catalog_changes(before, after, wanted)
        dropped |= {name for (name, d) in self._dirty | self._unread if d == dc and name not in wanted}
        for name in dropped:
            self._forget(name, dc)
        new = {(name, dc) for name in read}
        if first:
            self._unread |= new
            if len(new) >= NODE_READS_FROM and not self._first_answers[dc].is_set():
                self._by_node[dc] = set(read)  # read by node once state/any answered (_first_read)
                new = set()
        self._dirty |= new
        self._wake.set()
        self._maybe_hand_over()

    def _explain(self, dc: str, index: int, deadline: float) -> None:
        """A catalog change no check change came with: every routed service of the datacenter is read again
        (rate-limited by the readers), since nothing tells which one gained or lost an instance without checks."""
        if index in self._check_writes.get(dc, ()) or index in self._check_answers.get(dc, ()):
            # Explained: a check was written or removed at that index, and its service is being read. A check
            # removed between two answers (at an index neither shows) explains nothing: another instance, one
            # without checks, may have gone at any index in between.
            self._explaining.discard((dc, index))
            return
        loop = asyncio.get_running_loop()
        if self._checks_at.get(dc, 0) < index and loop.time() < deadline:
            loop.call_later(_EXPLAIN_WAIT_S, self._explain, dc, index, deadline)  # state/any not there yet
            return
        self._explaining.discard((dc, index))
        log.info("catalog_resync", datacenter=dc or None, services=len(self._wanted.get(dc, ())),
                 reason="an instance changed and no check with it")
        self._resync(dc)

    async def _checks_loop(self, dc: str) -> None:
        def answered(answer: tuple[int, Sequence[dict[str, Any]] | None]) -> None:
            index, checks = answer
            if checks is None:
                return  # the wait ran out at the same index: nothing changed
            # The indexes state/any answered at (a catalog change at one of them came with a check change).
            self._check_answers.setdefault(dc, collections.deque(maxlen=256)).append(index)
            self._checks_at[dc] = max(self._checks_at.get(dc, 0), index)
            changed = self._checks_changed(dc, index, checks)
            wanted = self._wanted.get(dc, set())
            self._dirty |= {(name, dc) for name in changed if name in wanted}
            self._wake.set()

        def failed(exc: ConsulError) -> None:
            self._on_error(exc.reason)
            self._first_answer(dc, "checks")  # the first read by node does not wait for a state/any that fails

        async def fetch(index: int) -> tuple[int, tuple[int, Sequence[dict[str, Any]] | None]]:
            returned, checks = await _timed(self._on_request, "checks", self._source.checks(index, dc=dc))
            return returned, (returned, checks)

        await follow(fetch, answered,
                     query=_query("checks", dc), outage=self._outage, limit=self._limit, backoff=self._backoff(),
                     on_failure=failed)

    def _checks_changed(self, dc: str, index: int, checks: Sequence[dict[str, Any]]) -> set[str]:
        """The services a state/any answer names: compared on the raw text with the last answer when both are
        StateAny (the check rows that differ), else decoded and compared whole."""
        raw = checks if isinstance(checks, StateAny) else None
        previous = self._raw.get(dc)
        if raw is not None:
            self._raw[dc], self._raw_at[dc] = raw, index
        if previous is not None and raw is not None:
            changes = changed_checks(previous, raw)
            if changes is not None:
                writes = self._check_writes.setdefault(dc, set())
                writes |= changes.written
                if len(writes) > 4 * len(raw.part_set()) + 4096:  # bounded: only indexes a catalog change may ask
                    floor = min([self._catalog_index.get(dc, 0), *(i for d, i in self._explaining if d == dc)])
                    self._check_writes[dc] = {i for i in writes if i >= floor}
                on_node = self._on_node.get(dc, {})
                named = set(changes.services).union(*(on_node.get(node, ()) for node in changes.nodes))
                return named
            before: Checks | None = Checks.read(previous)
        else:
            before = self._checks.get(dc)
        after = Checks.read(checks)
        if raw is None:
            self._checks[dc] = after
        # The indexes checks were written at: a catalog change at one of them came with a check change.
        self._check_writes[dc] = {v[5] for views in after.services.values() for v in views}
        if before is None:
            # The first answer: what the services read so far showed of their checks is the baseline; the
            # services waiting for the read by node are read with this very answer.
            before = Checks({**self._read_checks.get(dc, {}), **{n: after.services.get(n, frozenset())
                                                                  for n in self._by_node.get(dc, ())}}, after.nodes)
            self._first_checks[dc] = (index, raw.checks() if raw is not None else list(checks))
            self._first_answer(dc, "checks")
        return health_changes(before, after, self._on_node.get(dc, {}))

    def watch_also(self, services: frozenset[str]) -> None:
        """Also follow these services (named by routes from elsewhere than tags), from now on."""
        if services == self.also:
            return
        self.also = services
        for dc, catalog in self._catalogs.items():
            wanted = self._wanted[dc] = routed(catalog, self._prefix, self.also)
            self._dirty |= {(name, dc) for name in wanted if name not in self._health or dc not in self._health[name]}
            for name in [n for n, known in self._health.items() if dc in known and n not in wanted]:
                self._forget(name, dc)
        self._wake.set()

    # --- reading the services that changed ---
    async def _reader(self) -> None:
        """One of `fetch_concurrency` readers: takes a service to read, reads it, builds it, repeats."""
        backoff = self._backoff()
        while True:
            todo = self._dirty - self._reading
            if not todo:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = min(todo)
            self._dirty.discard(key)
            self._reading.add(key)
            name, dc = key
            try:
                _, entries = await _timed(self._on_request, "health", self._source.health(name, 0, dc=dc))
            except ConsulError as exc:
                self._outage.failed(_query("health", dc), exc)
                self._on_error(exc.reason)
                self._reading.discard(key)
                if key in self._unread:
                    # A service that cannot be read must not hold back every other one: it joins when it can.
                    self._unread.discard(key)
                    self._maybe_hand_over()
                # Read again after a pause, while the others go on (it must not starve the services after it).
                self._retrying.add(key)
                asyncio.get_running_loop().call_later(backoff.next_delay(), self._retry, key)
                continue
            finally:
                self._reading.discard(key)
            backoff.reset()
            self._read_at[key] = next(self._reads_done)
            self._outage.succeeded(_query("health", dc))
            if name in self._wanted.get(dc, ()):
                self._read(name, dc, entries)
            self._unread.discard(key)
            self._maybe_hand_over()

    def _retry(self, key: tuple[str, str]) -> None:
        self._retrying.discard(key)
        if key[0] in self._wanted.get(key[1], ()):
            self._dirty.add(key)
            self._wake.set()
