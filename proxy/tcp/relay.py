"""One connection of a TCP or SNI listener: its route, its instance, and the bytes both ways until it ends.

A `Relay` is the client connection's asyncio protocol. On a TCP listener it stops reading at once and looks up
the route of the listener's port; on an SNI listener it reads until the ClientHello is complete (sni.py;
bounded in size here and in time by the listener's sweeper), stops reading and looks up the route of the
server name. It then connects to an instance the service's balancer picks (the connection counts in flight,
so p2c and least_conn balance open connections; `lb=hash` hashes the client's address), within the connect
timeout; a failed connect counts against the instance (passive ejection) and the next instance is tried, up to
`max_attempts`. Once connected it writes the PROXY header when the route asks for one (`pxyproto=`), replays
what it read, and reads again.

Flow control both ways: a side whose write buffer is above its high-water mark pauses reading on the other
side until it drains (asyncio's pause_writing / resume_writing), so a connection holds at most about two
buffers whatever the speeds. A half-close is passed on (write_eof); the relay ends when both sides have closed,
when either side is lost, when it idles (`tcp_idle_timeout`) or at shutdown. Its end is counted once: the
pool's open connection released, metrics, one access line.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final, cast

import structlog

from ..dispatch import _shared_side as shared_side
from ..proxyproto import encode_v1, encode_v2
from .sni import MAX_HELLO, NotHello, read_hello

if TYPE_CHECKING:
    from discovery.model import Endpoint

    from ..pool import Pool
    from ..table import Route
    from .listener import TcpServer

log = structlog.get_logger("ferryman.tcp")
access = structlog.get_logger("ferryman.access")

# A side's write buffer above this pauses reading on the other side (asyncio's default, said here).
HIGH_WATER: Final = 64 * 1024
NO_SERVICE: Final = "none"


class UpstreamSide(asyncio.Protocol):
    """The connection to the instance: hands everything to its Relay."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.from_upstream(data)

    def eof_received(self) -> bool:
        return self.relay.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.end("upstream_closed")

    def pause_writing(self) -> None:
        self.relay.pause_client()

    def resume_writing(self) -> None:
        self.relay.resume_client()


class Relay(asyncio.Protocol):
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "client_eof",
        "ended",
        "endpoint",
        "last",
        "name",
        "opened_at",
        "peer",
        "pending",
        "pool",
        "route",
        "server",
        "service",
        "sock",
        "started",
        "task",
        "upstream",
        "upstream_done",
    )

    def __init__(self, server: TcpServer, peer: tuple[str, int] | None = None,
                 sock: tuple[str, int] | None = None) -> None:
        """`peer`, `sock`: the client and the address it connected to, as a PROXY header named them."""
        self.server = server
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.peer: tuple[str, int] = peer or ("", 0)
        self.sock: tuple[str, int] = sock or ("", 0)
        self.started = self.last = server.ctx.loop.time()
        self.opened_at = time.monotonic()  # the access line's duration: finer than uvloop's millisecond clock
        self.pending = b""  # read before the upstream connection is open: the ClientHello, replayed
        self.name: str | None = None  # the server name of an SNI listener's connection
        self.route: Route | None = None
        self.service = NO_SERVICE
        self.pool: Pool | None = None
        self.endpoint: Endpoint | None = None
        self.task: asyncio.Task[None] | None = None
        self.bytes_in = self.bytes_out = 0
        self.client_eof = self.upstream_done = self.ended = False

    # --- the client side (asyncio calls these) ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it: no isinstance check.
        self.client = transport = cast(asyncio.Transport, transport)
        if not self.peer[0]:  # not named by a PROXY header: the socket's own
            peer = transport.get_extra_info("peername")
            self.peer = (peer[0], peer[1]) if peer else ("", 0)
        if not self.sock[0]:
            sock = transport.get_extra_info("sockname")
            self.sock = (sock[0], sock[1]) if sock else ("", 0)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if not self.server.admit(self):
            self.end("limited")
            return
        if not self.server.sni:
            transport.pause_reading()  # nothing is read before an instance takes it
            self._take(self.server.ctx.routes.of(self.server.ctx.router.current).for_port(self.server.port))

    def data_received(self, data: bytes) -> None:
        self.last = self.server.ctx.loop.time()
        upstream = self.upstream
        if upstream is not None:
            self.bytes_in += len(data)
            upstream.write(data)
            return
        self.pending += data
        if self.server.sni and self.name is None:
            self._hello()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream is None:
            if self.server.sni and self.name is None:
                self.end("not_tls")  # closed before its ClientHello was complete
            return True  # a TCP client's bytes and its close are passed on once connected
        if self.upstream_done:
            self.end("upstream_closed")  # the instance closed first; the client's close completes it
        elif self.upstream.can_write_eof():
            self.upstream.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.end("client_closed")

    def pause_writing(self) -> None:  # the client does not keep up: stop reading from the instance
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    # --- the upstream side (UpstreamSide calls these) ---
    def from_upstream(self, data: bytes) -> None:
        self.last = self.server.ctx.loop.time()
        self.bytes_out += len(data)
        assert self.client is not None
        self.client.write(data)

    def upstream_eof(self) -> bool:
        self.upstream_done = True
        client = self.client
        if self.client_eof or client is None:
            self.end("client_closed")  # the client closed first; the instance's close completes it
        elif client.can_write_eof():
            client.write_eof()
        return True

    def pause_client(self) -> None:  # the instance does not keep up: stop reading from the client
        if self.client is not None and not self.client.is_closing():
            self.client.pause_reading()

    def resume_client(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    # --- routing and connecting ---
    def _hello(self) -> None:
        try:
            hello = read_hello(self.pending, MAX_HELLO)
        except NotHello as exc:
            log.info("sni_hello_refused", client=self.peer[0], listener=self.server.port, reason=str(exc))
            self.end("not_tls")
            return
        if hello is None:
            return
        assert self.client is not None
        self.client.pause_reading()
        self.name = hello.name
        route = self.server.ctx.routes.of(self.server.ctx.router.current).for_name(hello.name) if hello.name else None
        self._take(route)

    def _take(self, route: Route | None) -> None:
        ctx = self.server.ctx
        if route is not None and route.shares:
            route = shared_side(route, ctx.pools, ctx.rng.random())
        server = self.server
        service = route.service if route is not None else (
            ctx.settings.sni_default_service if server.sni and not server.passthrough else "")
        if not service:
            self.end("no_route")
            return
        self.route, self.service = route, service
        peer = self.peer[0].encode()
        if (ctx.access is not None and not ctx.access.permits(peer)) or (
                route is not None and route.access is not None and not route.access.permits(peer)):
            self.end("denied")
            return
        pool = self.pool = ctx.pools.get(service)
        if pool is None or not pool.endpoints:
            self.end("no_instance")
            return
        self.task = ctx.loop.create_task(self._connect(pool))

    async def _connect(self, pool: Pool) -> None:
        ctx = self.server.ctx
        loop = ctx.loop
        timeout = pool.connect_timeout or ctx.connect_timeout
        key = self.peer[0] if pool.hash_on is not None else None
        tried: set[str] = set()
        for _ in range(max(1, min(ctx.max_attempts, len(pool.endpoints)))):
            endpoint = pool.pick(tried, key, loop.time())
            if endpoint is None:
                break
            tried.add(endpoint.key)
            began = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    transport, _ = await loop.create_connection(
                        lambda: UpstreamSide(self), endpoint.address, endpoint.port)
            except (OSError, TimeoutError) as exc:
                self._failed(pool, endpoint, exc)
                continue
            if self.ended:  # the client left while this connected
                transport.close()
                return
            ctx.metrics.tcp_connect_duration.labels(self.service).observe(loop.time() - began)
            self._opened(pool, endpoint, transport)
            return
        self.end("connect_failed")

    def _failed(self, pool: Pool, endpoint: Endpoint, exc: BaseException) -> None:
        ctx = self.server.ctx
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("tcp_connect_failed", service=self.service, instance=endpoint.instance_id,
                    upstream=endpoint.authority, error=error)
        ejected = pool.failed(endpoint, ctx.loop.time())
        if ejected is not None:
            ctx.metrics.ejections.labels(self.service).inc()
            log.warning("upstream_ejected", service=self.service, instance=endpoint.instance_id,
                        duration_s=ejected)

    def _opened(self, pool: Pool, endpoint: Endpoint, transport: asyncio.Transport) -> None:
        self.upstream, self.endpoint = transport, endpoint
        pool.tcp_opened(endpoint)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        route = self.route
        if route is not None and route.proxy_protocol:
            encode = encode_v2 if route.proxy_protocol == 2 else encode_v1
            transport.write(encode(self.peer, self.sock))
        if self.pending:
            self.bytes_in += len(self.pending)
            transport.write(self.pending)
            self.pending = b""
        self.last = self.server.ctx.loop.time()
        if self.client_eof:
            if transport.can_write_eof():
                transport.write_eof()
        elif self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    # --- the end ---
    def sweep(self, now: float) -> None:
        """The listener's sweeper: the ClientHello's time bound, then the idle timeout."""
        settings = self.server.ctx.settings
        if self.upstream is None:
            if self.server.sni and self.name is None and now - self.started >= settings.hello_timeout:
                self.end("hello_timeout")
        elif now - self.last >= settings.idle_timeout:
            self.end("idle")

    def end(self, how: str) -> None:
        """Close both sides (after what they have buffered, unless `how` is abrupt) and account, once."""
        if self.ended:
            return
        self.ended = True
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        abrupt = how in ("shutdown", "limited")
        for transport in (self.client, self.upstream):
            if transport is not None:
                (transport.abort if abrupt else transport.close)()
        if self.endpoint is not None and self.pool is not None:
            self.pool.tcp_closed(self.endpoint)
        self._account(how)
        if how != "limited":
            self.server.gone(self)

    def _account(self, how: str) -> None:
        ctx = self.server.ctx
        metrics = ctx.metrics
        metrics.tcp_connections.labels(self.service, how).inc()
        if self.bytes_in:
            metrics.tcp_bytes.labels(self.service, "in").inc(self.bytes_in)
        if self.bytes_out:
            metrics.tcp_bytes.labels(self.service, "out").inc(self.bytes_out)
        if ctx.log_access:
            endpoint = self.endpoint
            access.info(
                "tcp_access", client=f"{self.peer[0]}:{self.peer[1]}", listener=self.server.address,
                server_name=self.name, service=self.service,
                instance=endpoint.instance_id if endpoint is not None else None,
                upstream=endpoint.authority if endpoint is not None else None, bytes_in=self.bytes_in,
                bytes_out=self.bytes_out, duration_ms=round((time.monotonic() - self.opened_at) * 1000, 3), end=how,
            )
