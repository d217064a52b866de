"""The exchange of a request on a route whose instances speak HTTP/2 (proto=grpc: h2c, proto=grpcs: TLS, ALPN h2).

`GrpcExchange` is an `Exchange` (the same routing, balancing, retries, ejection, metrics and access line) that
takes a stream on a pooled HTTP/2 connection (proxy/h2/upstream.py) where the base class takes an HTTP/1.1
connection: `dial` is the one method the base calls to reach an instance. The request goes up as HTTP/2 fields
(the same header rules and X-Forwarded-* as over HTTP/1.1, from `upstream_request_head`, plus `te: trailers`),
its body as DATA within the instance's windows; the answer comes back as head, DATA and trailers, which end the
client's stream as a HEADERS frame with END_STREAM (`Downstream.send_trailers`); a trailers-only answer (one
HEADERS frame with END_STREAM: most gRPC errors) stays one frame.

`grpc-timeout` (the call's deadline, gRPC's PROTOCOL-HTTP2.md) is passed on less the time the call already
spent here (waiting for a stream, or on an instance that refused it), and bounds the whole call here: when it
passes before the answer's head, the call is answered DEADLINE_EXCEEDED; after, the stream to the instance is
cancelled and the client's ends with grpc-status 4. A deadline is the caller's choice: it never
counts against the instance. gRPC status codes are counted per service (`ferryman_grpc_responses_total`), from
the instance's trailers or the proxy's own answers (proxy/h2/stream.py).

Only streams reach this class: HTTP/1.1 requests for such routes are refused in the dispatch (505).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from h2.exceptions import ProtocolError

from discovery.model import Endpoint

from ..errors import ProxyError, ProxyInternalError, UpstreamConnectError, UpstreamStreamRefused, UpstreamTimeout
from ..exchange import Exchange, body_taken, instance_failed
from ..h1.head import BODY_NONE
from ..headers import upstream_request_head
from ..logs import request_log
from .head import CONNECTION_SPECIFIC, response_fields
from .upstream import H2UpstreamConnection, H2UpstreamPool, UpstreamStream

if TYPE_CHECKING:
    from ..h1.head import Request
    from ..h1.upstream import PoolKey
    from ..pool import Pool
    from ..table import Route
    from .stream import Stream

Field = tuple[bytes, bytes]

# grpc-timeout: at most 8 digits and a unit (gRPC's PROTOCOL-HTTP2.md).
_UNITS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_DEADLINE_TRAILERS: Final = [(b"grpc-status", b"4"), (b"grpc-message", b"deadline exceeded")]
# Request body kept until the instance answers, to send again if it refuses the stream; a body larger than this
# is not kept (and a refused call with it is answered UNAVAILABLE): memory stays bounded per stream.
REPLAY_MAX: Final = 16 * 1024


class DeadlineExceeded(UpstreamTimeout):
    """The call's grpc-timeout passed (answered DEADLINE_EXCEEDED, as a 504 maps)."""

    reason = "grpc_deadline_exceeded"
    public = "deadline exceeded"


def grpc_timeout(headers: Iterable[Field]) -> float | None:
    """The call's deadline in seconds from now, from its grpc-timeout field; None without one (or a bad one)."""
    for name, value in headers:
        if name == b"grpc-timeout":
            unit, digits = _UNITS.get(value[-1:]), value[:-1]
            if unit is not None and digits.isdigit() and len(digits) <= 8:
                return int(digits) * unit
            return None
    return None


def timeout_value(seconds: float) -> bytes:
    """A grpc-timeout value for `seconds`, in the finest unit that fits its 8 digits, rounded up (as gRPC's own
    clients do: a deadline a nanosecond late is answered by our own timer anyway)."""
    for unit, scale in ((b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60)):
        count = max(1, math.ceil(seconds * scale))
        if count <= 99_999_999:
            return b"%d%s" % (count, unit)
    return b"%dH" % min(99_999_999, math.ceil(seconds / 3600))


def with_timeout(fields: list[Field], seconds: float) -> list[Field]:
    """The fields with grpc-timeout set to what is left of the call's deadline."""
    value = timeout_value(seconds)
    return [(name, value) if name == b"grpc-timeout" else (name, old) for name, old in fields]


def request_fields(head: bytes, scheme: bytes) -> list[Field]:
    """An HTTP/1.1 request head as built for an upstream (headers.upstream_request_head: header rules, X-Forwarded-*,
    Forwarded, Host) as HTTP/2 fields: pseudo-headers first (RFC 9113 §8.3.1), names in lower case, no
    connection-specific field, and `te: trailers`, which gRPC servers require."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    path = rest.rpartition(b" ")[0]
    authority = b""
    fields: list[Field] = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            lower = name.lower()
            if lower == b"host":
                authority = value.strip()
            elif lower not in CONNECTION_SPECIFIC:
                fields.append((lower, value.strip()))
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", path), *fields,
            (b"te", b"trailers")]


def grpc_status(fields: Iterable[Field]) -> bytes | None:
    for name, value in fields:
        if name == b"grpc-status":
            return value
    return None


class GrpcExchange(Exchange):
    """One request on an HTTP/2 stream to an instance: the base exchange with a stream for a connection."""

    __slots__ = ("deadline", "replay", "replay_size", "stream", "timer")

    def __init__(
        self, client: Stream, req: Request, route: Route, pool: Pool, target: bytes, started: float, path: str,
        service: str,
    ) -> None:
        super().__init__(client, req, route, pool, target, started, path, service)
        self.stream: UpstreamStream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # the loop's time when the call's grpc-timeout passes
        self.replay: list[bytes] | None = []  # the body sent on this attempt, while at most REPLAY_MAX
        self.replay_size = 0
        timeout = grpc_timeout(req.headers)
        if timeout is not None:
            self.timer = self.loop.call_later(timeout, self._deadline_passed)
            self.deadline = self.loop.time() + timeout

    # --- reaching an instance ---
    def dial(self, endpoint: Endpoint, now: float) -> None:
        route = self.route
        key: PoolKey = (route.scheme, endpoint.address, endpoint.port, route.tls_skip_verify, route.sni)
        upstream = self.ctx.upstream.h2
        assert upstream is not None  # the app sets it up with the HTTP/1.1 pool
        conn = upstream.take(key, now)
        if conn is not None:
            self._open(endpoint, conn)
        else:
            self.loop.create_task(self._acquire(endpoint, key, upstream))

    async def _acquire(self, endpoint: Endpoint, key: PoolKey, upstream: H2UpstreamPool) -> None:
        """A new connection, or room on a full one; a failure is the attempt's, and nothing was sent."""
        try:
            conn = await upstream.acquire(key, self.pool.connect_timeout,
                                          self.pool.read_timeout or self.ctx.limits.read_timeout)
        except ProxyError as err:
            self._attempt_failed(endpoint, err, connected=False)
            return
        except Exception:  # a bug, not an upstream failure: answer 500 rather than leave the client hanging
            request_log(self.req, "exception", "internal_error", service=self.service, path=self.path)
            self._answer(ProxyInternalError("internal proxy error"))
            return
        if self.over:
            return  # answered meanwhile (its deadline passed)
        if self.client.closing:
            self._finish(499)
            return
        self._open(endpoint, conn)

    def _open(self, endpoint: Endpoint, conn: H2UpstreamConnection) -> None:
        client, req, route, ctx = self.client, self.req, self.route, self.ctx
        self.endpoint = endpoint
        self.reused = False  # a stream is new whatever its connection: a reset of it is the instance's doing
        self.pool.acquire(endpoint)
        head = upstream_request_head(
            req.method.encode(), self.target, req.headers, client_ip=client.peer, proto=ctx.proto,
            port=ctx.listen_port, default_host=endpoint.authority.encode(), chunked=False,
            request_id=req.request_id, trusted=ctx.limits.trusted if client.trusted else None,
            rules=route.request_rules, prefix=route.strip_bytes,
            upstream_host=endpoint.authority.encode() if route.host_dst else route.upstream_host_bytes,
        )
        fields = request_fields(head, b"https" if route.scheme == "grpcs" else b"http")
        if self.deadline is not None:
            # The instance gets what is left of the deadline, not the whole of it again (gRPC's proxies do so).
            fields = with_timeout(fields, self.deadline - self.loop.time())
        try:
            stream = conn.open(fields, self, end_stream=req.body_kind == BODY_NONE)
        except ProtocolError as exc:  # the connection closed between taking it and opening the stream
            self.pool.release(endpoint)
            self._attempt_failed(endpoint, UpstreamConnectError(f"cannot open a stream: {exc}"), connected=False)
            return
        self.stream = stream
        self.conn = stream  # the base class calls detach, pause_reading and resume_reading on it (UpstreamLink)
        if client.writing_paused:
            stream.pause_reading()
            self.client_backlog = client.backlog()
        self.armed, self.last_activity = not self.over, self.loop.time()
        self.sent_at = time.perf_counter()
        if req.body_kind != BODY_NONE:
            client.take_body(req, self)

    # --- the request body ---
    def send_body(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        if body_taken(self, data):
            replay = self.replay
            if replay is not None:
                self.replay_size += len(data)
                if self.replay_size > REPLAY_MAX:
                    self.replay = None
                else:
                    replay.append(data)
            stream.write(data)

    def end_body(self) -> None:
        if self.stream is not None:
            self.stream.end()
            self._arm_timer()

    def on_error(self, error: ProxyError, *, nothing_received: bool) -> None:
        """A refused stream was never processed (RFC 9113 §8.7): its body goes back in front of what the client
        sent since, for the next attempt to send again (retry.py then tries another instance)."""
        replay = self.replay
        if isinstance(error, UpstreamStreamRefused) and replay is not None and not self.head_sent:
            req = self.req
            req.buffer[:0] = replay
            req.buffered += self.replay_size
            req.body_sent = 0
            self.replay, self.replay_size = [], 0
        super().on_error(error, nothing_received=nothing_received)

    # --- the answer's end ---
    def on_trailers(self, fields: list[Field]) -> None:
        fields = [pair for pair in fields if pair[0] not in CONNECTION_SPECIFIC]
        self._count(fields)
        self.armed = False
        self.client.send_trailers(fields)
        self._finish(self.status)

    def on_trailers_only(self, status: int, fields: list[Field]) -> None:
        """An answer that is one HEADERS frame (gRPC's errors): passed on as one."""
        self.upstream_s = time.perf_counter() - self.sent_at
        self.status = status
        self.head_sent = True
        endpoint = self.endpoint
        if endpoint is not None:
            if status >= 500:
                instance_failed(self, endpoint, status)
            else:
                self.pool.succeeded(endpoint)
        out = response_fields(status, fields, (), self.req.request_id, self.route.response_rules)
        self._count(out)
        self.armed = False
        self.client.send_trailers(out)
        self._finish(status)

    def on_complete(self, reusable: bool) -> None:
        """The answer ended without trailers (not a gRPC answer): the client's stream ends with its last DATA."""
        self.armed = False
        self.out.end()
        self._finish(self.status)

    def _count(self, fields: list[Field]) -> None:
        code = grpc_status(fields)
        if code is not None:
            self.ctx.metrics.observe_grpc(self.service, code)

    def _deadline_passed(self) -> None:
        self.timer = None
        if self.over:
            return
        request_log(self.req, "info", "grpc_deadline_exceeded", service=self.service,
                    upstream=self.endpoint.authority if self.endpoint else "", answered=self.head_sent)
        if not self.head_sent:
            self.abandon(DeadlineExceeded("the call's grpc-timeout passed before the instance answered"))
            return
        self.armed = False
        if self.conn is not None:
            self.conn.detach()  # RST_STREAM CANCEL: the instance stops working on it
        self._count(_DEADLINE_TRAILERS)
        self.client.send_trailers(list(_DEADLINE_TRAILERS))
        self._finish(self.status)

    def _finish(self, status: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.stream = None
        super()._finish(status)
