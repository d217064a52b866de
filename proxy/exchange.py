"""One request's life upstream: pick an instance, send, relay the answer, retry, time out, hand over a tunnel.

Driven by callbacks only, so a request on a pooled keep-alive connection costs no task and no future:
`attempt()` picks an instance and sends the head at once when an idle connection is at hand (a task is
started only to open a new connection); the upstream connection then calls `on_head`, `on_body`,
`on_complete` or `on_error`, which pass the answer on to the client side as bytes arrive. Before the response
head, a failure may lead to another attempt (`retry.Attempts` decides); after it, the client is cut off.

The exchange never touches a client socket: it talks to a `Downstream` (send the head, send body bytes, end,
abort, pause and resume the request body), which the HTTP/1.1 client connection implements, so another
client protocol reuses the exchange unchanged. Outcomes go to the `Pool` through its outcome interface.
When the answer is to be compressed (decided once, at its head: proxy/compression.py), an `Encoder` stands
between the exchange and the client for the body (`out`); otherwise `out` is the client itself.
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import TYPE_CHECKING, Protocol, cast

from mypy_extensions import mypyc_attr

from discovery.model import Endpoint

from .compression import BodyOut, Encoder, choose, encoded_head, with_vary
from .dispatch import hash_key
from .errors import NoHealthyEndpoint, PayloadTooLarge, ProxyError, ProxyInternalError
from .h1.head import BODY_CHUNKED, BODY_NONE, Request
from .h1.upstream import FRAMING_CHUNKED, FRAMING_NONE, PoolKey, UpstreamConnection
from .headers import upstream_request_head
from .logs import request_log
from .pool import Pool, sticky_cookie
from .retry import Attempts, Verdict, counts_against_instance
from .table import Route
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .listener import ProxyContext

_LAST_CHUNK = b"0\r\n\r\n"


class UpstreamLink(Protocol):
    """What every exchange does with what its request went out on: an HTTP/1.1 connection here, an HTTP/2
    stream in a gRPC exchange (proxy/h2/grpc.py). A Protocol, not the connection's class: the compiled build
    checks an attribute's class on every assignment, and a stream is no UpstreamConnection."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def detach(self) -> None: ...


class Downstream(Protocol):
    """The client side of an exchange, as the exchange needs it."""

    ctx: ProxyContext
    peer: bytes
    peer_text: str
    trusted: bool  # the peer is one of trusted_proxies: its forwarding headers are kept
    closing: bool  # the client is gone or going: nothing more is sent
    writing_paused: bool  # the client reads slower than it is sent to
    body_paused: bool  # reading the request body is paused because the upstream does not take it

    def backlog(self) -> int:
        """Bytes sent to the client that it has not taken yet."""

    def send_head(
        self, req: Request, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int,
        extra: tuple[tuple[bytes, bytes], ...], route: Route,
    ) -> None: ...
    def send_body(self, data: bytes) -> None: ...
    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The answer's last fields, which end it (HTTP/2: a HEADERS frame with END_STREAM); before any head was
        sent, `fields` hold `:status` too: a trailers-only answer (gRPC's errors)."""

    def write(self, data: bytes) -> None:
        """Raw bytes to the client (a tunnel's)."""

    def flush(self) -> None: ...
    def close(self) -> None:
        """Close after what is buffered (a tunnel's end)."""

    def end(self) -> None: ...
    def abort(self) -> None: ...
    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def take_body(self, req: Request, exchange: Exchange) -> None: ...
    def open_tunnel(self, req: Request, tunnel: Tunnel, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def answer_error(
        self, req: Request, err: ProxyError, service: str, started: float, path: str, route_id: str,
    ) -> None: ...
    def done(self, exchange: Exchange, status: int) -> None: ...


class _NotMember:
    """Excluded from a pick: tried already, or not one of the instances that declare the route."""

    __slots__ = ("members", "tried")

    def __init__(self, tried: Container[str], members: Container[str]) -> None:
        self.tried, self.members = tried, members

    def __contains__(self, key: object) -> bool:
        return key in self.tried or key not in self.members


# Compiled (proxy/compiled.py), a class takes interpreted subclasses only when it says so:
# proxy/h2/grpc.py subclasses it (gRPC streams).
@mypyc_attr(allow_interpreted_subclasses=True)
class Exchange:
    """One request, from routing to its last byte, across the instances it is tried on."""

    __slots__ = (
        "armed", "attempts", "bytes_out", "client", "client_backlog", "conn", "ctx", "endpoint", "fresh",
        "head_request", "head_sent", "last_activity", "loop", "out", "over", "path", "pin", "pool", "req", "reused",
        "route", "sent_at", "service", "started", "status", "target", "tried", "tunnel", "upstream_s",
    )

    def __init__(
        self, client: Downstream, req: Request, route: Route, pool: Pool, target: bytes, started: float,
        path: str, service: str,
    ) -> None:
        ctx = self.ctx = client.ctx
        self.client, self.loop, self.req, self.route, self.pool = client, ctx.loop, req, route, pool
        self.out: BodyOut = client  # where the response body goes: the client, or an Encoder in front of it
        self.service = service  # the route's, or the one a split drew
        self.target, self.started, self.path = target, started, path
        self.tried: set[str] = set()  # instances this request was sent to
        self.attempts: Attempts | None = None  # the retry rules, made at the first failure (most requests have none)
        pool.begin(self.loop.time())
        self.head_request = req.method == "HEAD"
        self.endpoint: Endpoint | None = None
        self.conn: UpstreamLink | None = None
        self.reused = self.head_sent = False
        self.status = self.bytes_out = 0
        self.client_backlog = 0  # the client's backlog when it last paused us, or shrank
        self.sent_at = 0.0
        self.upstream_s: float | None = None  # request sent to response head received, on the last attempt
        self.tunnel: Tunnel | None = None  # the upstream accepted an upgrade (101): raw bytes both ways
        self.last_activity = 0.0
        self.armed = False  # the read timeout runs (checked by the listener's sweeper, not a timer per request)
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
        now = self.loop.time()
        if pool.ejected:
            for instance in pool.readmit(now):
                request_log(self.req, "info", "upstream_readmitted", service=self.service, instance=instance)
        tried = self.tried
        members = self.route.members  # only the instances that declare the route (None: all)
        exclude: Container[str] = tried if members is None else _NotMember(tried, members)
        endpoint = pool.pinned(self.pin, exclude) if self.pin is not None else None
        if endpoint is None:
            hashed = hash_key(self.req, client.peer_text, pool.hash_on) if pool.hash_on else None
            endpoint = pool.pick(exclude, hashed, now)
        if endpoint is None:
            self._answer(NoHealthyEndpoint(f"no healthy instance of service {self.service!r}"))
            return
        tried.add(endpoint.key)
        self.dial(endpoint, now)

    def dial(self, endpoint: Endpoint, now: float) -> None:
        """Send to the instance: on an idle keep-alive connection at once, else once a new one is open (an
        HTTP/2 upstream's exchange, proxy/h2/grpc.py, takes a stream instead)."""
        route = self.route
        key: PoolKey = (route.scheme, endpoint.address, endpoint.port, route.tls_skip_verify, route.sni)
        conn = None if self.fresh else self.ctx.upstream.take_idle(key, now)
        self.fresh = False
        if conn is not None:
            self._send(endpoint, conn, reused=True)
        else:
            self.loop.create_task(connect_and_send(self, endpoint, key))

    def _send(self, endpoint: Endpoint, conn: UpstreamConnection, *, reused: bool) -> None:
        client = self.client
        ctx = self.ctx
        req = self.req
        self.endpoint = endpoint
        self.conn = conn
        self.reused = reused
        self.pool.acquire(endpoint)
        if client.writing_paused:
            conn.pause_reading()  # the client is still behind on an earlier answer on this connection
            self.client_backlog = client.backlog()  # its progress, from here, keeps this request alive
        self.armed, self.last_activity = not self.over, self.loop.time()  # the inactivity clock (_arm_timer)
        self.sent_at = time.perf_counter()
        route = self.route
        conn.send(upstream_request_head(
            req.method.encode(), self.target, req.headers, client_ip=client.peer, proto=ctx.proto,
            port=ctx.listen_port, default_host=endpoint.authority.encode(), chunked=req.body_kind == BODY_CHUNKED,
            request_id=req.request_id, upgrade=req.upgrade, trusted=ctx.limits.trusted if client.trusted else None,
            rules=route.request_rules, prefix=route.strip_bytes,
            upstream_host=endpoint.authority.encode() if route.host_dst else route.upstream_host_bytes,
        ), self, head_request=self.head_request, upgrade=bool(req.upgrade))
        if req.body_kind != BODY_NONE:
            client.take_body(req, self)

    def _arm_timer(self) -> None:
        """(Re)start the inactivity clock (the upstream's silence counts once it has the whole request)."""
        self.armed, self.last_activity = not self.over, self.loop.time()

    def _attempt_failed(self, endpoint: Endpoint, err: ProxyError, *, connected: bool) -> None:
        """Before any response byte reached the client: count the failure, then retry or answer."""
        if self.over:
            return
        err.upstream = endpoint.authority
        if counts_against_instance(err, connected=connected, reused=self.reused):
            instance_failed(self, endpoint)
        if connected:
            self.armed = False
            self.pool.release(endpoint)
            self.req.sink = None  # body chunks arriving meanwhile wait in the buffer for the next attempt
            self.conn = None
        attempts = self.attempts
        if attempts is None:
            # The instances it may go to: those in the pool now, and those tried (one that failed as it left the
            # pool, in a deploy, still counts: else the last one left would never be tried).
            instances = len({e.key for e in self.pool.endpoints} | self.tried)
            attempts = self.attempts = Attempts(self.ctx.limits.max_attempts, instances,
                                                self.req.method, self.tried)
        verdict = attempts.after_failure(
            err, connected=connected, reused=self.reused, body_sent=self.req.body_sent,
            client_gone=self.client.closing, budget=lambda: self.pool.retry_allowed(self.loop.time()),
        )
        if verdict is Verdict.ANSWER:
            self._answer(err)
            return
        if verdict is Verdict.SAME_INSTANCE:
            self.tried.discard(endpoint.key)
            self.fresh = True  # other pooled connections to it may be just as stale
        request_log(self.req, "info", "upstream_retry", service=self.service, upstream=endpoint.authority,
                    reason=err.reason, error=err.message, attempt=len(self.tried))
        self.ctx.metrics.retries.labels(self.service).inc()
        self.attempt()

    def _answer(self, err: ProxyError) -> None:
        if not self.over:
            self.over = True
            self.pool.end()
            self.client.answer_error(self.req, err, self.service, self.started, self.path, self.route.id)

    # --- request body, client -> upstream ---
    def send_body(self, data: bytes) -> None:
        if self.conn is None:
            return
        conn = cast("UpstreamConnection", self.conn)  # an HTTP/1.1 exchange's (gRPC's has its own send_body)
        if not body_taken(self, data):
            return
        if self.req.body_kind == BODY_CHUNKED:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)

    def end_body(self) -> None:
        if self.conn is None:
            return
        if self.req.body_kind == BODY_CHUNKED:
            cast("UpstreamConnection", self.conn).write(_LAST_CHUNK)
        self._arm_timer()

    def upstream_pause_writing(self) -> None:
        self.client.pause_body()

    def upstream_resume_writing(self) -> None:
        self.client.resume_body()

    # --- response, upstream -> client (the upstream connection's ResponseSink) ---
    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.upstream_s = time.perf_counter() - self.sent_at
        self.status = status
        self.head_sent = True
        endpoint = self.endpoint
        if endpoint is not None:
            if status >= 500:
                instance_failed(self, endpoint, status)
            else:
                self.pool.succeeded(endpoint)
        # (_arm_timer inlined) an upstream may answer before it read the whole body: its silence counts from now
        self.armed, self.last_activity = not self.over, self.loop.time()
        # Compression is decided here, once per answer; off (no setting, no gzip= on the route) it costs these
        # two attribute tests and nothing per chunk.
        if self.ctx.limits.gzip is not None or self.route.gzip:
            headers, framing = compressed_head(self, status, headers, framing)
        self.client.send_head(
            self.req, status, reason, headers, framing,
            sticky_cookie(self.pool.sticky, self.endpoint, self.pin, self.route.path) if self.pool.sticky else (),
            self.route,
        )

    def on_body(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_out += len(data)
        self.out.send_body(data)

    def flush(self) -> None:
        self.out.flush()

    def on_complete(self, reusable: bool) -> None:
        self.armed = False
        self.out.end()
        if self.conn is not None:
            self.ctx.upstream.release(cast("UpstreamConnection", self.conn), reusable and self.req.body_done)
        self._finish(self.status)

    def on_error(self, error: ProxyError, *, nothing_received: bool) -> None:
        error.nothing_received = nothing_received
        if not self.over:
            self._broken(error)

    def on_upgrade(self, reason: bytes, headers: list[tuple[bytes, bytes]], rest: bytes) -> Tunnel | None:
        """The upstream switched protocols: a tunnel takes over the two connections (see proxy/tunnel.py)."""
        if self.over or self.conn is None or self.endpoint is None:
            return None
        self.upstream_s = time.perf_counter() - self.sent_at
        self.status = 101
        self.head_sent = True
        self.armed = False
        return Tunnel.open(self, cast("UpstreamConnection", self.conn), self.endpoint, reason, headers, rest)

    def tunnel_ended(self, sent: int) -> None:
        """The tunnel closed: the request is over (its access line says 101)."""
        self.pool.tunnel_closed()
        self.bytes_out += sent
        self._finish(101)

    # --- the client went away, or a side went silent ---
    def client_gone(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            return
        self.armed = False
        if self.conn is not None:
            self.conn.detach()
        self._finish(499)  # nginx's code for a client that went away before the answer

    def abandon(self, err: ProxyError) -> None:
        """The request cannot go on (its body broke off or grew past the limit while relayed, or a bug): answered
        with `err` if nothing went out yet, else cut off."""
        if self.over:
            return
        self.armed = False
        if self.conn is not None:
            self.conn.detach()
        self.req.keep_alive = False
        if self.head_sent:
            self.client.abort()
            self._finish(self.status)
        else:
            if self.endpoint is not None and self.conn is not None:
                self.pool.release(self.endpoint)
            self.conn = None
            self._answer(err)

    def timed_out(self, error: ProxyError | None) -> None:
        """The read timeout ran out (see proxy/timeouts.py): the upstream connection goes, then as `_broken`;
        without an error, the client stopped reading: the connection is cut."""
        self.armed = False
        if self.conn is not None:
            self.conn.detach()
        if error is not None:
            self._broken(error)
            return
        self.req.keep_alive = False
        self.client.abort()
        self._finish(self.status or 499)

    def _broken(self, error: ProxyError) -> None:
        self.client.flush()
        endpoint = self.endpoint
        if not self.head_sent and endpoint is not None:
            self._attempt_failed(endpoint, error, connected=True)
            return
        self.armed = False
        # The head is out: the only honest signal left is to cut the connection.
        request_log(self.req, "warning", "upstream_body_aborted", service=self.service, upstream=error.upstream or
                    (endpoint.authority if endpoint else ""), reason=error.reason, error=error.message,
                    bytes=self.bytes_out)
        self.req.keep_alive = False
        self.client.abort()
        self._finish(self.status)

    def _finish(self, status: int) -> None:
        if self.over:
            return
        self.over = True
        self.armed = False
        self.pool.end(self.endpoint if self.conn is not None else None)  # and the instance it held, released
        self.conn = None
        if status == 499:
            self.req.keep_alive = False
        self.client.done(self, status)


async def connect_and_send(ex: Exchange, endpoint: Endpoint, key: PoolKey) -> None:
    """Open a new connection to the instance (no idle one was at hand), then send; a failure is the attempt's."""
    try:
        conn = await ex.ctx.upstream.connect(key, ex.pool.connect_timeout)
    except ProxyError as err:
        ex._attempt_failed(endpoint, err, connected=False)
        return
    except Exception:  # a bug, not an upstream failure: answer 500 rather than leave the client hanging
        request_log(ex.req, "exception", "internal_error", service=ex.service, path=ex.path)
        ex._answer(ProxyInternalError("internal proxy error"))
        return
    if ex.over or ex.client.closing:
        ex.ctx.upstream.release(conn, True)
        ex._finish(499)
        return
    ex._send(endpoint, conn, reused=False)


def compressed_head(
    ex: Exchange, status: int, headers: list[tuple[bytes, bytes]], framing: int,
) -> tuple[list[tuple[bytes, bytes]], int]:
    """The answer's head and framing as the client gets them, with an Encoder in front of the client when
    the body is compressed (proxy/compression.py decides)."""
    route_gzip = ex.route.gzip
    if route_gzip is False or framing == FRAMING_NONE:
        return headers, framing
    limits = ex.ctx.limits
    policy = limits.gzip_route if route_gzip else limits.gzip
    assert policy is not None
    decision = choose(ex.req.method, ex.req.headers, status, headers, policy)
    if decision.encoding is None:
        return (with_vary(headers) if decision.vary else headers), framing
    ex.out = Encoder(ex.client, decision.encoding, policy.level, ex, ex.ctx.metrics)
    # The encoded length is known only at its end: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
    return encoded_head(headers, decision.encoding), FRAMING_CHUNKED


def instance_failed(ex: Exchange, endpoint: Endpoint, status: int = 0) -> None:
    """An attempt failed at `endpoint` (no answer, or a 5xx `status`): counted by its pool, which may eject it."""
    now = ex.loop.time()
    ejected_for = ex.pool.answered(endpoint, status, now) if status else ex.pool.failed(endpoint, now)
    if ejected_for is not None:
        request_log(ex.req, "warning", "upstream_ejected", service=ex.service, upstream=endpoint.authority,
                    instance=endpoint.key, for_s=ejected_for)
        ex.ctx.metrics.ejections.labels(ex.service).inc()


def body_taken(ex: Exchange, data: bytes) -> bool:
    """Request body bytes on their way upstream: counted, or (past the route's limit) the request abandoned."""
    req = ex.req
    if req.max_body and req.body_sent + len(data) > req.max_body:
        # A chunked body (a declared length was checked before forwarding) grew past the limit: the upstream
        # never gets the bytes beyond it, and the request ends here.
        ex.abandon(PayloadTooLarge(f"request body larger than {req.max_body} bytes"))
        return False
    req.body_sent += len(data)
    ex.last_activity = ex.loop.time()
    return True


def client_behind(ex: Exchange, backlog: int) -> None:
    """The client stopped taking the answer: from now on the clock runs on its reading, and the upstream is not
    read until it catches up (answers it never reads must not pile up in memory)."""
    ex.last_activity = ex.loop.time()
    ex.client_backlog = backlog
    if ex.conn is not None:
        ex.conn.pause_reading()


def client_caught_up(ex: Exchange) -> None:
    """The client read (progress): the upstream is read again."""
    ex.last_activity = ex.loop.time()
    if ex.conn is not None:
        ex.conn.resume_reading()
