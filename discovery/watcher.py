"""Follow Consul with blocking queries and hand over a new Snapshot whenever the routed world changes.

One loop blocks on /v1/catalog/services (which services exist, with their route tags); one loop per routed
service blocks on /v1/health/service/<name>. Each answer replaces that part of the state and the whole
Snapshot is rebuilt (pure, cheap); a snapshot equal to the last one handed over is dropped. A change in
Consul therefore reaches the proxy as soon as Consul answers the blocked query: milliseconds, not a poll.

Every loop is the one blocking-query loop of `follow.py` (index rules, backoff, rate limit), and all of them
share one outage bookkeeping: the first failure of an outage logs `consul_unreachable`, the moment every
failing loop has answered again logs `consul_recovered`. Failures never empty the table: the last good state
stays until Consul answers again. A loop that crashes (a bug) ends `run()` with its exception.

With several datacenters (the source's `datacenters`, in order of preference) every loop runs once per
datacenter: a catalog loop each, and a health loop per routed service in each datacenter whose catalog lists
it. Every datacenter is followed all the time, so when the preferred one loses a service's last healthy
instance the next one's instances are already known and take over in the same snapshot (`build_dc_snapshot`);
`datacenter_failover` is logged once per switch. A datacenter whose first catalog query fails does not hold
back the others (its services join when it answers); until one catalog has answered nothing is published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from .consul import ConsulError
from .follow import DEFAULT_LIMIT, Backoff, Outage, RateLimit, follow
from .model import Problem, Snapshot
from .snapshot import build_dc_snapshot, datacenter_switches, routed_services, serving_datacenters
from .tags import DEFAULT_PREFIX
from .tasks import start_task

log = structlog.get_logger("ferryman.discovery")


class CatalogSource(Protocol):
    """What the watcher reads. `datacenters`: the names to follow in order of preference; `("",)` reads the
    agent's own datacenter (and a query's `dc=""` means that one)."""

    @property
    def datacenters(self) -> tuple[str, ...]: ...
    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]: ...
    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]: ...


def _query(what: str, dc: str) -> str:
    """A loop's name in logs and in the outage bookkeeping: `catalog`, `health:web`, `health:web@dc2`."""
    return f"{what}@{dc}" if dc else what


class Watcher:
    """Runs the blocking-query loops; calls `on_snapshot` (synchronously, on the loop) for each new Snapshot.
    A discovery `Source`."""

    def __init__(
        self,
        source: CatalogSource,
        on_snapshot: Callable[[Snapshot], None],
        *,
        prefix: str = DEFAULT_PREFIX,
        on_error: Callable[[str], None] | None = None,
        on_request: Callable[[str, float], None] | None = None,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        limit: RateLimit = DEFAULT_LIMIT,
    ) -> None:
        self._source = source
        self._on_snapshot = on_snapshot
        self._on_error = on_error or (lambda reason: None)
        self._on_request = on_request or (lambda query, seconds: None)
        self._prefix = prefix
        self.also: frozenset[str] = frozenset()  # services watched without route tags (config and KV routes)
        self._backoff_base, self._backoff_cap, self._limit = backoff_base, backoff_cap, limit
        self._datacenters: tuple[str, ...] = tuple(source.datacenters) or ("",)
        self._catalogs: dict[str, dict[str, list[str]]] = {}  # per datacenter, once it answered
        self._catalog_pending: set[str] = set(self._datacenters)  # datacenters whose first catalog query is due
        self._health: dict[str, dict[str, list[dict[str, Any]]]] = {}  # service -> datacenter -> entries
        self._health_tasks: dict[tuple[str, str], asyncio.Task[None]] = {}  # (service, datacenter)
        self._pending: set[tuple[str, str]] = set()  # health loops whose first query has not answered (or failed)
        self._serving: dict[str, str] = {}  # service -> the datacenter that last served it (several followed)
        self._last: Snapshot | None = None
        self._known_problems: set[Problem] = set()
        self._outage = Outage()  # every loop's: an outage lasts while any of them is failing
        self._crashed: asyncio.Future[None] | None = None  # set with a health loop's exception: ends run()
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

    def reload(self) -> None:
        """Nothing to re-read: Consul is followed continuously."""

    async def run(self) -> None:
        """Run until cancelled; cancelling stops every loop. A loop that crashes ends it with that exception
        (the owner's done-callback says so), instead of leaving a part of the world unfollowed unnoticed."""
        self._crashed = asyncio.get_running_loop().create_future()
        catalogs = [
            start_task(self._catalog_loop(dc), _query("consul-catalog", dc)) for dc in self._datacenters
        ]
        try:
            await asyncio.gather(*catalogs, self._crashed)
        finally:
            tasks = [*catalogs, *self._health_tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _loop_crashed(self, exc: BaseException) -> None:
        if self._crashed is not None and not self._crashed.done():
            self._crashed.set_exception(exc)

    def _backoff(self) -> Backoff:
        return Backoff(self._backoff_base, self._backoff_cap)

    async def _catalog_loop(self, dc: str) -> None:
        async def fetch(index: int) -> tuple[int, dict[str, list[str]]]:
            started = time.monotonic()
            answer = await self._source.services(index, dc=dc)
            self._on_request("catalog", time.monotonic() - started)
            return answer

        def failed(exc: ConsulError) -> None:
            self._on_error(exc.reason)
            if dc in self._catalog_pending:
                # A datacenter out of reach must not hold back the others: its services join when it answers.
                self._catalog_pending.discard(dc)
                self._publish()

        def answered(services: dict[str, list[str]]) -> None:
            if services != self._catalogs.get(dc):
                self._catalogs[dc] = services
                self._catalog_pending.discard(dc)
                self._sync_health_loops()
                self._publish()

        await follow(fetch, answered, query=_query("catalog", dc), outage=self._outage, limit=self._limit,
                     backoff=self._backoff(), on_failure=failed)

    def watch_also(self, services: frozenset[str]) -> None:
        """Also follow these services (named by routes from elsewhere than tags), from now on."""
        if services != self.also:
            self.also = services
            if self._catalogs:
                self._sync_health_loops()
                self._publish()

    def _sync_health_loops(self) -> None:
        """One health loop per routed service (route tags in any datacenter) in each datacenter listing it."""
        routed: set[str] = set()
        for catalog in self._catalogs.values():
            routed |= routed_services(catalog, self._prefix)
        routed |= self.also
        wanted = {(name, dc) for dc, catalog in self._catalogs.items() for name in catalog if name in routed}
        for name, dc in list(self._health_tasks):
            if (name, dc) not in wanted:
                self._health_tasks.pop((name, dc)).cancel()
                known = self._health.get(name, {})
                known.pop(dc, None)
                if not known:
                    self._health.pop(name, None)
                self._pending.discard((name, dc))
                self._outage.forget(_query(f"health:{name}", dc))
        for name, dc in sorted(wanted - self._health_tasks.keys()):
            self._pending.add((name, dc))
            self._health_tasks[(name, dc)] = start_task(
                self._health_loop(name, dc), _query(f"consul-health-{name}", dc), self._loop_crashed
            )

    async def _health_loop(self, service: str, dc: str) -> None:
        async def fetch(index: int) -> tuple[int, list[dict[str, Any]]]:
            started = time.monotonic()
            answer = await self._source.health(service, index, dc=dc)
            self._on_request("health", time.monotonic() - started)
            return answer

        def failed(exc: ConsulError) -> None:
            self._on_error(exc.reason)
            if (service, dc) in self._pending:
                # A service whose health cannot be read must not hold back every other update: it stays
                # out of the table (or keeps its last known state) until a query succeeds.
                self._pending.discard((service, dc))
                self._publish()

        def answered(entries: list[dict[str, Any]]) -> None:
            self._pending.discard((service, dc))
            known = self._health.setdefault(service, {})
            if known.get(dc) != entries:
                known[dc] = entries
                self._publish()

        await follow(fetch, answered, query=_query(f"health:{service}", dc), outage=self._outage,
                     limit=self._limit, backoff=self._backoff(), on_failure=failed)

    def _publish(self) -> None:
        # Nothing before a first catalog, nor while a datacenter's first catalog query is under way.
        if not self._catalogs or self._catalog_pending:
            return
        # Until every new routed service's first health query has answered, keep serving the previous table:
        # a half-known world would briefly drop routes that are fine.
        if self._pending:
            return
        snapshot = build_dc_snapshot(self._datacenters, self._catalogs, self._health, self._prefix, self.also)
        problems = set(snapshot.problems)
        for problem in sorted(problems - self._known_problems, key=lambda p: (p.service, p.item)):
            log.warning(problem.kind, service=problem.service, tag=problem.item, error=problem.detail)
        self._known_problems = problems
        if snapshot == self._last:
            return
        self._last = snapshot
        self._log_failovers(snapshot)
        self.synced.set()
        self._on_snapshot(snapshot)

    def _log_failovers(self, snapshot: Snapshot) -> None:
        serving = serving_datacenters(snapshot)
        for service, was, now in datacenter_switches(self._serving, serving):
            log.info("datacenter_failover", service=service, **{"from": was}, to=now)
        routed = {s.name for s in snapshot.services}
        self._serving = {name: dc for name, dc in self._serving.items() if name in routed} | serving
