#!/usr/bin/env python3
"""Discovery at cluster scale (issue 14): N services x M instances in one Consul dev agent on its DEFAULT limits,
Ferryman with W workers in front. Prints figures; asserts nothing.

    .venv/bin/python bench/scale.py --preset quick|small|full [--services N --instances M --workers W
        --dereg K --churn-rate R --churn-seconds S --churn-services C --idle-seconds I ...]
    make bench-scale BENCH_ARGS="--preset small"

What runs, all on 127.0.0.1 ports picked free at start, each process stopped by its PID at the end:
  * a Consul dev agent (tests/integration/harness.py's ConsulAgent; .venv/bin/consul or CONSUL_BIN) with its
    default limits (200 HTTP connections per client address); only its telemetry is configured, so that the
    agent itself counts the HTTP requests it serves (`/v1/agent/metrics?format=prometheus`);
  * backends in ONE SEPARATE PROCESS (this script with --_backend), raw asyncio: one "bulk" port that every
    instance points at, and one dedicated port per service of the deregistration phase, for the instance that
    will be removed. Every answer is "<backend name> <CLOCK_MONOTONIC at arrival>", so the client learns which
    instance a request reached and when it reached it (the clock is system-wide, comparable across processes);
  * Ferryman (`.venv/bin/ferryman --workers W --access-log false`, its other settings left at their defaults);
  * clients in this process: raw asyncio, one NEW connection per request (`Connection: close`), so the kernel
    spreads them over the workers (SO_REUSEPORT). A failed request is any status but 200 or a connection error.

The instances are registered straight into the catalog on M external nodes (`bench-0`..), in `PUT /v1/txn`
batches of 64 operations (a service and its check, Status "passing": nothing for the agent to run), over at
most --agent-conns (<= 8) connections. Service `svc-NNNNN` has the tag `urlprefix-/svc-NNNNN`. This script
talks to the agent from 127.0.0.2 (still loopback), as the deployers of a cluster would from other hosts:
Consul counts connections per client address, so its own calls neither eat Ferryman's 200 nor get refused when
Ferryman has used them up (127.0.0.1 when 127.0.0.2 cannot be bound).

Figures (see the table it prints; bench/out/scale.md gets the same):
  a. registration: time to put N x M instances (+ their checks) into the catalog.
  b. routed: time from Ferryman's start (just before its process is spawned) until every service is routed at
     every worker. Method "worker_reports": /api/status lists one report per worker ("worker_reports": pid,
     generation, routes, services) and every one of the W has >= N routes and >= N services. Method "requests"
     (fallback, when /api/status has no per-worker reports): the supervisor's view has >= N routes and every
     service answered 200 over a new connection (this cannot prove every worker). Either way a sweep then asks
     every service once over a new connection and counts what failed.
  c. deregistration: K rounds, one service at a time: clients send requests to it over new connections; once its
     dedicated instance answered, it is removed (`PUT /v1/catalog/deregister`) at t0; requests go on for
     --dereg-window seconds. Figure of a round: (latest arrival at the removed instance, by the backend's clock)
     - t0; p50 and max over the rounds; failed requests during the rounds.
  d. connections to the agent: every second, the ESTABLISHED TCP connections to the agent's HTTP port whose
     socket belongs to the supervisor or one of its descendants (/proc/<pid>/fd inodes matched in
     /proc/net/tcp); the max over the whole run, and per phase.
  e. idle: nothing changes for --idle-seconds (no client load either). Ferryman's CPU: utime+stime of all its
     processes (/proc/<pid>/stat) over the window, as % of one core. Requests per second to the agent, two ways:
     the increase of Ferryman's `ferryman_consul_request_duration_seconds_count` on /metrics (what the workers
     export; the supervisor's own queries are not in it today), and the agent's own count of HTTP requests
     served (every `consul_http_*_count` but its metrics endpoint; nothing else talks to it then).
  f. churn: R changes a second for S seconds over C services (flip an instance's check passing <-> critical, at
     most one critical instance per service; register / deregister an extra instance), under client load on
     those services: failed requests, table swaps (`table_swapped` log lines, all processes, and the increase of
     ferryman_routing_table_generation, the lowest across workers), peak RSS summed over Ferryman's processes
     (sampled every second during churn; and the sum of their VmHWM at the end, the kernel's high water mark).
Every wait and loop is bounded (by --routed-timeout, the windows and the counts). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration.harness import ConsulAgent, free_port, new_workdir  # noqa: E402  (path set just above)

OUT = ROOT / "bench" / "out" / "scale.md"
TXN_OPS = 64  # Consul's limit of operations in one transaction
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TELEMETRY = 'telemetry { prometheus_retention_time = "30m" disable_hostname = true }'
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never an env proxy


def own_address() -> str:
    """The address this script talks to the agent from (see the docstring)."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


SOURCE = own_address()

PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(services=10_000, instances=3, workers=16, dereg=20, churn_rate=100, churn_seconds=60,
                 churn_services=1000, idle_seconds=60),
    "small": dict(services=1000, instances=3, workers=2, dereg=20, churn_rate=100, churn_seconds=60,
                  churn_services=1000, idle_seconds=60),
    "quick": dict(services=200, instances=3, workers=2, dereg=5, churn_rate=20, churn_seconds=10,
                  churn_services=200, idle_seconds=10, routed_timeout=60),
}


def name(s: int) -> str:
    return f"svc-{s:05d}"


# --------------------------------------------------------------------------------------------------------
# the backend process (--_backend)

class _Answer(asyncio.Protocol):
    """Answers every request head with its name and the arrival time; keep-alive unless asked to close."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end].lower(), self.buf[end + 4 :]
            body = b"%s %.6f\n" % (self.label, time.monotonic())
            close = b"connection: close" in head
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
                len(body), b"Connection: close\r\n" if close else b"", body))
            if close:
                self.transport.close()
                return


async def _backend_main(dedicated: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: _Answer("bulk"), "127.0.0.1", 0, backlog=4096)]
    for k in range(dedicated):
        servers.append(await loop.create_server(lambda k=k: _Answer(f"d{k}"), "127.0.0.1", 0, backlog=4096))
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"bulk": ports[0], "dedicated": ports[1:]}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# --------------------------------------------------------------------------------------------------------
# /proc: Ferryman's processes, their CPU, memory and connections to the agent

def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total


def status_kib(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def agent_connections(pids: list[int], agent_port: int) -> int:
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == agent_port and cols[9] in inodes:
                    count += 1
    return count


@dataclass
class Sampler:
    """Every second: Ferryman's connections to the agent and its summed RSS, labelled with the current phase."""

    root: int
    agent_port: int
    phase: str = "start"
    conns: dict[str, int] = field(default_factory=dict)
    rss_kib: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(1.0):
            pids = descendants(self.root)
            phase = self.phase
            self.conns[phase] = max(self.conns.get(phase, 0), agent_connections(pids, self.agent_port))
            self.rss_kib[phase] = max(self.rss_kib.get(phase, 0), status_kib(pids, "VmRSS"))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------------------------------
# HTTP: the agent (few connections), Ferryman's admin port, clients over new connections

class BenchAgent(ConsulAgent):
    """The harness's dev agent (default limits) with telemetry, so that it counts the requests it serves."""

    def spawn(self, *extra: str) -> None:
        super().spawn("-hcl", TELEMETRY, *extra)


def get_text(url: str, timeout: float = 5, source: str = "") -> str:
    if not source:
        with _HTTP.open(url, timeout=timeout) as resp:
            return str(resp.read().decode())
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            raise OSError(f"GET {url}: {resp.status}")
        return body
    finally:
        conn.close()


def metric_sum(text: str, metric: str) -> float:
    pattern = re.compile(rf"^{re.escape(metric)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def agent_requests(text: str) -> float:
    """HTTP requests the agent served, all endpoints but its metrics endpoint (this script's own scrape)."""
    total = 0.0
    for metric, value in re.findall(r"^(consul_http_\w+)_count (\S+)$", text, re.M):
        if "agent_metrics" not in metric:
            total += float(value)
    return total


async def request(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """GET over a new connection, `Connection: close`; (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("connection closed without a response")
    return int(head.split(b" ", 2)[1]), body


@dataclass
class Load:
    """`clients` loops, each sending GET to a path drawn from `paths()` over new connections until stopped (or
    `limit_s`): failures, and the latest arrival (backend clock) per dedicated backend."""

    port: int
    paths: Any  # () -> str
    clients: int
    limit_s: float
    failures: list[str] = field(default_factory=list)
    sent: int = 0
    last_arrival: dict[str, float] = field(default_factory=dict)
    watch: str = ""  # a dedicated backend's label: `answered` is set once it answered
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def _client(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            path = self.paths()
            self.sent += 1
            try:
                status, body = await request(self.port, path)
            except (OSError, TimeoutError, ValueError, IndexError) as exc:
                self.failures.append(f"{path}: {type(exc).__name__} {exc}")
                await asyncio.sleep(0.01)  # a refused connection must not turn the loop into a busy loop
                continue
            if status != 200:
                self.failures.append(f"{path}: {status} {body[:80]!r}")
                await asyncio.sleep(0.01)  # an error page comes fast: no busy loop either
                continue
            label, _, at = body.decode().partition(" ")
            if label != "bulk":
                self.last_arrival[label] = max(self.last_arrival.get(label, 0.0), float(at))
                if label == self.watch:
                    self.answered.set()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@dataclass
class Catalog:
    """Writes to the agent's catalog over one aiohttp session with at most `conns` connections."""

    url: str
    http: Any  # aiohttp.ClientSession
    calls: int = 0
    retries: int = 0  # calls sent again after a connection error

    async def put(self, path: str, body: Any, attempts: int = 4) -> None:
        """Retried a few times: an agent whose connections per client address are used up (by Ferryman) resets
        this script's connections too; RuntimeError when it still fails."""
        import aiohttp

        for attempt in range(attempts):
            self.calls += 1
            try:
                async with self.http.put(f"{self.url}{path}", json=body) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return
                    raise RuntimeError(f"PUT {path}: {resp.status} {text[:300]}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == attempts - 1:
                    raise RuntimeError(f"PUT {path}: {type(exc).__name__} {exc}") from exc
                self.retries += 1
                await asyncio.sleep(0.1 * 2**attempt)

    @staticmethod
    def instance_ops(node: str, s: int, iid: str, port: int) -> list[dict[str, Any]]:
        service = {"ID": iid, "Service": name(s), "Tags": [f"urlprefix-/{name(s)}"], "Address": "127.0.0.1",
                   "Port": port}
        check = {"Node": node, "CheckID": f"service:{iid}", "Name": "bench", "Status": "passing", "ServiceID": iid}
        return [{"Service": {"Verb": "set", "Node": node, "Service": service}},
                {"Check": {"Verb": "set", "Check": check}}]

    async def register_all(self, ops: list[dict[str, Any]], nodes: int) -> None:
        await self.put("/v1/txn", [{"Node": {"Verb": "set", "Node": {"Node": f"bench-{n}", "Address": "127.0.0.1"}}}
                                   for n in range(nodes)])
        await asyncio.gather(*(self.put("/v1/txn", ops[i : i + TXN_OPS]) for i in range(0, len(ops), TXN_OPS)))

    async def deregister(self, node: str, iid: str) -> None:
        await self.put("/v1/catalog/deregister", {"Node": node, "ServiceID": iid})

    async def set_check(self, node: str, iid: str, status: str) -> None:
        await self.put("/v1/catalog/register", {
            "Node": node, "Address": "127.0.0.1", "SkipNodeUpdate": True,
            "Check": {"CheckID": f"service:{iid}", "Name": "bench", "Status": status, "ServiceID": iid}})


# --------------------------------------------------------------------------------------------------------
# the run

@dataclass
class Figures:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: str, target: str = "") -> None:
        self.rows.append((figure, value, target))
        print(f"  {figure}: {value}" + (f"   (issue 14: {target})" if target else ""), flush=True)


def summary(what: str, failures: list[str]) -> list[str]:
    """Failures by kind (the path left out), most frequent first."""
    kinds = Counter(f.split(": ", 1)[-1] for f in failures)
    return [f"{what}: {count} x {kind}" for kind, count in kinds.most_common(5)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.work = new_workdir("ferryman-scale-")
        self.fig = Figures()
        self.rng = random.Random(14)
        self.agent = BenchAgent(self.work)
        self.backend: subprocess.Popen[bytes] | None = None
        self.ferryman: subprocess.Popen[bytes] | None = None
        self.port, self.admin = free_port(), free_port()
        k = args.dereg
        self.dereg_services = sorted({i * args.services // k for i in range(k)}) if k else []
        self.sampler: Sampler | None = None

    # --- processes -----------------------------------------------------------------------------------------
    def start_backend(self) -> tuple[int, list[int]]:
        self.backend = subprocess.Popen(
            [sys.executable, __file__, "--_backend", str(len(self.dereg_services))],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.backend.stdout is not None
        ports = json.loads(self.backend.stdout.readline())
        return int(ports["bulk"]), [int(p) for p in ports["dedicated"]]

    def start_ferryman(self) -> None:
        exe = Path(sys.executable).parent / "ferryman"
        help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30).stdout
        quiet = ["--access-log", "false"] if "--access-log" in help_text else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
        with open(self.work / "ferryman.log", "ab") as log:
            self.ferryman = subprocess.Popen(
                [str(exe), "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
                 "--consul-addr", self.agent.addr, "--workers", str(self.a.workers), "--log-format", "json",
                 *quiet, *self.a.ferryman_arg],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def stop_all(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        for proc in (self.ferryman, self.backend):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.agent.stop()

    def pids(self) -> list[int]:
        assert self.ferryman is not None
        return descendants(self.ferryman.pid)

    def log_events(self, event: str, since: int = 0) -> tuple[Counter[str], int]:
        """Count of `event` log lines after byte offset `since`, by worker ("-": no worker field); new offset."""
        counts: Counter[str] = Counter()
        with open(self.work / "ferryman.log", "rb") as f:
            f.seek(since)
            data = f.read()
        for line in data.splitlines():
            if event.encode() in line:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == event:
                        counts[str(entry.get("worker", "-"))] += 1
        return counts, since + len(data)

    def metrics(self) -> str:
        return get_text(f"http://127.0.0.1:{self.admin}/metrics")

    def status(self) -> dict[str, Any]:
        return json.loads(get_text(f"http://127.0.0.1:{self.admin}/api/status", timeout=10))  # type: ignore[no-any-return]

    # --- phases --------------------------------------------------------------------------------------------
    async def register(self, catalog: Catalog, bulk: int, dedicated: list[int]) -> None:
        a = self.a
        special = {s: k for k, s in enumerate(self.dereg_services)}
        ops: list[dict[str, Any]] = []
        for s in range(a.services):
            for i in range(a.instances):
                port = dedicated[special[s]] if i == 0 and s in special else bulk
                ops += catalog.instance_ops(f"bench-{i}", s, f"{name(s)}-{i}", port)
        t0 = time.monotonic()
        await catalog.register_all(ops, a.instances)
        took = time.monotonic() - t0
        self.fig.add("registration", f"{a.services * a.instances} instances (+ checks) in {took:.1f} s, "
                     f"{catalog.calls} txn calls over <= {a.agent_conns} connections")

    async def consul_floor(self, http: Any) -> None:
        """How long the agent itself takes to answer the two whole-datacenter queries a change wakes (median of 5
        plain reads, before Ferryman starts): no watcher of the whole datacenter learns of a change faster."""
        for query in ("/v1/health/state/any", "/v1/catalog/services"):
            took, size = [], 0
            for _ in range(5):
                t0 = time.monotonic()
                async with http.get(f"{self.agent.url}{query}") as resp:
                    size = len(await resp.read())
                took.append(time.monotonic() - t0)
            self.fig.add(f"the agent's own answer to {query} (median of 5, {size / 1e6:.1f} MB)",
                         ms(statistics.median(took)), "")

    async def routed(self, started: float) -> None:
        a = self.a
        deadline = started + a.routed_timeout
        method, worst, doc = "requests", 0, None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                doc = await asyncio.to_thread(self.status)
            if doc is not None and "worker_reports" in doc:
                method = "worker_reports"
                reports = doc["worker_reports"]
                counts = [min(int(r.get("routes", 0)), int(r.get("services", 0))) for r in reports]
                worst = min(counts) if len(counts) >= a.workers else 0
                if len(counts) >= a.workers and worst >= a.services:
                    break
            elif doc is not None:
                worst = int(doc.get("discovery", {}).get("routes", 0))
                if worst >= a.services and doc.get("ready"):
                    break
            await asyncio.sleep(0.25)
        if method == "requests" and worst >= a.services:
            missing = await self.sweep(list(range(a.services)), until=deadline)
            worst = a.services - len(missing)
        took = time.monotonic() - started
        if worst >= a.services:
            self.fig.add(f"routed at every worker (method: {method})", f"{took:.1f} s after start",
                         "<= 20 s at 10,000 x 3, 16 workers")
        else:
            self.fig.add(f"routed at every worker (method: {method})",
                         f"NOT within {a.routed_timeout:.0f} s: {worst} of {a.services} services at the worst "
                         f"{'worker' if method == 'worker_reports' else 'view'}", "<= 20 s")
        missing = await self.sweep(list(range(a.services)), until=time.monotonic() + a.routed_timeout, once=True)
        self.fig.add("sweep: every service once, new connections", f"{a.services - len(missing)} of {a.services} "
                     f"answered 200" + (f"; failed e.g. {missing[:3]}" if missing else ""))

    async def sweep(self, services: list[int], until: float, once: bool = False) -> list[str]:
        """Ask each service over a new connection; retry the ones that failed until `until` (unless `once`).
        Returns the failures of the last pass."""
        todo = services
        failed: list[str] = []
        while todo and time.monotonic() < until:
            queue = list(todo)
            todo, failed = [], []
            await asyncio.gather(*(self._sweeper(queue, todo, failed) for _ in range(self.a.clients)))
            if once:
                break
            if todo:
                await asyncio.sleep(0.5)
        return failed

    async def _sweeper(self, queue: list[int], todo: list[int], failed: list[str]) -> None:
        while queue:
            s = queue.pop()
            try:
                status, _ = await request(self.port, f"/{name(s)}/")
                ok, why = status == 200, str(status)
            except (OSError, TimeoutError, ValueError, IndexError) as exc:
                ok, why = False, type(exc).__name__
            if not ok:
                todo.append(s)
                failed.append(f"{name(s)}: {why}")

    async def deregistrations(self, catalog: Catalog) -> None:
        a = self.a
        figures: list[float] = []
        failures: list[str] = []
        sent = stuck = unmeasured = 0
        for k, s in enumerate(self.dereg_services):
            label = f"d{k}"
            load = Load(self.port, lambda s=s: f"/{name(s)}/", a.clients, limit_s=30, watch=label).start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.answered.wait(), 5)
            measured = load.answered.is_set()
            t0 = time.monotonic()
            try:
                await catalog.deregister("bench-0", f"{name(s)}-0")
            except RuntimeError as exc:
                measured = False
                self.fig.notes.append(f"round {k}: the deregistration failed: {exc}")
            await asyncio.sleep(a.dereg_window)
            await load.stop()
            failures += load.failures
            sent += load.sent
            if not measured:  # nothing to time: the instance got no traffic before its removal
                unmeasured += 1
                print(f"    round {k + 1:2d} {name(s)}: not measured (the instance answered no request before, "
                      f"or the deregistration failed); {load.sent} requests, {len(load.failures)} failed", flush=True)
                continue
            last = max(0.0, load.last_arrival[label] - t0)
            if last > a.dereg_window - 0.2:
                stuck += 1
            figures.append(last)
            print(f"    round {k + 1:2d} {name(s)}: last request at the removed instance {ms(last)} "
                  f"after deregistration; {load.sent} requests, {len(load.failures)} failed", flush=True)
        if unmeasured:
            self.fig.add("deregistration rounds not measured (no answer from the instance before, or the "
                         "deregistration call failed)",
                         f"{unmeasured} of {len(self.dereg_services)}", "0")
        self.fig.add("deregistration rounds: failed requests", f"{len(failures)} of {sent}", "0")
        self.fig.notes += summary("deregistration rounds, failed requests", failures)
        if not figures:
            return
        self.fig.add("deregistration -> last request at removed instance, p50",
                     ms(statistics.median(figures)), "<= 50 ms")
        self.fig.add("deregistration -> last request at removed instance, max",
                     ms(max(figures)) + (f" ({stuck} rounds still routed to it at the end of the "
                                         f"{a.dereg_window:g} s window)" if stuck else ""), "<= 250 ms")

    async def idle(self) -> None:
        a = self.a
        metrics0, agent0 = await self.scrape(self.metrics), await self.scrape(self.agent_metrics)
        pids0 = self.pids()
        ticks0, t0 = cpu_ticks(pids0), time.monotonic()
        await asyncio.sleep(a.idle_seconds)
        pids1 = self.pids()
        ticks1, took = cpu_ticks(pids1), time.monotonic() - t0
        metrics1, agent1 = await self.scrape(self.metrics), await self.scrape(self.agent_metrics)
        cpu = (ticks1 - ticks0) / CLK_TCK / took * 100
        extra = "" if pids0 == pids1 else " (the process tree changed during the window)"
        self.fig.add(f"idle {took:.0f} s: Ferryman CPU, all {len(pids1)} processes", f"{cpu:.2f} % of one core{extra}",
                     "< 1 %")
        refused = "n/a: the agent refused this script's connection"
        theirs = (f"{(agent_requests(agent1) - agent_requests(agent0)) / took:.2f}" if agent0 and agent1
                  else refused)
        self.fig.add("idle: requests/s to the agent, counted by the agent", theirs, "<= 1")
        count = "ferryman_consul_request_duration_seconds_count"
        ours = (f"{(metric_sum(metrics1, count) - metric_sum(metrics0, count)) / took:.2f}" if metrics0 and metrics1
                else "n/a: /metrics did not answer")
        self.fig.add("idle: requests/s to the agent, Ferryman's /metrics (workers only)", ours, "<= 1")

    @staticmethod
    async def scrape(get: Any, attempts: int = 4) -> str:
        """A metrics page, or "" when it cannot be had (an agent out of connections for this address)."""
        for attempt in range(attempts):
            try:
                return str(await asyncio.to_thread(get))
            except (OSError, ValueError):
                await asyncio.sleep(0.1 * 2**attempt)
        return ""

    def agent_metrics(self) -> str:
        return get_text(f"{self.agent.url}/v1/agent/metrics?format=prometheus", source=SOURCE)

    async def churn(self, catalog: Catalog, bulk: int) -> None:
        a = self.a
        dereg = set(self.dereg_services)
        pool = [s for s in range(a.services) if s not in dereg][: a.churn_services]
        if not pool or a.churn_rate <= 0 or a.churn_seconds <= 0:
            return
        critical: dict[int, int] = {}
        extra: set[int] = set()
        errors: list[str] = []

        async def change() -> None:
            s = self.rng.choice(pool)
            try:
                if self.rng.random() < 0.5:  # flip a check; at most one critical instance per service
                    if s in critical:
                        await catalog.set_check(f"bench-{critical[s]}", f"{name(s)}-{critical.pop(s)}", "passing")
                    else:
                        i = critical[s] = self.rng.randrange(a.instances)
                        await catalog.set_check(f"bench-{i}", f"{name(s)}-{i}", "critical")
                elif s in extra:
                    extra.discard(s)
                    await catalog.deregister("bench-0", f"{name(s)}-x")
                else:
                    extra.add(s)
                    await catalog.put("/v1/txn", catalog.instance_ops("bench-0", s, f"{name(s)}-x", bulk))
            except (OSError, RuntimeError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        metrics0 = await self.scrape(self.metrics)
        _, offset = self.log_events("table_swapped")
        load = Load(self.port, lambda: f"/{name(self.rng.choice(pool))}/", a.clients,
                    limit_s=a.churn_seconds + 30).start()
        t0 = time.monotonic()
        done, pending = 0, set()
        while (now := time.monotonic()) < t0 + a.churn_seconds:
            due = int((now - t0) * a.churn_rate) - done
            for _ in range(max(0, due)):
                pending.add(asyncio.create_task(change()))
            done += max(0, due)
            pending = {t for t in pending if not t.done()}
            await asyncio.sleep(0.02)
        await asyncio.gather(*pending)
        took = time.monotonic() - t0
        await asyncio.sleep(2)  # the last changes reach the workers under the same load
        await load.stop()
        swaps, _ = self.log_events("table_swapped", offset)
        metrics1 = await self.scrape(self.metrics)
        generation = (metric_sum(metrics1, "ferryman_routing_table_generation")
                      - metric_sum(metrics0, "ferryman_routing_table_generation"))
        updates = (metric_sum(metrics1, "ferryman_discovery_updates_total")
                   - metric_sum(metrics0, "ferryman_discovery_updates_total"))
        per_worker = [v for k, v in swaps.items() if k != "-"]
        self.fig.add(f"churn: {done} changes in {took:.0f} s over {len(pool)} services",
                     f"{done / took:.0f}/s, {len(errors)} agent calls failed", f"{a.churn_rate}/s")
        self.fig.add("churn: failed requests", f"{len(load.failures)} of {load.sent}", "0")
        self.fig.add("churn: table swaps (table_swapped lines)",
                     f"{sum(swaps.values())} in all; per worker max {max(per_worker, default=0)}, supervisor "
                     f"{swaps.get('-', 0)}; routing_table_generation +{generation:.0f}, discovery_updates "
                     f"+{updates:.0f}")
        assert self.sampler is not None
        self.fig.add("churn: peak RSS, all processes (1 s samples)",
                     f"{self.sampler.rss_kib.get('churn', 0) / 1024:.0f} MiB")
        self.fig.add("peak RSS since start: sum of VmHWM", f"{status_kib(self.pids(), 'VmHWM') / 1024:.0f} MiB")
        self.fig.notes += summary("churn, failed requests", load.failures)
        self.fig.notes += summary("churn, failed agent calls", errors)

    async def run(self) -> None:
        import aiohttp

        a = self.a
        print(f"scale bench: {a.services} services x {a.instances} instances, {a.workers} workers; this script "
              f"talks to the agent from {SOURCE}; work dir {self.work}", flush=True)
        await asyncio.to_thread(self.agent.start)
        bulk, dedicated = self.start_backend()
        connector = aiohttp.TCPConnector(limit=a.agent_conns, local_addr=(SOURCE, 0))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            catalog = Catalog(self.agent.url, http)
            await self.register(catalog, bulk, dedicated)
            await self.consul_floor(http)
            started = time.monotonic()
            self.start_ferryman()
            assert self.ferryman is not None
            self.sampler = Sampler(self.ferryman.pid, self.agent.http_port, phase="start")
            self.sampler.start()
            await self.routed(started)
            self.sampler.phase = "deregistrations"
            await self.deregistrations(catalog)
            self.sampler.phase = "idle"
            await self.idle()
            self.sampler.phase = "churn"
            await self.churn(catalog, bulk)
            await asyncio.sleep(1.2)  # one more sample
        conns = self.sampler.conns
        self.fig.add("max connections to the agent (1 s samples)",
                     f"{max(conns.values(), default=0)} ({', '.join(f'{k} {v}' for k, v in conns.items())})", "<= 8")
        if self.ferryman.poll() is not None:
            self.fig.notes.append(f"ferryman exited early with {self.ferryman.returncode}")

    def write(self) -> None:
        a = self.a
        lines = [
            f"# Ferryman at scale: {a.services} services x {a.instances} instances, --workers {a.workers}", "",
            f"Consul dev agent, default limits; {a.dereg} deregistrations ({a.dereg_window:g} s window); idle "
            f"{a.idle_seconds:g} s; churn {a.churn_rate}/s for {a.churn_seconds:g} s over {a.churn_services} "
            f"services; {a.clients} clients over new connections. Command: `{' '.join(sys.argv)}`", "",
            "| figure | value | issue 14 |", "|---|---|---|",
            *[f"| {f} | {v} | {t} |" for f, v, t in self.fig.rows], "",
            *[f"- {n}" for n in self.fig.notes],
        ]
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines) + f"\nwritten to {OUT}; logs in {self.work}", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--services", type=int)
    p.add_argument("--instances", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--dereg", type=int, help="single-instance deregistrations")
    p.add_argument("--dereg-window", type=float, default=1.5, help="seconds of traffic after each deregistration")
    p.add_argument("--churn-rate", type=int, help="instance changes a second")
    p.add_argument("--churn-seconds", type=float)
    p.add_argument("--churn-services", type=int)
    p.add_argument("--idle-seconds", type=float)
    p.add_argument("--routed-timeout", type=float, help="seconds to wait for every service at every worker")
    p.add_argument("--clients", type=int, default=8, help="concurrent client loops (new connection per request)")
    p.add_argument("--agent-conns", type=int, default=8, help="connections this script opens to the agent (<= 8)")
    p.add_argument("--ferryman-arg", action="append", default=[], help="extra Ferryman flag (repeatable)")
    p.add_argument("--_backend", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = {"routed_timeout": 120.0, **PRESETS[args.preset]}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Bounds: the run stays finite and the names stay 5 digits (`/svc-00001` is no prefix of another service).
    args.services = max(1, min(args.services, 99_999))
    args.instances = max(1, min(args.instances, 16))
    args.workers = max(1, min(args.workers, 64))
    args.dereg = max(0, min(args.dereg, 200, args.services))
    args.dereg_window = max(0.3, min(args.dereg_window, 10))
    args.churn_rate = max(0, min(args.churn_rate, 1000))
    args.churn_seconds = max(0.0, min(args.churn_seconds, 600))
    args.churn_services = max(1, min(args.churn_services, args.services))
    args.idle_seconds = max(1.0, min(args.idle_seconds, 600))
    args.routed_timeout = max(1.0, min(args.routed_timeout, 900))
    args.clients = max(1, min(args.clients, 64))
    args.agent_conns = max(1, min(args.agent_conns, 8))
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args._backend is not None:
        asyncio.run(_backend_main(args._backend))
        return
    bench = Bench(args)
    try:
        asyncio.run(bench.run())
    finally:
        bench.stop_all()
        bench.write()  # what was measured, even when a phase failed


if __name__ == "__main__":
    main(sys.argv[1:])
