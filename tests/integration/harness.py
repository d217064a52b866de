"""Real components for integration tests: a Consul dev agent, Ferryman as a subprocess, aiohttp backends.

Everything listens on 127.0.0.1 on ports the kernel hands out; every process started here is stopped by its
PID. Nothing here mocks Consul: the agent is the real binary (CONSUL_BIN, set by `make test`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
from aiohttp import web
from aiohttp.typedefs import StrOrURL

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def debian_binary(name: str, package: str) -> str:
    """A peer's command from .venv/bin (`make test-debs` unpacks Debian's `package` there) or from PATH; a clear
    error when neither has it (a test never skips a missing peer)."""
    local = REPO / ".venv" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"no {name}: run `make test-debs`, which unpacks Debian's {package} into .venv")
    return found


def start_haproxy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Debian's HAProxy in the foreground on `config` (its own ports), its output appended to `log`; the caller
    stops it by PID (`_stop_pid`)."""
    with open(log, "ab") as out:
        return subprocess.Popen([debian_binary("haproxy", "haproxy"), "-f", str(config), "-db"],
                                stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL)


def consul_binary() -> str:
    path = os.environ.get("CONSUL_BIN") or str(REPO / ".venv" / "bin" / "consul")
    if not Path(path).is_file():
        raise RuntimeError(
            f"no Consul binary at {path}: run the tests with `make test`, which obtains one, or set CONSUL_BIN"
        )
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # still starting up
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = await predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def _http_json(method: str, url: str, body: Any = None, timeout: float = 5) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def registration(name: str, instance: str, port: int, tags: list[str], *, ttl: bool, address: str,
                 meta: dict[str, str] | None) -> dict[str, Any]:
    """The body of a service registration with the agent; `ttl` adds a passing TTL check (30 s)."""
    body: dict[str, Any] = {"Name": name, "ID": instance, "Address": address, "Port": port, "Tags": tags}
    if meta:
        body["Meta"] = meta
    if ttl:
        body["Check"] = {"CheckID": f"service:{instance}", "TTL": "30s", "Status": "passing"}
    return body


@dataclass
class ConsulAgent:
    """A `consul agent -dev` on free loopback ports; restartable on the same ports."""

    workdir: Path
    http_port: int = field(default_factory=free_port)
    ports: tuple[int, int, int] = field(default_factory=lambda: (free_port(), free_port(), free_port()))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    log_name = "consul.log"

    def spawn(self, *extra: str) -> None:
        """Start the agent process (`extra`: more flags), without waiting for it."""
        serf_lan, serf_wan, server = self.ports
        log = open(self.workdir / self.log_name, "ab")
        self.proc = subprocess.Popen(
            [consul_binary(), "agent", "-dev", "-node", "ferryman-test", "-bind", "127.0.0.1",
             "-client", "127.0.0.1", "-http-port", str(self.http_port), "-dns-port", "-1", "-grpc-port", "-1",
             # Consul's default limits, as a new user has them: 200 HTTP connections per client address, and
             # every process here connects from 127.0.0.1 (issue 14: Ferryman's connections stay a small constant).
             "-serf-lan-port", str(serf_lan), "-serf-wan-port", str(serf_wan), "-server-port", str(server), *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def start(self) -> None:
        self.spawn()
        try:
            wait_until(self._ready, 30, "Consul to elect itself leader and register its node")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"consul exited with {self.proc.returncode}; see {self.workdir / 'consul.log'}")
        leader = _http_json("GET", f"{self.url}/v1/status/leader", timeout=1)
        nodes = _http_json("GET", f"{self.url}/v1/catalog/nodes", timeout=1)
        return bool(leader) and bool(nodes)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)
            self.proc = None

    # --- agent API, synchronous (used from fixtures and via to_thread from async tests) ---
    def register(self, name: str, instance: str, port: int, tags: list[str], *, ttl: bool = True,
                 address: str = "127.0.0.1", meta: dict[str, str] | None = None) -> None:
        body = registration(name, instance, port, tags, ttl=ttl, address=address, meta=meta)
        _http_json("PUT", f"{self.url}/v1/agent/service/register", body)

    def deregister(self, instance: str) -> None:
        _http_json("PUT", f"{self.url}/v1/agent/service/deregister/{instance}")

    def ttl(self, instance: str, status: str) -> None:
        verb = {"passing": "pass", "warning": "warn", "critical": "fail"}[status]
        _http_json("PUT", f"{self.url}/v1/agent/check/{verb}/service:{instance}")

    # --- catalog API: many instances fast, on an external node (nothing for the agent to run) ---
    def register_external(self, node: str, instances: list[CatalogInstance]) -> None:
        """Put `instances` straight into the catalog on node `node` (created, address 127.0.0.1), each with a
        service check whose Status is "passing": `PUT /v1/txn` batches of 64 operations (Consul's limit per
        transaction), one connection at a time."""
        ops: list[dict[str, Any]] = [{"Node": {"Verb": "set", "Node": {"Node": node, "Address": "127.0.0.1"}}}]
        for i in instances:
            service = {"ID": i.id, "Service": i.service, "Tags": list(i.tags), "Address": "127.0.0.1", "Port": i.port}
            check = {"Node": node, "CheckID": f"service:{i.id}", "Name": "external", "Status": "passing",
                     "ServiceID": i.id}
            ops += [{"Service": {"Verb": "set", "Node": node, "Service": service}},
                    {"Check": {"Verb": "set", "Check": check}}]
        for start in range(0, len(ops), 64):
            _http_json("PUT", f"{self.url}/v1/txn", ops[start : start + 64], timeout=30)

    def deregister_external(self, node: str, instance: str = "") -> None:
        """Remove one instance of the external node `node`, or (no `instance`) the node with all of them."""
        body = {"Node": node, "ServiceID": instance} if instance else {"Node": node}
        _http_json("PUT", f"{self.url}/v1/catalog/deregister", body)


@dataclass(frozen=True, slots=True)
class CatalogInstance:
    """An instance for `ConsulAgent.register_external`."""

    service: str
    id: str
    port: int
    tags: tuple[str, ...] = ()


@dataclass
class ConsulServer:
    """A `consul agent -server` on loopback ports of its own, for tests that build clusters or datacenters;
    `start(*args)` adds what makes it one (`-bootstrap-expect 3 -retry-join ...`, `-datacenter dc2 ...`).
    Its log is `<datadir>.log`; stopped by PID."""

    name: str
    datadir: Path
    node: str = ""
    http_port: int = field(default_factory=free_port)
    serf_lan: int = field(default_factory=free_port)
    serf_wan: int = field(default_factory=free_port)
    server_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    @property
    def log_path(self) -> Path:
        return self.datadir.parent / f"{self.name}.log"

    def start(self, *args: str) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [consul_binary(), "agent", "-server", "-node", self.node or self.name, "-data-dir", str(self.datadir),
             "-bind", "127.0.0.1", "-client", "127.0.0.1", "-http-port", str(self.http_port),
             "-serf-lan-port", str(self.serf_lan), "-serf-wan-port", str(self.serf_wan),
             "-server-port", str(self.server_port), "-dns-port", "-1", "-grpc-port", "-1",
             "-hcl", "performance { raft_multiplier = 1 }", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def get(self, path: str) -> Any:
        return _http_json("GET", f"{self.url}{path}", timeout=2)

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)
            self.proc = None


@dataclass
class FerrymanProcess:
    consul_addr: str
    workdir: Path
    extra: list[str] = field(default_factory=list)
    workers: int = 1
    log_flush_interval: float = 0  # tests read the log as they go; buffering is covered on its own
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"ferryman-{self.port}.log"

    def start(self) -> None:
        # A free port can be taken between choosing it and Ferryman binding it (the suite's own outgoing
        # connections use the same range): then Ferryman (its supervisor or a worker) exits soon after, and it is
        # started again on new ports.
        for attempt in range(3):
            self._spawn()
            deadline, last_error = time.monotonic() + 40, "none"
            while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if self._answers() and self._proxy_accepts():
                        return
                except (OSError, ValueError, RuntimeError) as exc:  # still starting up
                    last_error = repr(exc)
                time.sleep(0.05)
            exited = None if self.proc is None else self.proc.poll()
            log = self.log_path
            self.stop()  # a start that failed leaves no process behind
            if exited is None:
                raise TimeoutError(f"Ferryman did not listen within 40 s (last error: {last_error}); see {log}")
            if attempt == 2 or "address already in use" not in self._log_text():
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"ferryman exited with {exited}; see {log}; its log ends:\n{tail}")
            self.port, self.admin_port = free_port(), free_port()

    def _answers(self) -> bool:
        return _http_json("GET", f"{self.admin_url}/api/routes", timeout=1) is not None

    def _log_text(self) -> str:
        return self.log_path.read_text(errors="replace").lower() if self.log_path.exists() else ""

    def _spawn(self) -> None:
        exe = Path(sys.executable).parent / "ferryman"
        # No FERRYMAN_* setting from the caller, but the build under test (FERRYMAN_BUILD, proxy/compiled.py).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_") or k == "FERRYMAN_BUILD"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(exe), "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
             "--consul-addr", self.consul_addr, "--log-format", "json", "--consul-wait", "5",
             "--workers", str(self.workers), "--log-flush-interval", str(self.log_flush_interval), *self.extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()

    def _proxy_accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ferryman exited with {self.proc.returncode}; see {self.log_path}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)
            self.proc = None

    def routes(self) -> dict[str, Any]:
        routes: dict[str, Any] = _http_json("GET", f"{self.admin_url}/api/routes", timeout=2)
        return routes

    def instances(self, route_id: str) -> list[str]:
        for route in self.routes()["routes"]:
            if route["id"] == route_id:
                return sorted(i["id"] for i in route["instances"])
        return []

    def wait_instances(self, route_id: str, expected: list[str], timeout: float = 10) -> None:
        wait_until(lambda: self.instances(route_id) == sorted(expected), timeout,
                   f"route {route_id} to have instances {expected}")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events


@dataclass
class Hit:
    at: float
    method: str
    path: str


class Backend:
    """An aiohttp server in the test's event loop that records every request it receives."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.port = free_port()
        self.hits: list[Hit] = []
        self.gate = asyncio.Event()
        self.first_chunk_received = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(Hit(time.monotonic(), request.method, request.raw_path))
        tail = request.match_info["tail"]
        action = tail.rsplit("/", 1)[-1]
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = getattr(self, f"_do_{action}", None)
        if handler is not None:
            return await handler(request)
        return await self._echo(request)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "instance": self.instance, "method": request.method, "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()], "body_bytes": len(body),
        })

    async def _do_upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        first = True
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            if first:
                self.first_chunk_received.set()
                first = False
        return web.json_response({"sha256": digest.hexdigest(), "size": size,
                                  "chunked": "chunked" in request.headers.get("Transfer-Encoding", "")})

    async def _do_download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "0"))
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        for offset in range(0, size, 65536):
            await resp.write(pattern_bytes(offset, min(65536, size - offset)))
        await resp.write_eof()
        return resp

    async def _do_gated(self, request: web.Request) -> web.StreamResponse:
        """First chunk, then wait until the test saw it through the proxy, then the rest."""
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"first\n")
        await asyncio.wait_for(self.gate.wait(), 10)
        await resp.write(b"second\n")
        await resp.write_eof()
        return resp

    health_status = 200  # what GET .../healthcheck answers (for Ferryman's active checks)

    async def _do_healthcheck(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status, text="health\n")

    async def _do_slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="late\n")

    async def _do_hopbyhop(self, request: web.Request) -> web.Response:
        resp = web.Response(text="ok\n")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers["Connection"] = "X-Hop"
        resp.headers["X-Hop"] = "must not reach the client"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["X-End-To-End"] = "kept"
        return resp


def pattern_bytes(offset: int, length: int) -> bytes:
    """Deterministic, incompressible-looking bytes: the same offset always gives the same content."""
    out = bytearray()
    block = offset // 32
    while len(out) < length + (offset % 32):
        out += hashlib.sha256(block.to_bytes(8, "big")).digest()
        block += 1
    start = offset % 32
    return bytes(out[start : start + length])


def new_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


async def fetch(session: aiohttp.ClientSession, url: StrOrURL, **kwargs: Any) -> tuple[int, bytes, Any]:
    async with session.request(kwargs.pop("method", "GET"), url, **kwargs) as resp:
        return resp.status, await resp.read(), resp.headers


class SteadyLoad:
    """`clients` loops sending GET `url` back to back until `stop()` (each bounded by `limit_s` even if the test
    goes wrong): every failure (an exception or a status other than 200) and, for each 200, when it came and
    which instance answered (the echo backend's `instance`)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, *, clients: int = 4, limit_s: float = 30) -> None:
        self.http, self.url, self.limit_s = http, url, limit_s
        self.failures: list[str] = []
        self.served: list[tuple[float, str]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(clients)]

    async def _client(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, body, _ = await fetch(self.http, self.url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if status != 200:
                self.failures.append(f"{status} {body[:100]!r}")
            else:
                self.served.append((time.monotonic(), json.loads(body)["instance"]))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
