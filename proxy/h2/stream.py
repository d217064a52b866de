"""One HTTP/2 stream as the client side of an exchange (a `Downstream`), relaying within both flow-control windows.

The answer's head and bytes wait in the stream until the exchange flushes (once per upstream read) or ends it, then
go as HEADERS and DATA frames, END_STREAM on the last of them (a frame and a pass through the library's state
machine fewer than a separate end). Bytes wait longer when the client's windows (the stream's and the connection's)
hold them back; when more than `_HIGH` bytes wait, the upstream connection stops being read until the queue is below
`LOW_WATER` again (the connection calls `pump` on each WINDOW_UPDATE). Request body bytes go to the upstream as they
arrive, and are acknowledged to the client (its window reopened) only once the upstream takes them: while the
upstream's socket is full (`pause_body`) or no upstream has the request yet, nothing is acknowledged, so the client
can never have more in flight than the window it was given. Neither a slow client nor a slow upstream grows memory
past a window per stream.

Errors the proxy answers itself go out as a short text body (as over HTTP/1.1), or as a trailers-only gRPC
answer to a gRPC call; a cut after the head went out is a RST_STREAM of this stream only, never the connection.
An HTTP/2 upstream's trailers (proto=grpc routes: proxy/h2/grpc.py) end the stream as a HEADERS frame with
END_STREAM after the DATA still waiting (`send_trailers`).
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Final

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from ..accounting import record
from ..dispatch import Client, plan
from ..errors import ProxyError, ProxyInternalError
from ..exchange import Exchange, client_behind, client_caught_up
from ..h1.head import SANE_REQUEST_ID, new_request_id
from ..headers import error_body_size
from ..logs import request_log
from ..metrics import NO_ROUTE, NO_SERVICE
from .grpc import GrpcExchange
from .head import grpc_error_fields, is_grpc, response_fields
from .limits import window_chunk

if TYPE_CHECKING:
    from ..h1.head import Request
    from ..listener import ProxyContext
    from ..table import Route
    from ..tunnel import Tunnel
    from .connection import H2ClientConnection

# Bytes of answer waiting on the client's windows before the upstream stops being read, and below which it is
# read again.
_HIGH: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024


class Stream:
    """The client side of one request on an HTTP/2 connection."""

    __slots__ = (
        "body_paused",
        "closing",
        "conn",
        "ctx",
        "ending",
        "exchange",
        "head",
        "id",
        "peer",
        "peer_text",
        "pending",
        "pending_size",
        "req",
        "sent_all",
        "trailers",
        "trusted",
        "unacked",
        "writing_paused",
    )

    def __init__(self, conn: H2ClientConnection, stream_id: int, req: Request) -> None:
        self.conn, self.id, self.req = conn, stream_id, req
        self.ctx: ProxyContext = conn.ctx
        self.peer, self.peer_text, self.trusted = conn.peer, conn.peer_text, conn.trusted
        self.closing = False  # reset by either side, or the connection is gone: nothing more is sent
        self.writing_paused = False  # more than _HIGH bytes wait on the client's windows
        self.body_paused = False  # the upstream does not take the request body: received data is not acknowledged
        self.exchange: Exchange | None = None
        self.head: list[tuple[bytes, bytes]] | None = None  # the answer's head, until the next flush or end
        self.pending: collections.deque[bytes] = collections.deque()  # answer bytes the windows hold back
        self.pending_size = 0
        self.ending = False  # END_STREAM goes after what is pending
        self.trailers: list[tuple[bytes, bytes]] | None = None  # the HEADERS frame that carries END_STREAM, if any
        self.sent_all = False  # END_STREAM sent (or the stream was reset): the answer is over on the wire
        self.unacked = 0  # request body bytes received and not yet acknowledged (flow-controlled length)

    # --- Downstream: sending ---
    def backlog(self) -> int:
        return self.pending_size + self.conn.transport_backlog()

    def send_head(
        self, req: Request, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int,
        extra: tuple[tuple[bytes, bytes], ...], route: Route,
    ) -> None:
        if not self.closing:
            self.head = response_fields(status, headers, extra, req.request_id, route.response_rules)

    def send_body(self, data: bytes) -> None:
        if self.closing or not data:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > _HIGH and not self.writing_paused:
            self.pump()
            if self.pending_size > _HIGH:
                self.pause_upstream()

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The answer ends with these fields (an HTTP/2 upstream's trailers, or a whole trailers-only answer),
        sent after what the windows still hold back."""
        if not self.closing:
            self.trailers = fields
            self.end()

    def flush(self) -> None:
        if self.head is not None or self.pending:
            self.pump()
        self.conn.flush()

    def write(self, data: bytes) -> None:
        """Tunnels are HTTP/1.1 only (no extended CONNECT is offered): an exchange on a stream never opens one."""

    def close(self) -> None:
        self.abort()

    def end(self) -> None:
        self.ending = True
        self.pump()
        self.conn.flush()

    def abort(self) -> None:
        """Cut this stream (RST_STREAM INTERNAL_ERROR): the client sees the answer broken off, never complete."""
        self.head = None
        self.pending.clear()
        self.pending_size = 0
        if not self.closing:
            self.closing = True
            self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)

    # --- Downstream: the request body ---
    def pause_body(self) -> None:
        self.body_paused = True

    def resume_body(self) -> None:
        self.body_paused = False
        self._acknowledge()
        self.conn.flush()  # called by the upstream connection, outside any client read that would flush

    def take_body(self, req: Request, exchange: Exchange) -> None:
        for chunk in req.buffer:
            exchange.send_body(chunk)
        req.buffer.clear()
        req.buffered = 0
        req.sink = exchange
        if req.body_done:
            exchange.end_body()
        if not self.body_paused:
            self._acknowledge()
            self.conn.flush()  # a new upstream connection takes the body from a task of its own

    def received(self, data: bytes, flow_length: int) -> None:
        """DATA from the client: on to the upstream when it has the request, else kept until it does."""
        req = self.req
        self.unacked += flow_length
        sink = req.sink
        if sink is not None:
            sink.send_body(data)
            if not self.body_paused:
                self._acknowledge()
        else:
            req.buffer.append(data)
            req.buffered += len(data)

    def body_ended(self) -> None:
        req = self.req
        if not req.body_done:
            req.body_done = True
            if req.sink is not None:
                req.sink.end_body()

    def _acknowledge(self) -> None:
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(self, unacked)

    def open_tunnel(self, req: Request, tunnel: Tunnel, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        tunnel.close()  # never reached: req.upgrade is empty on HTTP/2 (see write)

    # --- flow control of the answer ---
    def pause_upstream(self) -> None:
        self.writing_paused = True
        if self.exchange is not None:
            client_behind(self.exchange, self.backlog())

    def resume_upstream(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            client_caught_up(self.exchange)

    def pump(self) -> None:
        """Send the head, then what the stream's and the connection's windows allow; END_STREAM on the last frame
        once the exchange ended the answer and nothing waits."""
        conn = self.conn
        h2 = conn.h2
        sid = self.id
        pending = self.pending
        try:
            head = self.head
            if head is not None:
                self.head = None
                if self.ending and not pending and self.trailers is None:
                    h2.send_headers(sid, head, end_stream=True)
                    self._ended()
                    return
                h2.send_headers(sid, head)
            while pending:
                chunk = window_chunk(h2, sid, pending)
                if chunk is None:
                    return
                self.pending_size -= len(chunk)
                if self.ending and not pending and self.trailers is None:
                    h2.send_data(sid, chunk, end_stream=True)
                    self._ended()
                    return
                h2.send_data(sid, chunk)
            if self.ending and not self.sent_all:
                if self.trailers is not None:
                    h2.send_headers(sid, self.trailers, end_stream=True)
                else:
                    h2.end_stream(sid)
                self._ended()
                return
        except (StreamClosedError, ProtocolError):
            conn.lost(sid)
            return
        if self.writing_paused and self.pending_size < LOW_WATER and not conn.paused:
            self.resume_upstream()

    def _ended(self) -> None:
        """END_STREAM went out."""
        self.sent_all = True
        if not self.req.body_done:
            # RFC 9113 §8.1: the answer is complete before the request; the rest of it is not wanted.
            self.conn.h2.reset_stream(self.id, ErrorCodes.NO_ERROR)
        self.conn.forget(self)

    def start(self, client: Client) -> None:
        """Plan the request and start forwarding it; a decision that is an error is answered here."""
        req = self.req
        started = time.perf_counter()
        if not req.request_id or SANE_REQUEST_ID(req.request_id) is None:
            req.request_id = new_request_id()
        exchange = None
        try:
            ctx = self.ctx
            decision = plan(req, ctx.router.current, ctx.pools, ctx.limits, ctx.rng, ctx.port, client)
            if decision.error is not None:
                self.answer_error(req, decision.error, decision.service, started, decision.path,
                                    decision.route_id)
                return
            assert decision.route is not None and decision.pool is not None
            # A route whose instances speak HTTP/2 (proto=grpc, grpcs) takes a stream to one of them.
            kind = GrpcExchange if decision.route.grpc else Exchange
            exchange = self.exchange = kind(
                self, req, decision.route, decision.pool, decision.target, started, decision.path,
                decision.service,
            )
            exchange.attempt()
        except Exception:  # a bug: the proxy's fault, answered 500, never blamed on the client
            request_log(req, "exception", "internal_error", method=req.method)
            err = ProxyInternalError("internal proxy error")
            if exchange is None:
                self.answer_error(req, err, NO_SERVICE, started, "", NO_ROUTE)
            else:
                exchange.abandon(err)

    # --- the end of the exchange ---
    def answer_error(
        self, req: Request, err: ProxyError, service: str, started: float, path: str, route_id: str,
    ) -> None:
        if err.status >= 400:
            request_log(req, "warning", "proxy_error", status=err.status, reason=err.reason, error=err.message,
                        service=service, upstream=err.upstream, method=req.method, path=path)
        sent = self.send_error(req, err, service)
        record(self.ctx, req, service, route_id, err.status, started, err.upstream, sent, path, None, self.peer_text)
        self.finished()

    def send_error(self, req: Request, err: ProxyError, service: str) -> int:
        """The proxy's own answer on this stream; the body bytes sent, for the access line."""
        if self.closing:
            return 0
        if is_grpc(req):
            fields = grpc_error_fields(err.status, err.public_message, req.request_id)
            self.ctx.metrics.observe_grpc(service, fields[2][1])  # grpc-status
            self.conn.send_headers(self.id, fields, end_stream=True)
            return 0
        body = f"{err.status} {err.public_message}\n".encode()
        fields = [
            (b":status", b"%d" % err.status), (b"content-type", b"text/plain; charset=utf-8"),
            (b"cache-control", b"no-store"), (b"content-length", b"%d" % len(body)),
            *((b"x-request-id", req.request_id) for _ in (1,) if req.request_id),
            *((name.lower(), value) for name, value in err.headers),
        ]
        if req.method == "HEAD":
            self.conn.send_headers(self.id, fields, end_stream=True)
            return 0
        self.conn.send_headers(self.id, fields)
        self.send_body(body)
        self.end()
        return error_body_size(err.status, err.public_message)

    def done(self, exchange: Exchange, status: int) -> None:
        record(self.ctx, exchange.req, exchange.service, exchange.route.id, status, exchange.started,
               exchange.endpoint.authority if exchange.endpoint else "", exchange.bytes_out, exchange.path,
               exchange.upstream_s, self.peer_text)
        self.finished()

    def finished(self) -> None:
        self.exchange = None
        self.conn.stream_done(self)
