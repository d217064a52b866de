"""A TCP or SNI listener: its socket, its connections (Relays), their timeouts, and its shutdown.

`TcpContext` is what every TCP and SNI listener of a process shares: the router (its table replaced whole by
one assignment), the pools, metrics, the TCP routes of the current table (rebuilt once per table), and the
settings a reload replaces by one assignment. One sweeper task per listener checks, a few times a second,
each connection's ClientHello time bound and idle timeout (no timer per connection). At shutdown the socket
closes, open connections go on until either side closes or `shutdown_timeout` runs out, and then are cut.
A deregistered instance gets no new connection (it left the pool) while those open to it go on (draining).

A listener of `proxy_protocol` accepts by itself (proxy/proxied.py's Acceptor: trusted peers only, the header
read within `proxy_protocol_timeout`) and its relays take the header's client as theirs. A TLS listener of
`tls_passthrough` owns a TcpServer without a socket of its own (`passthrough`): it adopts the connections whose
server name has a `proto=tcp` route, and a name without one is never sent to `sni_default_service`.
"""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Final

import structlog

from ..access import AccessRules
from ..headers import TrustedProxies
from ..listener import Router
from ..metrics import Metrics
from ..pool import Pools
from ..proxied import Acceptor, listening_socket
from ..proxyproto import ProxyHeader
from ..settings import TcpSettings
from ..table import Route
from .relay import Relay
from .routes import RouteCache

log = structlog.get_logger("ferryman.tcp")

_LIMITED_LOG_EVERY_S: Final = 10.0


class TcpContext:
    """What every TCP and SNI listener of one process needs, gathered once; `settings`, `connect_timeout`,
    `max_attempts`, `access`, `trusted` and `header_timeout` are replaced on reload."""

    __slots__ = ("access", "connect_timeout", "header_timeout", "log_access", "loop", "max_attempts", "metrics",
                 "pools", "rng", "router", "routes", "settings", "trusted")

    def __init__(
        self, *, router: Router, pools: Pools, metrics: Metrics, loop: asyncio.AbstractEventLoop,
        settings: TcpSettings, connect_timeout: float, max_attempts: int, access: AccessRules | None,
        log_access: bool, trusted: TrustedProxies | None = None, header_timeout: float = 3.0,
    ) -> None:
        self.router, self.pools, self.metrics, self.loop = router, pools, metrics, loop
        self.settings, self.connect_timeout, self.max_attempts = settings, connect_timeout, max_attempts
        self.access, self.log_access = access, log_access
        self.trusted, self.header_timeout = trusted, header_timeout  # PROXY headers (proxy_protocol listeners)
        self.routes = RouteCache()
        self.rng = random.Random()  # the side of a shared route: no secrets


class TcpServer:
    """One listening socket: `sni` False routes by its port, True by the ClientHello's server name;
    `passthrough`: no socket of its own, the relays of a pass-through TLS listener."""

    def __init__(self, ctx: TcpContext, *, sni: bool, port: int, address: str, passthrough: bool = False) -> None:
        self.ctx, self.sni, self.port, self.address, self.passthrough = ctx, sni, port, address, passthrough
        self.connections: set[Relay] = set()
        self.drained = asyncio.Event()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._acceptor: Acceptor | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._refused = 0
        self._refused_logged_at = float("-inf")

    async def start(self, host: str, *, reuse_port: bool = False, backlog: int = 1024,
                    proxy_protocol: bool = False) -> None:
        """Listen (`proxy_protocol`: each connection starts with a PROXY header); a pass-through server only
        sweeps: its TLS listener accepts."""
        ctx = self.ctx
        if proxy_protocol:
            sock = listening_socket(host, self.port, reuse_port=reuse_port, backlog=backlog)
            self._acceptor = Acceptor(ctx.loop, sock, self.adopt, lambda: (ctx.trusted, ctx.header_timeout))
            self._accepting = ctx.loop.create_task(self._acceptor.run(), name="tcp-accept")
        elif not self.passthrough:
            self._server = await ctx.loop.create_server(
                lambda: Relay(self), host, self.port, reuse_port=reuse_port or None, backlog=backlog)
        self._sweeper = ctx.loop.create_task(self._sweep(), name="tcp-timeouts")
        kind = "tls_passthrough" if self.passthrough else "sni" if self.sni else "tcp"
        log.info("tcp_listening", listener=self.address, kind=kind, proxy_protocol=proxy_protocol)

    async def adopt(self, conn: socket.socket, header: ProxyHeader | None) -> bool:
        """A socket accepted elsewhere (after its PROXY header, or peeked at by a TLS listener) becomes a relay;
        the header's client and destination, when it names them, are the connection's."""
        source = header.source if header is not None else None
        destination = header.destination if header is not None and source is not None else None
        await self.ctx.loop.connect_accepted_socket(lambda: Relay(self, source, destination), conn)
        return True

    def route_for(self, name: str) -> Route | None:
        """The `proto=tcp` route of a server name in the current table."""
        return self.ctx.routes.of(self.ctx.router.current).for_name(name)

    def admit(self, relay: Relay) -> bool:
        """A new connection: tracked, or (over tcp_max_connections, or stopping) refused: closed at once."""
        limit = self.ctx.settings.max_connections
        if len(self.connections) < limit and not self.stopping:
            self.connections.add(relay)
            return True
        self._refused += 1
        now = self.ctx.loop.time()
        if now - self._refused_logged_at >= _LIMITED_LOG_EVERY_S:  # one line per 10 s under a flood
            log.warning("tcp_connections_limited", listener=self.address, max_connections=limit,
                        refused=self._refused)
            self._refused_logged_at, self._refused = now, 0
        return False

    def gone(self, relay: Relay) -> None:
        self.connections.discard(relay)
        if self.stopping and not self.connections:
            self.drained.set()

    async def _sweep(self) -> None:
        ctx = self.ctx
        while True:
            settings = ctx.settings  # read each time: a reload may shorten the timeouts
            await asyncio.sleep(min(1.0, max(0.05, min(settings.idle_timeout, settings.hello_timeout) / 4)))
            now = ctx.loop.time()
            for relay in list(self.connections):
                try:
                    relay.sweep(now)
                except Exception:  # one broken connection must not end timeouts for all the others
                    log.exception("tcp_sweep_failed", client=relay.peer[0])

    async def stop(self, timeout: float) -> None:
        """No new connection; the open ones get `timeout` seconds to end by themselves, then are cut."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._accepting is not None and self._acceptor is not None:
            self._accepting.cancel()
            await self._acceptor.stop()
        if self.connections:
            log.info("tcp_draining", listener=self.address, connections=len(self.connections), timeout_s=timeout)
            try:
                await asyncio.wait_for(self.drained.wait(), timeout)
            except TimeoutError:
                log.warning("tcp_shutdown_timeout", listener=self.address, connections=len(self.connections))
        for relay in list(self.connections):
            relay.end("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()
