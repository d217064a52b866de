"""Follow Consul with blocking queries and hand over a new Snapshot whenever the routed world changes.

One loop blocks on /v1/catalog/services (which services exist, with their route tags); one loop per routed
service blocks on /v1/health/service/<name>. Each answer replaces that part of the state and the whole
Snapshot is rebuilt (pure, cheap); a snapshot equal to the last one handed over is dropped. A change in
Consul therefore reaches the proxy as soon as Consul answers the blocked query: milliseconds, not a poll.

Failures never empty the table: the last good state stays until Consul answers again. Each loop retries
with exponential backoff and full jitter; the first failure of an outage logs `consul_unreachable`, the first
success after it logs `consul_recovered`. After a failure the next query is non-blocking (index 0), so a
restarted Consul whose index went backwards, or jumped, is read afresh instead of blocking on a stale index.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from .consul import ConsulError
from .model import Problem, Snapshot
from .snapshot import build_snapshot, routed_services
from .tags import DEFAULT_PREFIX

log = structlog.get_logger("ferryman.discovery")


class CatalogSource(Protocol):
    async def services(self, index: int) -> tuple[int, dict[str, list[str]]]: ...
    async def health(self, service: str, index: int) -> tuple[int, list[dict[str, Any]]]: ...


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's variant): sleep U(0, min(cap, base*2^n))."""

    __slots__ = ("_attempt", "base", "cap", "rng")

    def __init__(self, base: float = 0.05, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * (2**self._attempt)))
        self._attempt = min(self._attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self._attempt = 0


def next_index(previous: int, returned: int) -> int:
    """Consul's rules for blocking-query indexes: an index that went backwards means the state was reset
    (a restarted agent, a snapshot restore), so read afresh with 0; an index of 0 or less is clamped to 1 so
    the next query still blocks instead of spinning."""
    if returned <= 0:
        return 1
    if returned < previous:
        return 0
    return returned


class Watcher:
    """Runs the blocking-query loops; calls `on_snapshot` (synchronously, on the loop) for each new Snapshot."""

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
    ) -> None:
        self._source = source
        self._on_snapshot = on_snapshot
        self._on_error = on_error or (lambda reason: None)
        self._on_request = on_request or (lambda query, seconds: None)
        self._prefix = prefix
        self._backoff_base, self._backoff_cap = backoff_base, backoff_cap
        self._catalog: dict[str, list[str]] | None = None
        self._health: dict[str, list[dict[str, Any]]] = {}
        self._health_tasks: dict[str, asyncio.Task[None]] = {}
        self._pending: set[str] = set()  # health loops whose first query has not answered (or failed) yet
        self._last: Snapshot | None = None
        self._known_problems: set[Problem] = set()
        self._failing: set[str] = set()  # loops whose last query failed; an outage lasts while non-empty
        self._outage_since = 0.0
        self.last_success: float | None = None
        self.synced = asyncio.Event()

    @property
    def last_snapshot(self) -> Snapshot | None:
        return self._last

    @property
    def reachable(self) -> bool:
        """Consul answered the last query of every loop (no outage under way)."""
        return self.last_success is not None and not self._failing

    async def run(self) -> None:
        """Run until cancelled; cancelling stops every loop."""
        try:
            await self._catalog_loop()
        finally:
            tasks = list(self._health_tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _catalog_loop(self) -> None:
        backoff = Backoff(self._backoff_base, self._backoff_cap)
        index = 0
        while True:
            started = time.monotonic()
            try:
                returned, services = await self._source.services(index)
            except ConsulError as exc:
                self._failed(exc, "catalog")
                index = 0
                await asyncio.sleep(backoff.next_delay())
                continue
            self._on_request("catalog", time.monotonic() - started)
            backoff.reset()
            self._succeeded("catalog")
            index = next_index(index, returned)
            if services != self._catalog:
                self._catalog = services
                self._sync_health_loops(routed_services(services, self._prefix))
                self._publish()

    def _sync_health_loops(self, wanted: set[str]) -> None:
        for name in list(self._health_tasks):
            if name not in wanted:
                self._health_tasks.pop(name).cancel()
                self._health.pop(name, None)
                self._pending.discard(name)
                self._recovered(f"health:{name}")
        for name in sorted(wanted - self._health_tasks.keys()):
            self._pending.add(name)
            self._health_tasks[name] = asyncio.get_running_loop().create_task(
                self._health_loop(name), name=f"consul-health-{name}"
            )

    async def _health_loop(self, service: str) -> None:
        backoff = Backoff(self._backoff_base, self._backoff_cap)
        index = 0
        while True:
            started = time.monotonic()
            try:
                returned, entries = await self._source.health(service, index)
            except ConsulError as exc:
                self._failed(exc, f"health:{service}")
                if service in self._pending:
                    # A service whose health cannot be read must not hold back every other update: it stays
                    # out of the table (or keeps its last known state) until a query succeeds.
                    self._pending.discard(service)
                    self._publish()
                index = 0
                await asyncio.sleep(backoff.next_delay())
                continue
            self._on_request("health", time.monotonic() - started)
            backoff.reset()
            self._succeeded(f"health:{service}")
            index = next_index(index, returned)
            self._pending.discard(service)
            if self._health.get(service) != entries:
                self._health[service] = entries
                self._publish()

    def _publish(self) -> None:
        if self._catalog is None:
            return
        # Until every new routed service's first health query has answered, keep serving the previous table:
        # a half-known world would briefly drop routes that are fine.
        if self._pending:
            return
        snapshot = build_snapshot(self._catalog, self._health, self._prefix)
        problems = set(snapshot.problems)
        for problem in sorted(problems - self._known_problems, key=lambda p: (p.service, p.item)):
            log.warning(problem.kind, service=problem.service, tag=problem.item, error=problem.detail)
        self._known_problems = problems
        if snapshot == self._last:
            return
        self._last = snapshot
        self.synced.set()
        self._on_snapshot(snapshot)

    def _failed(self, exc: ConsulError, query: str) -> None:
        self._on_error(exc.reason)
        if not self._failing:
            self._outage_since = time.monotonic()
            log.warning("consul_unreachable", reason=exc.reason, query=query, error=exc.detail)
        self._failing.add(query)

    def _succeeded(self, query: str) -> None:
        self.last_success = time.time()
        self._recovered(query)

    def _recovered(self, query: str) -> None:
        # The outage ends when every loop that failed has succeeded again (or was stopped), not at the first
        # answer: a restarting agent answers some queries before it has a leader, and a per-query view would
        # log the same outage several times.
        if query in self._failing:
            self._failing.discard(query)
            if not self._failing:
                log.info("consul_recovered", outage_s=round(time.monotonic() - self._outage_since, 3))
