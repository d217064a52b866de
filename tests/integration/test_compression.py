"""Response compression through a real Ferryman (gzip_content_type, Fabio's proxy.gzip.contenttype), seen by
curl --compressed and on raw sockets: what is compressed for whom, what never is, and that compressing keeps
streaming (an SSE stream's events arrive while it is open; a large body passes with bounded memory).

Every wait is bounded (`WAIT`); sleeps only pace a sender or a reader, never stand for an assertion.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import subprocess
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import brotli
import pytest
from aiohttp import web

from .harness import Backend, ConsulAgent, FerrymanProcess
from .rawhttp import WAIT, Connect, Response, request
from .rawhttp import connect as connect  # pytest fixtures, requested by name
from .test_memory_bound import Sampler, rss_kib

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Fabio's documented example for proxy.gzip.contenttype.
FABIO_TYPES = r"^(text/.*|application/(javascript|json|font-woff|xml)|.*\+(json|xml))(;.*)?$"
MIB = 1024 * 1024


def _text(size: int, seed: int = 7) -> bytes:
    """Words drawn from a small vocabulary: text that compresses about as well as real pages (2-3x)."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
                  for _ in range(2000)]
    out = " ".join(rng.choice(vocabulary) for _ in range(size // 4)).encode()
    while len(out) < size:
        out += out
    return out[:size]


TEXT = _text(64 * 1024)
BLOCK = _text(MIB, seed=11)  # the large body repeats it: further apart than deflate's 32 KiB window
LARGE = 32 * MIB
ENCODED = gzip.compress(TEXT, mtime=0)  # what an upstream that compresses itself sends


class TextBackend(Backend):
    """`/<route>/<action>`: answers for each case of the specification."""

    def __init__(self, instance: str) -> None:
        super().__init__(instance)
        self.sse_gate = asyncio.Event()

    async def _do_text(self, request: web.Request) -> web.Response:
        return web.Response(body=TEXT, headers={"Content-Type": "text/plain; charset=utf-8", "ETag": '"v1"',
                                                 "Vary": "Origin", "Accept-Ranges": "bytes"})

    async def _do_small(self, request: web.Request) -> web.Response:
        return web.Response(body=TEXT[:100], content_type="text/plain")

    async def _do_png(self, request: web.Request) -> web.Response:
        return web.Response(body=TEXT, content_type="image/png")

    async def _do_encoded(self, request: web.Request) -> web.Response:
        return web.Response(body=ENCODED, headers={"Content-Type": "text/plain",
                                                               "Content-Encoding": "gzip"})

    async def _do_notransform(self, request: web.Request) -> web.Response:
        return web.Response(body=TEXT, headers={"Content-Type": "text/plain", "Cache-Control": "no-transform"})

    async def _do_ranged(self, request: web.Request) -> web.Response:
        if "Range" in request.headers:  # always bytes=0-99 here
            return web.Response(status=206, body=TEXT[:100], headers={
                "Content-Type": "text/plain", "Content-Range": f"bytes 0-99/{len(TEXT)}"})
        return web.Response(body=TEXT, content_type="text/plain")

    async def _do_cached(self, request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=TEXT, headers={"Content-Type": "text/plain", "ETag": '"v1"'})

    async def _do_events(self, request: web.Request) -> web.StreamResponse:
        """One event, then nothing until the test saw it through the proxy, then a second and the end."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(self.sse_gate.wait(), WAIT)
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    async def _do_large(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = LARGE
        await resp.prepare(request)
        view = memoryview(BLOCK)
        for offset in range(0, LARGE, 256 * 1024):
            await resp.write(view[offset % MIB:offset % MIB + 256 * 1024])
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def ferryman(consul: ConsulAgent, workdir: Path) -> Iterator[FerrymanProcess]:
    """This module's Ferryman compresses Fabio's example types (the raw-socket `connect` fixture uses it)."""
    proc = FerrymanProcess(consul.addr, workdir, extra=["--gzip-content-type", FABIO_TYPES])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def backend(consul: ConsulAgent, ferryman: FerrymanProcess) -> AsyncIterator[TextBackend]:
    """Service `gz` behind `urlprefix-/gz`, and `gz-off` behind `urlprefix-/gz-off gzip=off`."""
    started = await TextBackend("gz").start()
    for name, tags in (("gz", ["urlprefix-/gz"]), ("gz-off", ["urlprefix-/gz-off gzip=off"])):
        instance = f"{name}-{started.port}"  # a new one per test: routed only once the proxy has this backend
        await asyncio.to_thread(consul.register, name, instance, started.port, tags)
        await asyncio.to_thread(ferryman.wait_instances, f"{name}@*any*/{name}", [instance])
    yield started
    for name in ("gz", "gz-off"):
        await asyncio.to_thread(consul.deregister, f"{name}-{started.port}")
    await started.stop()


def curl(url: str, *args: str) -> tuple[dict[str, str], bytes]:
    """curl's response headers (lower-case names, the last response's) and body, the body decoded by curl."""
    done = subprocess.run(["curl", "-sS", "--max-time", str(WAIT), "-D", "-", *args, url],
                          capture_output=True, check=True)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


async def get(connect: Connect, target: str, *headers: str, method: str = "GET",
              version: str = "HTTP/1.1") -> Response:
    wire = await connect()
    wire.send(request(method, target, *headers, version=version))
    return await wire.response(method=method)


class TestCompressedForClientsThatAsk:
    """A matching answer is compressed for a client that accepts gzip (or rates br above it), and decodes to
    the upstream's bytes."""

    async def test_curl_compressed_gets_gzip_and_the_same_text(
        self, ferryman: FerrymanProcess, backend: TextBackend
    ) -> None:
        headers, body = await asyncio.to_thread(curl, f"{ferryman.url}/gz/text", "--compressed")
        assert body == TEXT
        assert headers["content-encoding"] == "gzip"  # curl sends gzip, deflate, br, zstd: br not rated higher
        assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
        assert headers["vary"] == "Origin, Accept-Encoding"
        assert headers["etag"] == 'W/"v1"'
        assert "accept-ranges" not in headers

    async def test_raw_body_is_gzip_and_smaller(self, connect: Connect, backend: TextBackend) -> None:
        resp = await get(connect, "/gz/text", "Accept-Encoding: gzip")
        assert resp.chunked and resp.header("Content-Encoding") == "gzip"
        assert len(resp.body) < len(TEXT) // 2
        assert gzip.decompress(resp.body) == TEXT

    async def test_brotli_when_the_client_rates_it_above_gzip(
        self, ferryman: FerrymanProcess, backend: TextBackend
    ) -> None:
        headers, body = await asyncio.to_thread(
            curl, f"{ferryman.url}/gz/text", "--compressed", "-H", "Accept-Encoding: br;q=1, gzip;q=0.5")
        assert headers["content-encoding"] == "br"
        assert body == TEXT

    async def test_an_http10_client_gets_a_close_delimited_gzip_body(
        self, connect: Connect, backend: TextBackend
    ) -> None:
        resp = await get(connect, "/gz/text", "Accept-Encoding: gzip", version="HTTP/1.0")
        assert resp.header("Content-Encoding") == "gzip"
        assert resp.header("Transfer-Encoding") is None and resp.header("Content-Length") is None
        assert resp.header("Connection") == "close"
        assert gzip.decompress(resp.body) == TEXT

    async def test_counted_in_metrics(self, ferryman: FerrymanProcess, backend: TextBackend) -> None:
        await asyncio.to_thread(curl, f"{ferryman.url}/gz/text", "-H", "Accept-Encoding: gzip")
        _, metrics = await asyncio.to_thread(curl, f"{ferryman.admin_url}/metrics")
        lines = {line.partition(" ")[0]: float(line.partition(" ")[2]) for line in metrics.decode().splitlines()
                 if line.startswith("ferryman_compress")}
        assert lines['ferryman_compressed_responses_total{encoding="gzip"}'] >= 1
        assert (lines['ferryman_compression_output_bytes_total{encoding="gzip"}']
                < lines['ferryman_compression_input_bytes_total{encoding="gzip"}'])


class TestNeverCompressed:
    """What goes out exactly as the upstream sent it: to clients that did not ask, and for answers that must
    not or need not be compressed."""

    @pytest.mark.parametrize("accept", [None, "gzip;q=0", "identity", "deflate", ""],
                             ids=["no-accept-encoding", "gzip-q-0", "identity", "deflate-only", "empty"])
    async def test_a_client_that_did_not_ask_gets_the_identity_body(
        self, connect: Connect, backend: TextBackend, accept: str | None
    ) -> None:
        headers = () if accept is None else (f"Accept-Encoding: {accept}",)
        resp = await get(connect, "/gz/text", *headers)
        assert resp.header("Content-Encoding") is None
        assert resp.header("Content-Length") == str(len(TEXT)) and not resp.chunked
        assert resp.body == TEXT
        assert resp.header("Vary") == "Origin, Accept-Encoding"  # caches keep the two answers apart
        assert resp.header("ETag") == '"v1"'

    async def test_head_keeps_the_upstream_head_and_the_connection(
        self, connect: Connect, backend: TextBackend
    ) -> None:
        wire = await connect()
        wire.send(request("HEAD", "/gz/text", "Accept-Encoding: gzip"))
        head = await wire.response(method="HEAD")
        assert head.header("Content-Encoding") is None and head.header("Content-Length") == str(len(TEXT))
        wire.send(request("GET", "/gz/small", "Accept-Encoding: gzip"))  # a leaked body would be read here
        assert (await wire.response()).body == TEXT[:100]

    async def test_304_goes_out_as_it_came(self, connect: Connect, backend: TextBackend) -> None:
        resp = await get(connect, "/gz/cached", "Accept-Encoding: gzip", 'If-None-Match: "v1"')
        assert resp.status == 304
        assert resp.header("Content-Encoding") is None and resp.header("ETag") == '"v1"'

    async def test_a_range_gets_its_206_as_it_came(self, connect: Connect, backend: TextBackend) -> None:
        resp = await get(connect, "/gz/ranged", "Accept-Encoding: gzip", "Range: bytes=0-99")
        assert resp.status == 206
        assert resp.header("Content-Encoding") is None
        assert resp.body == TEXT[:100]

    @pytest.mark.parametrize(("action", "body"), [
        ("encoded", ENCODED), ("notransform", TEXT), ("small", TEXT[:100]), ("png", TEXT),
    ], ids=["already-encoded", "no-transform", "below-min-length", "type-not-matched"])
    async def test_answers_that_are_not_compressed(
        self, connect: Connect, backend: TextBackend, action: str, body: bytes
    ) -> None:
        resp = await get(connect, f"/gz/{action}", "Accept-Encoding: gzip")
        assert resp.body == body
        assert resp.header("Content-Length") == str(len(body))
        assert resp.header("Content-Encoding") == ("gzip" if action == "encoded" else None)

    async def test_a_route_with_gzip_off(self, connect: Connect, backend: TextBackend) -> None:
        resp = await get(connect, "/gz-off/text", "Accept-Encoding: gzip")
        assert resp.header("Content-Encoding") is None and resp.body == TEXT
        assert resp.header("Vary") == "Origin"  # untouched


class TestStreaming:
    """Compressing never waits for more of the body than one upstream read, nor holds a whole body."""

    async def test_sse_events_arrive_while_the_stream_is_open(
        self, connect: Connect, backend: TextBackend
    ) -> None:
        wire = await connect()
        wire.send(request("GET", "/gz/events", "Accept-Encoding: gzip", "Accept: text/event-stream"))
        head = await wire.head()
        assert head.header("Content-Encoding") == "gzip" and head.header("Transfer-Encoding") == "chunked"
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        seen = b""
        async with asyncio.timeout(WAIT):  # the upstream holds the stream open until the first event was seen
            while b"data: first\n\n" not in seen:
                size = int((await wire.take_until(b"\r\n")).strip(), 16)
                seen += decoder.decompress(await wire.take(size))
                assert await wire.take(2) == b"\r\n"
        backend.sse_gate.set()
        rest = await wire.body(head)
        assert seen + decoder.decompress(rest.body) + decoder.flush() == b"data: first\n\ndata: second\n\n"

    async def test_a_large_body_streams_with_bounded_memory(
        self, ferryman: FerrymanProcess, backend: TextBackend, tmp_path: Path
    ) -> None:
        assert ferryman.proc is not None
        pid = ferryman.proc.pid
        await asyncio.to_thread(curl, f"{ferryman.url}/gz/text", "--compressed")  # warm the compression path
        baseline = rss_kib(pid)
        sampler = Sampler(pid)
        sampler.start()
        out = tmp_path / "large"
        try:
            # Paced: the upstream's 32 MiB would pile up in the proxy if it did not pass flow control through.
            await asyncio.to_thread(curl, f"{ferryman.url}/gz/large", "--compressed", "--limit-rate", "12M",
                                    "-o", str(out))
        finally:
            sampler.halt.set()
            await asyncio.to_thread(sampler.join)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(BLOCK * (LARGE // MIB)).digest()
        growth_mib = (sampler.peak - baseline) / 1024
        print(f"RSS growth {growth_mib:.1f} MiB")
        assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB relaying a {LARGE // MIB} MiB body"


async def test_a_route_with_gzip_on_compresses_when_the_setting_is_off(
    consul: ConsulAgent, workdir: Path
) -> None:
    """gzip=on compresses Fabio's example types on that route alone; the proxy's other routes stay as they are."""
    proxy = FerrymanProcess(consul.addr, workdir)
    await asyncio.to_thread(proxy.start)
    started = await TextBackend("gzon-1").start()
    try:
        for name, tags in (("gzon", ["urlprefix-/gzon gzip=on"]), ("gzplain", ["urlprefix-/gzplain"])):
            await asyncio.to_thread(consul.register, name, f"{name}-1", started.port, tags)
            await asyncio.to_thread(proxy.wait_instances, f"{name}@*any*/{name}", [f"{name}-1"])
        on, on_body = await asyncio.to_thread(curl, f"{proxy.url}/gzon/text", "--compressed")
        plain, plain_body = await asyncio.to_thread(curl, f"{proxy.url}/gzplain/text", "--compressed")
        assert on["content-encoding"] == "gzip" and on_body == TEXT
        assert "content-encoding" not in plain and plain["vary"] == "Origin" and plain_body == TEXT
        raw, _ = await asyncio.to_thread(curl, f"{proxy.url}/gzon/text", "-H", "Accept-Encoding: br")
        assert raw["content-encoding"] == "br"
        assert brotli.decompress((await asyncio.to_thread(
            curl, f"{proxy.url}/gzon/text", "-H", "Accept-Encoding: br"))[1]) == TEXT
    finally:
        await started.stop()
        await asyncio.to_thread(proxy.stop)
