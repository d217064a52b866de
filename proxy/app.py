"""The composition root: builds one process's parts, starts them in order, applies each new routed world,
takes over a SIGHUP's settings, and stops everything in reverse.

Discovery is a `Source` (the Consul watcher, or the static file) handing over Snapshots; Consul KV routes and
the config file's [[routes]] are route parts beside it. Every change of either becomes a new `RoutedWorld`
(`_update`), from which the table is built (`apply`): pools first, then the table in one assignment. A world
that fails to build keeps the table in force (`table_build_failed`). Every background task is started through
`start_task`, so a crash is logged (`task_crashed`); a crashed discovery task makes /ready say not ready.
Certificates (certs.py) and Ferryman's own health checks (checks.py) live in their own modules.
"""

from __future__ import annotations

import asyncio
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog
from aiohttp import web

from discovery.consul import ConsulAccessError, ConsulClient
from discovery.kv import KvFollower
from discovery.model import Snapshot, SnapshotDelta
from discovery.source import Source
from discovery.static import StaticError, StaticWatcher
from discovery.tasks import start_task
from discovery.watcher import OnChange, Watcher

from . import BUILD, logs
from .access import AccessRules
from .admin import make_admin_app
from .auth import AuthError, Realms
from .certs import Certificates
from .channel import Broadcaster, ChannelSource
from .checks import active_checks
from .compression import Compression
from .config import ConfigError, HostPort, Settings, parse_route_entry, reloaded
from .h1.upstream import UpstreamPool
from .h2.limits import H2Limits
from .h2.upstream import H2UpstreamPool
from .headers import TrustedProxies
from .listener import ListenerLimits, ProxyContext, ProxyServer, Router
from .metrics import Metrics, StateCollector
from .pool import Pools
from .routing import Routing
from .state import Report, pools_state, write_report
from .table import Route, RoutedWorld, RoutePart
from .tcp.listener import TcpContext, TcpServer
from .tcp.routes import TcpListening
from .tls import HttpsRedirect, TlsError

log = structlog.get_logger("ferryman")

# The proxy listener opens once the first routing table is in (so a new worker never answers 404 for routes
# that exist), or after this long without one.
_FIRST_SYNC_WAIT_S = 5.0
# A discovery source that crashed is started again after this long (the last table serves meanwhile).
_RESTART_AFTER_S = 1.0
# How often a worker writes its state report for the supervisor (status page, state gauges, /ready).
REPORT_INTERVAL_S = 1.0
REPORT_REFRESH_S = 3.0


def kv_routes(prefix: str, values: dict[str, bytes], matcher: str = "prefix") -> RoutePart:
    """Routes under a Consul KV prefix, one per key, each holding a [[routes]] table in TOML: the `kv` part.
    Operators add, change (a canary's weight) and delete routes at run time. A key that does not load is logged
    with its name and left out; the others apply. Empty keys are folders."""
    routes: list[Route] = []
    for key, raw in sorted(values.items()):
        if not raw.strip():
            continue  # a folder key, or an emptied one
        try:
            entry = parse_route_entry(tomllib.loads(raw.decode("utf-8")), f"consul kv {key}", matcher)
            routes.append(Route.from_config(entry))
        except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError
            log.warning("kv_route_invalid", key=key, error=str(exc))
    log.info("kv_routes_loaded", prefix=prefix, routes=len(routes))
    return RoutePart("kv", tuple(routes))




async def write_reports(directory: str, report: Callable[[], Report], flush: Callable[[], None]) -> None:
    """A worker's state report for the supervisor, every REPORT_INTERVAL_S while it changes, else every
    REPORT_REFRESH_S (the supervisor takes a report older than 5 s for a hung worker), until cancelled: an idle
    worker writes nothing most seconds."""
    last: Report | None = None
    written = float("-inf")
    while True:
        flush()
        now = report()
        same = last is not None and replace(now, at=0.0) == last
        if not same or time.monotonic() - written >= REPORT_REFRESH_S:
            try:
                write_report(directory, now)
                last, written = replace(now, at=0.0), time.monotonic()
            except OSError as exc:
                log.warning("state_report_failed", error=str(exc))
        await asyncio.sleep(REPORT_INTERVAL_S)


async def start_admin(app: web.Application, address: HostPort) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port).start()
    except BaseException:
        await runner.cleanup()  # (a taken port: nothing of the admin side stays behind)
        raise
    return runner


def listener_limits(s: Settings, proto: str, realms: Realms | None = None) -> ListenerLimits:
    """The settings a listener follows (at start and on every reload), as one value."""
    redirect = None
    if proto == "http" and s.tls.https_redirect:
        tls = s.listeners.tls
        redirect = HttpsRedirect(s.tls.https_redirect, tls[0].port if tls else 443)
    c = s.compression
    gzip = None if c.content_type is None else Compression(c.content_type, c.level, c.min_length)
    return ListenerLimits(
        read_timeout=s.timeouts.read, idle_timeout=s.client.idle_timeout, header_timeout=s.client.header_timeout,
        tunnel_idle_timeout=s.client.websocket_idle_timeout, max_attempts=max(1, s.upstream.max_attempts),
        max_connections=s.client.max_connections, max_target=s.client.max_request_target,
        max_header_bytes=s.client.max_header_bytes, max_header_count=s.client.max_header_count,
        max_body=s.client.max_body, underscores_in_headers=s.client.underscores_in_headers,
        proxy_header_timeout=s.client.proxy_header_timeout,
        access_sample=s.logs.access_sample, redirect=redirect,
        trusted=TrustedProxies(s.client.trusted_proxies) if s.client.trusted_proxies else None,
        access=AccessRules(s.client.allow, s.client.deny) if s.client.allow or s.client.deny else None,
        realms=realms,
        gzip=gzip, gzip_route=gzip or Compression(level=c.level, min_length=c.min_length),
        h2=h2_limits(s),
    )


def h2_limits(s: Settings) -> H2Limits | None:
    c = s.client
    if not c.http2:
        return None
    return H2Limits(
        max_concurrent_streams=c.http2_max_concurrent_streams, max_header_list_size=c.http2_max_header_list_size,
        max_frame_size=c.http2_max_frame_size, header_table_size=c.http2_header_table_size,
        max_resets=c.http2_max_resets, max_control_frames=c.http2_max_control_frames,
    )


def tcp_limits(s: Settings) -> dict[str, Any]:
    """What TCP and SNI listeners follow that a reload may change: TcpContext's attributes by name."""
    return {
        "settings": s.tcp, "connect_timeout": s.upstream.connect_timeout, "max_attempts": s.upstream.max_attempts,
        "access": AccessRules(s.client.allow, s.client.deny) if s.client.allow or s.client.deny else None,
        "trusted": TrustedProxies(s.client.trusted_proxies) if s.client.trusted_proxies else None,
        "header_timeout": s.client.proxy_header_timeout,
    }


async def consul_client(s: Settings) -> ConsulClient:
    """The Consul client, its access checked: a token Consul refuses is a config error (exit 2); an
    unreachable Consul is not (serve, retry)."""
    consul = ConsulClient(
        s.consul.addresses, token=s.consul.token, dc=s.consul.datacenters, wait_s=s.consul.wait,
        stale=s.consul.stale, cached=s.consul.cached,
    )
    try:
        await consul.check_access()
    except ConsulAccessError as exc:
        await consul.close()
        log.error("consul_forbidden", error=exc.detail, consul=s.consul.shown)
        raise ConfigError(f"consul_token: {exc.detail}") from exc
    return consul


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
        make_source: Callable[[OnChange], Source] | None = None,
        channel: str | None = None,
        share: Broadcaster | None = None,
    ) -> None:
        """`make_source` builds the discovery source around the app's snapshot callback (tests, a discovery
        shared by a host's workers); by default the static file or the Consul watcher the settings name."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.serve_proxy, self.serve_admin, self.reuse_port = serve_proxy, serve_admin, reuse_port
        self.exposition = exposition or self.metrics.exposition
        # What the admin port reports: this process's state, or (supervisor) every worker's merged.
        self.report_source = report or self.report
        if exposition is None:
            self.metrics.registry.register(StateCollector(self.report_source))
        self.report_dir = report_dir  # a worker writes its report here for the supervisor
        self.draining = False
        self.router = Router()
        self.pools = Pools(settings.service_overrides(), settings.health)
        self.upstream = UpstreamPool(
            connect_timeout=settings.upstream.connect_timeout,
            keepalive=settings.upstream.keepalive,
            idle_timeout=settings.upstream.idle_timeout,
            ca_file=settings.upstream.ca_file,
        )
        self.upstream.h2 = self.h2_upstream = H2UpstreamPool(
            connect_timeout=settings.upstream.connect_timeout, idle_timeout=settings.upstream.idle_timeout,
            max_connections=settings.upstream.grpc_max_connections, ca_file=settings.upstream.ca_file,
        )
        self.routing = Routing(self.router, self.pools, self.upstream, self.metrics,
                               RoutedWorld(parts=(RoutePart.declared("file", settings.routes),)))
        # One process logs TCP routes no listener takes: the supervisor, or the only one.
        self.tcp_listening = self.routing.tcp = tcp_listening(settings) if serve_admin else None
        self._proxies: list[ProxyServer] = []  # the plain listener, then the TLS ones
        self._tcp: list[TcpServer] = []  # the TCP listeners, then the SNI ones
        self._tcp_ctx: TcpContext | None = None
        self.certs: Certificates | None = None
        self.realms = Realms(settings.auth)  # basic-authentication realms (auth=NAME), read at start
        self._consul: ConsulClient | None = None
        self._source: Source | None = None
        self._make_source = make_source
        self._channel = channel  # a worker: the supervisor's discovery, over this socket (never Consul)
        self.share = share  # the supervisor: what discovery learns goes to the workers too
        self._discovery_crashed = False
        self._tasks: list[asyncio.Task[None]] = []  # every background task, cancelled at stop
        self._runners: list[web.BaseRunner] = []

    def _snapshot(self, change: Snapshot | SnapshotDelta) -> None:
        """The source's callback: a new snapshot, or (a source that follows changes) what changed."""
        if self.share is not None:
            self.share.changed(change)
        self.routing.take(change)

    @property
    def world(self) -> RoutedWorld:
        return self.routing.world

    @property
    def generation(self) -> int:
        return self.routing.generation

    def apply(self, world: RoutedWorld) -> None:
        self.routing.apply(world)

    async def _build_source(self) -> Source:
        """The static file (no Consul at all), or the Consul watcher. A bad file, or a token Consul refuses,
        is a config error (exit 2); an unreachable Consul is not (serve, retry)."""
        s = self.settings
        if self._make_source is not None:
            self._source = self.routing.source = self._make_source(self._snapshot)
            self._source.watch_also(self.world.named)
            return self._source
        if self._channel is not None:
            prefix = s.consul.routes_kv_prefix
            self._source = self.routing.source = ChannelSource(
                self._channel, self._snapshot, on_kv_routes=lambda values: self._kv_routes(prefix, values),
                on_tls_kv=lambda values: self._tls_kv(s.tls.kv_prefix, values),
            )
            return self._source
        if s.static_file:  # (the source is in place before the file's first snapshot arrives)
            static = self._source = self.routing.source = StaticWatcher(
                s.static_file, self._snapshot, prefix=s.consul.tag_prefix, matcher=s.path_matcher)
            return load_static(static)
        self._consul = await consul_client(s)
        watcher = Watcher(
            self._consul, self._snapshot, prefix=s.consul.tag_prefix, matcher=s.path_matcher,
            on_error=lambda reason: self.metrics.discovery_errors.labels(reason).inc(),
            on_request=self.metrics.observe_consul,
        )
        watcher.watch_also(self.world.named)
        self._source = self.routing.source = watcher
        return watcher

    @property
    def source(self) -> Source | None:
        return self._source

    def _crashed(self, _: BaseException) -> None:
        self._discovery_crashed = True  # /ready: not ready (the routes may be going stale)

    def _discovery_crashed_restart(self, exc: BaseException) -> None:
        """The discovery source ended with a bug: not ready meanwhile; it is started again (its state kept)
        after a pause, and the last table keeps serving."""
        self._crashed(exc)
        source = self._source
        if source is None:
            return

        def restart() -> None:
            log.warning("discovery_restarted", after_s=_RESTART_AFTER_S)
            self._discovery_crashed = False
            self._tasks.append(start_task(source.run(), "consul-watcher", self._discovery_crashed_restart))

        asyncio.get_running_loop().call_later(_RESTART_AFTER_S, restart)

    def _kv_routes(self, prefix: str, values: dict[str, bytes]) -> None:
        if self.share is not None:
            self.share.kv_routes(values)
        self.routing.update(self.world.with_part(kv_routes(prefix, values, self.settings.path_matcher)))

    def _tls_kv(self, prefix: str, values: dict[str, bytes]) -> None:
        if self.share is not None:
            self.share.tls_kv(values)
        if self.certs is not None:
            self.certs.kv_changed(prefix, values)

    async def start(self) -> None:
        s = self.settings
        if self.serve_proxy and s.listeners.tls:
            self.certs = Certificates(s.tls.certs, s.tls.reload_interval, http2=s.client.http2)
            try:  # read before anything starts: a bad file is a config error naming it
                self.certs.load()
            except TlsError as exc:
                raise ConfigError(f"tls_certs: {exc}") from exc
        if self.serve_proxy:
            try:  # a file that cannot be read is a config error naming it (the loader checked it already)
                self.realms.load()
            except AuthError as exc:
                raise ConfigError(str(exc)) from exc
            self._tasks.append(start_task(self.realms.watch(), "auth-files"))
        source = await self._build_source()
        self._tasks.append(start_task(source.run(), "consul-watcher", self._discovery_crashed_restart))
        if self._consul is not None and s.consul.routes_kv_prefix:
            prefix = s.consul.routes_kv_prefix
            routes = KvFollower(self._consul, prefix, lambda values: self._kv_routes(prefix, values),
                                unreadable="routes_kv_unreadable", recovered="routes_kv_recovered")
            self._tasks.append(start_task(routes.run(), "routes-kv", self._crashed))
        if self.certs is not None and self.certs.has_files:
            self._tasks.append(start_task(self.certs.watch_files(), "tls-files"))
        if self._consul is not None and s.tls.kv_prefix and (self.certs is not None or self.share is not None):
            tls_prefix = s.tls.kv_prefix
            follower = KvFollower(self._consul, tls_prefix, lambda values: self._tls_kv(tls_prefix, values),
                                  unreadable="tls_kv_unreadable", recovered="tls_kv_recovered")
            self._tasks.append(start_task(follower.run(), "tls-kv"))
        if self.serve_proxy:
            health = s.health
            self._tasks.append(start_task(
                active_checks(self.pools, health.active_check_interval, health.active_check_timeout), "active-checks"))
            if not await self.wait_synced(_FIRST_SYNC_WAIT_S):
                # Consul is down or slow: serve anyway (404 until it answers) rather than refuse connections.
                log.warning("started_without_routes", waited_s=_FIRST_SYNC_WAIT_S, consul=s.consul.shown)
            await self._start_proxies()
        if self.serve_admin:
            self._runners.append(await start_admin(
                make_admin_app(self.router, self.pools, self.exposition, self.report_source, consul=s.consul.shown,
                               max_sync_age=lambda: self.settings.timeouts.max_sync_age, tcp=self.tcp_listening),
                s.listeners.admin))
        if self.report_dir is not None:
            self._tasks.append(start_task(
                write_reports(self.report_dir, self.report, self.metrics.flush), "state-report"))
        log.info("ferryman_started", listen=str(s.listeners.plain) if self.serve_proxy else None,
                 admin=str(s.listeners.admin) if self.serve_admin else None, consul=s.consul.shown,
                 build=BUILD.describe())

    async def _start_proxies(self) -> None:
        s = self.settings
        access_log = logs.access_writer(s.logs.access_format, s.logs.access_file) if s.logs.access else None
        self._tcp_ctx = tcp_context(s, self.router, self.pools, self.metrics)
        plain = ProxyServer(self._context("http", s.listeners.plain.port, access_log))
        self._proxies.append(plain)
        await plain.start(s.listeners.plain.host, s.listeners.plain.port, reuse_port=self.reuse_port,
                          proxy_protocol=s.listeners.expects_proxy_header(s.listeners.plain))
        for address in s.listeners.tls:
            assert self.certs is not None
            secure = ProxyServer(self._context("https", address.port, access_log))
            self._proxies.append(secure)
            passthrough = await passthrough_server(s, self._tcp_ctx, address, self._tcp)
            await secure.start(address.host, address.port, reuse_port=self.reuse_port, ssl=self.certs.context,
                               proxy_protocol=s.listeners.expects_proxy_header(address), passthrough=passthrough)
        if self._tcp_ctx is not None:
            await start_tcp_listeners(s, self._tcp_ctx, self._tcp, reuse_port=self.reuse_port)

    def _context(self, proto: str, port: int, access_log: logs.AccessWriter | None) -> ProxyContext:
        return ProxyContext(
            router=self.router, pools=self.pools, upstream=self.upstream, metrics=self.metrics, listen_port=port,
            proto=proto, access_log=access_log, loop=asyncio.get_running_loop(),
            limits=listener_limits(self.settings, proto, self.realms),
        )

    def reload(self, new: Settings) -> None:
        """Take over what a SIGHUP re-read: timeouts, limits, balancing and health settings, per-service tables.
        Keys that shape listeners, processes, the Consul client or logging keep their running values (logged)."""
        settings, changed, restart = reloaded(self.settings, new)
        self.settings = s = settings
        if self.serve_proxy:
            self.realms.configure(s.auth)
        for proxy in self._proxies:
            proxy.cfg.limits = listener_limits(s, proxy.cfg.proto.decode(), self.realms)
        if self._tcp_ctx is not None:
            for name, value in tcp_limits(s).items():
                setattr(self._tcp_ctx, name, value)
        if self.certs is not None:
            self.certs.reload(s.tls.certs, s.tls.reload_interval)
        if self._source is not None:
            self._source.reload()
        self.upstream.connect_timeout, self.upstream.keepalive, self.upstream.idle_timeout = (
            s.upstream.connect_timeout, s.upstream.keepalive, s.upstream.idle_timeout)
        self.h2_upstream.connect_timeout, self.h2_upstream.idle_timeout, self.h2_upstream.max_connections = (
            s.upstream.connect_timeout, s.upstream.idle_timeout, s.upstream.grpc_max_connections)
        self.pools.configure(s.service_overrides(), s.health)
        if "routes" in changed:
            self.routing.update(self.world.with_part(RoutePart.declared("file", s.routes)))  # the file's new [[routes]]
        elif self._source is not None and self._source.last_snapshot is not None:
            self.pools.reconcile(self.world.snapshot, now=asyncio.get_running_loop().time())
        log.info("config_reloaded", changed=changed)
        if restart:
            log.warning("config_reload_needs_restart", keys=restart,
                        detail="these keys keep their running values until Ferryman is restarted")

    def report(self) -> Report:
        """This process's state now (called on the event loop). A crashed discovery is neither synced nor
        reachable: its table may be going stale."""
        source, ok = self._source, self._source is not None and not self._discovery_crashed
        # A worker reports only the pools with something to say; the supervisor has every instance.
        pools = self.pools.touched() if self.report_dir is not None else self.pools
        return Report(
            services=pools_state(pools, asyncio.get_running_loop().time()),
            connections=sum(len(p.connections) for p in self._proxies),
            synced=ok and source is not None and source.synced.is_set(),
            reachable=ok and source is not None and source.reachable,
            last_success=source.last_success if source is not None else None,
            generation=self.generation, routes=self.router.current.route_count, pools=len(self.pools),
            draining=self.draining, at=time.time(), pid=os.getpid(),
        )

    async def wait_synced(self, timeout: float) -> bool:
        if self._source is None:
            return False
        try:
            await asyncio.wait_for(self._source.synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def drain(self) -> None:
        """Say not-ready (/ready 503) and keep serving for `drain_delay` seconds, so load balancers in front
        stop sending before the listener closes."""
        self.draining = True
        for proxy in self._proxies:
            proxy.drain()
        if self.report_dir is not None:
            write_report(self.report_dir, self.report())
        if self.settings.timeouts.drain_delay > 0:
            log.info("ferryman_draining", drain_delay_s=self.settings.timeouts.drain_delay)
            await asyncio.sleep(self.settings.timeouts.drain_delay)

    async def stop(self) -> None:
        self.draining = True
        log.info("ferryman_stopping", shutdown_timeout_s=self.settings.timeouts.shutdown)
        # Listeners first (in-flight requests finish within shutdown_timeout), then discovery and clients.
        await asyncio.gather(*(p.stop(self.settings.timeouts.shutdown) for p in self._proxies),
                             *(t.stop(self.settings.timeouts.shutdown) for t in self._tcp))
        self._proxies.clear()
        self._tcp.clear()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._consul is not None:
            await self._consul.close()
        self.upstream.close()
        log.info("ferryman_stopped")


def tcp_context(s: Settings, router: Router, pools: Pools, metrics: Metrics) -> TcpContext | None:
    """What the TCP, SNI and pass-through listeners share; None when there are none."""
    if not (s.tcp.listen or s.tcp.sni_listen or s.listeners.tls_passthrough):
        return None
    return TcpContext(router=router, pools=pools, metrics=metrics, loop=asyncio.get_running_loop(),
                      log_access=s.logs.access, **tcp_limits(s))


def tcp_listening(s: Settings) -> TcpListening:
    return TcpListening(frozenset(a.port for a in s.tcp.listen), bool(s.tcp.sni_listen or s.listeners.tls_passthrough))


async def passthrough_server(s: Settings, ctx: TcpContext | None, address: HostPort,
                             servers: list[TcpServer]) -> TcpServer | None:
    """The relays of a TLS listener of tls_passthrough (None for the others), added to `servers` as it starts."""
    if ctx is None or not s.listeners.passes_through(address):
        return None
    server = TcpServer(ctx, sni=True, port=address.port, address=str(address), passthrough=True)
    servers.append(server)
    await server.start(address.host)
    return server


async def start_tcp_listeners(s: Settings, ctx: TcpContext, servers: list[TcpServer], *, reuse_port: bool) -> None:
    """The TCP and TLS pass-through listeners, each added to `servers` as it starts (so a stop stops those)."""
    for address, sni in [*((a, False) for a in s.tcp.listen), *((a, True) for a in s.tcp.sni_listen)]:
        server = TcpServer(ctx, sni=sni, port=address.port, address=str(address))
        servers.append(server)
        await server.start(address.host, reuse_port=reuse_port,
                           proxy_protocol=s.listeners.expects_proxy_header(address))


def load_static(static: StaticWatcher) -> StaticWatcher:
    """The static provider, its file loaded once: a file that does not load is a config error (exit 2)."""
    try:
        static.load()
    except StaticError as exc:
        raise ConfigError(f"static_file: {exc}") from exc
    return static
