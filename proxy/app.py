"""Wiring: discovery watcher -> routing table + pools -> proxy listener, plus the admin listener.

The only place that owns long-lived resources (Consul client, upstream ClientSession, listeners) and the
only place that starts and stops them, in order.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Callable
from dataclasses import fields

import aiohttp
import structlog
from aiohttp import web

from discovery.consul import ConsulAccessError, ConsulClient, ConsulError
from discovery.model import Endpoint, Problem, Snapshot
from discovery.static import StaticError, StaticWatcher
from discovery.watcher import Backoff, Watcher, next_index

from . import logs
from .admin import make_admin_app
from .config import ConfigError, ConfigRoute, Settings, parse_route_entry, reloaded
from .forwarder import UpstreamPool
from .headers import TrustedProxies
from .metrics import Metrics, StateCollector
from .pool import Pool, PoolPolicy, Pools
from .server import ProxyContext, ProxyServer, Router
from .state import Report, pools_state, write_report
from .table import RoutingTable
from .tls import HttpsRedirect, Terminator, TlsError, kv_certificates

log = structlog.get_logger("ferryman")

# The proxy listener opens once the first routing table is in (so a new worker never answers 404 for routes
# that exist), or after this long without one.
_FIRST_SYNC_WAIT_S = 5.0
# How often a worker writes its state report for the supervisor (status page, state gauges, /ready).
REPORT_INTERVAL_S = 1.0


def config_services(settings: Settings, extra: tuple[ConfigRoute, ...] = ()) -> frozenset[str]:
    """Services the config file's [[routes]] (and KV routes) send to: followed in Consul whether or not they have
    route tags."""
    return frozenset(name for route in (*settings.routes, *extra) for name, _ in route.services)


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
        report: Callable[[], Report] | None = None,
        report_dir: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.serve_proxy, self.serve_admin, self.reuse_port = serve_proxy, serve_admin, reuse_port
        self.exposition = exposition or self.metrics.exposition
        # What the admin port reports: this process's state, or (supervisor) every worker's merged.
        self.report_source = report or self.report
        if exposition is None:
            self.metrics.registry.register(StateCollector(self.report_source))
        self.report_dir = report_dir  # a worker writes its report here for the supervisor
        self._report_task: asyncio.Task[None] | None = None
        self.draining = False
        self.router = Router()
        # PoolPolicy's fields are HealthPolicy's of the same names.
        policy = PoolPolicy(**{f.name: getattr(settings.health, f.name) for f in fields(PoolPolicy)})
        self.pools = Pools(settings.service_overrides(), policy)
        self._checks_task: asyncio.Task[None] | None = None
        self.generation = 0
        self._conflicts: set[Problem] = set()
        self.upstream = UpstreamPool(
            connect_timeout=settings.upstream.connect_timeout,
            keepalive=settings.upstream.keepalive,
            idle_timeout=settings.upstream.idle_timeout,
            ca_file=settings.upstream.ca_file,
        )
        self._proxies: list[ProxyServer] = []  # the plain listener, then the TLS ones
        self.tls: Terminator | None = None
        self._side_tasks: list[asyncio.Task[None]] = []  # certificate files and KV, KV routes
        self._kv_routes: tuple[ConfigRoute, ...] = ()  # routes from Consul KV (routes_kv_prefix)
        self._consul: ConsulClient | None = None
        self._watcher: Watcher | StaticWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._runners: list[web.BaseRunner] = []

    def apply(self, snapshot: Snapshot) -> None:
        """Install a new snapshot: pools first (so every route of the new table has its pool), then the
        table in one assignment."""
        self.generation += 1
        # KV routes first (an operator's runtime override), then the config file's, then the tags.
        table = RoutingTable.from_snapshot(snapshot, self.generation, (*self._kv_routes, *self.settings.routes))
        changes = self.pools.reconcile(snapshot, now=time.monotonic())  # the event loop's clock
        self.router.current = table
        for service in changes.added:
            self.metrics.new_service(service)
        if changes.added or changes.removed or changes.changed:
            self.upstream.close_idle_except({(e.address, e.port) for p in self.pools for e in p.endpoints})
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
        if self.serve_proxy and s.listeners.tls:
            # Certificate files are read before anything starts: a bad one is a config error naming the file.
            self.tls = Terminator(s.tls.certs)
            try:
                self.tls.load_files()
            except TlsError as exc:
                raise ConfigError(f"tls_certs: {exc}") from exc
            if self.tls.files:
                log.info("tls_certs_loaded", source="files", names=self.tls.store.names)
        if s.static_file:
            # No Consul at all: the file is the catalog. A bad file at start is a config error.
            static = StaticWatcher(s.static_file, self.apply, prefix=s.consul.tag_prefix)
            try:
                static.load()
            except StaticError as exc:
                raise ConfigError(f"static_file: {exc}") from exc
            self._watcher = static
        else:
            self._consul = ConsulClient(
                s.consul.addresses, token=s.consul.token, dc=s.consul.datacenters, wait_s=s.consul.wait,
            )
            try:  # a token Consul refuses is a config error (exit 2); an unreachable Consul is not (serve, retry)
                await self._consul.check_access()
            except ConsulAccessError as exc:
                await self._consul.close()
                log.error("consul_forbidden", error=exc.detail, consul=s.consul.shown)
                raise ConfigError(f"consul_token: {exc.detail}") from exc
            self._watcher = Watcher(
                self._consul, self.apply, prefix=s.consul.tag_prefix,
                on_error=lambda reason: self.metrics.discovery_errors.labels(reason).inc(),
                on_request=self.metrics.observe_consul,
            )
            self._watcher.also = config_services(s)
            if s.consul.routes_kv_prefix:
                prefix = s.consul.routes_kv_prefix
                self._side_tasks.append(asyncio.get_running_loop().create_task(self._follow_kv(
                    prefix, lambda values: self._kv_routes_changed(prefix, values), "routes_kv_unreadable",
                ), name="routes-kv"))
        self._watch_task = asyncio.get_running_loop().create_task(self._watcher.run(), name="consul-watcher")
        if self.tls is not None:
            loop = asyncio.get_running_loop()
            if self.tls.files:
                self._side_tasks.append(loop.create_task(self._watch_cert_files(), name="tls-files"))
            if s.tls.kv_prefix:
                self._side_tasks.append(loop.create_task(self._follow_kv(
                    s.tls.kv_prefix, lambda values: self._kv_certs_changed(s.tls.kv_prefix, values),
                    "tls_kv_unreadable",
                ), name="tls-kv"))
        if self.serve_proxy:
            self._checks_task = asyncio.get_running_loop().create_task(self._active_checks(), name="active-checks")

        listen, admin = s.listeners.plain, s.listeners.admin
        if self.serve_proxy and not await self.wait_synced(_FIRST_SYNC_WAIT_S):
            # Consul is down or slow: serve anyway (404 until it answers) rather than refuse connections.
            log.warning("started_without_routes", waited_s=_FIRST_SYNC_WAIT_S, consul=s.consul.shown)
        if self.serve_proxy:
            access_log = logs.access_writer(s.logs.access_format, s.logs.access_file) if s.logs.access else None
            plain = ProxyServer(self._context("http", listen.port, access_log))
            self._proxies.append(plain)
            await plain.start(listen.host, listen.port, reuse_port=self.reuse_port)
            for address in s.listeners.tls:
                assert self.tls is not None
                secure = ProxyServer(self._context("https", address.port, access_log))
                self._proxies.append(secure)
                await secure.start(address.host, address.port, reuse_port=self.reuse_port, ssl=self.tls.context)
        if self.serve_admin:
            admin_runner = web.AppRunner(make_admin_app(
                self.router, self.pools, self.exposition, self.report_source, consul=s.consul.shown,
                max_sync_age=lambda: self.settings.timeouts.max_sync_age,
            ), access_log=None)
            await admin_runner.setup()
            self._runners.append(admin_runner)
            await web.TCPSite(admin_runner, admin.host, admin.port).start()
        if self.report_dir is not None:
            self._report_task = asyncio.get_running_loop().create_task(self._write_reports(), name="state-report")
        log.info("ferryman_started", listen=str(listen) if self.serve_proxy else None,
                 admin=str(admin) if self.serve_admin else None, consul=s.consul.shown)

    def _context(self, proto: str, port: int, access_log: logs.AccessWriter | None) -> ProxyContext:
        ctx = ProxyContext(
            router=self.router, pools=self.pools, upstream=self.upstream, metrics=self.metrics, listen_port=port,
            proto=proto, access_log=access_log, loop=asyncio.get_running_loop(),
        )
        self._configure(ctx)
        return ctx

    def _configure(self, ctx: ProxyContext) -> None:
        """The settings a listener's context follows (at start and on every reload)."""
        s = self.settings
        ctx.read_timeout, ctx.idle_timeout, ctx.header_timeout = (
            s.timeouts.read, s.client.idle_timeout, s.client.header_timeout)
        ctx.max_attempts, ctx.max_connections, ctx.max_body = (
            max(1, s.upstream.max_attempts), s.client.max_connections, s.client.max_body)
        ctx.set_head_limits(s.client.max_request_target, s.client.max_header_bytes, s.client.max_header_count)
        ctx.access_sample = s.logs.access_sample
        ctx.tunnel_idle_timeout = s.client.websocket_idle_timeout
        ctx.trusted = TrustedProxies(s.client.trusted_proxies) if s.client.trusted_proxies else None
        if ctx.proto == b"http" and s.tls.https_redirect:
            tls = s.listeners.tls
            ctx.redirect = HttpsRedirect(s.tls.https_redirect, tls[0].port if tls else 443)
        else:
            ctx.redirect = None

    def reload(self, new: Settings) -> None:
        """Take over what a SIGHUP re-read: timeouts, limits, balancing and health settings, per-service tables.
        Keys that shape listeners, processes, the Consul client or logging keep their running values (logged)."""
        settings, changed, restart = reloaded(self.settings, new)
        self.settings = s = settings
        for proxy in self._proxies:
            self._configure(proxy.cfg)
        if self.tls is not None:
            self.tls.files = s.tls.certs
            self._reload_tls_files("sighup")
        if isinstance(self._watcher, StaticWatcher):
            try:
                self._watcher.load()
            except StaticError as exc:
                log.error("static_file_invalid", error=str(exc), detail="the routes loaded before stay")
        self.upstream.connect_timeout, self.upstream.keepalive, self.upstream.idle_timeout = (
            s.upstream.connect_timeout, s.upstream.keepalive, s.upstream.idle_timeout)
        policy = PoolPolicy(**{f.name: getattr(s.health, f.name) for f in fields(PoolPolicy)})
        self.pools.configure(s.service_overrides(), policy)
        snapshot = self._watcher.last_snapshot if self._watcher is not None else None
        if snapshot is not None:
            if "routes" in changed:
                if isinstance(self._watcher, Watcher):
                    self._watcher.watch_also(config_services(s, self._kv_routes))
                self.apply(snapshot)  # a new table with the file's new [[routes]]
            else:
                self.pools.reconcile(snapshot, now=asyncio.get_running_loop().time())
        log.info("config_reloaded", changed=changed)
        if restart:
            log.warning("config_reload_needs_restart", keys=restart,
                        detail="these keys keep their running values until Ferryman is restarted")

    def _reload_tls_files(self, reason: str) -> None:
        assert self.tls is not None
        try:
            self.tls.load_files()
        except TlsError as exc:
            log.error("tls_reload_failed", file=exc.origin, error=exc.detail, reason=reason,
                      detail="the certificates loaded before stay in use")
            return
        log.info("tls_certs_loaded", source="files", names=self.tls.store.names, reason=reason)

    async def _watch_cert_files(self) -> None:
        """Certificate files are re-read when they change (a renewal writes new files): new handshakes get
        the new certificate, open connections keep theirs."""
        assert self.tls is not None
        while True:
            await asyncio.sleep(self.settings.tls.reload_interval)
            if self.tls.files_changed():
                self._reload_tls_files("files changed")

    async def _follow_kv(self, prefix: str, changed: Callable[[dict[str, bytes]], None], unreadable: str) -> None:
        """Follow a Consul KV prefix with blocking queries, as the watcher follows the catalog, and hand every
        changed set of keys to `changed`. Failures back off (and log `unreadable` once per outage); the last
        values handed over stay in force meanwhile."""
        assert self._consul is not None
        backoff = Backoff()
        index = 0
        last: dict[str, bytes] | None = None
        failing = False
        while True:
            try:
                returned, values = await self._consul.kv(prefix, index)
            except ConsulError as exc:
                if not failing:
                    log.warning(unreadable, prefix=prefix, reason=exc.reason, error=exc.detail)
                    failing = True
                index = 0
                await asyncio.sleep(backoff.next_delay())
                continue
            failing = False
            backoff.reset()
            index = next_index(index, returned)
            if values != last:
                last = values
                changed(values)

    def _kv_certs_changed(self, prefix: str, values: dict[str, bytes]) -> None:
        """Certificates under a Consul KV prefix (`<name>/cert`, `<name>/key`), so every Ferryman of a cluster
        serves the same ones without files."""
        assert self.tls is not None
        certificates, problems = kv_certificates(prefix, values)
        for problem in problems:
            log.warning("tls_kv_certificate_invalid", error=problem)
        self.tls.set_kv(certificates)
        log.info("tls_certs_loaded", source="consul kv", prefix=prefix, names=self.tls.store.names)

    def _kv_routes_changed(self, prefix: str, values: dict[str, bytes]) -> None:
        """Routes under a Consul KV prefix, one per key, each holding a [[routes]] table in TOML (route, service
        or split, header rules): operators add, change (a canary's weight) and delete routes without touching a
        service. A key that does not load is logged with its name and left out; the others apply."""
        routes = []
        for key, raw in sorted(values.items()):
            if not raw.strip():
                continue  # a folder key, or an emptied one
            try:
                routes.append(parse_route_entry(tomllib.loads(raw.decode("utf-8")), f"consul kv {key}"))
            except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError
                log.warning("kv_route_invalid", key=key, error=str(exc))
        self._kv_routes = tuple(routes)
        log.info("kv_routes_loaded", prefix=prefix, routes=len(routes))
        if isinstance(self._watcher, Watcher):
            self._watcher.watch_also(config_services(self.settings, self._kv_routes))
            snapshot = self._watcher.last_snapshot
            if snapshot is not None:
                self.apply(snapshot)

    def report(self) -> Report:
        """This process's state now (called on the event loop)."""
        watcher = self._watcher
        return Report(
            services=pools_state(self.pools, asyncio.get_running_loop().time()),
            connections=sum(len(p.connections) for p in self._proxies),
            synced=watcher is not None and watcher.synced.is_set(),
            reachable=watcher is not None and watcher.reachable,
            last_success=watcher.last_success if watcher is not None else None,
            generation=self.generation,
            routes=len(self.router.current.routes),
            draining=self.draining,
            at=time.time(),
        )

    async def _write_reports(self) -> None:
        assert self.report_dir is not None
        while True:
            self.metrics.flush()
            try:
                write_report(self.report_dir, self.report())
            except OSError as exc:
                log.warning("state_report_failed", error=str(exc))
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _active_checks(self) -> None:
        """Ferryman's own checks, for services whose meta names a `ferryman-health-path`: every interval a GET
        to each instance; an answer other than 2xx/3xx (or none in time) takes it out of its pool until a
        check passes again. On top of Consul's checks, never instead of them."""
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=s.health.active_check_timeout)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            while True:
                await asyncio.sleep(s.health.active_check_interval)
                checks = [
                    self._check(session, pool, endpoint)
                    for pool in self.pools if pool.health_path
                    for endpoint in pool.endpoints
                ]
                if checks:
                    await asyncio.gather(*checks)

    async def _check(self, session: aiohttp.ClientSession, pool: Pool, endpoint: Endpoint) -> None:
        url = f"{pool.check_scheme}://{endpoint.authority}{pool.health_path}"
        try:
            async with session.get(url, allow_redirects=False, ssl=not pool.check_skip_verify) as resp:
                healthy, detail = resp.status < 400, f"status {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            healthy, detail = False, f"{type(exc).__name__}: {exc}"
        if healthy and endpoint.key in pool.down:
            pool.down.discard(endpoint.key)
            log.info("upstream_check_passed", service=pool.service, upstream=endpoint.authority)
        elif not healthy and endpoint.key not in pool.down and endpoint in pool.endpoints and pool.health_path:
            # (an instance that left, or checks switched off, while this check was under way stays out of it)
            pool.down.add(endpoint.key)
            log.warning("upstream_check_failed", service=pool.service, upstream=endpoint.authority,
                        path=pool.health_path, error=detail)

    async def wait_synced(self, timeout: float) -> bool:
        if self._watcher is None:
            return False
        try:
            await asyncio.wait_for(self._watcher.synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def drain(self) -> None:
        """Say not-ready (/ready 503) and keep serving for `drain_delay` seconds, so load balancers in front
        stop sending before the listener closes."""
        self.draining = True
        if self._report_task is not None and self.report_dir is not None:
            write_report(self.report_dir, self.report())
        if self.settings.timeouts.drain_delay > 0:
            log.info("ferryman_draining", drain_delay_s=self.settings.timeouts.drain_delay)
            await asyncio.sleep(self.settings.timeouts.drain_delay)

    async def stop(self) -> None:
        self.draining = True
        log.info("ferryman_stopping", shutdown_timeout_s=self.settings.timeouts.shutdown)
        # Listeners first (in-flight requests finish within shutdown_timeout), then discovery and clients.
        await asyncio.gather(*(p.stop(self.settings.timeouts.shutdown) for p in self._proxies))
        self._proxies.clear()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for task in (self._watch_task, self._checks_task, self._report_task, *self._side_tasks):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._consul is not None:
            await self._consul.close()
        self.upstream.close()
        log.info("ferryman_stopped")
