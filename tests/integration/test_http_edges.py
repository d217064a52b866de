"""HTTP/1.1 edge cases through the proxy, seen on the wire from both sides.

The client side is a raw socket (`Wire`) that keeps every byte the proxy sent and tells a clean close (FIN) from a
reset (RST), so framing mistakes cannot hide behind a forgiving HTTP client. The upstream side is either an
aiohttp `Backend` or a `RawUpstream` whose answers are written by hand, byte for byte, to produce what aiohttp
never sends: close-delimited bodies, HTTP/1.0 status lines, interim 1xx answers, bodies cut short, keep-alive
connections dropped between requests. Each test registers its upstream in the real Consul agent under its own
service name and `urlprefix-/<name>` route.

Every wait is bounded by `WAIT`; sleeps only pace a sender, they never stand for an assertion about timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, async_wait_until, pattern_bytes

pytestmark = pytest.mark.integration

WAIT = 5.0  # the bound on any single wait in this module
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
    async def open(cls, port: int) -> Wire:
        loop = asyncio.get_running_loop()
        _, wire = await asyncio.wait_for(loop.create_connection(cls, "127.0.0.1", port), WAIT)
        return wire

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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


class RawUpstream:
    """A loopback HTTP/1.1 server that reads requests properly and answers with whatever `handler` writes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.connections = 0
        self.requests: list[UpstreamRequest] = []  # complete requests, body included
        self.heads: list[str] = []  # "METHOD target" of every request head that arrived, complete or not
        self.head_seen = asyncio.Event()  # set as soon as a request head arrived, before its body
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
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


@pytest.fixture
async def connect(ferryman: FerrymanProcess) -> AsyncIterator[Callable[[], Awaitable[Wire]]]:
    """`wire = await connect()`: a raw client connection to the proxy, aborted after the test."""
    opened: list[Wire] = []

    async def open_wire() -> Wire:
        wire = await Wire.open(ferryman.port)
        opened.append(wire)
        return wire

    yield open_wire
    for wire in opened:
        wire.abort()


async def _route(consul: ConsulAgent, ferryman: FerrymanProcess, name: str, port: int) -> None:
    """Register one instance of service `name` behind `urlprefix-/<name>` and wait until the proxy routes it."""
    instance = f"{name}-1"
    await asyncio.to_thread(consul.register, name, instance, port, [f"urlprefix-/{name}"])
    await asyncio.to_thread(ferryman.wait_instances, f"{name}@*any*/{name}", [instance])


async def _raw(
    upstreams: list[RawUpstream], consul: ConsulAgent, ferryman: FerrymanProcess, name: str, handler: Handler
) -> RawUpstream:
    upstream = await RawUpstream(handler).start()
    upstreams.append(upstream)
    await _route(consul, ferryman, name, upstream.port)
    return upstream


async def _backend(backends: list[Backend], consul: ConsulAgent, ferryman: FerrymanProcess, name: str) -> Backend:
    backend = await Backend(f"{name}-1").start()
    backends.append(backend)
    await _route(consul, ferryman, name, backend.port)
    return backend


# --- the specification ----------------------------------------------------------------------------------------


class TestBodilessResponses:
    """Responses that carry no body by definition are relayed without one, and the connection stays usable."""

    async def test_head_keeps_content_length_sends_no_body_and_the_connection_serves_a_get_next(
        self, consul, ferryman, upstreams, connect
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(ok(b"hello world", b"Content-Type: text/plain\r\n", head=ex.request.method == "HEAD"))
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-head", handler)
        wire = await connect()

        wire.send(request("HEAD", "/edge-head/file"))
        head = await wire.response(method="HEAD")
        assert head.status == 200
        assert head.header("Content-Length") == "11"
        wire.send(request("GET", "/edge-head/file"))
        got = await wire.response()  # a HEAD body leaked onto the wire would be read here as the status line

        assert (got.status, got.body) == (200, b"hello world")
        assert wire.buffer == b"" and wire.ended is None
        assert upstream.connections == 1, "the upstream connection is reused after a HEAD"

    @pytest.mark.parametrize("status_line, fields", [
        pytest.param(b"204 No Content", b"X-Kind: none\r\n", id="204"),
        # A 304 may repeat the Content-Length of the representation it stands for (RFC 9110 §8.6).
        pytest.param(b"304 Not Modified", b'ETag: "v1"\r\nContent-Length: 11\r\n', id="304-with-content-length"),
    ])
    async def test_204_and_304_carry_no_body_and_the_connection_stays_usable(
        self, consul, ferryman, upstreams, connect, status_line, fields
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.request.target.endswith("/empty"):
                ex.writer.write(b"HTTP/1.1 " + status_line + b"\r\n" + fields + b"\r\n")
            else:
                ex.writer.write(ok(b"hello world"))
            return True

        name = f"edge-nobody-{status_line[:3].decode()}"
        upstream = await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        for _ in range(2):
            wire.send(request("GET", f"/{name}/empty"))
            empty = await wire.response()
            assert empty.status == int(status_line[:3])
            assert empty.body == b""
            wire.send(request("GET", f"/{name}/full"))
            full = await wire.response()
            assert (full.status, full.body) == (200, b"hello world")

        assert wire.buffer == b"" and wire.ended is None
        assert upstream.connections == 1


class TestBodyFraming:
    """Chunked and close-delimited bodies arrive whole, framed the way the client's HTTP version allows."""

    @staticmethod
    async def chunked(ex: UpstreamExchange) -> bool:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n")
        for piece in (b"hello ", b"chunked ", b"world"):
            ex.writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await ex.writer.drain()
        ex.writer.write(b"0\r\n\r\n")
        return True

    async def test_chunked_response_reaches_an_http11_client_chunked_and_intact(
        self, consul, ferryman, upstreams, connect
    ):
        await _raw(upstreams, consul, ferryman, "edge-chunk11", self.chunked)
        wire = await connect()

        for _ in range(2):  # and the connection carries the next request
            wire.send(request("GET", "/edge-chunk11/text"))
            resp = await wire.response()
            assert resp.status == 200
            assert resp.chunked
            assert resp.header("Content-Length") is None
            assert resp.body == b"hello chunked world"
        assert wire.ended is None

    async def test_chunked_response_reaches_an_http10_client_close_delimited(
        self, consul, ferryman, upstreams, connect
    ):
        await _raw(upstreams, consul, ferryman, "edge-chunk10", self.chunked)
        wire = await connect()

        wire.send(request("GET", "/edge-chunk10/text", version="HTTP/1.0"))
        resp = await wire.response()

        assert resp.status == 200
        assert resp.header("Transfer-Encoding") is None, "HTTP/1.0 has no chunked coding (RFC 9112 §7.1)"
        assert resp.header("Content-Length") is None
        assert resp.body == b"hello chunked world"
        assert wire.ended == "eof", "the end of the body is the end of the connection"

    @pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
    async def test_close_delimited_response_arrives_whole(self, consul, ferryman, upstreams, connect, version):
        size = 300 * 1024

        async def handler(ex: UpstreamExchange) -> bool:
            # Neither Content-Length nor chunked: the body ends when the upstream closes (RFC 9112 §6.3 rule 8).
            ex.writer.write(f"{version} 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
            for offset in range(0, size, 50_000):
                ex.writer.write(pattern_bytes(offset, min(50_000, size - offset)))
                await ex.writer.drain()
            return False

        name = f"edge-eof-{version[-1]}"
        upstream = await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        for _ in range(2):  # the client connection outlives the upstream one
            wire.send(request("GET", f"/{name}/blob"))
            resp = await wire.response()
            assert resp.status == 200
            assert len(resp.body) == size
            assert resp.body == pattern_bytes(0, size)
        assert upstream.connections == 2

    async def test_http10_upstream_connection_without_keep_alive_is_not_reused(
        self, consul, ferryman, upstreams, connect
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            # An HTTP/1.0 answer without keep-alive ends the connection's use, even if the socket stays open.
            ex.writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-up10", handler)
        wire = await connect()

        for _ in range(2):
            wire.send(request("GET", "/edge-up10/x"))
            resp = await wire.response()
            assert (resp.status, resp.body) == (200, b"hello")
        assert upstream.connections == 2


class TestPipelining:
    """Requests sent back to back on one connection are answered in order."""

    async def test_pipelined_requests_in_one_write_get_responses_in_order(
        self, consul, ferryman, upstreams, connect
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.request.target.endswith("/first"):
                await asyncio.sleep(0.1)  # tempt a proxy that would answer the quicker one first
            return await echo(ex)

        await _raw(upstreams, consul, ferryman, "edge-pipe", handler)
        wire = await connect()

        wire.send(
            request("GET", "/edge-pipe/first")
            + request("POST", "/edge-pipe/second", body=b"payload")
            + request("GET", "/edge-pipe/third")
        )
        answers = [await wire.response() for _ in range(3)]

        assert [r.status for r in answers] == [200, 200, 200]
        seen = [json.loads(r.body) for r in answers]
        assert [(s["method"], s["target"], s["body"]) for s in seen] == [
            ("GET", "/edge-pipe/first", ""), ("POST", "/edge-pipe/second", "payload"), ("GET", "/edge-pipe/third", ""),
        ]
        assert wire.ended is None

    async def test_a_malformed_request_pipelined_after_a_valid_one_does_not_cost_the_valid_one_its_answer(
        self, consul, ferryman, upstreams, connect
    ):
        await _raw(upstreams, consul, ferryman, "edge-pipebad", echo)
        wire = await connect()

        wire.send(request("GET", "/edge-pipebad/valid") + b"this is not http\r\n\r\n")

        try:
            first = await wire.response()
        except Truncated as exc:
            pytest.fail(f"the valid request got no answer; the proxy sent {exc.received!r} and closed ({exc.ended})")
        assert first.status == 200
        assert json.loads(first.body)["target"] == "/edge-pipebad/valid"
        second = await wire.response()
        assert second.status == 400
        await wire.until_closed()


class TestExpectContinue:
    """`Expect: 100-continue` is answered by the proxy once it knows where the body goes, and only then."""

    async def test_client_gets_100_continue_before_sending_the_body_then_the_final_answer(
        self, consul, ferryman, upstreams, connect
    ):
        upstream = await _raw(upstreams, consul, ferryman, "edge-expect", echo)
        wire = await connect()

        wire.send(request("PUT", "/edge-expect/doc", "Expect: 100-continue", "Content-Length: 11"))
        interim = await wire.head()  # the body is not sent yet: without a 100 this wait would time out
        assert (interim.version, interim.status) == ("HTTP/1.1", 100)
        wire.send(b"hello world")
        final = await wire.response()

        assert final.status == 200
        seen = json.loads(final.body)
        assert seen["body"] == "hello world"
        assert "expect" not in {name.lower() for name, _ in seen["headers"]}
        assert len(upstream.requests) == 1
        wire.send(request("GET", "/edge-expect/next"))
        assert (await wire.response()).status == 200

    async def test_no_route_answers_404_without_100_continue(self, ferryman, connect):
        wire = await connect()

        wire.send(request("PUT", "/edge-nowhere/doc", "Expect: 100-continue", "Content-Length: 11"))
        resp = await wire.response()

        assert resp.status == 404, f"expected the 404 first, got {resp.status} {resp.reason}"
        # The body was never sent, so the connection cannot be read on: the proxy closes it.
        assert resp.header("Connection") == "close"
        assert await wire.until_closed() == b""

    async def test_http10_client_gets_no_100_continue(self, consul, ferryman, upstreams, connect):
        upstream = await _raw(upstreams, consul, ferryman, "edge-expect10", echo)
        wire = await connect()

        wire.send(request("PUT", "/edge-expect10/doc", "Expect: 100-continue", "Content-Length: 11",
                          version="HTTP/1.0"))
        await asyncio.wait_for(upstream.head_seen.wait(), WAIT)  # the proxy has chosen where the body goes
        wire.send(b"hello world")
        resp = await wire.response()

        # RFC 9110 §10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request;
        # §15.2: a server MUST NOT send a 1xx response to an HTTP/1.0 client.
        assert resp.status == 200, f"an HTTP/1.0 client got {resp.version} {resp.status} {resp.reason}"
        assert json.loads(resp.body)["body"] == "hello world"


class TestInterimResponses:
    """Interim 1xx answers from the upstream do not disturb the final answer the client reads."""

    @pytest.mark.parametrize("interim", [
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="100-continue"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n", id="103-early-hints"),
    ])
    async def test_final_response_after_an_interim_one_arrives_intact(
        self, consul, ferryman, upstreams, connect, interim
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(interim)
            await ex.writer.drain()
            await asyncio.sleep(0.05)  # a separate read for the proxy, not one buffer with the final answer
            ex.writer.write(ok(b"final answer", b"X-Final: yes\r\n"))
            return True

        name = f"edge-interim-{interim[9:12].decode()}"
        await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        for _ in range(2):
            wire.send(request("POST", f"/{name}/x", body=b"data"))
            resp = await wire.head()
            if interim.startswith(b"HTTP/1.1 100"):
                # The proxy stripped the client's Expect (it answers that itself), so the upstream's 100 is the
                # proxy's to swallow (RFC 9110 §15.2).
                assert resp.status == 200, f"the client got {resp.status} {resp.reason} before the final answer"
            while resp.status < 200:  # a forwarded 103 is allowed; it must be well formed and then end
                resp = await wire.head()
            resp = await wire.body(resp)
            assert (resp.status, resp.header("X-Final"), resp.body) == (200, "yes", b"final answer")
        assert wire.buffer == b"" and wire.ended is None


class TestClientProtocolErrors:
    """A request the proxy cannot read gets the status that says why, and the connection is closed."""

    @pytest.mark.parametrize("raw, status", [
        pytest.param(b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                     400, id="content-length-and-chunked"),
        pytest.param(b"this is not http\r\n\r\n", 400, id="garbage-request-line"),
        # RFC 9112 §6.3: chunked not last in a request's Transfer-Encoding -> MUST answer 400 and close.
        pytest.param(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
                     id="transfer-encoding-not-chunked"),
        pytest.param(b"GET /" + b"a" * 9 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="9KiB-target"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Fill-%d: %b\r\n" % (i, b"v" * 1000)
                                                             for i in range(70)) + b"\r\n",
                     431, id="70KiB-headers"),
    ])
    async def test_malformed_request_gets_its_status_and_the_connection_closed(self, connect, raw, status):
        wire = await connect()

        wire.send(raw)
        try:
            resp = await wire.response()
        except Truncated as exc:
            pytest.fail(f"expected {status}; the proxy sent {exc.received!r} and closed the connection ({exc.ended})")

        assert resp.status == status, resp.body
        assert resp.header("Connection") == "close"
        await wire.until_closed()  # closed (FIN, or RST where part of the request stayed unread)


    async def test_request_refused_as_malformed_never_reaches_the_upstream(
        self, consul, ferryman, upstreams, connect
    ):
        upstream = await _raw(upstreams, consul, ferryman, "edge-te", echo)
        warm = await connect()
        warm.send(request("GET", "/edge-te/warm-up"))  # leaves a pooled connection the next request could take
        assert (await warm.response()).status == 200
        wire = await connect()

        wire.send(b"POST /edge-te/x HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: gzip\r\n\r\n")
        try:
            resp = await wire.response()
        except Truncated as exc:
            resp = Response("", 0, f"nothing: {exc.received!r}, connection ended ({exc.ended})", [])
        warm.send(request("GET", "/edge-te/after"))  # a round trip, so the upstream has read what it was sent
        assert (await warm.response()).status == 200

        assert resp.status == 400, f"expected 400, got {resp.status} {resp.reason}"
        assert upstream.heads == ["GET /edge-te/warm-up", "GET /edge-te/after"]


class TestUpstreamCutsTheBody:
    """An upstream that stops mid-body never yields a complete-looking short response at the client."""

    @pytest.mark.parametrize("name, answer, ending, client_version", [
        pytest.param("edge-cut-length", b"Content-Length: 100000\r\n\r\n" + b"x" * 1000, "fin", "HTTP/1.1",
                     id="content-length"),
        pytest.param("edge-cut-chunked", b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
                     "fin", "HTTP/1.1", id="chunked"),
        # To an HTTP/1.0 client the body is close-delimited: only a reset can say it is incomplete.
        pytest.param("edge-cut-chunked10", b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
                     "fin", "HTTP/1.0", id="chunked-to-http10-client"),
        # A close-delimited body ends cleanly only with a FIN; a reset means the upstream failed mid-body.
        pytest.param("edge-cut-eof-reset", b"\r\n" + b"x" * 1000, "reset", "HTTP/1.1", id="close-delimited-reset"),
    ])
    async def test_client_sees_a_truncated_body(
        self, consul, ferryman, upstreams, connect, name, answer, ending, client_version
    ):
        cut = asyncio.Event()

        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + answer)
            await ex.writer.drain()
            await asyncio.wait_for(cut.wait(), WAIT)  # until the client saw the head: the failure is mid-body
            if ending == "reset":
                reset(ex.writer)
            return False

        await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        wire.send(request("GET", f"/{name}/blob", version=client_version))
        resp = await wire.head()
        assert resp.status == 200
        cut.set()
        with pytest.raises(Truncated) as truncated:
            resp = await wire.body(resp)
            pytest.fail(f"the client read a complete {len(resp.body)}-byte body; the connection ended with "
                        f"{wire.ended}")
        assert truncated.value.received.count(b"x") <= 1000


class TestStaleUpstreamConnections:
    """Keep-alive connections the upstream dropped are retried on a new connection for idempotent requests."""

    async def test_upstream_closing_after_every_keep_alive_response_costs_no_request(
        self, consul, ferryman, upstreams, connect
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(ok(b"n=%d" % ex.connection))  # announces keep-alive, then closes anyway
            return False

        upstream = await _raw(upstreams, consul, ferryman, "edge-drop", handler)
        wire = await connect()

        for _ in range(8):
            wire.send(request("GET", "/edge-drop/x"))
            resp = await wire.response()
            assert resp.status == 200, resp.body
        assert upstream.connections == 8

    async def test_upstream_dropping_a_pooled_connection_as_the_next_request_arrives_costs_no_request(
        self, consul, ferryman, upstreams, connect
    ):
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.index > 0:
                return False  # the keep-alive race: the upstream gave up on the connection just as it was reused
            ex.writer.write(ok(head=ex.request.method == "HEAD"))
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-stale", handler)
        wire = await connect()

        for method in ("GET", "GET", "HEAD", "DELETE", "GET"):
            wire.send(request(method, "/edge-stale/x"))
            resp = await wire.response(method=method)
            assert resp.status == 200, f"{method}: {resp.status} {resp.body!r}"
        assert upstream.connections == 5

    async def test_several_dropped_pooled_connections_cost_no_request(self, consul, ferryman, upstreams, connect):
        both_in = asyncio.Event()
        in_flight = 0

        async def handler(ex: UpstreamExchange) -> bool:
            nonlocal in_flight
            if ex.index > 0:
                return False  # every pooled connection went stale at once (an upstream keep-alive timeout)
            in_flight += 1
            if in_flight >= 2:
                both_in.set()
            await asyncio.wait_for(both_in.wait(), WAIT)  # two requests at once: two pooled connections after
            ex.writer.write(ok())
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-stale2", handler)
        first, second = await connect(), await connect()
        first.send(request("GET", "/edge-stale2/a"))
        second.send(request("GET", "/edge-stale2/b"))
        assert [(await w.response()).status for w in (first, second)] == [200, 200]
        assert upstream.connections == 2

        first.send(request("GET", "/edge-stale2/c"))
        resp = await first.response()

        assert resp.status == 200, f"{resp.status} {resp.body!r} after {upstream.connections} upstream connections"


class TestClientGoesAway:
    """A client that hangs up mid-response is logged as 499 and costs nobody else anything."""

    async def test_client_disconnect_mid_stream_is_499_and_the_proxy_keeps_serving(
        self, consul, ferryman, upstreams, connect
    ):
        hung_up = asyncio.Event()

        async def handler(ex: UpstreamExchange) -> bool:
            if not ex.request.target.endswith("/stream"):
                ex.writer.write(ok(b"still here"))
                return True
            ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            await ex.writer.drain()
            try:  # the rest never comes: wait for the proxy to let go of this connection
                await asyncio.wait_for(ex.reader.read(), WAIT)
            except ConnectionError:
                pass
            hung_up.set()
            return False

        await _raw(upstreams, consul, ferryman, "edge-gone", handler)
        wire = await connect()
        wire.send(request("GET", "/edge-gone/stream"))
        assert (await wire.head()).status == 200
        await wire.take_until(b"first\n")
        wire.close()

        await asyncio.wait_for(hung_up.wait(), WAIT)  # the proxy dropped the upstream side too
        for _ in range(3):
            other = await connect()
            other.send(request("GET", "/edge-gone/other"))
            resp = await other.response()
            assert (resp.status, resp.body) == (200, b"still here")

        async def logged() -> list[int]:
            return [e["status"] for e in ferryman.log_events()
                    if e.get("event") == "access" and e.get("path") == "/edge-gone/stream"]

        assert await async_wait_until(logged, WAIT, "the access log line of the abandoned request") == [499]


class TestRequestBodies:
    """Request bodies bigger than the proxy's buffer arrive intact, however slowly they are sent."""

    async def test_body_over_256KiB_queued_behind_a_slow_request_arrives_intact(
        self, consul, ferryman, backends, connect
    ):
        await _backend(backends, consul, ferryman, "edge-buffered")
        size = 640 * 1024
        payload = os.urandom(size)
        wire = await connect()

        # The upload is pipelined behind a slow request, so the proxy must buffer it, then stop reading at its
        # bound, then resume once the upload's turn comes.
        wire.send(request("GET", "/edge-buffered/slow?delay=0.3"))
        wire.send(request("POST", "/edge-buffered/upload", f"Content-Length: {size}"))
        for offset in range(0, size, 32 * 1024):
            wire.send(payload[offset : offset + 32 * 1024])
            await wire.drain()
            await asyncio.sleep(0.005)
        slow = await wire.response()
        upload = await wire.response()

        assert (slow.status, slow.body) == (200, b"late\n")
        assert upload.status == 200, upload.body
        assert json.loads(upload.body) == {"sha256": hashlib.sha256(payload).hexdigest(), "size": size,
                                           "chunked": False}

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    async def test_upload_slower_than_the_read_timeout_arrives_intact(
        self, consul, ferryman, backends, connect, framing
    ):
        # The upstream is silent while the body is still coming: that is not an upstream timeout (README:
        # read_timeout is "the longest silence of an upstream"; here the client is the one still talking).
        await _backend(backends, consul, ferryman, f"edge-slowup-{framing}")
        size, piece = 320 * 1024, 16 * 1024
        payload = os.urandom(size)
        wire = await connect()

        framing_header = f"Content-Length: {size}" if framing == "content-length" else "Transfer-Encoding: chunked"
        wire.send(request("POST", f"/edge-slowup-{framing}/upload", framing_header))
        for offset in range(0, size, piece):  # 20 pieces, 75 ms apart: 1.5 s, the fixture's read timeout is 1 s
            data = payload[offset : offset + piece]
            wire.send(data if framing == "content-length" else b"%x\r\n%b\r\n" % (len(data), data))
            await wire.drain()
            await asyncio.sleep(0.075)
            if wire.ended is not None or wire.buffer:
                break  # the proxy answered early: the assertion below says with what
        if framing == "chunked" and wire.ended is None and not wire.buffer:
            wire.send(b"0\r\n\r\n")
        resp = await wire.response()

        assert resp.status == 200, f"{resp.status} {resp.body!r}"
        assert json.loads(resp.body)["sha256"] == hashlib.sha256(payload).hexdigest()

