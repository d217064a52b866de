"""A proxy listener: the socket, its connections, the timeout sweeper, and what every connection shares.

`ProxyContext` is gathered once per listener: the router (whose table is replaced whole by one assignment),
the pools, the upstream connection pool, metrics, the access log, and `limits`, a frozen `ListenerLimits`
value that a reload replaces by one assignment (a connection reads `ctx.limits` when it needs a limit, so it
never sees half of an old and half of a new configuration).

Timeouts are checked by one sweeper task a few times a second rather than with a timer per request and per
idle connection (creating and cancelling those was a measurable share of a request's cost). A timeout fires
between its value and its value plus one tick.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import TYPE_CHECKING, Final

import structlog

from .access import AccessRules
from .auth import Realms
from .compression import Compression
from .errors import TooManyConnections
from .h1.client import ClientConnection
from .h1.upstream import UpstreamPool
from .h2.connection import H2ClientConnection
from .h2.limits import H2Limits
from .headers import TrustedProxies
from .logs import AccessWriter
from .metrics import Metrics
from .pool import Pools
from .proxied import Acceptor, http_hand_over, listening_socket
from .table import RoutingTable
from .tls import HttpsRedirect

if TYPE_CHECKING:
    from .tcp.listener import TcpServer

log = structlog.get_logger("ferryman.proxy")

# Defaults of the limits (config keys max_request_target, max_header_bytes, max_header_count).
MAX_TARGET_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_HEADER_COUNT: Final = 100
DEFAULT_H2: Final = H2Limits()
_RETRY_AFTER: Final = ((b"Retry-After", b"1"),)
_LIMITED_LOG_EVERY_S: Final = 10.0


class Router:
    """Holds the current table; replaced whole by one assignment (atomic on the event loop)."""

    __slots__ = ("current",)

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.current = table or RoutingTable()


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """A listener's timeouts and limits, as configured; replaced whole on reload."""

    read_timeout: float = 30.0
    idle_timeout: float = 75.0
    header_timeout: float = 10.0
    tunnel_idle_timeout: float = 600.0  # a WebSocket with no byte either way this long closes
    max_attempts: int = 3
    max_connections: int = 10_000
    max_target: int = MAX_TARGET_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    max_header_count: int = MAX_HEADER_COUNT
    max_body: int = 0
    access_sample: float = 1.0  # share of successful (< 400) requests logged; errors always are
    redirect: HttpsRedirect | None = None  # plain HTTP sent to HTTPS, for these hosts
    trusted: TrustedProxies | None = None  # peers whose forwarding headers are kept (trusted_proxies)
    access: AccessRules | None = None  # the global allow / deny settings; None: everyone
    underscores_in_headers: bool = False  # keep request header fields whose name has '_'
    realms: Realms | None = None  # basic-authentication realms routes name with auth=NAME
    proxy_header_timeout: float = 3.0  # a PROXY protocol header must arrive within this (proxy_protocol_timeout)
    # Response compression: the gzip_content_type setting's policy (None: off unless a route says gzip=on),
    # and the one routes with gzip=on follow (the same when the setting is on; Fabio's example types when off).
    gzip: Compression | None = None
    gzip_route: Compression = field(default_factory=Compression)
    h2: H2Limits | None = DEFAULT_H2  # HTTP/2 to clients and its limits; None: HTTP/1.1 only (http2 = false)
    # One endless line never completes a field, so the per-field checks would never run: the head as a whole
    # is bounded too.
    max_head: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_head", self.max_target + self.max_header_bytes + 1024)

    @property
    def sweep_interval(self) -> float:
        return min(1.0, max(0.05, min(self.read_timeout, self.idle_timeout, self.header_timeout) / 4))


class ProxyContext:
    """What every connection of one listener needs, gathered once."""

    __slots__ = ("access_log", "limits", "listen_port", "loop", "metrics", "pools", "port", "proto", "rng",
                 "router", "upstream")

    def __init__(
        self, *, router: Router, pools: Pools, upstream: UpstreamPool, metrics: Metrics, listen_port: int,
        proto: str, access_log: AccessWriter | None, loop: asyncio.AbstractEventLoop,
        limits: ListenerLimits | None = None,
    ) -> None:
        self.router, self.pools, self.upstream, self.metrics = router, pools, upstream, metrics
        self.listen_port = str(listen_port).encode()
        self.port = listen_port  # what routes restricted to a port (`host:80/`) are matched against
        self.proto = proto.encode()
        self.access_log = access_log
        self.loop = loop
        self.limits = limits or ListenerLimits()
        self.rng = random.Random()  # canary splits and access-log sampling: no secrets


class ProxyServer:
    """Listens and tracks connections so shutdown can let requests in progress finish."""

    def __init__(self, cfg: ProxyContext) -> None:
        self.cfg = cfg
        self.connections: set[ClientConnection | H2ClientConnection] = set()
        self.stopping = False  # the listener closes: idle connections go, the busy ones after their answer
        # From the first moment of a drain (SIGTERM, then drain_delay) every answer says Connection: close, so
        # kept-alive clients move to new connections while the listener still accepts them.
        self.draining = False
        self.drained = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._acceptor: Acceptor | None = None  # a PROXY-protocol or pass-through listener accepts by itself
        self._accepting: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._busy = asyncio.Event()  # set while there are connections to sweep
        self._refused = 0
        self._refused_logged_at = float("-inf")

    def admit(self, conn: ClientConnection | H2ClientConnection) -> bool:
        """A new connection: tracked, or (over max_connections) refused with a 503 and Retry-After and closed
        at once, so the proxy stays responsive for the connections it has."""
        if len(self.connections) < self.cfg.limits.max_connections:
            if not self.connections:
                self._busy.set()  # the sweeper, asleep while there was no connection, runs again
            self.connections.add(conn)
            return True
        transport = conn.transport
        if transport is not None:
            conn.refuse(TooManyConnections(f"more than {self.cfg.limits.max_connections} client connections",
                                           headers=_RETRY_AFTER))
            transport.close()
        self._refused += 1
        now = self.cfg.loop.time()
        if now - self._refused_logged_at >= _LIMITED_LOG_EVERY_S:  # one line per 10 s under a flood
            log.warning("client_connections_limited", max_connections=self.cfg.limits.max_connections,
                        refused=self._refused)
            self._refused_logged_at = now
            self._refused = 0
        return False

    def gone(self, conn: ClientConnection | H2ClientConnection) -> None:
        self.connections.discard(conn)
        if self.stopping and not self.connections:
            self.drained.set()

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024, ssl: SSLContext | None = None,
        proxy_protocol: bool = False, passthrough: TcpServer | None = None,
    ) -> None:
        """`proxy_protocol`: every connection starts with a PROXY protocol header; `passthrough`: the TCP relay
        of a TLS listener's `proto=tcp` server names (both in proxy/proxied.py)."""
        if proxy_protocol or passthrough is not None:
            sock = listening_socket(host, port, reuse_port=reuse_port, backlog=backlog)
            cfg = self.cfg  # its limits are read per connection: a reload replaces them
            self._acceptor = Acceptor(
                cfg.loop, sock, http_hand_over(self, ssl, passthrough),
                (lambda: (cfg.limits.trusted, cfg.limits.proxy_header_timeout)) if proxy_protocol else None)
            self._accepting = self.cfg.loop.create_task(self._acceptor.run(), name="accept")
        else:
            self._server = await self.cfg.loop.create_server(
                lambda: ClientConnection(self.cfg, self), host, port, reuse_port=reuse_port or None, backlog=backlog,
                ssl=ssl,
            )
        self._sweeper = self.cfg.loop.create_task(self._sweep(), name="proxy-timeouts")

    async def _sweep(self) -> None:
        cfg = self.cfg
        while True:
            if not self.connections:
                # Nothing to time out: sleep until a connection comes (an idle worker does not wake each second).
                self._busy.clear()
                await self._busy.wait()
            await asyncio.sleep(cfg.limits.sweep_interval)  # read each time: a reload may shorten the timeouts
            now = cfg.loop.time()
            for conn in list(self.connections):
                try:
                    conn.sweep(now)
                except Exception:  # one broken connection must not end timeouts for all the others
                    log.exception("timeout_sweep_failed", client=conn.peer_text)

    def drain(self) -> None:
        """Serve on, but end every connection after its next answer."""
        self.draining = True

    async def stop(self, timeout: float) -> None:
        self.draining = self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._accepting is not None and self._acceptor is not None:
            self._accepting.cancel()
            await self._acceptor.stop()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                await asyncio.wait_for(self.drained.wait(), timeout)
            except TimeoutError:
                log.warning("shutdown_timeout", connections=len(self.connections))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()
