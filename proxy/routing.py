"""The routed world in force, and the one way it changes: whole (a snapshot, a route source's new part) or by
the services a discovery change names (a SnapshotDelta), which updates only their slots of the table and
their pools. Pools first (every route of the new table has its pool), then the table in one assignment.
A TCP route no configured listener takes is logged once (`tcp_route_without_listener`) when it appears.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import structlog

from discovery.model import Problem, Snapshot, SnapshotDelta
from discovery.source import Source

from .h1.upstream import UpstreamPool
from .listener import Router
from .metrics import Metrics
from .pool import Pools, Reconciled
from .route_index import identity
from .table import Route, RoutedWorld, RoutingTable, service_routes
from .tcp.routes import TcpListening

log = structlog.get_logger("ferryman")


class Routing:
    def __init__(
        self, router: Router, pools: Pools, upstream: UpstreamPool, metrics: Metrics, world: RoutedWorld,
    ) -> None:
        self.router, self.pools, self.upstream, self.metrics = router, pools, upstream, metrics
        self.world = world
        self.generation = 0
        self.source: Source | None = None  # set once the app has built it
        self._conflicts: set[Problem] = set()
        self.tcp: TcpListening | None = None  # set where TCP routes no listener takes are to be logged
        self._unlistened: set[str] = set()  # their ids, logged once each

    def take(self, change: Snapshot | SnapshotDelta) -> None:
        """A discovery source's hand-over: a new snapshot, or what changed."""
        if isinstance(change, SnapshotDelta):
            self.changed(change)
        else:
            self.update(RoutedWorld(change, self.world.parts))

    def update(self, world: RoutedWorld) -> None:
        """The one way the routed world changes (a snapshot, or a route source's new part): the services the
        parts name are followed, then the world is applied once a first snapshot is in."""
        previous, self.world = self.world, world
        if self.source is None:
            return
        if world.named != previous.named:
            self.source.watch_also(world.named)
            if self.world is not world:
                return  # the source handed over a new snapshot meanwhile, and that applied these parts
        if self.source.last_snapshot is not None:
            self.apply(world)

    def changed(self, delta: SnapshotDelta) -> None:
        """Some services changed: the table and the pools are updated for those alone (a deploy in a cluster of
        10,000 services must not rebuild 10,000 pools per instance it replaces)."""
        before = self.world
        if self.generation == 0:  # nothing applied yet: the first table is built whole
            self.update(RoutedWorld(before.snapshot.apply(delta), before.parts))
            return
        generation = self.generation + 1
        try:
            table = self.router.current.updated(before.snapshot, delta, generation)
            changes = self.pools.update(delta, now=time.monotonic())  # the event loop's clock
        except Exception as exc:  # whatever a builder raises, the source must go on
            log.error("table_build_failed", generation=generation, error=f"{type(exc).__name__}: {exc}",
                      exc_info=exc, detail="the routing table in force stays")
            return
        self.world = RoutedWorld(before.snapshot.apply(delta), before.parts)
        routes = [r for s in delta.changed for r in service_routes(s)]
        self._installed(table, changes, table.index.conflicts({identity(r) for r in routes}))
        self._unlistened_tcp(routes, whole=False)

    def apply(self, world: RoutedWorld) -> None:
        """Install a routed world: pools first (so every route of the new table has its pool), then the table
        in one assignment. A world that fails to build (a bug) keeps the table in force, logged."""
        generation = self.generation + 1
        try:
            table = RoutingTable.from_snapshot(world, generation)
            changes = self.pools.reconcile(world.snapshot, now=time.monotonic())  # the event loop's clock
        except Exception as exc:  # whatever a builder raises, the source must go on
            log.error("table_build_failed", generation=generation, error=f"{type(exc).__name__}: {exc}",
                      exc_info=exc, detail="the routing table in force stays")
            return
        problems = set(table.conflicts)
        new = problems - self._conflicts
        self._conflicts = problems
        self._installed(table, changes, tuple(new))
        self._unlistened_tcp(table.index.winners(), whole=True)

    def _unlistened_tcp(self, routes: Iterable[Route], *, whole: bool) -> None:
        """Log the TCP routes among `routes` that no listener takes, each once while it stays (`whole`: these
        are all the table's routes, so one that went away may warn again if it comes back)."""
        if self.tcp is None:
            return
        found = {route.id: (route, why) for route in routes if (why := self.tcp.missing(route)) is not None}
        for route_id in found.keys() - self._unlistened:
            route, why = found[route_id]
            log.warning("tcp_route_without_listener", route=route_id, service=route.service, detail=why)
        self._unlistened = set(found) if whole else self._unlistened | found.keys()

    def _installed(self, table: RoutingTable, changes: Reconciled, conflicts: Iterable[Problem]) -> None:
        self.generation = table.generation
        self.router.current = table
        for service in changes.added:
            self.metrics.new_service(service)
        self.upstream.close_idle_to(self.pools.take_gone(), self.pools.live)
        self.metrics.discovery_updates.inc()
        for problem in conflicts:
            log.warning(problem.kind, service=problem.service, route=problem.item, error=problem.detail)
        log.info(
            "table_swapped", generation=self.generation, routes=table.route_count, services=len(self.pools),
            added=changes.added[:20], removed=changes.removed[:20], changed=changes.changed[:20],
            counts=(len(changes.added), len(changes.removed), len(changes.changed)),
        )
