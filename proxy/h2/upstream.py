"""HTTP/2 to instances (routes with proto=grpc: h2c; proto=grpcs: TLS with ALPN h2), on the sans-IO `h2` library.

`H2UpstreamPool` keeps at most `max_connections` connections per instance (a `PoolKey`), each carrying many
streams. A request takes a stream on the connection with the fewest open ones that has room under the instance's
SETTINGS_MAX_CONCURRENT_STREAMS (and our own `_MAX_STREAMS`); while that connection is already busy and the bound
allows, another one is opened in the background, so load spreads over the connections without any request
waiting for a connect. With every connection full, a request waits for a stream to end (`acquire`). Connecting
fails as UpstreamConnectError / UpstreamConnectTimeout: nothing reached the instance (a TLS instance that does not
choose h2 by ALPN counts as refused).

An `UpstreamStream` is what the exchange holds as its upstream connection (write, end, pause and resume reading,
detach) and reports the answer to a `StreamSink`: head, DATA, trailers (or a trailers-only answer), end, error.

Flow control, end to end. The answer: each stream's receive window is `STREAM_WINDOW`; DATA is acknowledged at
once unless the client side paused the stream (its client's windows hold back more than its high-water mark),
and then only when it resumes, so a slow reader holds at most one window here and the instance stops sending on
that stream only; the connection's window is opened wide so that paused streams never hold back the others. The
request: body bytes go out as the stream's and the connection's send windows allow; past `_HIGH` bytes waiting,
the client side is paused (`upstream_pause_writing`: it stops acknowledging the client's DATA) until the instance
opens its window again.

Draining: connections to an instance that left every pool take no new stream, and close once their last stream
is done; idle connections close after `idle_timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Collection, Container
from typing import Final, Protocol

import structlog
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from ..errors import ProxyError, UpstreamConnectError, UpstreamProtocolError, UpstreamStreamRefused, UpstreamTimeout
from ..h1.upstream import FRAMING_NONE, PoolKey, open_connection
from .limits import window_chunk, window_reopened

log = structlog.get_logger("ferryman.proxy")

Field = tuple[bytes, bytes]

_CONFIG: Final = H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True,
                                 normalize_inbound_headers=True, validate_outbound_headers=False,
                                 normalize_outbound_headers=False)
STREAM_WINDOW: Final = 256 * 1024  # what an instance may send on one stream before we acknowledge
_CONNECTION_WINDOW: Final = 2**31 - 1  # never the limit: paused streams must not stall the others
_MAX_STREAMS: Final = 100  # streams we open on one connection, whatever the instance allows
_MAX_HEADER_LIST: Final = 256 * 1024  # a response head or trailers, decoded
# Request body bytes waiting on the instance's windows before the client is paused, and below which it resumes.
_HIGH: Final = 256 * 1024
_LOW: Final = 64 * 1024


class StreamSink(Protocol):
    """What an upstream stream reports to: the exchange of the request it carries."""

    def on_head(self, status: int, reason: bytes, headers: list[Field], framing: int) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def on_trailers(self, fields: list[Field]) -> None: ...
    def on_trailers_only(self, status: int, fields: list[Field]) -> None: ...
    def on_complete(self, reusable: bool) -> None: ...
    def on_error(self, error: ProxyError, *, nothing_received: bool) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


def _code(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


def _split_head(headers: list[Field]) -> tuple[int, list[Field]]:
    status = 0
    fields: list[Field] = []
    for name, value in headers:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif name[:1] != b":":
            fields.append((name, value))
    return status, fields


class UpstreamStream:
    """One request on an HTTP/2 upstream connection, as its exchange drives it."""

    __slots__ = ("answered", "conn", "ending", "id", "paused", "pending", "pending_size", "received", "sent_all",
                 "sink", "unacked", "writer_paused")

    def __init__(self, conn: H2UpstreamConnection, stream_id: int, sink: StreamSink, *, ended: bool) -> None:
        self.conn, self.id = conn, stream_id
        self.sink: StreamSink | None = sink
        self.pending: collections.deque[bytes] = collections.deque()  # request body the windows hold back
        self.pending_size = 0
        self.ending = self.sent_all = ended  # END_STREAM to send after what is pending / sent
        self.paused = False  # the client reads slower than the instance answers: DATA is not acknowledged
        self.writer_paused = False  # the client side was told to stop sending the request body
        self.unacked = 0
        self.received = False  # any frame of the answer arrived
        self.answered = False  # the answer was handed over whole (trailers, trailers-only or END_STREAM)

    # --- the exchange's side: the request body, and the pace of the answer ---
    def write(self, data: bytes) -> None:
        if self.sink is None or not data:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self.pump()
        if self.pending_size > _HIGH and not self.writer_paused:
            self.writer_paused = True
            self.sink.upstream_pause_writing()

    def end(self) -> None:
        self.ending = True
        self.pump()

    def pump(self) -> None:
        """Send what the stream's and the connection's windows allow; END_STREAM once nothing waits."""
        conn = self.conn
        h2 = conn.h2
        sid = self.id
        pending = self.pending
        try:
            while pending:
                chunk = window_chunk(h2, sid, pending)
                if chunk is None:
                    break
                self.pending_size -= len(chunk)
                h2.send_data(sid, chunk)
            if self.ending and not pending and not self.sent_all:
                self.sent_all = True
                h2.end_stream(sid)
        except (StreamClosedError, ProtocolError):
            # The instance closed or reset the stream: the rest of the body is not wanted.
            pending.clear()
            self.pending_size = 0
            self.sent_all = True
        conn.flush()
        sink = self.sink
        if self.writer_paused and self.pending_size < _LOW and not conn.write_paused and sink is not None:
            self.writer_paused = False
            sink.upstream_resume_writing()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.unacked:
                unacked, self.unacked = self.unacked, 0
                self.conn.acknowledge(self.id, unacked)
                self.conn.flush()

    def detach(self) -> None:
        """The exchange gave up (client gone, timeout, deadline): the stream is cancelled, the connection stays."""
        self.sink = None
        self.pending.clear()
        self.pending_size = 0
        if not self.answered:
            self.conn.cancel(self)

    # --- the connection's side: the answer ---
    def on_response(self, headers: list[Field], ended: bool) -> None:
        self.received = True
        sink = self.sink
        if sink is None:
            return
        status, fields = _split_head(headers)
        if ended:
            self.answered = True
            sink.on_trailers_only(status, fields)
        else:
            # FRAMING_NONE: HTTP/2 frames the body itself; it also keeps compression out of gRPC's own framing.
            sink.on_head(status, b"", fields, FRAMING_NONE)

    def on_data(self, data: bytes, flow_length: int) -> None:
        if flow_length:
            if self.paused and self.sink is not None:
                self.unacked += flow_length
            else:
                self.conn.acknowledge(self.id, flow_length)
        sink = self.sink
        if sink is not None and data:
            sink.on_body(data)

    def on_trailers(self, headers: list[Field]) -> None:
        sink = self.sink
        if sink is not None and not self.answered:
            self.answered = True
            sink.on_trailers([pair for pair in headers if pair[0][:1] != b":"])

    def on_ended(self) -> None:
        sink = self.sink
        if sink is not None and not self.answered:
            self.answered = True
            sink.on_complete(True)

    def on_lost(self, error: ProxyError) -> None:
        sink = self.sink
        self.sink = None
        if sink is not None and not self.answered:
            sink.on_error(error, nothing_received=not self.received)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an instance; its streams are the requests it carries."""

    def __init__(self, pool: H2UpstreamPool, key: PoolKey) -> None:
        self.pool, self.key = pool, key
        self.h2 = H2Connection(config=_CONFIG)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, UpstreamStream] = {}
        self.closed = False
        self.going_away = False  # GOAWAY received, or the instance left its pool: no new stream
        self.write_paused = False
        self.idle_since: float | None = None
        self.flush_pending = False

    def room(self) -> bool:
        return not (self.going_away or self.closed) and len(self.streams) < min(
            _MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)

    def open(self, fields: list[Field], sink: StreamSink, *, end_stream: bool) -> UpstreamStream:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, fields, end_stream=end_stream)
        stream = self.streams[sid] = UpstreamStream(self, sid, sink, ended=end_stream)
        self.idle_since = None
        self.flush()
        return stream

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        h2 = self.h2
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
        })
        h2.initiate_connection()
        h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.idle_since = asyncio.get_running_loop().time()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.info("upstream_http2_error", upstream=self.pool.authority(self.key), error=str(exc))
            self._fail(UpstreamProtocolError(f"invalid HTTP/2 from upstream: {exc}"))
            return
        streams = self.streams
        touched: list[UpstreamStream] = []  # streams whose client has something new to send
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.flow_controlled_length)
                    touched.append(stream)
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_response(event.headers, event.stream_ended is not None)
                    touched.append(stream)
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_ended()
                    self._stream_over(stream)
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._stream_over(stream, reset=True)
                    kind = UpstreamStreamRefused if event.error_code == ErrorCodes.REFUSED_STREAM \
                        else UpstreamConnectError
                    stream.on_lost(kind(f"upstream reset the stream ({_code(event.error_code)})"))
            elif isinstance(event, WindowUpdated):
                window_reopened(self.streams, event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                self.pool.wake(self.key)  # the instance may allow more streams now
            elif isinstance(event, ConnectionTerminated):
                self._go_away(event.last_stream_id)
        self.flush()
        for stream in touched:
            if stream.sink is not None:
                stream.sink.flush()  # what one read produced goes to each client in one write

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        error = UpstreamConnectError(f"upstream closed the HTTP/2 connection{f': {exc}' if exc else ''}")
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.on_lost(error)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            if not stream.writer_paused and stream.sink is not None:
                stream.writer_paused = True
                stream.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.pump()

    # --- what streams ask ---
    def acknowledge(self, stream_id: int, size: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (StreamClosedError, ProtocolError):
            return

    def cancel(self, stream: UpstreamStream) -> None:
        try:
            self.h2.reset_stream(stream.id, ErrorCodes.CANCEL)
        except (StreamClosedError, ProtocolError):
            pass
        self._stream_over(stream, reset=True)
        self.flush()

    def flush(self) -> None:
        """Write what the library has to send, once per turn of the event loop: the streams a client's read
        opened, or the acknowledgements of one upstream read, go out in one write (a write per stream cost a
        quarter of the CPU of a unary call)."""
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.write_now)

    def write_now(self) -> None:
        self.flush_pending = False
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # --- internals ---
    def _stream_over(self, stream: UpstreamStream, *, reset: bool = False) -> None:
        if self.streams.get(stream.id) is not stream:
            return
        if not reset and not stream.sent_all:
            # The answer is complete before the request (RFC 9113 §8.1): the rest of it is not wanted.
            try:
                self.h2.reset_stream(stream.id, ErrorCodes.NO_ERROR)
            except (StreamClosedError, ProtocolError):
                pass
        del self.streams[stream.id]
        if not self.streams:
            if self.going_away:
                self.close()
                return
            self.idle_since = asyncio.get_running_loop().time()
        self.pool.wake(self.key)

    def _go_away(self, last_stream_id: int | None) -> None:
        """The instance said GOAWAY: streams above the last it took were never processed; the others finish."""
        self.going_away = True
        self.pool.forget(self)
        refused = [s for sid, s in self.streams.items() if last_stream_id is not None and sid > last_stream_id]
        for stream in refused:
            del self.streams[stream.id]
            stream.on_lost(UpstreamStreamRefused("upstream is going away (GOAWAY) and refused the stream"))
        if not self.streams:
            self.close()

    def _fail(self, error: ProxyError) -> None:
        streams, self.streams = self.streams, {}
        self.close(abort=True)
        for stream in streams.values():
            stream.on_lost(error)

    def close(self, *, abort: bool = False) -> None:
        self.going_away = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if not abort:
                try:
                    self.h2.close_connection(ErrorCodes.NO_ERROR)
                except ProtocolError:
                    pass
                self.write_now()
                transport.close()
            else:
                transport.abort()


class H2UpstreamPool:
    """HTTP/2 connections to instances, at most `max_connections` each."""

    def __init__(self, *, connect_timeout: float, idle_timeout: float, max_connections: int, ca_file: str = "",
                 ) -> None:
        self.connect_timeout, self.idle_timeout, self.max_connections = connect_timeout, idle_timeout, max_connections
        self.ca_file = ca_file
        self._conns: dict[PoolKey, list[H2UpstreamConnection]] = {}
        self._connecting: dict[PoolKey, int] = {}
        self._waiters: dict[PoolKey, collections.deque[asyncio.Future[None]]] = {}
        self._live: Container[tuple[str, int]] | None = None
        self._ssl: dict[bool, ssl.SSLContext] = {}
        self._background: set[asyncio.Task[None]] = set()

    @staticmethod
    def authority(key: PoolKey) -> str:
        host, port = key[1], key[2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def take(self, key: PoolKey, now: float) -> H2UpstreamConnection | None:
        """The connection with room for a stream now that has the fewest open (no await: the fast path). While
        that one is busy and the bound allows, another is opened in the background for the requests to come."""
        conns = self._conns.get(key)
        if not conns:
            return None
        best: H2UpstreamConnection | None = None
        for conn in list(conns):
            if conn.idle_since is not None and now - conn.idle_since >= self.idle_timeout:
                conns.remove(conn)
                conn.close()
            elif conn.room() and (best is None or len(conn.streams) < len(best.streams)):
                best = conn
        if best is not None and best.streams and self._count(key) < self.max_connections:
            task = asyncio.get_running_loop().create_task(self._grow(key))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return best

    async def acquire(self, key: PoolKey, connect_timeout: float, wait_timeout: float) -> H2UpstreamConnection:
        """A connection with room for a stream: a new one while the bound allows, else the first to free a
        stream within `wait_timeout` (UpstreamTimeout after)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(wait_timeout) as deadline:
                while True:
                    conn = self.take(key, loop.time())
                    if conn is not None:
                        return conn
                    if self._count(key) < self.max_connections:
                        deadline.reschedule(None)  # connecting has its own timeout, and its own error
                        return await self.connect(key, connect_timeout)
                    waiter = loop.create_future()
                    self._waiters.setdefault(key, collections.deque()).append(waiter)
                    await waiter
        except TimeoutError:
            raise UpstreamTimeout(f"no stream free on the {self.max_connections} HTTP/2 connections to "
                                  f"{self.authority(key)}") from None

    def wake(self, key: PoolKey) -> None:
        waiters = self._waiters.get(key)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def connect(self, key: PoolKey, timeout: float = 0.0) -> H2UpstreamConnection:
        """A new connection to the instance within `timeout` (else connect_timeout), added to the pool."""
        ssl_ctx = self._ssl_context(key[3]) if key[0] == "grpcs" else None
        self._connecting[key] = self._connecting.get(key, 0) + 1
        try:
            conn = await open_connection(lambda: H2UpstreamConnection(self, key), key, ssl_ctx,
                                         timeout or self.connect_timeout)
        finally:
            self._connecting[key] -= 1
            if not self._connecting[key]:
                del self._connecting[key]
        transport = conn.transport
        if ssl_ctx is not None and transport is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.abort()
                raise UpstreamConnectError(f"{self.authority(key)} did not choose h2 by ALPN (proto=grpcs)")
        self._conns.setdefault(key, []).append(conn)
        self.wake(key)
        return conn

    async def _grow(self, key: PoolKey) -> None:
        try:
            await self.connect(key)
        except ProxyError as err:
            log.info("upstream_http2_connect_failed", upstream=self.authority(key), error=err.message)

    def _count(self, key: PoolKey) -> int:
        return len(self._conns.get(key, ())) + self._connecting.get(key, 0)

    def forget(self, conn: H2UpstreamConnection) -> None:
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]
        self.wake(conn.key)  # a waiter may open a connection in its place

    def close_idle_to(self, gone: Collection[tuple[str, int]], live: Container[tuple[str, int]]) -> None:
        """Instances that left every pool: their connections take no new stream and close when their open
        streams are done (drained, not cut)."""
        self._live = live
        if not gone:
            return
        for key in [k for k in self._conns if (k[1], k[2]) in gone]:
            for conn in self._conns.pop(key):
                conn.going_away = True
                if not conn.streams:
                    conn.close()

    def close(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                conn.close(abort=True)
        self._conns.clear()

    def _ssl_context(self, skip_verify: bool) -> ssl.SSLContext:
        ctx = self._ssl.get(skip_verify)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=None if skip_verify else (self.ca_file or None))
            if skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            self._ssl[skip_verify] = ctx
        return ctx
