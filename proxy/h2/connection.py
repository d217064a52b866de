"""An HTTP/2 client connection: the `h2` state machine fed with the socket's bytes, a `Stream` per request.

`H2ClientConnection` is the asyncio protocol of a client connection that chose HTTP/2: by ALPN on a TLS listener,
or by opening with the connection preface on the plain one (h2c with prior knowledge); the HTTP/1.1 connection
hands its transport over (see h1/client.py). The `h2` library (sans-IO) parses and frames; this class turns its
events into requests and flow control and writes what the library has to send once per read or upstream read.
Each request head is planned exactly as over HTTP/1.1 (`dispatch.plan`) and runs an `Exchange` to an HTTP/1.1
upstream (a `GrpcExchange` to an HTTP/2 one on proto=grpc routes), with its `Stream` as the exchange's Downstream.

Protections, each a setting (`H2Limits`): streams beyond max_concurrent_streams are refused (REFUSED_STREAM);
the header list (decoded size), frame size and HPACK table are advertised in SETTINGS and enforced by the
library (a client that exceeds them gets GOAWAY); a CONTINUATION flood ends at the library's 64 frames per
header block; more than max_resets RST_STREAM (rapid reset, CVE-2023-44487), or max_control_frames SETTINGS,
PING and PRIORITY frames, in one second end the connection with GOAWAY ENHANCE_YOUR_CALM. A connection with no
stream open for client_idle_timeout (client_header_timeout before its first request) is closed with GOAWAY.

Draining (`/ready` down, SIGTERM): a graceful GOAWAY naming the last stream taken, then the connection closes
when its open streams are done (the listener aborts what is left at shutdown_timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import structlog
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from ..dispatch import Client
from ..errors import ProxyError
from ..h1.head import Request
from ..timeouts import check_timeout
from .codec import MemoDecoder, PlainEncoder
from .frames import LeanH2Connection
from .head import HeadMemo, Malformed, check_trailers
from .limits import H2Limits, Rate, window_reopened
from .stream import LOW_WATER, Stream

if TYPE_CHECKING:
    from ..listener import ProxyContext, ProxyServer

log = structlog.get_logger("ferryman.proxy")

# The library's header validation and normalisation are off both ways: request heads are checked by
# `request_from_fields` (head.py) in the pass that reads them, and cookies joined there; answer heads are built
# by `response_fields` from an upstream's parsed head, lower case and without connection-specific fields.
_CONFIG: Final = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                 normalize_inbound_headers=False, validate_outbound_headers=False,
                                 normalize_outbound_headers=False)


def _settings(limits: H2Limits, streams: int) -> Settings:
    return Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
        SettingCodes.HEADER_TABLE_SIZE: limits.header_table_size,
        SettingCodes.ENABLE_PUSH: 0,
    })


class H2ClientConnection(asyncio.Protocol):
    """One client connection speaking HTTP/2; its streams are the requests in progress."""

    def __init__(self, ctx: ProxyContext, server: ProxyServer, limits: H2Limits, client: str | None = None) -> None:
        self.ctx = self.cfg = ctx
        self.server = server
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.peer, self.peer_text, self.trusted = b"", "", False
        self._client = client  # the client's address when known (a PROXY header's), else the socket's peer
        self.client = Client()
        self.h2 = LeanH2Connection(config=_CONFIG)
        self.streams: dict[int, Stream] = {}
        self.closing = False
        self.going_away = False  # a graceful GOAWAY went out: no new stream is taken
        self.last_stream = 0  # the highest stream id taken
        self.paused = False  # the transport's buffer is full: every stream's upstream waits
        self.idle_since: float | None = None
        self.fresh = True  # no request yet: the first one must come within client_header_timeout
        self._resets = Rate(limits.max_resets)
        self.control = Rate(limits.max_control_frames)
        self.reading = False  # in data_received: flush() waits for the end of the read
        self.flush_soon = False  # a send_out is due at the end of this turn of the event loop
        self.h2.encoder, self.h2.decoder = PlainEncoder(), MemoDecoder()  # HPACK with less CPU (see codec.py)
        self.heads = HeadMemo()  # the requests of heads seen before (see head.py)

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._client is not None:
            self.peer_text = self._client
        else:
            peer = transport.get_extra_info("peername")
            self.peer_text = peer[0] if isinstance(peer, tuple) else ""
        self.peer = self.peer_text.encode()
        trusted = self.ctx.limits.trusted
        self.trusted = trusted is not None and self.peer in trusted
        self.client = Client(self.peer, self.trusted)
        if not self.server.admit(self):
            self.closing = True
            return
        limits = self.limits
        h2 = self.h2
        # Initial values (an update would apply only once the client acknowledged it): the first SETTINGS frame
        # carries them.
        h2.local_settings = _settings(limits, limits.max_concurrent_streams)
        # The library applies local settings once acknowledged; the decoder's bounds hold from the first frame.
        h2.decoder.max_header_list_size = limits.max_header_list_size
        h2.decoder.max_allowed_table_size = limits.header_table_size
        h2.max_inbound_frame_size = limits.max_frame_size
        h2.initiate_connection()
        # The library treats a stream over the advertised limit as a connection error (GOAWAY for every
        # stream); `on_request` refuses that one stream instead (REFUSED_STREAM, RFC 9113 §5.1.2), so the library
        # is given room beyond it.
        h2.local_settings = _settings(limits, 2**31 - 1)
        self.idle_since = self.ctx.loop.time()
        self.send_out()

    def refuse(self, err: ProxyError, req: Request | None = None) -> None:
        """Over max_connections: GOAWAY (REFUSED_STREAM for all), closed by the listener."""
        self.h2.initiate_connection()
        self.h2.close_connection(ErrorCodes.REFUSED_STREAM)
        self.send_out()  # now: the listener closes the transport when this returns

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:  # the library queued a GOAWAY saying why
            log.info("http2_protocol_error", client=self.peer_text, error=str(exc))
            self._close()
            return
        handlers = _HANDLERS
        self.reading = True  # what streams answer meanwhile goes out in one write, below
        try:
            for event in events:
                handler = handlers.get(event.__class__)
                if handler is not None:
                    handler(self, event)
                    if self.closing:
                        return
        finally:
            self.reading = False
        self.send_out()  # what this read's events made (SETTINGS ACKs, window updates, answers) in one write

    def malformed(self, exc: Malformed) -> None:
        """RFC 9113 §8.1.1: the connection ends with PROTOCOL_ERROR, as the library's own check would end it."""
        log.info("http2_protocol_error", client=self.peer_text, error=str(exc))
        self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR, last_stream_id=self.last_stream)
        self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.idle_since = None
        self.server.gone(self)
        for stream in list(self.streams.values()):
            self._stream_gone(stream)
        self.streams.clear()

    def pause_writing(self) -> None:
        self.paused = True
        for stream in self.streams.values():
            if not stream.writing_paused:
                stream.pause_upstream()

    def resume_writing(self) -> None:
        self.paused = False
        for stream in list(self.streams.values()):
            if stream.writing_paused and stream.pending_size < LOW_WATER:
                stream.resume_upstream()

    # --- requests ---
    def on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self.going_away or len(self.streams) >= self.limits.max_concurrent_streams:
            # RFC 9113 §5.1.2: REFUSED_STREAM tells the client the request was not processed (safe to retry).
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self.h2.forget_closed(sid)
            return
        self.last_stream = sid
        self.idle_since = None
        self.fresh = False
        try:
            req = self.heads.request(event.headers, self.ctx.limits, end_stream=event.stream_ended is not None)
        except Malformed as exc:
            self.malformed(exc)
            return
        stream = self.streams[sid] = Stream(self, sid, req)
        stream.start(self.client)

    def on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        length = event.flow_controlled_length
        if stream is None or stream.closing:
            # A stream already answered (or refused): its bytes go nowhere, but the connection window reopens.
            if length:
                self.h2.acknowledge_received_data(length, event.stream_id)
            return
        stream.received(event.data, length)

    def on_stream_reset(self, event: StreamReset) -> None:
        if event.remote_reset:
            if self._resets.over(self.ctx.loop.time()):
                self.calm_down("http2_rapid_reset", self.limits.max_resets)
                return
        stream = self.streams.pop(event.stream_id, None)
        self.h2.forget_closed(event.stream_id)
        if stream is not None:
            self._stream_gone(stream)

    def _stream_gone(self, stream: Stream) -> None:
        stream.closing = True
        stream.pending.clear()
        exchange = stream.exchange
        if exchange is not None:
            exchange.client_gone()

    def calm_down(self, event: str, limit: int) -> None:
        """Over a rate limit: the client is told to calm down and cut off."""
        log.warning(event, client=self.peer_text, limit_per_s=limit)
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self.last_stream)
        self._close()

    # --- what streams ask ---
    def send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> None:
        try:
            self.h2.send_headers(stream_id, fields, end_stream=end_stream)
        except (StreamClosedError, ProtocolError):
            self.lost(stream_id)
            return
        if end_stream:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.sent_all = True

    def acknowledge(self, stream: Stream, size: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream.id)
        except (StreamClosedError, ProtocolError):
            return

    def reset(self, stream: Stream, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream.id, code)
        except (StreamClosedError, ProtocolError):
            pass
        stream.sent_all = True
        self.forget(stream)
        self.flush()

    def stream_done(self, stream: Stream) -> None:
        """The exchange is over (answered and recorded); the stream goes once its answer is on the wire."""
        if stream.sent_all or stream.closing:
            self.forget(stream)
        self.flush()

    def forget(self, stream: Stream) -> None:
        if stream.exchange is not None:
            return  # still relaying: stream_done comes
        if self.streams.get(stream.id) is stream and (stream.sent_all or stream.closing):
            del self.streams[stream.id]
            self.h2.forget_closed(stream.id)
            if not self.streams:
                self._idle()

    def _idle(self) -> None:
        if self.going_away or self.server.draining:
            self._go_away()
            if not self.streams:
                self._close()
            return
        self.idle_since = self.ctx.loop.time()

    def lost(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self.h2.forget_closed(stream_id)
        if stream is not None:
            self._stream_gone(stream)

    def transport_backlog(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def flush(self) -> None:
        """What streams have to send goes out at the end of this read, or else of this turn of the event loop:
        the answers of the upstreams that one turn found readable leave in one write (a write was a third of
        a request's CPU time on loopback)."""
        if not self.reading and not self.flush_soon:
            self.flush_soon = True
            self.ctx.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_soon = False
        if not self.closing:
            self.send_out()

    def send_out(self) -> None:
        """Write what the library has to send, now."""
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # --- timeouts, draining and closing ---
    def sweep(self, now: float) -> None:
        """Called by the listener a few times a second: idle and read timeouts, and draining."""
        if self.server.draining and not self.going_away:
            self._go_away()
            if not self.streams:
                self._close()
                return
        since = self.idle_since
        if since is not None:
            limits = self.ctx.limits
            limit = limits.header_timeout if self.fresh else limits.idle_timeout
            if now - since >= limit:
                log.info("http2_idle_timeout", client=self.peer_text, timeout_s=limit)
                self.idle_since = None
                self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self.last_stream)
                self._close()
                return
        for stream in list(self.streams.values()):
            if stream.exchange is not None:
                check_timeout(stream.exchange, now)
        self.h2.open_inbound_streams  # noqa: B018  # the library's walk forgets the closed streams left (frames.py)

    def _go_away(self) -> None:
        """A graceful GOAWAY (RFC 9113 §6.8): streams up to the last one taken are served; none after."""
        if self.going_away or self.closing:
            return
        self.going_away = True
        self.send_out()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            frame = GoAwayFrame(stream_id=0, last_stream_id=self.last_stream, error_code=ErrorCodes.NO_ERROR)
            transport.write(frame.serialize())

    def shutdown(self) -> None:
        """The listener stops: GOAWAY now; closed at once when no stream is open, else after the last one."""
        self._go_away()
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if self.closing:
            return
        self.send_out()
        self.closing = True
        self.idle_since = None
        if self.transport is not None:
            self.transport.close()


# --- the events acted on, by type (one dict look-up an event, where a chain of isinstance tests was) ---
def _stream_ended(conn: H2ClientConnection, event: StreamEnded) -> None:
    stream = conn.streams.get(event.stream_id)
    if stream is not None:
        stream.body_ended()


def _window_updated(conn: H2ClientConnection, event: WindowUpdated) -> None:
    window_reopened(conn.streams, event.stream_id)


def _control_frame(conn: H2ClientConnection, event: Any) -> None:
    if conn.control.over(conn.ctx.loop.time()):
        conn.calm_down("http2_control_flood", conn.limits.max_control_frames)


def _trailers(conn: H2ClientConnection, event: TrailersReceived) -> None:
    """Request trailers go nowhere (an HTTP/1.1 upstream gets none), but must be well formed."""
    try:
        check_trailers(event.headers)
    except Malformed as exc:
        conn.malformed(exc)


def _terminated(conn: H2ClientConnection, event: ConnectionTerminated) -> None:
    conn._close()  # (this module's own)


_HANDLERS: Final[dict[type, Callable[[H2ClientConnection, Any], None]]] = {
    DataReceived: H2ClientConnection.on_data, RequestReceived: H2ClientConnection.on_request,
    StreamEnded: _stream_ended, WindowUpdated: _window_updated, StreamReset: H2ClientConnection.on_stream_reset,
    RemoteSettingsChanged: _control_frame, PingReceived: _control_frame, PriorityUpdated: _control_frame,
    TrailersReceived: _trailers, ConnectionTerminated: _terminated,
}
