"""The proxy listener: parse -> lookup -> pick -> forward -> stream back -> record.

Written by hand on asyncio protocols with llhttp (through httptools), because the general-purpose aiohttp web
server cost more than the whole proxying work (README, Performance). One `ClientConnection` per client TCP
connection parses requests with llhttp's callbacks; each request is served by one coroutine (`_serve`), and
once the upstream's response head is in, bytes move by callbacks only: upstream `data_received` ->
`Relay.on_body` -> client `transport.write`, with flow control both ways (a slow reader pauses the other side).

A request reads `router.current` once, so a table swapped in mid-request never mixes two tables. ProxyErrors
are answered here, once, as short plain-text bodies with the status they carry, and every one is logged with
its reason. Once the response head has gone to the client an error can no longer be reported in-band: the
client connection is aborted so it sees a truncated response, never a silently short one.

Requests on one connection are answered in order (HTTP/1.1 pipelining): later ones wait, their bodies
buffered up to a bound, beyond which reading pauses.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Final

import httptools
import structlog

from discovery.model import Endpoint

from .errors import (
    BadRequest,
    HeaderTooLarge,
    NoHealthyEndpoint,
    NoRoute,
    ProxyError,
    UpstreamConnectError,
    UpstreamTimeout,
    UriTooLong,
)
from .forwarder import FRAMING_CHUNKED, FRAMING_EOF, UpstreamConnection, UpstreamPool
from .headers import client_response_head, error_response, upstream_request_head
from .metrics import NO_SERVICE, Metrics
from .pool import Pool, Pools
from .table import RoutingTable

log = structlog.get_logger("ferryman.proxy")
access_log = structlog.get_logger("ferryman.access")

# RFC 9110 §9.2.2: methods whose repetition has the same effect; only these are retried after a reused
# connection dropped. Any method is retried when the connection was never established.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_TARGET_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_BUFFERED_BODY: Final = 256 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2


class Router:
    """Holds the current table; replaced whole by one assignment (atomic on the event loop)."""

    __slots__ = ("current",)

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.current = table or RoutingTable()


class ClientGone(Exception):
    """The client closed its connection before the answer was complete (logged as status 499)."""


class Request:
    __slots__ = (
        "bad", "body_done", "body_kind", "body_sent", "buffer", "buffered", "expect_continue", "headers", "host",
        "http10", "keep_alive", "method", "sink", "target",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.host = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http10 = False
        self.keep_alive = True
        self.body_kind = BODY_NONE
        self.expect_continue = False
        self.body_done = False
        self.body_sent = 0
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.sink: Relay | None = None
        self.bad: ProxyError | None = None  # a request that parsed but must be refused (answered in order)


class Settings:
    """What every connection needs, gathered once."""

    __slots__ = (
        "access_log", "idle_timeout", "listen_port", "loop", "max_attempts", "metrics", "pools", "proto",
        "read_timeout", "router", "upstream",
    )

    def __init__(
        self, *, router: Router, pools: Pools, upstream: UpstreamPool, metrics: Metrics, max_attempts: int,
        read_timeout: float, idle_timeout: float, listen_port: int, proto: str, access_log: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.router, self.pools, self.upstream, self.metrics = router, pools, upstream, metrics
        self.max_attempts = max(1, max_attempts)
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self.listen_port = str(listen_port).encode()
        self.proto = proto.encode()
        self.access_log = access_log
        self.loop = loop


class Relay:
    """One request's exchange with one upstream connection: writes the response to the client as it comes."""

    __slots__ = (
        "bytes_out", "chunked_out", "client", "conn", "endpoint", "error", "finished", "head", "last_activity",
        "loop", "on_done", "out", "path", "pool", "read_timeout", "req", "service", "started", "status", "timer",
    )

    def __init__(
        self, client: ClientConnection, req: Request, conn: UpstreamConnection, endpoint: Endpoint,
        read_timeout: float,
    ) -> None:
        loop = client.cfg.loop
        self.client = client
        self.endpoint = endpoint
        self.req = req
        self.conn = conn
        self.loop = loop
        self.read_timeout = read_timeout
        self.head: asyncio.Future[None] = loop.create_future()
        # After the head, the end of the exchange is reported by callback (no second future, no task wake-up):
        # `on_done(relay)` runs once, with `error` set when the body broke off.
        self.finished = False
        self.error: Exception | None = None
        self.on_done: Callable[[Relay], None] | None = None
        self.started = 0.0
        self.service = ""
        self.path = ""
        self.pool: Pool | None = None
        self.status = 0
        self.bytes_out = 0
        self.chunked_out = False
        self.out: list[bytes] = []  # response bytes from the current upstream read, written once by flush()
        self.last_activity = loop.time()
        self.timer: asyncio.TimerHandle | None = loop.call_at(self.last_activity + read_timeout, self._check_timeout)

    # --- request body, client -> upstream ---
    def send_body(self, data: bytes) -> None:
        self.req.body_sent += len(data)
        if self.req.body_kind == BODY_CHUNKED:
            self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.conn.write(data)

    def end_body(self) -> None:
        if self.req.body_kind == BODY_CHUNKED:
            self.conn.write(_LAST_CHUNK)

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading()

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading()

    # --- response, upstream -> client (ResponseSink) ---
    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.last_activity = self.loop.time()
        req = self.req
        keep_alive = req.keep_alive
        if framing == FRAMING_EOF or framing == FRAMING_CHUNKED:
            if req.http10:
                keep_alive = False  # HTTP/1.0 has no chunked coding: the end of the body is the end of the connection
            else:
                self.chunked_out = True
        if not req.body_done:
            keep_alive = False  # the upstream answered before the client finished sending: do not read on
        req.keep_alive = keep_alive
        self.status = status
        self.out.append(client_response_head(
            status, reason, headers, chunked=self.chunked_out, keep_alive=keep_alive, http10=req.http10,
        ))
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_out += len(data)
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def on_complete(self, reusable: bool) -> None:
        self._stop_timer()
        if self.chunked_out:
            self.out.append(_LAST_CHUNK)
        self.flush()
        self.client.cfg.upstream.release(self.conn, reusable and self.req.body_done)
        self._end(None)

    def on_error(self, error: ProxyError, *, nothing_received: bool) -> None:
        self._stop_timer()
        error.nothing_received = nothing_received
        self._fail(error)

    # --- client went away, or the upstream went silent ---
    def client_gone(self) -> None:
        self._stop_timer()
        self.conn.detach()
        self._fail(ClientGone())

    def _fail(self, error: Exception) -> None:
        """Deliver a failure to whoever waits: the coroutine awaiting the head, else the completion callback."""
        self.flush()
        if not self.head.done():
            self.finished = True
            self.head.set_exception(error)
        else:
            self._end(error)

    def _end(self, error: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.error = error
        if self.on_done is not None:
            self.on_done(self)

    def _check_timeout(self) -> None:
        idle = self.loop.time() - self.last_activity
        if idle < self.read_timeout:
            self.timer = self.loop.call_later(self.read_timeout - idle, self._check_timeout)
            return
        self.timer = None
        self.conn.detach()
        authority = self.endpoint.authority
        if not self.head.done():
            self._fail(UpstreamTimeout(f"{authority} did not answer in time"))
        else:
            self._fail(UpstreamTimeout(f"{authority} stalled while sending the body"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_header_bytes", "_idle_timer", "_queue", "_reading_paused", "_req", "_serving", "cfg", "closing",
        "parser", "peer", "relay", "server", "transport",
    )

    def __init__(self, cfg: Settings, server: ProxyServer) -> None:
        self.cfg = cfg
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        self._req: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._serving = False
        self._header_bytes = 0
        self._reading_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.relay: Relay | None = None
        self.closing = False

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if isinstance(peer, tuple) else b""
        self.server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An Upgrade (WebSocket) request: Upgrade is hop-by-hop and not forwarded, so the request is
            # answered as plain HTTP; bytes after its head are parsed as the next request.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            if offset < len(data):
                self.data_received(data[offset:])
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            self._protocol_error(cause if isinstance(cause, ProxyError) else BadRequest(f"malformed request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_idle_timer()
        self.server.connections.discard(self)
        if self.server.stopping and not self.server.connections:
            self.server.drained.set()
        if self.relay is not None:
            self.relay.client_gone()
        self._queue.clear()

    def pause_writing(self) -> None:
        relay = self.relay
        if relay is not None and relay.conn.transport is not None:
            relay.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        relay = self.relay
        if relay is not None and relay.conn.transport is not None and not relay.conn.closed:
            relay.conn.transport.resume_reading()

    # --- llhttp callbacks ---
    def on_message_begin(self) -> None:
        self._req = Request()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        req = self._req
        assert req is not None
        req.target += url
        if len(req.target) > MAX_TARGET_BYTES:
            raise UriTooLong(f"request target longer than {MAX_TARGET_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeaderTooLarge(f"request header fields larger than {MAX_HEADER_BYTES} bytes")
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        parser = self.parser
        req.method = parser.get_method().decode("ascii", "replace")
        req.http10 = parser.get_http_version() == "1.0"
        req.keep_alive = parser.should_keep_alive()
        hosts = 0
        for name, value in req.headers:
            lower = name.lower()
            if lower == b"host":
                req.host = value
                hosts += 1
            elif lower == b"content-length":
                if req.body_kind == BODY_NONE and value.strip() != b"0":
                    req.body_kind = BODY_LENGTH
            elif lower == b"transfer-encoding":
                req.body_kind = BODY_CHUNKED
            elif lower == b"expect" and value.lower() == b"100-continue":
                req.expect_continue = True
        if hosts > 1:
            # RFC 9112 §3.2: more than one Host is a 400; routing on one while the upstream reads another is
            # how requests reach hosts they were not routed to.
            req.bad = BadRequest("more than one Host header")
        if req.body_kind == BODY_NONE:
            req.body_done = True
        self._cancel_idle_timer()  # the head arrived in time; the request now runs under upstream timeouts
        self._queue.append(req)
        if not self._serving:
            self._serve_next()

    def on_body(self, data: bytes) -> None:
        req = self._req
        assert req is not None
        if req.sink is not None:
            req.sink.send_body(data)
            return
        req.buffer.append(data)
        req.buffered += len(data)
        if req.buffered > MAX_BUFFERED_BODY:
            self.pause_reading()

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        if req.body_kind != BODY_NONE:
            req.body_done = True
            if req.sink is not None:
                req.sink.end_body()

    # --- flow control and writing ---
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- serving requests, one at a time per connection ---
    def _serve_next(self) -> None:
        if not self._queue or self.closing:
            self._serving = False
            return
        self._serving = True
        self.cfg.loop.create_task(self._serve(self._queue.popleft()))

    def _finished(self, req: Request) -> None:
        self.relay = None
        if not req.keep_alive or (self.server.stopping and not self._queue) or self.closing:
            self._close()
            return
        if self._queue:
            self._serve_next()
            return
        self._serving = False
        self.resume_reading()
        self._arm_idle_timer()

    async def _serve(self, req: Request) -> None:
        """Route and forward one request; returns once the response head went out (or an error answer did).
        The rest of the exchange finishes in `_relay_done`, called back by the relay."""
        cfg = self.cfg
        started = time.perf_counter()
        service = NO_SERVICE
        upstream = ""
        status = 0
        path = req.target.partition(b"?")[0].decode("latin-1")
        try:
            if req.bad is not None:
                raise req.bad
            route = cfg.router.current.lookup(req.host.decode("latin-1"), path)
            if route is None:
                raise NoRoute("no route for this host and path")
            service = route.service
            pool = cfg.pools.get(service)
            if pool is None or not pool.endpoints:
                raise NoHealthyEndpoint(f"no healthy instance of service {service!r}")
            target = route.upstream_target(req.target.decode("latin-1")).encode("latin-1")
            relay = await self._forward(req, route.scheme, route.tls_skip_verify, pool, target)
        except ProxyError as err:
            status = err.status
            upstream = err.upstream or upstream
            log.warning("proxy_error", status=err.status, reason=err.reason, error=err.message,
                        service=service, upstream=upstream, method=req.method, path=path)
            if not req.body_done:
                req.keep_alive = False  # the unread rest of the body would be taken for the next request
            self.write(error_response(err.status, err.message, keep_alive=req.keep_alive, http10=req.http10))
        except ClientGone:
            status = 499  # nginx's code for a client that went away before the answer
            req.keep_alive = False
        except Exception:
            log.exception("proxy_internal_error", service=service, method=req.method, path=path)
            status = 500
            req.keep_alive = False
            self.write(error_response(500, "internal proxy error", keep_alive=False, http10=req.http10))
        else:
            relay.started = started
            relay.service = service
            relay.path = path
            relay.pool = pool
            if relay.finished:
                self._relay_done(relay)
            else:
                relay.on_done = self._relay_done
            return
        self._record(req, service, status, started, upstream, 0, path)
        self._finished(req)

    def _relay_done(self, relay: Relay) -> None:
        req = relay.req
        if relay.pool is not None:
            relay.pool.release(relay.endpoint)
        status = relay.status
        error = relay.error
        if isinstance(error, ProxyError):
            # The head is out: the only honest signal left is to cut the connection.
            log.warning("upstream_body_aborted", service=relay.service, upstream=relay.endpoint.authority,
                        reason=error.reason, error=error.message, bytes=relay.bytes_out)
            req.keep_alive = False
            if self.transport is not None:
                self.transport.abort()
        elif error is not None:
            status = 499
            req.keep_alive = False
        self._record(req, relay.service, status, relay.started, relay.endpoint.authority, relay.bytes_out,
                     relay.path)
        self._finished(req)

    def _record(self, req: Request, service: str, status: int, started: float, upstream: str, sent: int,
                path: str) -> None:
        cfg = self.cfg
        elapsed = time.perf_counter() - started
        cfg.metrics.observe_request(service, req.method, status, elapsed)
        if cfg.access_log:
            access_log.info(
                "access", method=req.method, host=req.host.decode("latin-1"), path=path, status=status,
                service=service, upstream=upstream, duration_ms=round(elapsed * 1000, 3), bytes=sent,
                client=self.peer.decode(),
            )

    async def _forward(self, req: Request, scheme: str, skip_verify: bool, pool: Pool, target: bytes) -> Relay:
        """Send the request to an instance and wait for the response head, trying another where it is safe.

        On return the instance counts the request as in flight (`pool.acquire`); the caller releases it.
        """
        cfg = self.cfg
        tried: set[str] = set()
        attempts = min(cfg.max_attempts, len(pool.endpoints))
        stale_retry_left = True
        head_request = req.method == "HEAD"
        while True:
            endpoint: Endpoint | None = pool.pick(tried)
            if endpoint is None:
                raise NoHealthyEndpoint(f"no healthy instance of service {pool.service!r}")
            tried.add(endpoint.key)
            key = (scheme, endpoint.address, endpoint.port, skip_verify)
            conn = cfg.upstream.take_idle(key, cfg.loop.time())
            reused = conn is not None
            try:
                if conn is None:
                    conn = await cfg.upstream.connect(key)
            except ProxyError as err:
                err.upstream = endpoint.authority
                if len(tried) < attempts and not self.closing:
                    log.info("upstream_retry", service=pool.service, upstream=endpoint.authority,
                             reason=err.reason, error=err.message, attempt=len(tried))
                    continue
                raise
            if self.closing:
                cfg.upstream.release(conn, True)
                raise ClientGone()
            pool.acquire(endpoint)
            relay = Relay(self, req, conn, endpoint, cfg.read_timeout)
            self.relay = relay
            conn.send(upstream_request_head(
                req.method.encode(), target, req.headers, client_ip=self.peer, proto=cfg.proto,
                port=cfg.listen_port, default_host=endpoint.authority.encode(),
                chunked=req.body_kind == BODY_CHUNKED,
            ), relay, head_request=head_request)
            if req.body_kind != BODY_NONE:
                self._attach_body(req, relay)
            try:
                await relay.head
            except ProxyError as err:
                self.relay = None
                pool.release(endpoint)
                err.upstream = endpoint.authority
                # A reused keep-alive connection the upstream had already closed: nothing was processed, so an
                # idempotent request without a body sent yet goes once more, on a new connection.
                stale = reused and err.nothing_received and isinstance(err, UpstreamConnectError)
                if stale and stale_retry_left and req.method in IDEMPOTENT and req.body_sent == 0:
                    stale_retry_left = False
                    tried.discard(endpoint.key)
                    continue
                raise
            except BaseException:
                self.relay = None
                pool.release(endpoint)
                raise
            return relay

    def _attach_body(self, req: Request, relay: Relay) -> None:
        if req.expect_continue and not req.buffer and not req.body_done:
            self.write(_CONTINUE)
        for chunk in req.buffer:
            relay.send_body(chunk)
        req.buffer.clear()
        req.buffered = 0
        req.sink = relay
        if req.body_done:
            relay.end_body()
        self.resume_reading()

    # --- errors and closing ---
    def _protocol_error(self, err: ProxyError) -> None:
        log.warning("client_protocol_error", status=err.status, reason=err.reason, error=err.message,
                    client=self.peer.decode())
        self.cfg.metrics.observe_request(NO_SERVICE, "OTHER", err.status, 0.0)
        if self.relay is None and not self._serving:
            self.write(error_response(err.status, err.message, keep_alive=False))
        self._close()

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = self.cfg.loop.call_later(self.cfg.idle_timeout, self._idle_expired)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self._serving:
            self._close()

    def _close(self) -> None:
        self.closing = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Stop after the request in progress; close now if there is none."""
        if not self._serving:
            self._close()


class ProxyServer:
    """Listens and tracks connections so shutdown can let requests in progress finish."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.connections: set[ClientConnection] = set()
        self.stopping = False
        self.drained = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> None:
        self._server = await self.cfg.loop.create_server(
            lambda: ClientConnection(self.cfg, self), host, port, reuse_port=reuse_port or None, backlog=backlog,
        )

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
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
        if self._server is not None:
            await self._server.wait_closed()
