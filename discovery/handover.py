"""The watcher's half that turns reads into hand-overs: what each service's reads became, and when the services
that changed go out.

`Services` keeps, per service, its health entries per datacenter (as its last read, alone or by node, gave
them) and rebuilds the service alone (`snapshot.build_service`) after each read; a service whose rebuild differs
from what was handed over waits in `_pending`. `HandOver` sends the pending services out: nothing before every
catalog answered and each routed service was read once, then the first Snapshot whole, then SnapshotDeltas, at
most one per `min_interval` (the first at once), so a burst is coalesced. The watcher (`watcher.py`) runs the
loops and reads that feed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from . import triggers
from .model import Problem, ServiceRoutes, Snapshot, SnapshotDelta
from .snapshot import build_service, datacenter_switches, serving_datacenters
from .triggers import Checks, CheckView

log = structlog.get_logger("ferryman.discovery")

OnChange = Callable[[Snapshot | SnapshotDelta], None]


class HandOver:
    """The hand-over half of the watcher: the services built since the last hand-over, and when they go out
    (the first Snapshot once everything was read, then SnapshotDeltas, at most one per `min_interval`)."""

    _catalog_pending: set[str]
    _catalogs: dict[str, dict[str, list[str]]]
    _unread: set[tuple[str, str]]
    synced: asyncio.Event

    def __init__(self, on_change: OnChange, min_interval: float) -> None:
        self._on_change = on_change
        self._current: dict[str, ServiceRoutes] = {}  # what was handed over, by service
        self._pending: dict[str, ServiceRoutes | None] = {}  # built, not handed over yet (None: gone)
        self._min_interval = min_interval
        self._last_handover = float("-inf")
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last: Snapshot | None = None
        self._serving: dict[str, str] = {}  # service -> the datacenter that last served it (several followed)

    def _maybe_hand_over(self) -> None:
        """Hand the pending changes over now, or once `min_interval` has passed since the last hand-over."""
        if self._catalog_pending or not self._catalogs or self._unread:
            return  # nothing before every catalog answered and each routed service was read once
        if not self._pending and self._last is not None:
            return
        loop = asyncio.get_running_loop()
        due = self._last_handover + self._min_interval - loop.time()
        if due <= 0:
            self._hand_over()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(due, self._hand_over)

    def _hand_over(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        self._last_handover = asyncio.get_running_loop().time()
        changed = tuple(s for s in pending.values() if s is not None)
        removed = tuple(n for n, s in pending.items() if s is None and n in self._current)
        for svc in changed:
            self._current[svc.name] = svc
        for name in removed:
            del self._current[name]
        self._log_failovers(changed)
        if self._last is None:
            self._last = Snapshot(tuple(sorted(self._current.values(), key=lambda s: s.name)))
            self.synced.set()
            self._on_change(self._last)
            return
        delta = SnapshotDelta(tuple(sorted(changed, key=lambda s: s.name)), removed)
        if not delta:
            return
        self._last = self._last.apply(delta)
        self._on_change(delta)

    def _log_failovers(self, changed: tuple[ServiceRoutes, ...]) -> None:
        serving = serving_datacenters(changed)
        for service, was, now in datacenter_switches(self._serving, serving):
            log.info("datacenter_failover", service=service, **{"from": was}, to=now)
        self._serving.update(serving)


class Services(HandOver):
    """What the reads of each service became: its health entries per datacenter, and the service rebuilt alone."""

    _health: dict[str, dict[str, list[dict[str, Any]]]]
    _read_checks: dict[str, dict[str, frozenset[CheckView]]]
    _on_node: dict[str, dict[str, set[str]]]
    _dirty: set[tuple[str, str]]
    _read_at: dict[tuple[str, str], int]  # (service, datacenter) -> when its last read alone completed
    _datacenters: tuple[str, ...]
    _prefix: str
    _matcher: str
    also: frozenset[str]
    _known_problems: dict[str, set[Problem]]

    def _read(self, name: str, dc: str, entries: list[dict[str, Any]]) -> None:
        known = self._health.setdefault(name, {})
        triggers.place_on_nodes(self._on_node.setdefault(dc, {}), name, known.get(dc, ()), entries)
        known[dc] = entries
        self._read_checks.setdefault(dc, {})[name] = Checks.of_service(name, entries)
        self._rebuild(name)

    def _forget(self, name: str, dc: str) -> None:
        self._dirty.discard((name, dc))
        self._read_at.pop((name, dc), None)
        self._unread.discard((name, dc))
        known = self._health.get(name)
        if known is not None and dc in known:
            triggers.place_on_nodes(self._on_node.setdefault(dc, {}), name, known.pop(dc), ())
            if not known:
                del self._health[name]
            self._rebuild(name)

    def _rebuild(self, name: str) -> None:
        known = self._health.get(name, {})
        svc, problems = build_service(name, self._datacenters, known, self._prefix, name in self.also,
                                      self._merged_tags(name), matcher=self._matcher)
        fresh = set(problems) - self._known_problems.get(name, set())
        for problem in sorted(fresh, key=lambda p: (p.service, p.item)):
            log.warning(problem.kind, service=problem.service, tag=problem.item, error=problem.detail)
        self._known_problems[name] = set(problems)
        if svc != self._current.get(name):
            self._pending[name] = svc
        else:
            self._pending.pop(name, None)

    def _merged_tags(self, name: str) -> list[str]:
        tags: list[str] = []
        for dc in self._datacenters:
            for tag in self._catalogs.get(dc, {}).get(name) or ():
                if tag not in tags:
                    tags.append(tag)
        return tags
