"""The upstream side: keep-alive HTTP/1.1 connections to instances, on asyncio protocols with llhttp.

Written by hand on purpose (aiohttp's ClientSession was the hot path's largest cost: see README, Performance):
one `UpstreamConnection` per TCP connection, its response parsed by llhttp (through httptools) straight
into callbacks on the request's `ResponseSink`, which writes to the client as bytes arrive. Nothing is
buffered beyond what the transports hold, nothing is decompressed, no header is invented.

`UpstreamPool` keeps idle connections per instance (last in, first out, at most `keepalive` each, closed
after `idle_timeout`) and opens new ones with a connect timeout. Connection failures leave as
UpstreamConnectError / UpstreamConnectTimeout: nothing reached the upstream.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Collection, Container
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import httptools
from mypy_extensions import mypyc_attr

from ..errors import ProxyError, UpstreamConnectError, UpstreamConnectTimeout, UpstreamProtocolError

if TYPE_CHECKING:
    from ..h2.upstream import H2UpstreamPool

# How a response body is delimited, as far as the relay is concerned.
FRAMING_NONE: Final = 0  # HEAD, 1xx, 204, 304: no body whatever the headers say
FRAMING_LENGTH: Final = 1
FRAMING_CHUNKED: Final = 2
FRAMING_EOF: Final = 3  # neither: the body ends when the upstream closes (RFC 9112 §6.3 rule 8)

# (scheme, address, port, skip TLS verification, TLS server name: "" for the address)
PoolKey = tuple[str, str, int, bool, str]
MAX_RESPONSE_HEAD: Final = 256 * 1024


class ResponseSink(Protocol):
    """What an upstream connection reports to, for the one request it carries."""

    def on_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self, reusable: bool) -> None: ...
    def on_error(self, error: ProxyError, *, nothing_received: bool) -> None: ...
    def flush(self) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...
    # A WebSocket (or other upgrade) the upstream accepted with 101: from then on raw bytes both ways, to the
    # TunnelSink this returns (None: nobody takes them, the connection is closed).
    def on_upgrade(self, reason: bytes, headers: list[tuple[bytes, bytes]], rest: bytes) -> TunnelSink | None: ...


class TunnelSink(Protocol):
    """Where an upgraded connection's raw bytes go."""

    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_tunnel_closed(self) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


# What one read from an upstream may take. Reads land in one buffer per pool (the loop runs one callback at a
# time) and reach the client as bytes objects of at most this size: with a slow client, about one such chunk
# waits in its transport per connection (uvloop reads 256 KB into a new object otherwise; 500 slow readers
# then held some 125 MB more).
READ_SIZE: Final = 128 * 1024


# Compiled (proxy/compiled.py), a class takes interpreted subclasses only when it says so:
# the tests' and bench/engine.py's upstream connections answer in process.
@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamConnection(asyncio.BufferedProtocol):
    __slots__ = (
        "_extra",
        "_head_bytes",
        "_head_request",
        "_headers",
        "_headers_done",
        "_interim",
        "_pending",
        "_reason",
        "_sink",
        "_skip_rest",
        "_switching",
        "_tunnel",
        "_upgrade",
        "closed",
        "framing",
        "idle_since",
        "key",
        "parser",
        "pool",
        "reading_paused",
        "received",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._sink: ResponseSink | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head_request = False
        self._interim = False
        self._skip_rest = False
        self._headers_done = False
        self.framing = FRAMING_NONE
        self.received = False
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        # The end of a response is acted on after the read that held it was parsed (never inside llhttp's
        # callback), so bytes beyond the response's framing cannot be parsed as the next exchange's answer.
        self._pending: tuple[ResponseSink, bool] | None = None
        self._extra = False
        self._head_bytes = 0
        self._upgrade = False  # the request asked to switch protocols
        self._switching = False  # and the upstream answered 101
        self._tunnel: TunnelSink | None = None  # after the 101: where the upstream's raw bytes go

    # --- driven by the request relay ---
    def send(self, head: bytes, sink: ResponseSink, *, head_request: bool, upgrade: bool = False) -> None:
        self._sink = sink
        self._upgrade = upgrade
        self._switching = False
        self._headers = []
        self._reason = b""
        self._head_request = head_request
        self._interim = False
        self._skip_rest = False
        self.received = False
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def detach(self) -> None:
        """The request gave up on this connection (client gone, timeout): it cannot be reused."""
        self._sink = None
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.BufferedProtocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The parser copies what it hands on (headers, body chunks), so the shared buffer is free again after.
        self.data_received(self.pool.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.on_tunnel_data(bytes(data))
            return
        if self._sink is None:
            # Bytes nobody asked for (an idle connection talking): it is no longer safe to reuse.
            if self.transport is not None:
                self.transport.close()
            return
        self.received = True
        sink = self._sink
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if not self._switching:
                self._fail(UpstreamProtocolError("upstream switched protocols unasked"))
                return
            # 101 to an upgrade request: what follows its head belongs to the new protocol.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._sink = None
            self._tunnel = sink.on_upgrade(self._reason, self._headers, bytes(data[offset:]))
            if self._tunnel is None and self.transport is not None:
                self.transport.abort()  # the request was over meanwhile: nobody takes the new protocol
            return
        except httptools.HttpParserError as exc:
            if self._pending is None:
                self._fail(UpstreamProtocolError(f"invalid response from upstream: {exc}"))
                return
            self._extra = True  # garbage after a complete response: the answer stands, the connection goes
        pending = self._pending
        if pending is not None:
            self._pending = None
            done_sink, keep_alive = pending
            done_sink.on_complete(keep_alive and not self._extra)
            return
        if not self._headers_done and self._head_bytes > MAX_RESPONSE_HEAD:
            self._fail(UpstreamProtocolError(f"response head larger than {MAX_RESPONSE_HEAD} bytes"))
            return
        # What one read produced (often head, body and end at once) goes to the client in one write.
        sink.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        tunnel = self._tunnel
        if tunnel is not None:
            self._tunnel = None
            tunnel.on_tunnel_closed()
            return
        sink = self._sink
        if sink is None:
            return
        self._sink = None
        # A close-delimited body is whole only when the upstream closed cleanly; a reset means it was cut.
        if exc is None and self.framing == FRAMING_EOF and not self._interim and self._headers_done:
            sink.on_complete(False)
        else:
            reason = f": {exc}" if exc else ""
            sink.on_error(
                UpstreamConnectError(f"upstream closed the connection before the response was complete{reason}"),
                nothing_received=not self.received,
            )

    def pause_writing(self) -> None:
        sink = self._sink or self._tunnel
        if sink is not None:
            sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        sink = self._sink or self._tunnel
        if sink is not None:
            sink.upstream_resume_writing()

    # --- llhttp callbacks ---
    def on_message_begin(self) -> None:
        if self._pending is not None:
            self._extra = True  # a second response in the same read: the upstream broke framing
        self._headers_done = False
        self._head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        sink = self._sink
        if sink is None:
            return
        status = self.parser.get_status_code()
        if status == 101 and self._upgrade:
            self._switching = True  # llhttp stops after this head; data_received hands over to the tunnel
            return
        if status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows on this parser.
            self._interim = True
            self._headers = []
            self._reason = b""
            return
        self._headers_done = True
        if self._head_request or status == 204 or status == 304:
            framing = FRAMING_NONE
        else:
            framing = FRAMING_EOF
            for name, value in self._headers:
                lower = name.lower()
                if lower == b"content-length":
                    framing = FRAMING_LENGTH
                elif lower == b"transfer-encoding":
                    framing = FRAMING_CHUNKED if value.lower().rstrip().endswith(b"chunked") else FRAMING_EOF
                    break
        self.framing = framing
        sink.on_head(status, self._reason, self._headers, framing)
        if self._head_request and self._sink is sink:
            # llhttp cannot be told a response answers HEAD, so it would wait for Content-Length bytes that
            # never come: finish here and give the next response a fresh parser.
            keep_alive = self.parser.should_keep_alive()
            self._skip_rest = True
            self.parser = httptools.HttpResponseParser(self)
            self._finish(keep_alive)

    def on_body(self, data: bytes) -> None:
        if self._skip_rest or self._sink is None:
            return
        self._sink.on_body(data)

    def on_message_complete(self) -> None:
        if self._switching:
            return  # a 101's head is the whole message; the tunnel starts when llhttp stops
        if self._interim:
            self._interim = False
            return
        if self._skip_rest or self._sink is None:
            return
        self._finish(self.parser.should_keep_alive())

    # --- internals ---
    def _finish(self, keep_alive: bool) -> None:
        sink = self._sink
        self._sink = None
        if sink is not None:
            self._extra = False
            self._pending = (sink, keep_alive and self.framing != FRAMING_EOF)

    def _fail(self, error: ProxyError) -> None:
        sink = self._sink
        self._sink = None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.on_error(error, nothing_received=False)


# Compiled (proxy/compiled.py), a class takes interpreted subclasses only when it says so:
# tests and bench/engine.py subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamPool:
    def __init__(
        self, *, connect_timeout: float, keepalive: int, idle_timeout: float, ca_file: str = "",
    ) -> None:
        self.ca_file = ca_file  # CA bundle TLS upstreams are verified against ("": the system's store)
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._live: Container[tuple[str, int]] | None = None  # instances in some pool (the pools' own view)
        self._ssl_verified: ssl.SSLContext | None = None
        self.read_buffer = memoryview(bytearray(READ_SIZE))  # every connection of this pool reads into it
        self._ssl_unverified: ssl.SSLContext | None = None
        # HTTP/2 connections to the instances of proto=grpc / grpcs routes (set by the app); drained and closed
        # with these.
        self.h2: H2UpstreamPool | None = None

    def take_idle(self, key: PoolKey, now: float) -> UpstreamConnection | None:
        """An idle keep-alive connection to the instance, most recently used first (no await: the fast path)."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_timeout:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.resume_reading()  # a pooled connection always reads, so a close by the upstream is noticed
        live = self._live
        if live is not None and (conn.key[1], conn.key[2]) not in live:
            reusable = False  # the instance left its pool while this request ran: drained, not kept
        if not reusable or conn.closed or conn.transport is None:
            if conn.transport is not None and not conn.closed:
                conn.transport.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.keepalive:
            conn.transport.close()
            return
        conn.idle_since = time.monotonic()  # the event loop's clock (asyncio and uvloop use the monotonic clock)
        idle.append(conn)

    def close_idle_to(self, gone: Collection[tuple[str, int]], live: Container[tuple[str, int]]) -> None:
        """Close idle connections to instances no longer in any pool (drain: the in-flight ones finish on
        their own connections, and are not pooled again). `live` is the pools' view of the instances in use,
        kept up to date by them; `gone` the addresses that left it since the last call."""
        self._live = live
        if self.h2 is not None:
            self.h2.close_idle_to(gone, live)
        if not gone:
            return
        for key in [k for k in self._idle if (k[1], k[2]) in gone]:
            for conn in self._idle.pop(key):
                if conn.transport is not None:
                    conn.transport.close()

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        if self.h2 is not None:
            self.h2.close()

    async def connect(self, key: PoolKey, timeout: float = 0.0) -> UpstreamConnection:
        """A new connection to the instance, within `timeout` (the service's own connect timeout) or else
        connect_timeout; failures are UpstreamConnect* errors."""
        ssl_ctx = self._ssl_context(key[3]) if key[0] == "https" else None
        conn = await open_connection(lambda: UpstreamConnection(self, key), key, ssl_ctx,
                                     timeout or self.connect_timeout)
        self._all.add(conn)
        return conn

    def _ssl_context(self, skip_verify: bool) -> ssl.SSLContext:
        if skip_verify:
            if self._ssl_unverified is None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._ssl_unverified = ctx
            return self._ssl_unverified
        if self._ssl_verified is None:
            self._ssl_verified = ssl.create_default_context(cafile=self.ca_file or None)
        return self._ssl_verified


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def open_connection(factory: Callable[[], P], key: PoolKey, ssl_ctx: ssl.SSLContext | None,
                          timeout: float) -> P:
    """A connection to the instance `key` names (TLS when `ssl_ctx` is given, its server name the route's `sni=`
    or the host) within `timeout`; a failure is UpstreamConnectTimeout or UpstreamConnectError naming it. One
    way to connect for the HTTP/1.1 and the HTTP/2 (gRPC) pools."""
    _, host, port, _, server_name = key
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server_hostname = (server_name or host) if ssl_ctx is not None else None
    try:
        async with asyncio.timeout(timeout):
            _, conn = await asyncio.get_running_loop().create_connection(
                factory, host, port, ssl=ssl_ctx, server_hostname=server_hostname,
            )
    except TimeoutError as exc:
        raise UpstreamConnectTimeout(f"connecting to {authority} timed out") from exc
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror or str(exc) or type(exc).__name__
        raise UpstreamConnectError(f"cannot connect to {authority}: {detail}") from exc
    return conn
