"""An HTTP/1.1 client connection: requests in order, answers framed for HTTP/1.1, flow control both ways.

One `ClientConnection` (an asyncio protocol) per client TCP or TLS connection. Its `RequestReader` turns bytes
into queued `Request`s; requests are served one at a time and answered in order (pipelining): `dispatch.plan`
decides, an `Exchange` forwards, and this connection is the exchange's `Downstream`: it frames the answer
(chunked when the upstream's length is unknown, Connection: close when the connection ends), batches what one
upstream read produced into one write, pauses and resumes reading, and writes the access line.

Errors known before any upstream is involved are answered here, once, as short plain-text bodies with the
status they carry. An exception that is nobody's fault but the proxy's is answered 500 and logged as
`internal_error` with the request id. Once the response head has gone out an error can no longer be reported
in-band: the connection is reset so the client sees a truncated response, never a silently short one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Final

import structlog

from ..accounting import record
from ..dispatch import Client, plan
from ..errors import HeaderTimeout, ProxyError, ProxyInternalError
from ..exchange import Exchange, client_behind, client_caught_up
from ..h2.connection import H2ClientConnection
from ..h2.limits import PREFACE, H2Limits
from ..logs import request_log
from ..metrics import NO_ROUTE, NO_SERVICE
from ..timeouts import check_timeout
from ..tunnel import Tunnel
from .head import SANE_REQUEST_ID, Request, new_request_id
from .reader import MAX_BUFFERED_BODY, MAX_PIPELINED, InternalParseError, RequestReader
from .writer import ResponseWriter

if TYPE_CHECKING:
    from ..listener import ProxyContext, ProxyServer

log = structlog.get_logger("ferryman.proxy")

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientConnection(ResponseWriter):
    __slots__ = (
        "_current_done", "_deferred_error", "_deferred_req", "_in_loop", "_reading_paused", "_serving",
        "_tunnel_early", "_upgraded", "body_paused", "cfg", "client", "closing", "ctx", "exchange", "fresh",
        "idle_since", "peer", "peer_text", "queue", "reader", "server", "trusted", "writing_paused",
    )

    def __init__(self, cfg: ProxyContext, server: ProxyServer) -> None:
        super().__init__()
        self.cfg = self.ctx = cfg
        self.server = server
        self.reader = RequestReader(self)
        self.peer, self.peer_text = b"", ""
        self.client = Client()  # the peer as planning sees it (access rules)
        self.queue: collections.deque[Request] = collections.deque()
        self.idle_since: float | None = None  # waiting for (the rest of) a request head since then
        self.fresh = True  # no request head completed yet: waiting for one runs on client_header_timeout
        self.exchange: Exchange | None = None
        # A parse error behind requests still being answered: sent, in order, once they are done.
        self._deferred_error: ProxyError | None = None
        self._deferred_req: Request | None = None  # the request it broke, when its head had begun
        self._tunnel_early = b""  # bytes a client sent after its upgrade head, before the upstream's 101
        self._serving = self._reading_paused = self._upgraded = self._in_loop = self._current_done = False
        self.closing = self.trusted = False  # trusted: the peer is one of trusted_proxies
        self.writing_paused = False  # the client reads slower than we write: upstream reading stays paused
        self.body_paused = False  # reading paused because the upstream does not take the body

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.begin(transport, peer[0] if isinstance(peer, tuple) else "")

    def begin(self, transport: asyncio.BaseTransport, client: str) -> None:
        """The connection is up; `client` is the peer's address, or the one a PROXY header named
        (proxy/proxied.py): the client for logs, forwarding headers, access rules and hashing."""
        self.transport = transport  # type: ignore[assignment]
        self.peer_text = client
        self.peer = client.encode()
        h2 = self.cfg.limits.h2
        if h2 is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                hand_over_to_h2(self, h2, b"")  # RFC 9113 §3.2: the client chose HTTP/2 in the TLS handshake
                return
        trusted = self.cfg.limits.trusted
        self.trusted = trusted is not None and self.peer in trusted
        self.client = Client(self.peer, self.trusted)
        if not self.server.admit(self):
            self.closing = True
            return
        self.idle_since = self.cfg.loop.time()

    def data_received(self, data: bytes) -> None:
        if self._deferred_error is not None or self.closing:
            return  # the stream is broken (nothing after the bad request is read), or the connection refused
        if self.fresh and data[:1] == b"P" and not self.reader.in_head and self.cfg.limits.h2 is not None:
            # h2c with prior knowledge (RFC 9113 §3.3): the connection opens with the HTTP/2 preface. Tested on
            # a new connection's first bytes only (no HTTP/1.1 method begins "PRI * HTTP/2.0"); `fresh` is false
            # from the first request head on, so later reads pay one attribute test.
            if data[:24] == PREFACE or (3 < len(data) < 24 and PREFACE.startswith(data)):
                hand_over_to_h2(self, self.cfg.limits.h2, data)
                return
        if self._upgraded:
            # After an Upgrade or CONNECT head the bytes are not HTTP (another protocol, or a body smuggled past
            # a head that claimed none): relayed once a WebSocket tunnel is up (the upstream answered 101), kept
            # until then (reading pauses), never parsed. Any other upgrade is answered as plain HTTP (Upgrade is
            # hop-by-hop) and the connection then closes.
            _after_upgrade_head(self, data)
            return
        try:
            err = self.reader.feed(data)
        except InternalParseError as exc:
            log.error("internal_error", client=self.peer_text, exc_info=exc.__cause__)
            err = ProxyInternalError("internal proxy error")
        if err is not None:
            self._protocol_error(err)
            return
        # Requests start after the whole read was parsed, so a request whose head parsed but whose framing
        # llhttp rejects a moment later (Transfer-Encoding not ending in chunked) never reaches an upstream.
        if not self._serving and self.queue:
            self._serve_next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.idle_since = None
        self.server.gone(self)
        if self.exchange is not None:
            self.exchange.client_gone()
        self.queue.clear()

    def pause_writing(self) -> None:
        # The client does not read its answers fast enough: stop reading the upstream and stop taking new
        # requests from it (answers it never reads must not pile up in memory).
        self.writing_paused = True
        self.pause_reading()
        if self.exchange is not None:
            client_behind(self.exchange, self.backlog())

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            client_caught_up(self.exchange)
        if not self.body_paused and len(self.queue) < MAX_PIPELINED:
            self.resume_reading()

    # --- what the reader reports ---
    def upgraded(self, rest: bytes) -> None:  # an Upgrade or CONNECT head: see data_received
        self._upgraded = True
        self._tunnel_early = rest
        self.pause_reading()

    # --- flow control and writing ---
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._upgraded and (self.exchange is None or self.exchange.tunnel is None):
            return  # after an upgrade head nothing is read until the upstream's 101 makes a tunnel
        if self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- serving requests, one at a time per connection ---
    def _serve_next(self) -> None:
        """Start queued requests in order (a loop: 404s answered at once in a pipeline must not nest calls)."""
        if self._in_loop:
            return
        self._in_loop = True
        try:
            while True:
                if self.closing:
                    self._serving = False
                    return
                if not self.queue:
                    self._serving = False
                    err = self._deferred_error
                    if err is not None:
                        self.refuse(err, self._deferred_req)
                        self._close()
                    return
                self._serving = True
                self._current_done = False
                self._start(self.queue.popleft())
                if not self._current_done:
                    return  # in progress; done() takes it from there
        finally:
            self._in_loop = False

    def _start(self, req: Request) -> None:
        """Plan the request and start forwarding it; a decision that is an error is answered here."""
        started = time.perf_counter()
        if not req.request_id or SANE_REQUEST_ID(req.request_id) is None:  # (settle_request_id, inline)
            req.request_id = new_request_id()
        exchange = None
        try:
            cfg = self.cfg
            decision = plan(req, cfg.router.current, cfg.pools, cfg.limits, cfg.rng, cfg.port, self.client)
            if decision.error is not None:
                self.answer_error(req, decision.error, decision.service, started, decision.path, decision.route_id)
                return
            assert decision.route is not None and decision.pool is not None
            exchange = self.exchange = Exchange(
                self, req, decision.route, decision.pool, decision.target, started, decision.path, decision.service,
            )
            exchange.attempt()
        except Exception:  # a bug: the proxy's fault, answered 500 and counted, never blamed on the client
            request_log(req, "exception", "internal_error", method=req.method)
            err = ProxyInternalError("internal proxy error")
            if exchange is None:
                self.answer_error(req, err, NO_SERVICE, started, "", NO_ROUTE)
            else:
                exchange.abandon(err)

    def done(self, exchange: Exchange, status: int) -> None:  # the exchange is over: its access line, then on
        record(self.cfg, exchange.req, exchange.service, exchange.route.id, status, exchange.started,
               exchange.endpoint.authority if exchange.endpoint else "", exchange.bytes_out, exchange.path,
               exchange.upstream_s, self.peer_text)
        self.finished(exchange.req)

    def finished(self, req: Request) -> None:  # the answer is complete: the next request, or wait, or close
        self.exchange = None
        self._current_done = True
        if not req.keep_alive or (self.server.draining and not self.queue) or self.closing:
            self._close()
            return
        if self.queue or self._deferred_error is not None:
            self._serve_next()  # a no-op inside the loop, which goes on by itself
            return
        self._serving = False
        if not self.writing_paused:
            self.resume_reading()
        self.idle_since = self.cfg.loop.time()

    def answer_error(
        self, req: Request, err: ProxyError, service: str, started: float, path: str, route_id: str,
    ) -> None:
        if err.status >= 400:  # a redirect to HTTPS is no error: its access line says enough
            request_log(req, "warning", "proxy_error", status=err.status, reason=err.reason, error=err.message,
                        service=service, upstream=err.upstream, method=req.method, path=path)
        if not req.body_done or self.server.draining or err.status == 413:
            # The unread rest of the body would be taken for the next request; after a 413 the client may still
            # be sending what was refused (nginx closes too). While draining, every answer says close.
            req.keep_alive = False
        sent = self._write_error(req, err)
        record(self.cfg, req, service, route_id, err.status, started, err.upstream, sent, path, None, self.peer_text)
        self.finished(req)

    # --- Downstream: what an exchange asks (sending is ResponseWriter's) ---
    def pause_body(self) -> None:
        self.body_paused = True
        self.pause_reading()

    def resume_body(self) -> None:
        self.body_paused = False
        self.resume_reading()

    def take_body(self, req: Request, exchange: Exchange) -> None:
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

    def open_tunnel(self, req: Request, tunnel: Tunnel, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """The upstream accepted the upgrade: its 101, then what the client sent early goes up; reading resumes."""
        self.send_switching(req, reason, headers)
        early, self._tunnel_early = self._tunnel_early, b""
        if early:
            tunnel.from_client(early)
        self.resume_reading()

    # --- errors, timeouts and closing ---
    def _protocol_error(self, err: ProxyError) -> None:
        """A request llhttp (or a limit) rejected: answer it after the requests before it, then close."""
        bad = self.reader.take_broken()
        if bad is not None and bad in self.queue:
            self.queue.remove(bad)  # its head parsed, its framing did not: it never starts
        elif bad is not None and self.exchange is not None and self.exchange.req is bad:
            self.exchange.abandon(err)  # its body broke off while being relayed
            return
        self._deferred_error = err
        self._deferred_req = bad
        self.pause_reading()
        if not self._serving:
            self._serve_next()

    def sweep(self, now: float) -> None:
        """Called by the listener a few times a second: enforce the header, idle and read timeouts."""
        since = self.idle_since
        if since is not None:
            limits = self.cfg.limits
            if self.reader.in_head or self.fresh:
                if now - since >= limits.header_timeout:
                    self._header_expired()
            elif now - since >= limits.idle_timeout:
                self.idle_since = None
                if not self._serving:
                    self._close()
        exchange = self.exchange
        if exchange is not None:
            check_timeout(exchange, now)

    def _header_expired(self) -> None:
        """A request head (or a new connection's first) did not arrive within client_header_timeout (slowloris):
        408 when part of a head came, then close; a connection that sent nothing is just closed."""
        self.idle_since = None
        if not self._serving:
            timeout = self.cfg.limits.header_timeout
            if self.reader.in_head:
                log.info("client_header_timeout", client=self.peer_text, timeout_s=timeout)
                self.refuse(HeaderTimeout(f"request head not received within {timeout:g} s"),
                            self.reader.take_broken())
            self._close()

    def _close(self) -> None:
        self.closing = True
        self.idle_since = None
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:  # stop after the request in progress; close now if there is none
        if not self._serving:
            self._close()


def hand_over_to_h2(conn: ClientConnection, limits: H2Limits, data: bytes) -> None:
    """This connection speaks HTTP/2: its transport goes to an HTTP/2 protocol, with the bytes read so far."""
    transport = conn.transport
    assert transport is not None
    conn.closing = True
    conn.idle_since = None
    conn.server.gone(conn)
    h2 = H2ClientConnection(conn.cfg, conn.server, limits, conn.peer_text)
    transport.set_protocol(h2)
    h2.connection_made(transport)
    if data:
        h2.data_received(data)


def _after_upgrade_head(conn: ClientConnection, data: bytes) -> None:
    """Bytes after an Upgrade or CONNECT head: to the tunnel once it is up, else kept (see data_received)."""
    exchange = conn.exchange
    if exchange is not None and exchange.tunnel is not None:
        exchange.tunnel.from_client(data)
    else:
        conn._tunnel_early += data  # nothing is dropped: reading pauses once enough waits
        if len(conn._tunnel_early) >= MAX_BUFFERED_BODY:
            conn.pause_reading()
