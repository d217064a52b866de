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
import contextlib
import fcntl
import itertools
import random
import re
import socket
import struct
import termios
import time
from ssl import SSLContext
from typing import Final

import httptools
import structlog

from discovery.matchers import cookie_values, header_values
from discovery.model import Endpoint

from .errors import (
    BadRequest,
    HeaderTimeout,
    HeaderTooLarge,
    MethodNotAllowed,
    NoHealthyEndpoint,
    NoRoute,
    NotImplementedCoding,
    PayloadTooLarge,
    ProxyError,
    ProxyInternalError,
    Redirect,
    RequestTimeout,
    ServiceOverloaded,
    ToHttps,
    TooManyConnections,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    UriTooLong,
    VersionNotSupported,
)
from .forwarder import FRAMING_CHUNKED, FRAMING_EOF, PoolKey, UpstreamConnection, UpstreamPool
from .headers import TrustedProxies, client_response_head, error_response, upstream_request_head
from .logs import AccessWriter
from .metrics import NO_ROUTE, NO_SERVICE, Metrics
from .pool import Pool, Pools, sticky_value
from .table import Route, RoutingTable, normalize_host, normalize_path
from .tls import HttpsRedirect

log = structlog.get_logger("ferryman.proxy")

# RFC 9110 §9.2.2: methods whose repetition has the same effect; only these are retried after a reused
# connection dropped. Any method is retried when the connection was never established.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Defaults of the limits (config keys max_request_target, max_header_bytes, max_header_count).
MAX_TARGET_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_HEADER_COUNT: Final = 100
MAX_BUFFERED_BODY: Final = 256 * 1024
MAX_PIPELINED: Final = 32  # queued requests on one connection before reading pauses
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_RETRY_AFTER: Final = ((b"Retry-After", b"1"),)
_LIMITED_LOG_EVERY_S: Final = 10.0
_LAST_CHUNK: Final = b"0\r\n\r\n"
_LINGER_RESET: Final = struct.pack("ii", 1, 0)

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2

# Bytes a Host value may have: a reg-name, an IPv4 or a bracketed IPv6 literal, an optional port.
_HOST_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+;=:[]"
# A client's X-Request-ID is kept when it is a plain token of sane length; anything else is replaced by a
# fresh id, so a log line cannot be forged through it. Fresh ids are 32 hex digits, as nginx's $request_id: a
# random 64-bit prefix per process and a counter, unique across processes and restarts (for log correlation,
# not secrets), and cheaper than 128 random bits per request.
_SANE_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._~:@+/=-]{1,128}\Z").match
_ids = random.Random()
_id_prefix = random.SystemRandom().getrandbits(64)
_id_counter = itertools.count(_ids.getrandbits(32))


def new_request_id() -> bytes:
    return b"%016x%016x" % (_id_prefix, next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF)


def request_log(req: Request, level: str, event: str, **fields: object) -> None:
    """A log line about one request, with its request id bound through structlog's context variables for
    the line (the engine runs requests as callbacks, with no task of their own to hold a context)."""
    with structlog.contextvars.bound_contextvars(request_id=req.request_id.decode("latin-1")):
        getattr(log, level)(event, **fields)


class Router:
    """Holds the current table; replaced whole by one assignment (atomic on the event loop)."""

    __slots__ = ("current",)

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.current = table or RoutingTable()


class ClientGone(Exception):
    """The client closed its connection before the answer was complete (logged as status 499)."""


class Request:
    __slots__ = (
        "absolute",
        "bad",
        "body_done",
        "body_kind",
        "body_sent",
        "buffer",
        "buffered",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "max_body",
        "method",
        "request_id",
        "sink",
        "target",
        "upgrade",
    )

    def __init__(self) -> None:
        self.upgrade = b""  # the protocol a WebSocket upgrade request asks for (b"websocket"), else empty
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
        self.sink: Exchange | None = None
        self.bad: ProxyError | None = None  # a request that parsed but must be refused (answered in order)
        self.request_id = b""
        self.content_length = -1  # the Content-Length header's value, -1 without one
        self.absolute = False  # the target was in absolute form (http://host/path)
        self.max_body = 0  # the body limit of the route it took (0: none)


class ProxyContext:
    """What every connection needs, gathered once. The structure comes in the constructor; the timeouts and
    limits start at their defaults and are set by the app from the configuration (at start, on reload)."""

    __slots__ = (
        "access_log", "access_sample", "header_timeout", "idle_timeout", "listen_port", "loop", "max_attempts",
        "max_body", "max_connections", "max_head", "max_header_bytes", "max_header_count", "max_target", "metrics",
        "pools", "proto", "read_timeout", "redirect", "router", "trusted", "tunnel_idle_timeout", "upstream",
    )

    def __init__(
        self, *, router: Router, pools: Pools, upstream: UpstreamPool, metrics: Metrics, listen_port: int,
        proto: str, access_log: AccessWriter | None, loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.router, self.pools, self.upstream, self.metrics = router, pools, upstream, metrics
        self.listen_port = str(listen_port).encode()
        self.proto = proto.encode()
        self.access_log = access_log
        self.loop = loop
        self.max_attempts = 3
        self.read_timeout, self.idle_timeout, self.header_timeout = 30.0, 75.0, 10.0
        self.access_sample = 1.0  # share of successful (< 400) requests logged; errors always are
        self.max_connections = 10_000
        self.max_target = self.max_header_bytes = self.max_header_count = self.max_head = 0
        self.set_head_limits(MAX_TARGET_BYTES, MAX_HEADER_BYTES, MAX_HEADER_COUNT)
        self.max_body = 0
        self.tunnel_idle_timeout = 600.0  # a WebSocket with no byte either way this long closes
        self.redirect: HttpsRedirect | None = None  # plain HTTP sent to HTTPS, for these hosts
        self.trusted: TrustedProxies | None = None  # peers whose forwarding headers are kept (trusted_proxies)

    def set_head_limits(self, max_target: int, max_header_bytes: int, max_header_count: int) -> None:
        self.max_target, self.max_header_bytes, self.max_header_count = max_target, max_header_bytes, max_header_count
        # One endless line never completes a field, so the per-field checks would never run: the head as a
        # whole is bounded too.
        self.max_head = max_target + max_header_bytes + 1024


class Exchange:
    """One request, from routing to its last byte, across the instances it is tried on.

    Driven by callbacks only, so a request on a pooled keep-alive connection costs no task and no future:
    `attempt()` picks an instance and sends the head at once when an idle connection is at hand (a task is
    started only to open a new connection); the upstream connection then calls `on_head`, `on_body`,
    `on_complete` or `on_error`, which write to the client as bytes arrive. Before the response head, a
    failure may lead to another attempt (see `_attempt_failed`); after it, the client connection is aborted.
    """

    __slots__ = (
        "armed",
        "attempts",
        "bytes_out",
        "chunked_out",
        "client",
        "client_backlog",
        "conn",
        "endpoint",
        "fresh",
        "head_request",
        "head_sent",
        "last_activity",
        "loop",
        "out",
        "over",
        "path",
        "pin",
        "pool",
        "req",
        "reused",
        "route",
        "sent_at",
        "service",
        "stale_retry_left",
        "started",
        "status",
        "target",
        "tried",
        "tunnel",
        "upstream_s",
    )

    def __init__(
        self, client: ClientConnection, req: Request, route: Route, pool: Pool, target: bytes, started: float,
        path: str, service: str,
    ) -> None:
        cfg = client.cfg
        self.client = client
        self.loop = cfg.loop
        self.req = req
        self.route = route
        self.pool = pool
        self.service = service  # the route's, or the one a split drew
        self.target = target
        self.started = started
        self.path = path
        self.tried: set[str] = set()
        self.attempts = min(cfg.max_attempts, len(pool.endpoints))
        pool.budget.record_request(self.loop.time())
        pool.active += 1
        self.stale_retry_left = True
        self.head_request = req.method == "HEAD"
        self.endpoint: Endpoint | None = None
        self.conn: UpstreamConnection | None = None
        self.reused = False
        self.head_sent = False
        self.status = 0
        self.bytes_out = 0
        self.client_backlog = 0  # the client transport's write buffer when it last paused us, or shrank
        self.sent_at = 0.0
        self.upstream_s: float | None = None  # request sent to response head received, on the last attempt
        self.tunnel = False  # the upstream accepted an upgrade (101): raw bytes both ways until one side closes
        self.chunked_out = False
        self.out: list[bytes] = []  # response bytes from the current upstream read, written once by flush()
        self.last_activity = 0.0
        self.armed = False  # the read timeout runs (checked by the server's sweeper, not a timer per request)
        self.over = False  # answered and recorded: every later callback is a no-op
        self.fresh = False  # the next attempt opens a new connection instead of taking a pooled one
        # The sticky cookie's value the client sent, read once (used to pick, then to decide on Set-Cookie).
        self.pin = hash_key(req, client.peer_text, ("cookie", pool.sticky)) if pool.sticky is not None else None

    # --- choosing an instance and sending ---
    def attempt(self) -> None:
        client = self.client
        if client.closing:
            self._finish(499)
            return
        pool = self.pool
        if pool.outliers.ejected:
            for instance in pool.outliers.readmit_expired(self.loop.time()):
                request_log(self.req, "info", "upstream_readmitted", service=self.service, instance=instance)
        endpoint = None
        if self.pin is not None:
            endpoint = pool.pinned(self.pin, self.tried)
        if endpoint is None:
            endpoint = pool.pick(
                self.tried, hash_key(self.req, client.peer_text, pool.hash_on) if pool.hash_on else None,
                self.loop.time(),
            )
        if endpoint is None:
            self._answer(NoHealthyEndpoint(f"no healthy instance of service {self.service!r}"))
            return
        self.tried.add(endpoint.key)
        route = self.route
        key = (route.scheme, endpoint.address, endpoint.port, route.tls_skip_verify, route.sni)
        upstream = client.cfg.upstream
        conn = None if self.fresh else upstream.take_idle(key, self.loop.time())
        self.fresh = False
        if conn is not None:
            self._send(endpoint, conn, reused=True)
        else:
            self.loop.create_task(self._connect(endpoint, key))

    async def _connect(self, endpoint: Endpoint, key: PoolKey) -> None:
        try:
            conn = await self.client.cfg.upstream.connect(key)
        except ProxyError as err:
            self._attempt_failed(endpoint, err, connected=False)
            return
        except Exception:  # a bug, not an upstream failure: answer 500 rather than leave the client hanging
            request_log(self.req, "exception", "proxy_internal_error", service=self.service, path=self.path)
            self._answer(ProxyInternalError("internal proxy error"))
            return
        if self.over or self.client.closing:
            self.client.cfg.upstream.release(conn, True)
            self._finish(499)
            return
        self._send(endpoint, conn, reused=False)

    def _send(self, endpoint: Endpoint, conn: UpstreamConnection, *, reused: bool) -> None:
        client = self.client
        cfg = client.cfg
        req = self.req
        self.endpoint = endpoint
        self.conn = conn
        self.reused = reused
        self.pool.acquire(endpoint)
        if client.writing_paused:
            conn.pause_reading()  # the client is still behind on an earlier answer on this connection
            self.client_backlog = unsent(client.transport)  # its progress, from here, keeps this request alive
        self._arm_timer()
        self.sent_at = time.perf_counter()
        conn.send(upstream_request_head(
            req.method.encode(), self.target, req.headers, client_ip=client.peer, proto=cfg.proto,
            port=cfg.listen_port, default_host=endpoint.authority.encode(), chunked=req.body_kind == BODY_CHUNKED,
            request_id=req.request_id, upgrade=req.upgrade, trusted=cfg.trusted if client.trusted else None,
            rules=self.route.request_rules, upstream_host=self.route.upstream_host_bytes,
        ), self, head_request=self.head_request, upgrade=bool(req.upgrade))
        if req.body_kind != BODY_NONE:
            client.attach_body(req, self)

    def _arm_timer(self) -> None:
        """(Re)start the inactivity clock. While the request body flows, the client's progress counts too; the
        upstream's silence counts from when it has the whole request (a slow upload is not its fault)."""
        if not self.over:
            self.armed = True
            self.last_activity = self.loop.time()

    def _attempt_failed(self, endpoint: Endpoint, err: ProxyError, *, connected: bool) -> None:
        """Before any response byte reached the client: try again when that is safe, else answer.

        - The connection was never made (refused, connect timeout): nothing reached the upstream, so any
          method goes to another instance.
        - The upstream closed the connection before any byte of its response and the request is idempotent
          with no body byte sent (RFC 9110 §9.2.2): a reused keep-alive connection the upstream had already
          dropped is retried once on a new connection to the same instance, and otherwise another instance
          is tried (a crashed backend).
        Other instances are tried at most `max_attempts` in all and within the pool's retry budget, so that
        retries cannot multiply an outage. Timeouts are never retried.
        """
        if self.over:
            return
        req = self.req
        client = self.client
        err.upstream = endpoint.authority
        may_retry = not connected
        if isinstance(err, UpstreamConnectError | UpstreamConnectTimeout) and not (connected and self.reused):
            # The instance refused, reset or did not accept: count it against the instance (a pooled
            # connection the upstream had dropped is not the instance's fault).
            self._instance_failed(endpoint)
        if connected:
            self._stop_timer()
            self.pool.release(endpoint)
            req.sink = None  # body chunks arriving meanwhile wait in the buffer for the next attempt
            self.conn = None
            closed_early = (
                err.nothing_received and isinstance(err, UpstreamConnectError)
                and req.method in IDEMPOTENT and req.body_sent == 0
            )
            if closed_early and self.reused and self.stale_retry_left:
                self.stale_retry_left = False
                self.tried.discard(endpoint.key)
                self.fresh = True  # other pooled connections to it may be just as stale
                self._count_retry(endpoint, err)
                self.attempt()
                return
            may_retry = closed_early
        if (
            may_retry and len(self.tried) < self.attempts and not client.closing
            and self.pool.budget.allow(self.loop.time())
        ):
            self._count_retry(endpoint, err)
            self.attempt()
            return
        self._answer(err)

    def _instance_failed(self, endpoint: Endpoint) -> None:
        pool = self.pool
        now = self.loop.time()
        pool.errors.add(endpoint.key, now)
        ejected_for = pool.outliers.failure(endpoint.key, now, len(pool.endpoints))
        if ejected_for is not None:
            request_log(self.req, "warning", "upstream_ejected", service=self.service, upstream=endpoint.authority,
                        instance=endpoint.key, for_s=ejected_for)
            self.client.cfg.metrics.ejections.labels(self.service).inc()

    def _count_retry(self, endpoint: Endpoint, err: ProxyError) -> None:
        request_log(self.req, "info", "upstream_retry", service=self.service, upstream=endpoint.authority,
                    reason=err.reason, error=err.message, attempt=len(self.tried))
        self.client.cfg.metrics.retries.labels(self.service).inc()

    def _answer(self, err: ProxyError) -> None:
        if not self.over:
            self.over = True
            self.pool.active -= 1
            self.client.answer_error(self.req, err, self.service, self.started, self.path, self.route.id)

    # --- request body, client -> upstream ---
    def send_body(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        req = self.req
        if req.max_body and req.body_sent + len(data) > req.max_body:
            # A chunked body (a declared length was checked before forwarding) grew past the limit: the upstream
            # never gets the bytes beyond it, and the request ends here.
            self.client_body_broken(PayloadTooLarge(f"request body larger than {req.max_body} bytes"))
            return
        req.body_sent += len(data)
        self.last_activity = self.loop.time()
        if self.req.body_kind == BODY_CHUNKED:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)

    def end_body(self) -> None:
        if self.conn is None:
            return
        if self.req.body_kind == BODY_CHUNKED:
            self.conn.write(_LAST_CHUNK)
        self._arm_timer()

    def client_body_broken(self, err: ProxyError) -> None:
        """The client's request body turned out malformed while it was being relayed."""
        if self.over:
            return
        self._stop_timer()
        if self.conn is not None:
            self.conn.detach()
        self.req.keep_alive = False
        if self.head_sent:
            reset_connection(self.client.transport)
            self._finish(self.status)
        else:
            if self.endpoint is not None and self.conn is not None:
                self.pool.release(self.endpoint)
            self.conn = None
            self._answer(err)

    def upstream_pause_writing(self) -> None:
        self.client.paused_by_upstream = True
        self.client.pause_reading()

    def upstream_resume_writing(self) -> None:
        self.client.paused_by_upstream = False
        self.client.resume_reading()

    # --- response, upstream -> client (ResponseSink) ---
    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.upstream_s = time.perf_counter() - self.sent_at
        self.last_activity = self.loop.time()
        req = self.req
        keep_alive = req.keep_alive
        if framing == FRAMING_EOF or framing == FRAMING_CHUNKED:
            if req.http10:
                keep_alive = False  # HTTP/1.0 has no chunked coding: the end of the body is the end of the connection
            else:
                self.chunked_out = True
        if not req.body_done or self.client.server.stopping:
            # The upstream answered before the client finished sending (do not read on), or the server is
            # shutting down: say so in this answer rather than race the client's next request with a close.
            keep_alive = False
        req.keep_alive = keep_alive
        self.status = status
        self.head_sent = True
        if self.endpoint is not None:
            if status >= 500 and self.pool.policy.eject_on_5xx:
                self._instance_failed(self.endpoint)
            else:
                if status >= 500:
                    self.pool.errors.add(self.endpoint.key, self.loop.time())
                self.pool.outliers.success(self.endpoint.key)
        self._arm_timer()  # an upstream may answer before it read the whole body: its silence counts from now
        self.out.append(client_response_head(
            status, reason, headers, chunked=self.chunked_out, keep_alive=keep_alive, http10=req.http10,
            extra=self._sticky_cookie() if self.pool.sticky is not None else (), request_id=req.request_id,
            rules=self.route.response_rules,
        ))

    # --- after a 101: a tunnel (WebSocket) ---
    def on_upgrade(self, reason: bytes, headers: list[tuple[bytes, bytes]], rest: bytes) -> None:
        """The upstream switched protocols: answer the client's upgrade with its 101 and relay raw bytes both
        ways from now on, with flow control as for bodies, until either side closes or it idles out."""
        if self.over:
            return
        self.upstream_s = time.perf_counter() - self.sent_at
        req = self.req
        client = self.client
        self.status = 101
        self.head_sent = True
        self.tunnel = True
        self.last_activity = self.loop.time()
        self.armed = True
        if self.endpoint is not None:
            self.pool.outliers.success(self.endpoint.key)
        protocol = next((v for n, v in headers if n.lower() == b"upgrade"), req.upgrade)
        client.write(client_response_head(
            101, reason, headers, chunked=False, keep_alive=True, http10=False,
            extra=((b"Connection", b"Upgrade"), (b"Upgrade", protocol)), request_id=req.request_id,
        ))
        self.pool.tunnels += 1
        if rest:
            self.on_tunnel_data(rest)
        client.start_tunnel(self)

    def on_tunnel_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_out += len(data)
        self.client.write(data)

    def tunnel_from_client(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            self.last_activity = self.loop.time()
            self.req.body_sent += len(data)
            conn.write(data)

    def on_tunnel_closed(self) -> None:
        self.end_tunnel()

    def end_tunnel(self) -> None:
        """Either side closed (or the tunnel idled out): close the other after what it has buffered."""
        if self.over:
            return
        self.pool.tunnels -= 1
        conn = self.conn
        if conn is not None:
            self.client.cfg.upstream.release(conn, False)
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._finish(101)

    def _sticky_cookie(self) -> tuple[tuple[bytes, bytes], ...]:
        """Pin the client to the instance that answered, unless its cookie already does."""
        name = self.pool.sticky
        endpoint = self.endpoint
        if name is None or endpoint is None:
            return ()
        value = sticky_value(endpoint)
        if self.pin == value:
            return ()
        # Scoped to the route's path, so two services under one host keep their own pins.
        path = self.route.path
        return ((b"Set-Cookie", f"{name}={value}; Path={path}; HttpOnly; SameSite=Lax".encode()),)

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
        if self.conn is not None:
            self.client.cfg.upstream.release(self.conn, reusable and self.req.body_done)
        self._finish(self.status)

    def on_error(self, error: ProxyError, *, nothing_received: bool) -> None:
        error.nothing_received = nothing_received
        if not self.over:
            self._broken(error)

    # --- the client went away, or the upstream went silent ---
    def client_gone(self) -> None:
        if self.tunnel:
            self.end_tunnel()
            return
        self._stop_timer()
        if self.conn is not None:
            self.conn.detach()
        self._finish(499)  # nginx's code for a client that went away before the answer

    def check_timeout(self, now: float) -> None:
        if self.tunnel:
            if now - self.last_activity >= self.client.cfg.tunnel_idle_timeout:
                request_log(self.req, "info", "tunnel_idle_closed", service=self.service,
                            idle_s=self.client.cfg.tunnel_idle_timeout)
                self.end_tunnel()
            return
        if not self.armed or now - self.last_activity < self.client.cfg.read_timeout:
            return
        if self.client.writing_paused:
            # Waiting on the client (for this answer, or for earlier ones on the connection while this
            # request's upstream reading stays paused). Progress is its backlog shrinking (it reads, if
            # slowly): the clock restarts.
            backlog = unsent(self.client.transport)
            if backlog < self.client_backlog:
                self.client_backlog = backlog
                self.last_activity = now
                return
        self.armed = False
        if self.conn is not None:
            self.conn.detach()
        authority = self.endpoint.authority if self.endpoint else "upstream"
        if not self.req.body_done and not self.head_sent:
            self.req.keep_alive = False
            if self.client.paused_by_upstream:
                self._broken(UpstreamTimeout(f"{authority} stopped reading the request body"))
            else:
                self._broken(RequestTimeout("the client stopped sending the request body"))
        elif self.client.writing_paused:
            # The client took none of what it was sent for read_timeout (nginx's send_timeout): its fault, not
            # the upstream's, which is neither answered with a 504 nor counted towards ejection. The connection
            # is cut (a reset, so the client cannot take a response for whole).
            request_log(self.req, "warning", "client_send_timeout", service=self.service, bytes=self.bytes_out,
                        timeout_s=self.client.cfg.read_timeout)
            self.req.keep_alive = False
            reset_connection(self.client.transport)
            self._finish(self.status or 499)
        elif self.head_sent:
            self._broken(UpstreamTimeout(f"{authority} stalled while sending the body"))
        else:
            self._broken(UpstreamTimeout(f"{authority} did not answer in time"))

    def _broken(self, error: ProxyError) -> None:
        self.flush()
        endpoint = self.endpoint
        if not self.head_sent and endpoint is not None:
            if isinstance(error, UpstreamTimeout | RequestTimeout):
                # Timeouts are not retried: the upstream may be working on it, and a retry doubles the load.
                self.stale_retry_left = False
                self.attempts = 0
            if isinstance(error, UpstreamTimeout) and not isinstance(error, RequestTimeout):
                # An instance that accepts but does not answer counts against it, like a refusal (Envoy's
                # consecutive gateway failures): otherwise a hung backend keeps 1/N of requests waiting.
                self._instance_failed(endpoint)
            self._attempt_failed(endpoint, error, connected=True)
            return
        self._stop_timer()
        # The head is out: the only honest signal left is to cut the connection.
        request_log(self.req, "warning", "upstream_body_aborted", service=self.service, upstream=error.upstream or
                    (endpoint.authority if endpoint else ""), reason=error.reason, error=error.message,
                    bytes=self.bytes_out)
        self.req.keep_alive = False
        reset_connection(self.client.transport)
        self._finish(self.status)

    def _finish(self, status: int) -> None:
        if self.over:
            return
        self.over = True
        self.pool.active -= 1
        self._stop_timer()
        if self.endpoint is not None and self.conn is not None:
            self.pool.release(self.endpoint)
        self.conn = None
        if status == 499:
            self.req.keep_alive = False
        client = self.client
        client.record(self.req, self.service, self.route.id, status, self.started,
                      self.endpoint.authority if self.endpoint else "", self.bytes_out, self.path, self.upstream_s)
        client.finished(self.req)

    def _stop_timer(self) -> None:
        self.armed = False


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body_fed",
        "_current_done",
        "_deferred_error",
        "_fresh",
        "_head_bytes",
        "_header_bytes",
        "_idle_since",
        "_in_head",
        "_in_loop",
        "_nonbody_run",
        "_queue",
        "_reading_paused",
        "_req",
        "_serving",
        "_tunnel_early",
        "_upgraded",
        "cfg",
        "closing",
        "exchange",
        "parser",
        "paused_by_upstream",
        "peer",
        "peer_text",
        "server",
        "transport",
        "trusted",
        "writing_paused",
    )

    def __init__(self, cfg: ProxyContext, server: ProxyServer) -> None:
        self.cfg = cfg
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        self.peer_text = ""
        self._req: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._serving = False
        self._header_bytes = 0
        self._reading_paused = False
        self._idle_since: float | None = None  # waiting for (the rest of) a request head since then
        self._fresh = True  # no request head completed yet: waiting for one runs on client_header_timeout
        self.exchange: Exchange | None = None
        self.closing = False
        # A parse error behind requests still being answered: sent, in order, once they are done.
        self._deferred_error: ProxyError | None = None
        self._upgraded = False
        self._in_head = False  # between a request's first byte and the end of its head
        self._head_bytes = 0
        self._body_fed = 0  # body bytes llhttp delivered during the current read
        self._nonbody_run = 0  # bytes of the body phase since the last body byte
        self.writing_paused = False  # the client reads slower than we write: upstream reading stays paused
        self._tunnel_early = b""  # bytes a client sent after its upgrade head, before the upstream's 101
        self.trusted = False  # the peer is one of trusted_proxies
        self.paused_by_upstream = False  # reading paused because the upstream does not take the body
        self._in_loop = False
        self._current_done = False

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_text = peer[0] if isinstance(peer, tuple) else ""
        self.peer = self.peer_text.encode()
        trusted = self.cfg.trusted
        self.trusted = trusted is not None and self.peer in trusted
        server = self.server
        if len(server.connections) >= self.cfg.max_connections:
            # Over the limit: answered at once and closed, so the proxy stays responsive for the connections
            # it has (the kernel's backlog would otherwise queue clients for no one).
            self.closing = True
            server.refuse(self)
            return
        server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self._deferred_error is not None or self.closing:
            return  # the stream is broken (nothing after the bad request is read), or the connection refused
        if self._upgraded:
            # After an Upgrade or CONNECT head the bytes are not HTTP: relayed once a WebSocket tunnel is up,
            # kept until then (reading pauses), and never parsed: without a tunnel the connection closes.
            exchange = self.exchange
            if exchange is not None and exchange.tunnel:
                exchange.tunnel_from_client(data)
            else:
                self._tunnel_early += data  # nothing is dropped: reading pauses once enough waits
                if len(self._tunnel_early) >= MAX_BUFFERED_BODY:
                    self.pause_reading()
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An Upgrade or CONNECT request: what follows its head is never parsed as requests (it may be
            # another protocol, or a body smuggled past a head that claimed none). A WebSocket upgrade goes to
            # the upstream with its Upgrade header and becomes a tunnel if it answers 101; any other is answered
            # as plain HTTP (Upgrade is hop-by-hop) and the connection then closes.
            self._upgraded = True
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._tunnel_early = data[offset:]
            self.pause_reading()
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            self._protocol_error(cause if isinstance(cause, ProxyError) else BadRequest(f"malformed request: {exc}"))
            return
        if self._in_head and self._head_bytes > self.cfg.max_head:
            # One endless header line never completes a field, so the per-field check would never run.
            self._protocol_error(HeaderTooLarge(f"request head larger than {self.cfg.max_head} bytes"))
            return
        if self._req is not None and not self._in_head:
            # Bytes of a request's body phase that were not body: chunk framing and, at the end, trailer
            # fields, which llhttp gathers whole however long. A run of them with no body byte is bounded
            # like a head.
            nonbody = len(data) - self._body_fed
            self._nonbody_run = nonbody if self._body_fed else self._nonbody_run + nonbody
            if self._nonbody_run > self.cfg.max_head:
                self._protocol_error(HeaderTooLarge(f"request trailer section larger than {self.cfg.max_head} bytes"))
                return
        self._body_fed = 0
        # Requests start after the whole read was parsed, so a request whose head parsed but whose framing
        # llhttp rejects a moment later (Transfer-Encoding not ending in chunked) never reaches an upstream.
        if not self._serving and self._queue:
            self._serve_next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_idle_timer()
        self.server.connections.discard(self)
        if self.server.stopping and not self.server.connections:
            self.server.drained.set()
        if self.exchange is not None:
            self.exchange.client_gone()
        self._queue.clear()

    def pause_writing(self) -> None:
        # The client does not read its answers fast enough: stop reading the upstream and stop taking new
        # requests from it (answers it never reads must not pile up in memory).
        self.writing_paused = True
        self.pause_reading()
        exchange = self.exchange
        if exchange is not None:
            exchange.last_activity = self.cfg.loop.time()  # from now on the clock runs on the client's reading
            exchange.client_backlog = unsent(self.transport)
            if exchange.conn is not None:
                exchange.conn.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        exchange = self.exchange
        if exchange is not None:
            exchange.last_activity = self.cfg.loop.time()  # the client read: progress
            if exchange.conn is not None:
                exchange.conn.resume_reading()
        if not self.paused_by_upstream and len(self._queue) < MAX_PIPELINED:
            self.resume_reading()

    # --- llhttp callbacks ---
    def on_message_begin(self) -> None:
        self._req = Request()
        self._header_bytes = 0
        self._head_bytes = 0
        self._nonbody_run = 0
        self._in_head = True
        self._idle_since = self.cfg.loop.time()  # from the first byte, the head must arrive in client_header_timeout

    def on_url(self, url: bytes) -> None:
        req = self._req
        assert req is not None
        req.target += url
        if len(req.target) > self.cfg.max_target:
            raise UriTooLong(f"request target longer than {self.cfg.max_target} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None
        if not self._in_head:
            # A chunked body's trailer fields (RFC 9110 §6.5): never merged into the head, where they could add
            # a second Host or forge headers after the checks ran. They are not forwarded.
            return
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.cfg.max_header_bytes:
            raise HeaderTooLarge(f"request header fields larger than {self.cfg.max_header_bytes} bytes")
        req.headers.append((name, value))
        if len(req.headers) > self.cfg.max_header_count:
            raise HeaderTooLarge(f"more than {self.cfg.max_header_count} request header fields")

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        parser = self.parser
        self._in_head = False
        req.method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        req.http10 = version == "1.0"
        req.keep_alive = parser.should_keep_alive()
        hosts = 0
        coding = b""
        upgrade = b""
        for name, value in req.headers:
            lower = name.lower()
            if lower == b"host":
                req.host = value
                hosts += 1
            elif lower == b"content-length":
                if value.strip().isdigit():  # llhttp refused anything else, and a second differing value
                    req.content_length = int(value)
                if req.body_kind == BODY_NONE and value.strip() != b"0":
                    req.body_kind = BODY_LENGTH
            elif lower == b"transfer-encoding":
                req.body_kind = BODY_CHUNKED
                # Repeated field lines form one list (RFC 9110 §5.3): `gzip` then `chunked` is `gzip, chunked`.
                coding = coding + b"," + value if coding else value
            elif lower == b"expect" and value.lower() == b"100-continue":
                req.expect_continue = True
            elif lower == b"x-request-id":
                req.request_id = value
            elif lower == b"upgrade":
                upgrade = value
        if version != "1.1" and version != "1.0":
            req.bad = VersionNotSupported(f"HTTP/{version} is not supported: HTTP/1.1 or HTTP/1.0 only")
            req.keep_alive = False
        elif hosts > 1:
            # RFC 9112 §3.2: more than one Host is a 400; routing on one while the upstream reads another is
            # how requests reach hosts they were not routed to.
            req.bad = BadRequest("more than one Host header")
            req.keep_alive = False
        elif hosts == 0 and not req.http10:
            req.bad = BadRequest("an HTTP/1.1 request must have a Host header")  # RFC 9112 §3.2
            req.keep_alive = False
        elif hosts and req.host.translate(None, _HOST_CHARS):
            # A list, a path, user info, blanks or control bytes: not a host (RFC 9112 §3.2, RFC 3986 §3.2.2).
            req.bad = BadRequest("invalid Host header")
            req.keep_alive = False
        elif coding and [c.strip().lower() for c in coding.split(b",")] != [b"chunked"]:
            # llhttp accepted `gzip, chunked`; relaying it would drop the gzip coding without a word (nginx: 501).
            req.bad = NotImplementedCoding(f"transfer coding {coding.decode('latin-1')!r} is not supported")
            req.keep_alive = False
        if req.method == "CONNECT":
            req.bad = MethodNotAllowed("CONNECT is not supported: this is a reverse proxy")
        if parser.should_upgrade():
            # llhttp reads no body after an upgrade head, whatever Content-Length says: a head that claims one
            # would have the next bytes read as its body upstream (request smuggling).
            req.keep_alive = False
            if req.body_kind != BODY_NONE and req.bad is None:
                req.bad = BadRequest("an upgrade request must not have a body")
            elif req.method == "GET" and b"websocket" in upgrade.lower():
                req.upgrade = b"websocket"
        if req.target[:1] != b"/" and req.target != b"*" and req.bad is None and req.method != "CONNECT":
            self._absolute_form(req)
        if req.body_kind == BODY_NONE:
            req.body_done = True
        self._cancel_idle_timer()  # the head arrived in time; the request now runs under upstream timeouts
        self._fresh = False
        self._queue.append(req)
        if len(self._queue) >= MAX_PIPELINED:
            self.pause_reading()  # resumed once the queue has drained

    def _absolute_form(self, req: Request) -> None:
        """RFC 9112 §3.2.2: with an absolute-form target the URI's authority is the host; it replaces Host for
        routing and upstream, and the upstream gets the origin form. Anything else is a 400."""
        scheme, sep, rest = req.target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            req.bad = BadRequest("request target must be a path or an absolute http(s) URI")
            return
        end = next((i for i, c in enumerate(rest) if c in b"/?#"), len(rest))
        authority, path = rest[:end].rpartition(b"@")[2], rest[end:]
        if not authority:
            req.bad = BadRequest("absolute request target without a host")
            return
        req.target = path if path.startswith(b"/") else b"/" + path
        req.host = authority
        req.absolute = True
        req.headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
        req.headers.append((b"Host", authority))

    def on_body(self, data: bytes) -> None:
        req = self._req
        assert req is not None
        self._body_fed += len(data)
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
        if self._upgraded and (self.exchange is None or not self.exchange.tunnel):
            return  # after an upgrade head nothing is read until the upstream's 101 makes a tunnel
        if self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- serving requests, one at a time per connection ---
    def _serve_next(self) -> None:
        """Start queued requests in order. A loop, not recursion: requests answered at once (404s in a
        pipeline) would otherwise nest one call per request."""
        if self._in_loop:
            return
        self._in_loop = True
        try:
            while True:
                if self.closing:
                    self._serving = False
                    return
                if not self._queue:
                    self._serving = False
                    err = self._deferred_error
                    if err is not None:
                        self.write(error_response(err.status, err.message, keep_alive=False))
                        self._close()
                    return
                self._serving = True
                self._current_done = False
                self._start(self._queue.popleft())
                if not self._current_done:
                    return  # in progress; finished() takes it from there
        finally:
            self._in_loop = False

    def finished(self, req: Request) -> None:
        """The request's answer is complete: go on with the next request, or wait, or close."""
        self.exchange = None
        self._current_done = True
        if not req.keep_alive or (self.server.stopping and not self._queue) or self.closing:
            self._close()
            return
        if self._queue or self._deferred_error is not None:
            self._serve_next()  # a no-op inside the loop, which goes on by itself
            return
        self._serving = False
        if not self.writing_paused:
            self.resume_reading()
        self._arm_idle_timer()

    def _start(self, req: Request) -> None:
        """Route a request and start forwarding it; errors known before any upstream is involved answer here."""
        started = time.perf_counter()
        path = req.target.partition(b"?")[0].decode("latin-1")
        matched = normalize_path(path)  # dot-segments and unreserved escapes resolved; `path` itself if none
        service = NO_SERVICE
        route_id = NO_ROUTE
        if not req.request_id or _SANE_REQUEST_ID(req.request_id) is None:
            req.request_id = new_request_id()
        try:
            if req.bad is not None:
                raise req.bad
            redirect = self.cfg.redirect
            if redirect is not None:
                location = redirect.location(normalize_host(req.host.decode("latin-1")), req.target)
                if location is not None:
                    raise ToHttps(location, req.method)
            route = self.cfg.router.current.lookup(req.host.decode("latin-1"), matched, req)
            if route is None:
                if req.absolute:
                    # Never an open proxy: an absolute URI naming a host this proxy does not route is refused.
                    raise BadRequest("absolute request target for a host this proxy does not route")
                raise NoRoute("no route for this host and path")
            service = route.service
            route_id = route.id
            if route.redirect is not None:
                raise Redirect(route.redirect[0], route.location(req.target))
            pools = self.cfg.pools
            if route.split:
                service = route.pick_service(_ids.random())  # a canary split: this request's service
                drawn = pools.get(service)
                if drawn is None or not drawn.endpoints:
                    # The drawn side has no healthy instance: another side of the split takes the request.
                    service = next((name for name, _ in route.split if (p := pools.get(name)) and p.endpoints),
                                   service)
            pool = pools.get(service)
            if pool is None or not pool.endpoints:
                raise NoHealthyEndpoint(f"no healthy instance of service {service!r}")
            if pool.max_concurrent and pool.active >= pool.max_concurrent:
                raise ServiceOverloaded(
                    f"service {service!r} has {pool.max_concurrent} requests in progress, its limit",
                    headers=_RETRY_AFTER,
                )
            max_body = route.max_body or pool.max_body or self.cfg.max_body
            if max_body and req.body_kind != BODY_NONE:
                if req.content_length > max_body:
                    raise PayloadTooLarge(f"request body of {req.content_length} bytes; the limit is {max_body}")
                req.max_body = max_body
            target = req.target if not route.rewrites else (
                route.upstream_target(req.target.decode("latin-1"), matched).encode("latin-1")
            )
        except ProxyError as err:
            self.answer_error(req, err, service, started, path, route_id)
            return
        exchange = self.exchange = Exchange(self, req, route, pool, target, started, path, service)
        exchange.attempt()

    def answer_error(
        self, req: Request, err: ProxyError, service: str, started: float, path: str, route_id: str,
    ) -> None:
        if err.status >= 400:  # a redirect to HTTPS is no error: its access line says enough
            request_log(req, "warning", "proxy_error", status=err.status, reason=err.reason, error=err.message,
                        service=service, upstream=err.upstream, method=req.method, path=path)
        if not req.body_done or self.server.stopping or err.status == 413:
            # The unread rest of the body would be taken for the next request; after a 413 the client may still
            # be sending what was refused (nginx closes too).
            req.keep_alive = False
        self.write(error_response(
            err.status, err.message, keep_alive=req.keep_alive, http10=req.http10, request_id=req.request_id,
            extra=err.headers, head=req.method == "HEAD",
        ))
        self.record(req, service, route_id, err.status, started, err.upstream, 0, path, None)
        self.finished(req)

    def record(self, req: Request, service: str, route_id: str, status: int, started: float, upstream: str,
               sent: int, path: str, upstream_s: float | None) -> None:
        cfg = self.cfg
        elapsed = time.perf_counter() - started
        cfg.metrics.observe_request(service, route_id, req.method, status, elapsed, upstream_s, req.body_sent, sent)
        access_log = cfg.access_log
        if access_log is not None and (status >= 400 or cfg.access_sample >= 1.0 or _ids.random() < cfg.access_sample):
            access_log(req, path, status, service, upstream, round(elapsed * 1000, 3), sent, self.peer_text)

    def start_tunnel(self, exchange: Exchange) -> None:
        """The upstream accepted the upgrade: what the client sent early goes first, then reading resumes."""
        early = self._tunnel_early
        self._tunnel_early = b""
        if early:
            exchange.tunnel_from_client(early)
        self.resume_reading()

    def attach_body(self, req: Request, exchange: Exchange) -> None:
        """From now on the request body goes to the upstream as it arrives; what waited in the buffer first."""
        # RFC 9110 §10.1.1 and §15.2: HTTP/1.0 clients get no 1xx; they send the body anyway.
        if req.expect_continue and not req.http10 and not req.buffer and not req.body_done:
            self.write(_CONTINUE)
            req.expect_continue = False
        for chunk in req.buffer:
            exchange.send_body(chunk)
        req.buffer.clear()
        req.buffered = 0
        req.sink = exchange
        if req.body_done:
            exchange.end_body()
        self.resume_reading()

    # --- errors and closing ---
    def _protocol_error(self, err: ProxyError) -> None:
        """A request llhttp (or a limit) rejected: answer it after the requests before it, then close."""
        log.warning("client_protocol_error", status=err.status, reason=err.reason, error=err.message,
                    client=self.peer.decode())
        self.cfg.metrics.observe_request(NO_SERVICE, NO_ROUTE, "OTHER", err.status, 0.0)
        bad = self._req
        self._req = None
        if bad is not None and bad in self._queue:
            self._queue.remove(bad)  # its head parsed, its framing did not: it never starts
        elif bad is not None and self.exchange is not None and self.exchange.req is bad:
            self.exchange.client_body_broken(err)  # its body broke off while being relayed
            return
        self._deferred_error = err
        self.pause_reading()
        if not self._serving:
            self._serve_next()

    def _arm_idle_timer(self) -> None:
        self._idle_since = self.cfg.loop.time()

    def _cancel_idle_timer(self) -> None:
        self._idle_since = None

    def sweep(self, now: float) -> None:
        """Called by the server a few times a second: enforce the header, idle and read timeouts."""
        since = self._idle_since
        if since is not None:
            cfg = self.cfg
            if self._in_head or self._fresh:
                if now - since >= cfg.header_timeout:
                    self._header_expired()
            elif now - since >= cfg.idle_timeout:
                self._idle_expired()
        exchange = self.exchange
        if exchange is not None:
            exchange.check_timeout(now)

    def _header_expired(self) -> None:
        """A request head (or a new connection's first) did not arrive within client_header_timeout (slowloris):
        408 when part of a head came, then close; a connection that sent nothing is just closed."""
        self._idle_since = None
        if self._serving:
            return
        if self._in_head:
            err = HeaderTimeout(f"request head not received within {self.cfg.header_timeout:g} s")
            log.info("client_header_timeout", client=self.peer_text, timeout_s=self.cfg.header_timeout)
            self.cfg.metrics.observe_request(NO_SERVICE, NO_ROUTE, "OTHER", err.status, 0.0)
            self.write(error_response(err.status, err.message, keep_alive=False))
        self._close()

    def _idle_expired(self) -> None:
        self._idle_since = None
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


def hash_key(req: Request, client_ip: str, hash_on: tuple[str, str]) -> str | None:
    """What `lb=hash` hashes for this request: the client address, a header's value or a cookie's value
    (None when the request lacks it: the balancer then picks at random)."""
    kind, name = hash_on
    if kind == "ip":
        return client_ip
    values = cookie_values(req.headers, name) if kind == "cookie" else header_values(req.headers, name)
    return next(values, None)


def unsent(transport: asyncio.Transport | None) -> int:
    """Bytes written to a client that it has not taken yet: the transport's buffer plus the kernel's send queue
    (Linux TIOCOUTQ), whose megabytes on a fast link would otherwise hide a slow reader's progress."""
    if transport is None:
        return 0
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return size


def reset_connection(transport: asyncio.Transport | None) -> None:
    """Close with a TCP reset (SO_LINGER 0): a plain close sends FIN, which a client reading a close-delimited
    body takes for a complete response."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class ProxyServer:
    """Listens and tracks connections so shutdown can let requests in progress finish."""

    def __init__(self, cfg: ProxyContext) -> None:
        self.cfg = cfg
        self.connections: set[ClientConnection] = set()
        self.stopping = False
        self.drained = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._refused = 0
        self._refused_logged_at = float("-inf")

    def refuse(self, conn: ClientConnection) -> None:
        """A connection over max_connections: a 503 with Retry-After and the connection closed."""
        transport = conn.transport
        if transport is not None:
            err = TooManyConnections(f"more than {self.cfg.max_connections} client connections")
            transport.write(error_response(err.status, err.message, keep_alive=False, extra=_RETRY_AFTER))
            transport.close()
        self._refused += 1
        self.cfg.metrics.observe_request(NO_SERVICE, NO_ROUTE, "OTHER", 503, 0.0)
        now = self.cfg.loop.time()
        if now - self._refused_logged_at >= _LIMITED_LOG_EVERY_S:  # one line per 10 s under a flood
            log.warning("client_connections_limited", max_connections=self.cfg.max_connections,
                        refused=self._refused)
            self._refused_logged_at = now
            self._refused = 0

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024, ssl: SSLContext | None = None,
    ) -> None:
        self._server = await self.cfg.loop.create_server(
            lambda: ClientConnection(self.cfg, self), host, port, reuse_port=reuse_port or None, backlog=backlog,
            ssl=ssl,
        )
        self._sweeper = self.cfg.loop.create_task(self._sweep(), name="proxy-timeouts")

    async def _sweep(self) -> None:
        """Timeouts are checked here a few times a second rather than with a timer per request and per idle
        connection (creating and cancelling those was a measurable share of a request's cost). A timeout fires
        between its value and its value plus one tick."""
        cfg = self.cfg
        while True:
            # Recomputed each time: a reload may shorten the timeouts.
            await asyncio.sleep(min(1.0, max(0.05, min(cfg.read_timeout, cfg.idle_timeout, cfg.header_timeout) / 4)))
            now = cfg.loop.time()
            for conn in list(self.connections):
                try:
                    conn.sweep(now)
                except Exception:  # one broken connection must not end timeouts for all the others
                    log.exception("timeout_sweep_failed", client=conn.peer.decode())

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
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()
