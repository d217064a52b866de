#!/usr/bin/env python3
"""TCP routes under load: redis-benchmark through Ferryman against direct, 1 GiB relayed intact, the memory
idle connections take, and a rolling deploy under connection churn.

    .venv/bin/python bench/tcp.py [--requests 200000] [--clients 50] [--gib 1] [--idle 10000] [--workers 1]
                                  [--rolling 30]

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
an upstream socket): opened one after another, as fast as Ferryman accepts them, with the time it took and
any connect that failed; `--rolling` seconds of a rolling deploy: a client opens a connection through a TCP
route to three redis-servers, sends PING, reads PONG and closes, in a loop (bounded by the time and by
`--rolling-max` connections), while each instance is replaced in turn (a new redis-server registered, the old
one deregistered, stopped once Ferryman no longer lists it); it prints the connections, the failed ones and
the instances replaced. The soft RLIMIT_NOFILE is raised up to the hard limit in-process (children inherit it).
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
from typing import Any

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


def idle(proxy: Any, port: int, count: int) -> None:
    """Open `count` connections through the idle route, one after another, and report Ferryman's RSS growth."""
    from tests.integration.harness import wait_until

    time.sleep(1)
    base = rss_mib(proxy.proc.pid)
    held, failed, started = [], 0, time.monotonic()
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        except OSError as exc:
            failed += 1
            if failed <= 3:
                print(f"  connect failed: {exc!r}")
    opened_s = time.monotonic() - started
    try:
        wait_until(lambda: open_gauge(proxy.admin_url, "bench-idle") >= len(held), 120, f"{len(held)} open")
    except TimeoutError:
        pass
    relayed = open_gauge(proxy.admin_url, "bench-idle")
    relayed_s = time.monotonic() - started
    time.sleep(1.5)
    grown = rss_mib(proxy.proc.pid) - base
    print(f"{len(held):,} idle TCP connections opened in {opened_s:.1f} s ({failed} failed), {relayed:,.0f} relayed "
          f"to the instance after {relayed_s:.1f} s: Ferryman RSS {base:.1f} -> {base + grown:.1f} MiB, "
          f"{grown * 1024 / max(1, relayed):.1f} KiB per connection (its client and upstream sockets)")
    for sock in held:
        sock.close()


def churn(port: int, until: float, limit: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """Open, PING, read PONG, close, in a loop: every connection that fails to connect or answer counts."""
    while not stop.is_set() and time.monotonic() < until and counts["connections"] < limit:
        counts["connections"] += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"PING\r\n")
                answer = b""
                while not answer.endswith(b"\r\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                if answer != b"+PONG\r\n":
                    raise ConnectionError(f"answer {answer!r}")
        except OSError as exc:
            counts["failed"] += 1
            if counts["failed"] <= 3:
                print(f"  churn connection failed: {exc!r}")


def rolling(consul: Any, proxy: Any, work: Path, port: int, seconds: float, limit: int) -> int:
    """Replace each of three redis instances in turn, over and over, while `churn` runs; the failures."""
    from tests.integration.tcp_peers import Redis

    route, tags = f"bench-roll@*any*:{port}", [f"urlprefix-:{port} proto=tcp"]
    live = {f"roll-{i}": Redis(work).start() for i in range(3)}
    for instance, redis in live.items():
        consul.register("bench-roll", instance, redis.port, tags)
    proxy.wait_instances(route, sorted(live))
    counts = {"connections": 0, "failed": 0}
    stop = threading.Event()
    started = time.monotonic()
    client = threading.Thread(target=churn, args=(port, started + seconds, limit, stop, counts))
    client.start()
    replaced, serial = 0, 3
    try:
        while client.is_alive():
            old = sorted(live, key=lambda name: int(name.split("-")[1]))[0]
            new, serial = f"roll-{serial}", serial + 1
            live[new] = Redis(work).start()
            consul.register("bench-roll", new, live[new].port, tags)
            proxy.wait_instances(route, sorted(live), timeout=30)
            consul.deregister(old)
            leaving = live.pop(old)
            proxy.wait_instances(route, sorted(live), timeout=30)
            time.sleep(0.5)  # connections opened just before are done (a PING each)
            leaving.stop()
            replaced += 1
    finally:
        stop.set()
        client.join()
        for instance, redis in live.items():
            consul.deregister(instance)
            redis.stop()
    took = time.monotonic() - started
    print(f"rolling deploy under churn: {counts['connections']:,} connections in {took:.1f} s "
          f"({counts['connections'] / took:,.0f}/s), {counts['failed']} failed, {replaced} instances replaced "
          f"(3 live at a time)")
    return counts["failed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000, help="redis-benchmark requests per test")
    parser.add_argument("--clients", type=int, default=50, help="redis-benchmark parallel connections")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB sent through the echo route and back")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections held open")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rolling", type=float, default=0, help="seconds of rolling deploy under churn (0: off)")
    parser.add_argument("--rolling-max", type=int, default=100_000, help="at most this many churn connections")
    parser.add_argument("--_backend", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = raise_nofile()
    if args._backend:
        import uvloop

        uvloop.run(backend_main(*args._backend))
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.integration.harness import ConsulAgent, FerrymanProcess, free_port, new_workdir
    from tests.integration.tcp_peers import Redis

    # Each idle connection is two sockets in the Ferryman worker that holds it; workers share them (SO_REUSEPORT).
    per_worker = (limit - 200) // 2
    if args.idle > per_worker * max(1, args.workers) * 0.99:
        print(f"RLIMIT_NOFILE is {limit}: at most {per_worker} connections a worker; fewer than asked ({args.idle})")
        args.idle = int(per_worker * max(1, args.workers) * 0.99)
    work = new_workdir("ferryman-bench-tcp-")
    consul = ConsulAgent(work)
    consul.start()
    redis = Redis(work).start()
    echo_port, idle_port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, __file__, "--_backend", str(echo_port), str(idle_port)],
                               stdout=subprocess.PIPE)
    assert backend.stdout is not None and backend.stdout.readline().strip() == b"ready"
    ports = {"redis": free_port(), "echo": free_port(), "idle": free_port(), "roll": free_port()}
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
            idle(proxy, ports["idle"], args.idle)
        if args.rolling:
            failures = rolling(consul, proxy, work, ports["roll"], args.rolling, args.rolling_max)
            intact = intact and failures == 0
    finally:
        proxy.stop()
        backend.terminate()
        backend.wait(10)
        redis.stop()
        consul.stop()
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
