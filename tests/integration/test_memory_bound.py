"""Backpressure, not buffering: slow readers do not make Ferryman's memory grow with the bodies it relays.

A scaled-down, real version of bench/memory.py (500 slow clients x 10 MiB, RSS < 300 MiB): a fresh Ferryman,
one backend streaming large bodies from a precomputed buffer, CLIENTS concurrent clients that each read their
whole body (length and content checked) SLOW_RATE per second for the first SLOW_FOR seconds, then as fast as
they can (so the test stays short). Ferryman's VmRSS is sampled all along; its growth over the baseline must
stay under GROWTH_BOUND.

Why bodies of 12 MiB and not smaller: on loopback the kernel takes about 4 MiB into the send buffer of each
proxy->client socket even when the client reads nothing (tcp_wmem's max, reached by autotuning), and more on the
backend's side. A proxy that relayed without backpressure would hold only what the kernel does not, so with
4 MiB bodies it would pass any bound (measured: +12 MiB for 100 clients x 4 MiB with pausing switched off).
With 12 MiB bodies it would hold about CLIENTS x 8 MiB (measured with Ferryman's pausing switched off: +522 MiB);
with backpressure each slow connection holds about one upstream read, < 0.4 MiB (measured: +17..21 MiB in all).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from .harness import Backend, ConsulAgent, FerrymanProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1024 * 1024
CLIENTS = 64
BODY = 12 * MIB
SLOW_RATE = 256 * 1024  # bytes per second per client while slow
SLOW_FOR = 4.0  # seconds each client reads slowly before draining the rest fast
READ = 32 * 1024  # bytes per read while slow
GROWTH_BOUND = 64 * MIB
DEADLINE = 45.0
PERIOD = 251  # body byte at offset o is o % 251
BLOB = memoryview((bytes(range(PERIOD)) * (BODY // PERIOD + 1))[:BODY])


class BlobBackend(Backend):
    """`.../blob` answers BODY pattern bytes from one buffer (Backend's /download hashes every 32 bytes: too slow
    for a GiB) and records how long after the request it handed over the last byte."""

    def __init__(self, instance: str) -> None:
        super().__init__(instance)
        self.handover: list[float] = []

    async def _do_blob(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = BODY
        await resp.prepare(request)
        for offset in range(0, BODY, 256 * 1024):
            await resp.write(BLOB[offset : offset + 256 * 1024])  # waits while the proxy does not read
        await resp.write_eof()
        self.handover.append(time.monotonic() - started)
        return resp


def _handing_over(reader: Reader) -> Callable[[], Reader]:
    """A protocol factory for one connection that hands it a protocol object made beforehand."""
    return lambda: reader


class Reader(asyncio.BufferedProtocol):
    """One GET; reads the whole body, paced while slow, checking length and content as it goes."""

    def __init__(self, request: bytes) -> None:
        self.loop = asyncio.get_running_loop()
        self.request = request
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.small = memoryview(bytearray(READ))
        self.large = memoryview(bytearray(256 * 1024))
        self.buf = self.small
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""
        self.length = -1
        self.received = 0
        self.t0 = 0.0
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A connection's transport (asyncio's or uvloop's) is a full Transport; the Protocol API types it BaseTransport.
        self.transport = cast(asyncio.Transport, transport)
        self.t0 = self.loop.time()
        self.transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buf[:nbytes]
        if self.head is not None:
            self.head += bytes(data)
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.head[:end].split(b"\r\n")
            rest = memoryview(self.head[end + 4 :])
            self.head = None
            if lines[0].split(b" ")[1:2] != [b"200"]:
                return self._fail(f"status line {lines[0]!r}")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = int(value)
            if self.length != BODY:
                return self._fail(f"Content-Length {self.length}")
            data = rest
        n = len(data)
        if n:
            off = self.received
            if data[0] != off % PERIOD or data[n - 1] != (off + n - 1) % PERIOD:
                return self._fail(f"wrong bytes at body offset {off}")
            self.received += n
        if self.received >= self.length:
            if self.received > self.length:
                return self._fail(f"{self.received} bytes for Content-Length {self.length}")
            if not self.done.done():
                self.done.set_result(None)
            assert self.transport is not None
            self.transport.close()
            return
        now = self.loop.time()
        if now - self.t0 < SLOW_FOR:
            due = self.t0 + self.received / SLOW_RATE
            if due > now:
                assert self.transport is not None
                self.transport.pause_reading()
                self.loop.call_later(due - now, self._resume)
        else:
            self.buf = self.large

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _fail(self, why: str) -> None:
        self.error = why
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.error = f"connection lost after {self.received} of {self.length} body bytes"
            self.done.set_result(None)


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


class Sampler(threading.Thread):
    """VmRSS of one process every 0.1 s, in a thread (the test's event loop is busy with the clients)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self.halt.wait(0.1)


async def test_slow_readers_do_not_grow_memory_with_the_bodies(consul: ConsulAgent, workdir: Path) -> None:
    backend = await BlobBackend("mem-a").start()
    proxy = FerrymanProcess(consul.addr, workdir, extra=["--access-log", "false"])
    await asyncio.to_thread(proxy.start)
    try:
        assert proxy.proc is not None
        pid = proxy.proc.pid
        await asyncio.to_thread(consul.register, "memtest", backend.instance, backend.port, ["urlprefix-/memtest"],
                                ttl=False)
        await asyncio.to_thread(proxy.wait_instances, "memtest@*any*/memtest", [backend.instance])
        for _ in range(3):  # warm the path (first connections, lazy imports) before the baseline
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /memtest/warm HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
            writer.close()
        await asyncio.sleep(0.3)
        baseline = statistics.median([rss_kib(pid) for _ in range(3)])
        sampler = Sampler(pid)
        sampler.start()
        request = b"GET /memtest/blob HTTP/1.1\r\nHost: t\r\n\r\n"
        readers = [Reader(request) for _ in range(CLIENTS)]
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(loop.create_connection(_handing_over(r), "127.0.0.1", proxy.port)
                                       for r in readers))
                await asyncio.gather(*(r.done for r in readers))
        except TimeoutError:
            done = sum(r.done.done() for r in readers)
            pytest.fail(f"only {done} of {CLIENTS} clients finished within {DEADLINE:.0f} s "
                        f"({sum(r.received for r in readers) / MIB:.0f} MiB received)")
        finally:
            elapsed = time.monotonic() - started
            sampler.halt.set()
            sampler.join(2)
            for r in readers:
                if r.transport is not None:
                    r.transport.abort()
        peak = max(sampler.peak, rss_kib(pid, "VmHWM"))
        for _ in range(50):  # a body's record is appended just after its last write returned
            if len(backend.handover) >= CLIENTS or any(r.error for r in readers):
                break
            await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(consul.deregister, backend.instance)
        await backend.stop()

    errors = [r.error for r in readers if r.error]
    assert not errors, f"{len(errors)} of {CLIENTS} clients failed, e.g. {errors[:3]}"
    assert sum(r.received for r in readers) == CLIENTS * BODY
    assert len(backend.handover) == CLIENTS
    growth = (peak - baseline) * 1024
    handover = statistics.median(backend.handover)
    figures = (f"Ferryman RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth "
               f"{growth / MIB:.1f} MiB (bound {GROWTH_BOUND / MIB:.0f} MiB) with {CLIENTS} slow readers x "
               f"{BODY // MIB} MiB in {elapsed:.1f} s; the backend handed over a body a median {handover:.2f} s "
               "after its request")
    print(figures)
    # Measured here: growth ~20 MiB with backpressure, ~520 MiB with the pausing switched off.
    assert growth < GROWTH_BOUND, f"slow readers made Ferryman buffer bodies: {figures}"
    # The bound means something only if the bodies did not fit in kernel buffers, i.e. if the slow readers held
    # the backend back: with backpressure most bodies leave the backend only once their readers left the slow
    # phase (measured: median 4.5-4.9 s); a buffering proxy takes them all at once (0.5 s). Below SLOW_FOR / 2
    # either the proxy buffers or this machine's socket buffers swallow whole bodies (then raise BODY).
    assert handover >= SLOW_FOR / 2, f"nothing held the backend back: {figures}"
