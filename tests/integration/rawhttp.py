"""Raw HTTP/1.1 on both sides of the proxy, for integration tests that look at the wire.

The client side is `Wire`, an asyncio protocol on a raw connection to the proxy that keeps every byte the proxy
sent and tells a clean close (FIN) from a reset (RST), so framing mistakes cannot hide behind a forgiving HTTP
client. The upstream side is `RawUpstream`, a loopback server that reads requests properly and answers with
whatever its handler writes, byte for byte. `route` registers an upstream in the real Consul agent under its own
service name and `urlprefix-/<name>` route and waits until the proxy routes it.

Every wait here is bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self, cast

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess

WAIT = 5.0  # the bound on any single wait
HOST = b"edge.test"


# --- the client side: a raw connection to the proxy ------------------------------------------------------------


class Truncated(Exception):
    """The connection ended before the response it carried was complete."""

    def __init__(self, what: str, received: bytes, ended: str | None) -> None:
        super().__init__(f"connection ended ({ended}) while reading {what}; {len(received)} bytes kept")
        self.received = received
        self.ended = ended


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def _parse_head(raw: bytes) -> Response:
    start, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, status, *reason = start.split(" ", 2)
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        assert sep, f"malformed header line {line!r} in {raw!r}"
        headers.append((name, value.strip()))
    return Response(version, int(status), reason[0] if reason else "", headers)


class Wire(asyncio.Protocol):
    """A raw client connection to the proxy: keeps every byte received and how the connection ended."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended: str | None = None  # "eof" for a clean close (FIN), "reset" for an abort (RST)
        self._changed = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    async def open(cls, port: int, *, receive_buffer: int | None = None) -> Wire:
        """Connect to the proxy; `receive_buffer` fixes the socket's SO_RCVBUF (before connecting, so the TCP
        window follows it) for a client whose every read takes only a little."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), WAIT)
            _, wire = await asyncio.wait_for(loop.create_connection(cls, sock=sock), WAIT)
        except BaseException:
            sock.close()
            raise
        return wire

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A connection's transport (asyncio's or uvloop's) is a full Transport; the Protocol API types it BaseTransport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._changed.set()

    def eof_received(self) -> bool:
        self.ended = self.ended or "eof"
        self._changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended is None:  # the first signal counts: a reset after a FIN answers a write of ours
            self.ended = "reset" if exc is not None else "eof"
        self._changed.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- sending ---
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        await asyncio.wait_for(self._writable.wait(), WAIT)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- receiving, every wait bounded ---
    async def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(WAIT):
            while not ready():
                if self.ended is not None:
                    raise Truncated(what, bytes(self.buffer), self.ended)
                self._changed.clear()
                await self._changed.wait()

    async def take_until(self, separator: bytes, what: str = "") -> bytes:
        await self._wait_for(lambda: separator in self.buffer, what or f"up to {separator!r}")
        end = self.buffer.index(separator) + len(separator)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def take(self, size: int, what: str = "") -> bytes:
        await self._wait_for(lambda: len(self.buffer) >= size, what or f"{size} bytes")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def trickle(self, size: int, pace: float) -> None:
        """Receive until `size` bytes are buffered, one socket read at a time with `pace` seconds between reads:
        a client that reads slower than the proxy writes, so the socket buffers on the way stay full."""
        assert self.transport is not None
        try:
            while len(self.buffer) < size:
                before = len(self.buffer)
                self.transport.resume_reading()

                def grew(n: int = before) -> bool:
                    return len(self.buffer) > n

                await self._wait_for(grew, f"{size} bytes, read slowly")
                self.transport.pause_reading()
                await asyncio.sleep(pace)
        finally:
            if not self.transport.is_closing():
                self.transport.resume_reading()

    async def until_closed(self) -> bytes:
        """Everything up to the end of the connection, however it ended (see `ended`)."""
        async with asyncio.timeout(WAIT):
            while self.ended is None:
                self._changed.clear()
                await self._changed.wait()
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def head(self) -> Response:
        return _parse_head(await self.take_until(b"\r\n\r\n", "a response head"))

    async def body(self, resp: Response, *, method: str = "GET") -> Response:
        """Read the body `resp` announces, by the framing rules of RFC 9112 §6.3."""
        if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
            return resp
        te = resp.header("Transfer-Encoding")
        length = resp.header("Content-Length")
        if te is not None and te.lower().endswith("chunked"):
            resp.chunked = True
            body = bytearray()
            while True:
                try:
                    line = await self.take_until(b"\r\n", "a chunk size line")
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while await self.take_until(b"\r\n", "the trailer section") != b"\r\n":
                            pass
                        break
                    body += await self.take(size, "chunk data")
                    assert await self.take(2, "a chunk's CRLF") == b"\r\n"
                except Truncated as exc:
                    raise Truncated("a chunked body", bytes(body) + exc.received, exc.ended) from None
            resp.body = bytes(body)
        elif length is not None:
            try:
                resp.body = await self.take(int(length), "a Content-Length body")
            except Truncated as exc:
                raise Truncated(f"a body of {length} bytes", exc.received, exc.ended) from None
        else:
            data = await self.until_closed()
            if self.ended == "reset":
                raise Truncated("a close-delimited body", data, self.ended)
            resp.body = data
        return resp

    async def response(self, *, method: str = "GET") -> Response:
        return await self.body(await self.head(), method=method)


def request(method: str, target: str, *headers: str, body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", f"Host: {HOST.decode()}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- the upstream side: answers written by hand ---------------------------------------------------------------


@dataclass
class UpstreamRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class UpstreamExchange:
    """One request as a `RawUpstream` handler sees it, with the connection it came on."""

    request: UpstreamRequest
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    connection: int  # which connection of the upstream's, from 0
    index: int  # which request on that connection, from 0


Handler = Callable[[UpstreamExchange], Awaitable[bool]]  # returns whether to keep the connection for another request


async def _read_request(reader: asyncio.StreamReader) -> UpstreamRequest | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None  # the proxy closed an idle connection
    start, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, target, version = start.split(" ", 2)
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    return UpstreamRequest(method, target, version, headers)


async def _read_body(reader: asyncio.StreamReader, req: UpstreamRequest) -> bytes:
    if (req.header("Transfer-Encoding") or "").lower().endswith("chunked"):
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return await reader.readexactly(int(req.header("Content-Length") or 0))


class LoopbackServer:
    """A TCP server on a free loopback port: `start` binds it and returns it, `stop` closes it and cuts every
    connection it still has. Subclasses serve connections in `_serve`, registering each writer in `_writers`."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RawUpstream(LoopbackServer):
    """A loopback HTTP/1.1 server that reads requests properly and answers with whatever `handler` writes."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.connections = 0
        self.requests: list[UpstreamRequest] = []  # complete requests, body included
        self.heads: list[str] = []  # "METHOD target" of every request head that arrived, complete or not
        self.head_seen = asyncio.Event()  # set as soon as a request head arrived, before its body
        self._tasks: set[asyncio.Task[Any]] = set()

    async def stop(self) -> None:
        await super().stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        connection = self.connections
        self.connections += 1
        try:
            index = 0
            while True:
                req = await _read_request(reader)
                if req is None:
                    break
                self.heads.append(f"{req.method} {req.target}")
                self.head_seen.set()
                req.body = await _read_body(reader, req)
                self.requests.append(req)
                if not await self.handler(UpstreamExchange(req, reader, writer, connection, index)):
                    break
                await writer.drain()
                index += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop() ends the handlers it started; ending quietly spares asyncio's "exception in callback"
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of a clean FIN."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def ok(body: bytes = b"ok", *extra: bytes, head: bool = False) -> bytes:
    """A keep-alive 200 with a Content-Length; `head=True` leaves the body out, as an answer to HEAD must."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), b"".join(extra), b"" if head else body)


async def echo(ex: UpstreamExchange) -> bool:
    """200 with a JSON account of what arrived: method, target, headers, body."""
    req = ex.request
    ex.writer.write(ok(json.dumps({
        "method": req.method, "target": req.target, "headers": req.headers, "body": req.body.decode("latin-1"),
    }).encode(), b"Content-Type: application/json\r\n"))
    return True


# --- fixtures and set-up --------------------------------------------------------------------------------------


@pytest.fixture
async def upstreams() -> AsyncIterator[list[RawUpstream]]:
    started: list[RawUpstream] = []
    yield started
    for upstream in started:
        await upstream.stop()


class Connect(Protocol):
    """What the `connect` fixture gives a test: `wire = await connect()` opens a raw connection to the proxy."""

    def __call__(self, *, receive_buffer: int | None = None) -> Awaitable[Wire]: ...


@pytest.fixture
async def connect(ferryman: FerrymanProcess) -> AsyncIterator[Connect]:
    """`wire = await connect()`: a raw client connection to the proxy, aborted after the test."""
    opened: list[Wire] = []

    async def open_wire(*, receive_buffer: int | None = None) -> Wire:
        wire = await Wire.open(ferryman.port, receive_buffer=receive_buffer)
        opened.append(wire)
        return wire

    yield open_wire
    for wire in opened:
        wire.abort()


async def route(consul: ConsulAgent, ferryman: FerrymanProcess, name: str, port: int) -> None:
    """Register one instance of service `name` behind `urlprefix-/<name>` and wait until the proxy routes it."""
    instance = f"{name}-1"
    await asyncio.to_thread(consul.register, name, instance, port, [f"urlprefix-/{name}"])
    await asyncio.to_thread(ferryman.wait_instances, f"{name}@*any*/{name}", [instance])


async def routed_raw(
    upstreams: list[RawUpstream], consul: ConsulAgent, ferryman: FerrymanProcess, name: str, handler: Handler
) -> RawUpstream:
    upstream = await RawUpstream(handler).start()
    upstreams.append(upstream)
    await route(consul, ferryman, name, upstream.port)
    return upstream


async def routed_backend(backends: list[Backend], consul: ConsulAgent, ferryman: FerrymanProcess, name: str) -> Backend:
    backend = await Backend(f"{name}-1").start()
    backends.append(backend)
    await route(consul, ferryman, name, backend.port)
    return backend


# --- a recording upstream: every byte kept, framed the way a careless backend would ----------------------------


class Unframeable(Exception):
    """Bytes a `RecordingUpstream` could not read as a request: the proxy let something through it should not."""


def _careless_head(raw: bytes) -> tuple[UpstreamRequest, int, int]:
    """A request head read as a CGI/WSGI-style backend reads it, at its most trusting: `_` and `-` in names are the
    same (HTTP_TRANSFER_ENCODING), a Content-Length with a leading zero is octal, any Transfer-Encoding that says
    `chunked` is chunked. Returns the request, the head's length and the body length (-1: chunked)."""
    end = raw.index(b"\r\n\r\n") + 4
    start, *lines = raw[: end - 4].decode("latin-1").split("\r\n")
    parts = start.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Unframeable(f"request line {start!r}")
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Unframeable(f"header line {line!r}")
        headers.append((name, value.strip()))
    length = 0
    for name, value in headers:
        cgi = name.upper().replace("-", "_")
        if cgi == "TRANSFER_ENCODING" and "chunked" in value.lower():
            length = -1
        elif cgi == "CONTENT_LENGTH" and length != -1:
            length = int(value, 8) if value.startswith("0") and len(value) > 1 else int(value)
    return UpstreamRequest(parts[0], parts[1], parts[2], headers), end, length


def _careless_chunks(raw: bytes, at: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        line_end = raw.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(raw[at:line_end].split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            trailer_end = raw.find(b"\r\n\r\n", at - 2)
            return (bytes(body), trailer_end + 4) if trailer_end >= 0 else None
        if len(raw) < at + size + 2:
            return None
        body += raw[at : at + size]
        at += size + 2


class RecordingUpstream(LoopbackServer):
    """A loopback HTTP/1.1 server that keeps every byte it receives, per connection, and answers every request it
    reads there with `200` and the body `METHOD target`. It frames requests as carelessly as real backends do
    (see `_careless_head`), so a request the proxy relays ambiguously shows up here as a request nobody sent, or
    as bytes it cannot read (`unframeable`)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytearray] = []  # every byte received, one entry per connection
        self.requests: list[UpstreamRequest] = []
        self.unframeable: list[str] = []

    @property
    def seen(self) -> list[str]:
        return [f"{r.method} {r.target}" for r in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        received = bytearray()
        self.raw.append(received)
        pending = b""
        try:
            while data := await reader.read(65536):
                received += data
                pending += data
                while b"\r\n\r\n" in pending:
                    req, at, length = _careless_head(pending)
                    if length == -1:
                        chunks = _careless_chunks(pending, at)
                        if chunks is None:
                            break
                        req.body, at = chunks
                    elif len(pending) < at + length:
                        break
                    else:
                        req.body, at = pending[at : at + length], at + length
                    pending = pending[at:]
                    self.requests.append(req)
                    writer.write(ok(f"{req.method} {req.target}".encode()))
        except (Unframeable, ValueError) as exc:
            self.unframeable.append(f"{exc}: {bytes(pending[:200])!r}")
            writer.transport.abort()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
