#!/usr/bin/env python3
"""Memory bound under slow readers: N concurrent clients each download a large body through Ferryman while
reading it slowly; Ferryman's RSS must stay bounded (backpressure, not buffering).

    .venv/bin/python bench/memory.py [--quick] [--clients 500] [--size-mib 10] [--rate-kib 256] [--workers 1]

What runs, all on 127.0.0.1 ports picked free at start:
  * a real Consul dev agent (tests/integration/harness.py's ConsulAgent, binary from .venv/bin/consul or
    CONSUL_BIN);
  * two backends in ONE SEPARATE PROCESS (this script with --_backend), so their memory is never counted:
    raw asyncio protocols (uvloop) that stream each body as slices of one precomputed buffer, respecting
    their own transport's flow control, and record when the last byte of each body left for the kernel;
    registered in Consul as two instances of service `mem` tagged `urlprefix-/mem`;
  * Ferryman as a subprocess (harness FerrymanProcess, access log off), a fresh one for each run, with
    --workers N (N > 1: the supervisor and its workers, all summed);
  * the clients in their own processes (this script with --_clients): raw asyncio protocols that send one
    GET each and read the whole body in small reads (--read-kib), paced to --rate-kib per client by pausing
    the socket between reads; each checks the status, that exactly Content-Length bytes arrive and, at both
    ends of every read, that the bytes are the backend's pattern at that offset (so a shifted, repeated or
    truncated stream counts as an error).
Two runs: "slow" (every client paced at --rate-kib) and a "control" run with the same clients reading as
fast as they can. RSS (VmRSS of every process of the Ferryman tree, from /proc) is sampled every 0.2 s; the
kernel's TCP buffer memory (/proc/net/sockstat, machine-wide: the clients' and backends' sockets too) with it.
The verdict uses the larger of the sampled peak and the sum of the processes' VmHWM (the kernel's exact high
water mark, which a 0.2 s sampler could miss a spike of).

Every process started here is stopped by its PID; every load is bounded in time (clients still reading at
their deadline are aborted and counted as errors). Loopback only. Exit status 0 on PASS, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
SERVICE = "mem"
PREFIX = "/mem"
ROUTE_ID = f"{SERVICE}@*any*{PREFIX}"
LIMIT_MIB = 300.0
SAMPLE_S = 0.2
PATTERN_PERIOD = 251  # body byte at offset o is o % 251 (a prime, so 2^k-sized reads never line up with it)
MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never an env proxy


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def pattern(size: int) -> bytes:
    period = bytes(range(PATTERN_PERIOD))
    return (period * (size // PATTERN_PERIOD + 1))[:size]


# --------------------------------------------------------------------------------------------------------
# the backend process (--_backend): cheap, flow-controlled, records when each body was handed over


class BlobServer(asyncio.Protocol):
    """`GET <any path>?bytes=N` answers N pattern bytes (Content-Length); `GET /_stats[?reset=1]` answers the
    hand-over times recorded so far. Keep-alive; one request at a time per connection."""

    CHUNK = 256 * 1024

    def __init__(self, blob: memoryview, stats: list[float]) -> None:
        self.blob = blob
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.inbuf = b""
        self.paused = False
        self.off = 0
        self.end = 0
        self.started = 0.0
        self.sending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # high=0: paused as soon as anything waits in user space, resumed once all of it went to the kernel,
        # so "the last slice was written and we are not paused" means the kernel has the whole body.
        self.transport.set_write_buffer_limits(high=0)

    def data_received(self, data: bytes) -> None:
        self.inbuf += data
        if len(self.inbuf) > 65536:
            self.transport.close()  # type: ignore[union-attr]
            return
        self._next_request()

    def _next_request(self) -> None:
        if self.sending:
            return
        end = self.inbuf.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.inbuf = self.inbuf[:end], self.inbuf[end + 4 :]
        target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
        path, _, query = target.partition("?")
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        assert self.transport is not None
        if path == "/_stats":
            body = json.dumps({"handover_s": self.stats}).encode()
            if params.get("reset"):
                self.stats.clear()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(body), body))
            self._next_request()
            return
        size = min(int(params.get("bytes", "0")), len(self.blob))
        self.started = time.monotonic()
        self.sending = True
        self.off, self.end = 0, size
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        while not self.paused and self.off < self.end:
            stop = min(self.off + self.CHUNK, self.end)
            transport.write(self.blob[self.off : stop])
            self.off = stop
        if self.off >= self.end and not self.paused and self.sending:
            self.sending = False
            self.stats.append(round(time.monotonic() - self.started, 3))
            self._next_request()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def backend_main(ports: list[int], size: int) -> None:
    loop = asyncio.get_running_loop()
    blob = memoryview(pattern(size))
    stats: list[float] = []
    servers = [await loop.create_server(lambda: BlobServer(blob, stats), "127.0.0.1", p, backlog=4096)
               for p in ports]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


# --------------------------------------------------------------------------------------------------------
# the client process (--_clients): N paced readers, one GET each, a JSON summary on stdout


@dataclass
class ClientJob:
    port: int
    clients: int
    size: int
    rate: float  # bytes per second per client; 0 = as fast as possible
    read_size: int
    deadline_s: float
    slow_for_s: float = 0.0  # > 0: paced only for this long, then as fast as possible (integration test)


class PacedReader(asyncio.BufferedProtocol):
    def __init__(self, job: ClientJob, request: bytes, done: asyncio.Future[None]) -> None:
        self.job = job
        self.request = request
        self.done = done
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray(job.read_size)
        self.view = memoryview(self.buf)
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""  # None once the response head was parsed
        self.length = -1
        self.received = 0
        self.t0 = 0.0
        self.finished_at = 0.0
        self.error: str | None = None
        self._resume_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.t0 = self.loop.time()
        self.transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.done.done():
            return
        data = self.view[:nbytes]
        if self.head is not None:
            self.head += bytes(data)
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._fail("response head too large")
                return
            head, rest = self.head[:end], self.head[end + 4 :]
            self.head = None
            lines = head.split(b"\r\n")
            status = lines[0].split(b" ", 2)
            if len(status) < 2 or status[1] != b"200":
                self._fail(f"status {lines[0][:60].decode('latin-1')!r}")
                return
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = int(value)
            if self.length != self.job.size:
                self._fail(f"Content-Length {self.length}, expected {self.job.size}")
                return
            self._body(memoryview(rest))
        else:
            self._body(data)
        if self.done.done():
            return
        rate = self.job.rate
        if rate and self.transport is not None:
            now = self.loop.time()
            if not self.job.slow_for_s or now - self.t0 < self.job.slow_for_s:
                due = self.t0 + self.received / rate
                if due > now + 0.002:
                    self.transport.pause_reading()
                    self._resume_handle = self.loop.call_later(due - now, self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        if self.transport is not None and not self.transport.is_closing() and not self.done.done():
            self.transport.resume_reading()

    def _body(self, data: memoryview) -> None:
        n = len(data)
        if not n:
            return
        off = self.received
        if data[0] != off % PATTERN_PERIOD or data[n - 1] != (off + n - 1) % PATTERN_PERIOD:
            self._fail(f"wrong bytes at body offset {off}")
            return
        self.received += n
        if self.received > self.length:
            self._fail(f"more than Content-Length bytes ({self.received} > {self.length})")
        elif self.received == self.length:
            self.finished_at = self.loop.time()
            self.done.set_result(None)
            assert self.transport is not None
            self.transport.close()

    def _fail(self, why: str) -> None:
        if self.error is None and not self.done.done():
            self.error = why
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        if not self.done.done():
            self.error = f"connection lost after {self.received} of {self.length} body bytes" + (
                f" ({type(exc).__name__})" if exc else "")
            self.done.set_result(None)


async def clients_main(job: ClientJob) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = (f"GET {PREFIX}/blob?bytes={job.size} HTTP/1.1\r\nHost: bench.local\r\n"
               "User-Agent: ferryman-memory-bench\r\n\r\n").encode()
    readers: list[PacedReader] = []
    errors: Counter[str] = Counter()
    started = loop.time()

    async def one() -> None:
        done: asyncio.Future[None] = loop.create_future()
        reader = PacedReader(job, request, done)
        readers.append(reader)
        try:
            async with asyncio.timeout(10):
                await loop.create_connection(lambda: reader, "127.0.0.1", job.port)
        except (OSError, TimeoutError) as exc:
            reader.error = f"connect: {type(exc).__name__}: {exc}"
            return
        await done

    tasks = [asyncio.ensure_future(one()) for _ in range(job.clients)]
    _, pending = await asyncio.wait(tasks, timeout=job.deadline_s)
    for reader in readers:
        if reader.error is None and not reader.done.done():
            reader.error = f"still reading at the {job.deadline_s:.0f} s deadline ({reader.received} bytes in)"
            if reader.transport is not None:
                reader.transport.abort()
    for task in pending:
        task.cancel()
    await asyncio.sleep(0)
    durations = []
    for reader in readers:
        if reader.error is not None:
            errors[reader.error.split(" (")[0] if "deadline" not in reader.error else "deadline"] += 1
        elif reader.finished_at:
            durations.append(round(reader.finished_at - reader.t0, 3))
    missing = job.clients - len(readers)
    if missing:
        errors["never started"] += missing
    return {"completed": len(durations), "errors": dict(errors), "bytes": sum(r.received for r in readers),
            "durations": durations, "wall_s": round(loop.time() - started, 3)}


# --------------------------------------------------------------------------------------------------------
# /proc


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def status_kib(pid: int, *keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def tcp_mem_mib() -> float:
    """The kernel's TCP buffer memory in use, machine-wide (pages, from /proc/net/sockstat)."""
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * PAGE / MIB
    except (OSError, ValueError):
        pass
    return float("nan")


class Sampler(threading.Thread):
    """Sums VmRSS over the Ferryman process tree every SAMPLE_S seconds (and the kernel's TCP memory)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, float, float]] = []  # (t, rss MiB, kernel TCP MiB)
        self.pids: set[int] = set()

    def sample(self) -> float:
        pids = process_tree(self.root)
        self.pids.update(pids)
        return sum(status_kib(p, "VmRSS")["VmRSS"] for p in pids) / 1024

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append((time.monotonic(), self.sample(), tcp_mem_mib()))
            self.stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


# --------------------------------------------------------------------------------------------------------
# the orchestrator


@dataclass
class RunResult:
    name: str
    clients: int
    size: int
    rate: float
    baseline: float = 0.0
    peak: float = 0.0
    peak_at_s: float = 0.0
    hwm: float = 0.0
    after: float = 0.0
    per_process: dict[int, tuple[float, float]] = field(default_factory=dict)  # pid -> (VmRSS, VmHWM) at the end
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    duration: float = 0.0
    durations: list[float] = field(default_factory=list)
    handover: list[float] = field(default_factory=list)
    tcp_before: float = 0.0
    tcp_peak: float = 0.0
    tcp_after: float = 0.0
    cpu: float = 0.0
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (s since start, RSS MiB), every 5 s

    @property
    def verdict_mib(self) -> float:
        return max(self.peak, self.hwm)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _get_json(url: str) -> Any:
    with _HTTP.open(url, timeout=5) as resp:
        return json.loads(resp.read())


def _mean_rss(sampler: Sampler, n: int = 5) -> float:
    values = []
    for _ in range(n):
        values.append(sampler.sample())
        time.sleep(SAMPLE_S)
    return statistics.mean(values)


def one_run(name: str, args: argparse.Namespace, consul: Any, work: Path, backend_ports: list[int],
            rate: float, deadline_s: float) -> RunResult:
    from tests.integration.harness import FerrymanProcess

    size = args.size_mib * MIB
    res = RunResult(name, args.clients, size, rate)
    proxy = FerrymanProcess(consul.addr, work, workers=args.workers, extra=["--access-log", "false"])
    proxy.start()
    try:
        assert proxy.proc is not None
        root = proxy.proc.pid
        proxy.wait_instances(ROUTE_ID, [f"{SERVICE}-{i + 1}" for i in range(len(backend_ports))], timeout=15)
        for _ in range(4):  # warm the path once per instance (imports, first connections) before the baseline
            with _HTTP.open(f"{proxy.url}{PREFIX}/warm?bytes=65536", timeout=5) as resp:
                assert len(resp.read()) == 65536
        for port in backend_ports:
            _get_json(f"http://127.0.0.1:{port}/_stats?reset=1")
        time.sleep(0.5)
        sampler = Sampler(root)
        res.baseline = _mean_rss(sampler)
        res.tcp_before = tcp_mem_mib()
        cpu0 = cpu_s(process_tree(root))
        procs = max(1, min(args.client_procs, args.clients))
        shares = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
        sampler.start()
        t0 = time.monotonic()
        children = []
        for share in shares:
            job = ClientJob(proxy.port, share, size, rate, args.read_kib * 1024, deadline_s)
            children.append(subprocess.Popen(
                [sys.executable, __file__, "--_clients", json.dumps(job.__dict__)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL))
        try:
            for child in children:
                out, err = child.communicate(timeout=deadline_s + 30)
                if child.returncode != 0:
                    raise RuntimeError(f"client process {child.pid} exited {child.returncode}: {err.decode()[-2000:]}")
                part = json.loads(out)
                res.completed += part["completed"]
                res.errors.update(part["errors"])
                res.bytes += part["bytes"]
                res.durations += part["durations"]
        finally:
            for child in children:
                _stop(child, 2)
        res.duration = time.monotonic() - t0
        res.cpu = cpu_s(process_tree(root)) - cpu0
        time.sleep(2.0)  # connections closed, buffers released
        sampler.stop()
        res.after = _mean_rss(sampler)
        res.tcp_after = tcp_mem_mib()
        during = [s for s in sampler.samples if s[0] <= t0 + res.duration]
        if during:
            top = max(during, key=lambda s: s[1])
            res.peak, res.peak_at_s = top[1], top[0] - t0
            res.tcp_peak = max(s[2] for s in during)
            step = 5.0
            for s in sampler.samples:
                if s[0] - t0 >= step * len(res.timeline):
                    res.timeline.append((s[0] - t0, s[1]))
        for pid in process_tree(root):
            st = status_kib(pid, "VmRSS", "VmHWM")
            res.per_process[pid] = (st["VmRSS"] / 1024, st["VmHWM"] / 1024)
        res.hwm = sum(h for _, h in res.per_process.values())
        for port in backend_ports:
            res.handover += _get_json(f"http://127.0.0.1:{port}/_stats?reset=1")["handover_s"]
    finally:
        proxy.stop()
    return res


def _mib(v: float) -> str:
    return f"{v:.1f} MiB"


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f} s"


def report(res: RunResult, workers: int) -> list[str]:
    readers = (f"reading at {res.rate / 1024:.0f} KiB/s each" if res.rate else "reading as fast as they can")
    errors = sum(res.errors.values())
    lines = [
        f'run "{res.name}": {res.clients} clients x {res.size / MIB:g} MiB, {readers}; Ferryman --workers {workers}',
        f"  Ferryman RSS   baseline {_mib(res.baseline)}, peak {_mib(res.peak)} (sampled every {SAMPLE_S} s, at "
        f"{res.peak_at_s:.1f} s), VmHWM {_mib(res.hwm)}, after {_mib(res.after)}; "
        f"growth {_mib(res.peak - res.baseline)}",
    ]
    if res.timeline:
        lines.append("  RSS timeline   " + " ".join(f"{t:.0f}s:{v:.0f}" for t, v in res.timeline) + " (MiB)")
    if len(res.per_process) > 1:
        lines.append("  per process    " + ", ".join(f"pid {pid}: RSS {r:.1f} / HWM {h:.1f} MiB"
                                                   for pid, (r, h) in sorted(res.per_process.items())))
    lines += [
        f"  clients        {res.completed}/{res.clients} completed, {errors} errors"
        + (f" ({', '.join(f'{k}: {v}' for k, v in res.errors.most_common(5))})" if errors else "")
        + f", {res.bytes:,} body bytes delivered ({res.bytes / MIB:,.1f} MiB), every completed body "
        "length- and pattern-checked",
        f"  duration       {res.duration:.1f} s for the run ({res.bytes / MIB / max(res.duration, 1e-9):,.1f} MiB/s "
        f"through Ferryman); per client min / median / max {_spread(res.durations)}",
        f"  backend        handed the last byte of each body to the kernel, after the request: min / median / max "
        f"{_spread(res.handover)} ({len(res.handover)} bodies)",
        *([f"  NOTE           the backend handed bodies over in a median {statistics.median(res.handover):.1f} s "
            f"while readers needed {res.size / res.rate:.0f} s: the bodies fitted in kernel socket buffers, so this "
            "run did not exercise Ferryman's backpressure (use larger --size-mib)"]
          if res.rate and res.handover and statistics.median(res.handover) < 0.25 * res.size / res.rate else []),
        f"  kernel TCP mem before {_mib(res.tcp_before)}, peak {_mib(res.tcp_peak)}, after {_mib(res.tcp_after)} "
        "(/proc/net/sockstat, all sockets: clients', Ferryman's and backends')",
        f"  Ferryman CPU   {res.cpu:.1f} s (user+system) during the run",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 500; --quick 100)")
    parser.add_argument("--size-mib", type=int, default=None, help="body size per client (default 10; --quick 12)")
    parser.add_argument("--rate-kib", type=float, default=None,
                        help="read rate per slow client, KiB/s (default 256; --quick 1024)")
    parser.add_argument("--read-kib", type=int, default=32, help="bytes per read by a client, KiB (32)")
    parser.add_argument("--workers", type=int, default=1, help="Ferryman --workers (1)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (2)")
    parser.add_argument("--no-control", action="store_true", help="skip the fast-reader control run")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="RSS limit for PASS (300)")
    parser.add_argument("--quick", action="store_true",
                        help="100 clients x 12 MiB at 1 MiB/s: a smoke run of ~30 s (bodies still larger than "
                        "what the kernel buffers per connection, ~4-8 MiB on loopback)")
    parser.add_argument("--_backend", help=argparse.SUPPRESS)
    parser.add_argument("--_clients", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._backend:
        _use_uvloop()
        ports, size = args._backend.split(":")
        asyncio.run(backend_main([int(p) for p in ports.split(",")], int(size)))
        return 0
    if args._clients:
        _use_uvloop()
        _raise_nofile()
        print(json.dumps(asyncio.run(clients_main(ClientJob(**json.loads(args._clients))))))
        return 0

    args.clients = args.clients or (100 if args.quick else 500)
    args.size_mib = args.size_mib or (12 if args.quick else 10)
    args.rate_kib = args.rate_kib or (1024 if args.quick else 256)
    if not (1 <= args.clients <= 5000 and 1 <= args.size_mib <= 256 and args.rate_kib >= 16
            and 1 <= args.workers <= 16 and 1 <= args.read_kib <= 1024):
        parser.error("out of range: 1..5000 clients, 1..256 MiB, rate >= 16 KiB/s, 1..16 workers, 1..1024 KiB reads")
    _raise_nofile()
    sys.path.insert(0, str(ROOT))
    from tests.integration.harness import ConsulAgent, free_port, new_workdir, wait_until

    size = args.size_mib * MIB
    rate = args.rate_kib * 1024
    slow_deadline = min(600.0, size / rate * 1.5 + 20)
    started = time.monotonic()
    work = new_workdir("ferryman-membench-")
    consul = ConsulAgent(work)
    backend: subprocess.Popen[bytes] | None = None
    results: list[RunResult] = []
    try:
        consul.start()
        ports = [free_port(), free_port()]
        backend = subprocess.Popen(
            [sys.executable, __file__, "--_backend", f"{','.join(map(str, ports))}:{size}"],
            stdin=subprocess.DEVNULL, stdout=open(work / "backend.log", "wb"), stderr=subprocess.STDOUT)

        def backends_up() -> bool:
            for port in ports:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            return True

        wait_until(backends_up, 15, "the backends")
        for i, port in enumerate(ports, 1):
            consul.register(SERVICE, f"{SERVICE}-{i}", port, [f"urlprefix-{PREFIX}"], ttl=False)
        print(f"memory bench: Consul {consul.addr}; backends 127.0.0.1:{ports[0]},{ports[1]} (pid {backend.pid}, "
              f"not counted); {args.clients} clients in {min(args.client_procs, args.clients)} processes; "
              f"reads of {args.read_kib} KiB", flush=True)
        results.append(one_run("slow", args, consul, work, ports, rate, slow_deadline))
        print("\n".join(report(results[-1], args.workers)), flush=True)
        if not args.no_control:
            results.append(one_run("control", args, consul, work, ports, 0, 120))
            print("\n".join(report(results[-1], args.workers)), flush=True)
    except KeyboardInterrupt:
        print("memory bench: interrupted; every process started was stopped", file=sys.stderr)
        return 130
    finally:
        if backend is not None:
            _stop(backend)
        consul.stop()
        shutil.rmtree(work, ignore_errors=True)

    slow = results[0]
    errors = sum(slow.errors.values())
    ok = slow.verdict_mib < args.limit_mib and errors == 0 and slow.completed == slow.clients
    lines = []
    if len(results) > 1:
        ctl = results[1]
        lines.append(f"control (fast readers): peak RSS {_mib(ctl.verdict_mib)} vs {_mib(slow.verdict_mib)} with slow "
                     f"readers; {ctl.completed}/{ctl.clients} completed, {sum(ctl.errors.values())} errors")
    why = "" if ok else (f" ({errors} errors, {slow.completed}/{slow.clients} completed)"
                         if slow.verdict_mib < args.limit_mib else "")
    lines.append(f"peak RSS {_mib(slow.verdict_mib)} (limit {args.limit_mib:g} MiB) with {slow.clients} slow readers x "
                 f"{args.size_mib} MiB, Ferryman --workers {args.workers}: {'PASS' if ok else 'FAIL'}{why}")
    lines.append(f"(whole bench {time.monotonic() - started:.0f} s)")
    print("\n" + "\n".join(lines))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    body = "\n".join(report(results[0], args.workers) + (report(results[1], args.workers) if len(results) > 1 else []))
    (OUT_DIR / f"memory-w{args.workers}.txt").write_text(
        f"$ {' '.join([Path(sys.executable).name, *sys.argv])}\n{body}\n\n" + "\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
