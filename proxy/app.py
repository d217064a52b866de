"""Wiring: discovery watcher -> routing table + pools -> proxy listener, plus the admin listener.

The only place that owns long-lived resources (Consul client, upstream ClientSession, listeners) and the
only place that starts and stops them, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiohttp import web

from discovery.consul import ConsulClient
from discovery.model import Problem, Snapshot
from discovery.watcher import Watcher

from . import logs
from .admin import make_admin_app
from .config import Settings
from .forwarder import UpstreamPool
from .metrics import Metrics
from .pool import Pools
from .server import ProxyContext, ProxyServer, Router
from .table import RoutingTable

log = structlog.get_logger("ferryman")

# The proxy listener opens once the first routing table is in (so a new worker never answers 404 for routes
# that exist), or after this long without one.
_FIRST_SYNC_WAIT_S = 5.0


class Ferryman:
    """One process's proxy. With several workers each worker runs one with `serve_admin=False` and
    `reuse_port=True`, and the supervisor runs one with `serve_proxy=False` for the admin listener."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        serve_proxy: bool = True,
        serve_admin: bool = True,
        reuse_port: bool = False,
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.serve_proxy, self.serve_admin, self.reuse_port = serve_proxy, serve_admin, reuse_port
        self.exposition = exposition or self.metrics.exposition
        self.router = Router()
        self.pools = Pools(settings.service_overrides())
        self.generation = 0
        self._conflicts: set[Problem] = set()
        self.upstream = UpstreamPool(
            connect_timeout=settings.connect_timeout,
            keepalive=settings.upstream_keepalive,
            idle_timeout=settings.upstream_idle_timeout,
        )
        self._proxy: ProxyServer | None = None
        self._consul: ConsulClient | None = None
        self._watcher: Watcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._runners: list[web.BaseRunner] = []

    def apply(self, snapshot: Snapshot) -> None:
        """Install a new snapshot: pools first (so every route of the new table has its pool), then the
        table in one assignment."""
        self.generation += 1
        table = RoutingTable.from_snapshot(snapshot, self.generation)
        changes = self.pools.reconcile(snapshot)
        self.router.current = table
        if changes.removed or changes.changed:
            self.upstream.close_idle_except({(e.address, e.port) for p in self.pools for e in p.endpoints})
        self.metrics.set_pools((p.service, len(p)) for p in self.pools)
        self.metrics.routes.set(len(table.routes))
        self.metrics.discovery_updates.inc()
        for problem in set(table.conflicts) - self._conflicts:
            log.warning(problem.kind, service=problem.service, route=problem.item, error=problem.detail)
        self._conflicts = set(table.conflicts)
        log.info(
            "table_swapped", generation=self.generation, routes=len(table.routes), services=len(self.pools),
            added=changes.added, removed=changes.removed, changed=changes.changed,
        )

    async def start(self) -> None:
        s = self.settings
        self._consul = ConsulClient(s.consul_address, token=s.consul_token, dc=s.consul_dc, wait_s=s.consul_wait)
        self._watcher = Watcher(
            self._consul, self.apply, prefix=s.tag_prefix,
            on_error=lambda reason: self.metrics.discovery_errors.labels(reason).inc(),
        )
        self._watch_task = asyncio.get_running_loop().create_task(self._watcher.run(), name="consul-watcher")

        listen, admin = s.listen_addr, s.admin_addr
        if self.serve_proxy and not await self.wait_synced(_FIRST_SYNC_WAIT_S):
            # Consul is down or slow: serve anyway (404 until it answers) rather than refuse connections.
            log.warning("started_without_routes", waited_s=_FIRST_SYNC_WAIT_S, consul=s.consul_addr)
        if self.serve_proxy:
            self._proxy = ProxyServer(ProxyContext(
                router=self.router, pools=self.pools, upstream=self.upstream, metrics=self.metrics,
                max_attempts=s.max_attempts, read_timeout=s.read_timeout, idle_timeout=s.client_idle_timeout,
                listen_port=listen.port, proto="http", access_log=logs.access_writer() if s.access_log else None,
                loop=asyncio.get_running_loop(),
            ))
            await self._proxy.start(listen.host, listen.port, reuse_port=self.reuse_port)
        if self.serve_admin:
            admin_runner = web.AppRunner(make_admin_app(self.router, self.pools, self.exposition), access_log=None)
            await admin_runner.setup()
            self._runners.append(admin_runner)
            await web.TCPSite(admin_runner, admin.host, admin.port).start()
        log.info("ferryman_started", listen=str(listen) if self.serve_proxy else None,
                 admin=str(admin) if self.serve_admin else None, consul=s.consul_addr)

    async def wait_synced(self, timeout: float) -> bool:
        if self._watcher is None:
            return False
        try:
            await asyncio.wait_for(self._watcher.synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        log.info("ferryman_stopping", shutdown_timeout_s=self.settings.shutdown_timeout)
        # Listeners first (in-flight requests finish within shutdown_timeout), then discovery and clients.
        if self._proxy is not None:
            await self._proxy.stop(self.settings.shutdown_timeout)
            self._proxy = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._consul is not None:
            await self._consul.close()
        self.upstream.close()
        log.info("ferryman_stopped")
