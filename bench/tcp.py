#!/usr/bin/env python3
"""TCP routes under load: redis-benchmark through Ferryman against direct, 1 GiB relayed intact, and the memory
idle connections take.

    .venv/bin/python bench/tcp.py [--requests 200000] [--clients 50] [--gib 1] [--idle 10000] [--workers 1]

What runs, all on 127.0.0.1 ports picked free at start:
  * a real Consul dev agent (tests/integration/harness.py's ConsulAgent);
  * Debian's redis-server (from .venv/bin, unpacked by `make test-debs`, or PATH), registered as `bench-redis`
    with `urlprefix-:PORT proto=tcp`;
  * an echo server and an idle server in ONE SEPARATE PROCESS (this script with --_backend), so their memory
    is never counted: the echo server writes back what it reads with flow control (it pauses reading while
    its write buffer is full); the idle server accepts and holds connections;
  * Ferryman as a subprocess (harness FerrymanProcess, access log off) with three TCP listeners.
Figures: redis-benchmark's SET and GET operations a second direct and through Ferryman and the ratio (without
pipelining, then with -P 16); `--gib` GiB sent through the echo route and read back, sha256 of both sides
compared, with the throughput and Ferryman's peak RSS (every process of its tree, sampled every 0.1 s);
`--idle` connections opened and left idle, and Ferryman's RSS growth per connection (each holds a client and
an upstream socket). The soft RLIMIT_NOFILE is raised up to the hard limit in-process (children inherit it).
Every process started here is stopped by its PID. Exit status 0 when the bytes arrived intact.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


# --- the backend process ---------------------------------------------------------------------------------------
class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[attr-defined]  # a Transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]  # a Transport

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # type: ignore[attr-defined]  # a Transport

    def resume_writing(self) -> None:
        self.transport.resume_reading()  # type: ignore[attr-defined]  # a Transport

    def eof_received(self) -> bool:
        self.transport.write_eof()  # type: ignore[attr-defined]  # a Transport
        return True


class Hold(asyncio.Protocol):
    """Accepts and holds the connection, reading nothing in particular."""


async def backend_main(echo_port: int, idle_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, "127.0.0.1", echo_port, backlog=4096)
    await loop.create_server(Hold, "127.0.0.1", idle_port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- measuring -------------------------------------------------------------------------------------------------
def raise_nofile() -> int:
    """The soft limit raised to the hard one; as root (CAP_SYS_RESOURCE) the hard one to 65536 first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 65536:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, 65536))
        except (ValueError, OSError):
            pass  # not allowed: the hard limit stays
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
                children.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def rss_mib(root: int) -> float:
    total = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class PeakRss(threading.Thread):
    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.done = root, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.peak = max(self.peak, rss_mib(self.root))


def redis_benchmark(port: int, requests: int, clients: int, pipeline: int) -> dict[str, float]:
    from tests.integration.tcp_peers import redis_binary

    done = subprocess.run(
        [redis_binary("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c",
         str(clients), "-P", str(pipeline), "-t", "set,get", "-q"], capture_output=True, timeout=600, check=True)
    text = done.stdout.decode().replace("\r", "\n")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(SET|GET): ([\d.]+) requests per second",
                                                              text, re.MULTILINE)}


def bulk(port: int, total: int) -> tuple[bool, float]:
    """Send `total` bytes through the echo route and read them back: (sha256 equal, seconds)."""
    blocks = [os.urandom(MIB) for _ in range(16)]
    sent, got = hashlib.sha256(), hashlib.sha256()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    received = [0]

    def reader() -> None:
        while received[0] < total:
            data = sock.recv(4 * MIB)
            if not data:
                return
            got.update(data)
            received[0] += len(data)

    started = time.monotonic()
    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(total // MIB):
        block = blocks[(i * 7) % 16]
        sent.update(block)
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)
    thread.join(600)
    seconds = time.monotonic() - started
    sock.close()
    return received[0] == total and sent.digest() == got.digest(), seconds


def open_gauge(admin_url: str, service: str) -> float:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^ferryman_tcp_connections{{service="{service}"}} ([\d.e+]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000, help="redis-benchmark requests per test")
    parser.add_argument("--clients", type=int, default=50, help="redis-benchmark parallel connections")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB sent through the echo route and back")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections held open")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--_backend", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = raise_nofile()
    if args._backend:
        import uvloop

        uvloop.run(backend_main(*args._backend))
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.integration.harness import ConsulAgent, FerrymanProcess, free_port, new_workdir, wait_until
    from tests.integration.tcp_peers import Redis

    if limit < 2 * args.idle + 1000:
        print(f"RLIMIT_NOFILE is {limit}: fewer idle connections than asked ({args.idle})")
        args.idle = max(0, (limit - 1000) // 2)
    work = new_workdir("ferryman-bench-tcp-")
    consul = ConsulAgent(work)
    consul.start()
    redis = Redis(work).start()
    echo_port, idle_port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, __file__, "--_backend", str(echo_port), str(idle_port)],
                               stdout=subprocess.PIPE)
    assert backend.stdout is not None and backend.stdout.readline().strip() == b"ready"
    ports = {"redis": free_port(), "echo": free_port(), "idle": free_port()}
    proxy = FerrymanProcess(consul.addr, work, workers=args.workers, extra=[
        "--tcp-listen", ",".join(f"127.0.0.1:{p}" for p in ports.values()), "--access-log", "false",
        "--tcp-max-connections", str(args.idle + 1000), "--max-attempts", "1"])
    intact = False
    try:
        proxy.start()
        assert proxy.proc is not None
        for name, port in (("bench-redis", redis.port), ("bench-echo", echo_port), ("bench-idle", idle_port)):
            short = name.removeprefix("bench-")
            consul.register(name, f"{name}-0", port, [f"urlprefix-:{ports[short]} proto=tcp"])
            proxy.wait_instances(f"{name}@*any*:{ports[short]}", [f"{name}-0"])
        print(f"Ferryman workers={args.workers}, RLIMIT_NOFILE={limit}")
        for pipeline in (1, 16):
            direct = redis_benchmark(redis.port, args.requests, args.clients, pipeline)
            through = redis_benchmark(ports["redis"], args.requests, args.clients, pipeline)
            for op in ("SET", "GET"):
                print(f"redis-benchmark -c {args.clients} -P {pipeline} {op}: direct {direct[op]:,.0f} ops/s, "
                      f"through Ferryman {through[op]:,.0f} ops/s, ratio {through[op] / direct[op]:.2f}")
        before = rss_mib(proxy.proc.pid)
        sampler = PeakRss(proxy.proc.pid)
        sampler.start()
        total = int(args.gib * 1024) * MIB
        intact, seconds = bulk(ports["echo"], total)
        sampler.done.set()
        sampler.join()
        verdict = "intact (sha256 equal)" if intact else "CORRUPT"
        print(f"{total / 2**30:.2f} GiB through a TCP route and back: {verdict}, "
              f"{total / MIB / seconds:,.0f} MiB/s each way, Ferryman RSS {before:.1f} MiB before, peak "
              f"{sampler.peak:.1f} MiB")
        if args.idle:
            time.sleep(1)
            base = rss_mib(proxy.proc.pid)
            held = []
            for _ in range(args.idle):
                held.append(socket.create_connection(("127.0.0.1", ports["idle"]), timeout=30))
            try:
                wait_until(lambda: open_gauge(proxy.admin_url, "bench-idle") >= args.idle, 60,
                           f"{args.idle} open connections")
            except TimeoutError:
                print(f"only {open_gauge(proxy.admin_url, 'bench-idle'):.0f} of {args.idle} connections open")
            time.sleep(1.5)
            grown = rss_mib(proxy.proc.pid) - base
            print(f"{args.idle:,} idle TCP connections: Ferryman RSS {base:.1f} -> {base + grown:.1f} MiB, "
                  f"{grown * 1024 / args.idle:.1f} KiB per connection (its client and upstream sockets)")
            for sock in held:
                sock.close()
    finally:
        proxy.stop()
        backend.terminate()
        backend.wait(10)
        redis.stop()
        consul.stop()
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
