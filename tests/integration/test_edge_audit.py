"""The points of the outside audit of the HTTP edge (issue 19), each on raw sockets or a real client.

- Ferryman's own error answers name no instance; the log line, with the request id the client got, does.
- Every answer, the parser's refusals and the limits' 408/413/431 included, has a request id, an access line
  with the bytes of its body, and counts in the metrics.
- Fresh request ids cannot be guessed from one another.
- A service may have its own read timeout (service meta `ferryman-read-timeout`, route tag `read_timeout=`):
  a long poll answers through it, while a service without one still gets 504 after the global timeout.
- A datacenter in `consul_dc` that Consul does not know is named as a configuration problem.
- A drain (SIGTERM with drain_delay) loses no request of clients sending back to back on kept-alive connections.

Look-alike framing names, Content-Length with leading zeros and request targets the grammar does not allow are
in test_desync.py's table; KV certificate rotation in test_tls.py.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, free_port, wait_until
from .rawhttp import WAIT, Response, Wire, request

pytestmark = pytest.mark.integration

_names = itertools.count(1)


def _name(what: str) -> str:
    return f"edge-{what}-{next(_names)}"


@pytest.fixture(scope="module")
def ferryman(consul: ConsulAgent, workdir: Path) -> Iterator[FerrymanProcess]:
    """A proxy with a 1 s global read timeout and a 1 s client header timeout, so timeouts show quickly."""
    proc = FerrymanProcess(consul.addr, workdir, extra=["--read-timeout", "1", "--client-header-timeout", "1"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def registered(consul: ConsulAgent) -> AsyncIterator[list[str]]:
    """Instance ids registered by the test, deregistered after it."""
    ids: list[str] = []
    yield ids
    for instance in ids:
        await asyncio.to_thread(consul.deregister, instance)


async def _register(consul: ConsulAgent, proxy: FerrymanProcess, registered: list[str], name: str, port: int,
                    tag_options: str = "", meta: dict[str, str] | None = None) -> None:
    instance = f"{name}-1"
    registered.append(instance)
    tag = f"urlprefix-/{name} {tag_options}".strip()
    await asyncio.to_thread(consul.register, name, instance, port, [tag], meta=meta)
    await asyncio.to_thread(proxy.wait_instances, f"{name}@*any*/{name}", [instance])


async def _exchange(proxy: FerrymanProcess, raw: bytes) -> Response:
    wire = await Wire.open(proxy.port)
    try:
        wire.send(raw)
        return await wire.response()
    finally:
        wire.abort()


def _access_line(proxy: FerrymanProcess, request_id: str) -> dict[str, Any]:
    """The access line of the request with this id (waited for: lines are written as requests end)."""
    def find() -> dict[str, Any] | None:
        return next((e for e in proxy.log_events()
                     if e.get("event") == "access" and e.get("request_id") == request_id), None)
    return wait_until(find, WAIT, f"the access line of request {request_id}")  # type: ignore[no-any-return]


def _log_lines(proxy: FerrymanProcess, request_id: str, event: str) -> list[dict[str, Any]]:
    return [e for e in proxy.log_events() if e.get("event") == event and e.get("request_id") == request_id]


class TestErrorAnswersNameNoInstance:
    """502 and 504 say what happened in general words; the log line keeps the instance, under the same id."""

    async def test_502_refused_connection(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, registered: list[str],
    ) -> None:
        name = _name("refused")
        port = free_port()  # nothing listens there
        await _register(consul, ferryman, registered, name, port)
        resp = await _exchange(ferryman, request("GET", f"/{name}/x"))

        assert resp.status == 502
        assert resp.body == b"502 the upstream could not be reached\n"
        assert b"127.0.0.1" not in resp.body and str(port).encode() not in resp.body
        request_id = resp.header("X-Request-ID")
        assert request_id
        logged = wait_until(lambda: _log_lines(ferryman, request_id, "proxy_error"), WAIT, "the proxy_error line")
        assert f"127.0.0.1:{port}" in logged[0]["error"] and logged[0]["upstream"] == f"127.0.0.1:{port}"

    async def test_504_silent_instance(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, registered: list[str], backends: list[Backend],
    ) -> None:
        name = _name("silent")
        backend = await Backend(f"{name}-1").start()
        backends.append(backend)
        await _register(consul, ferryman, registered, name, backend.port)
        resp = await _exchange(ferryman, request("GET", f"/{name}/slow?delay=3"))

        assert resp.status == 504
        assert resp.body == b"504 the upstream did not answer in time\n"
        assert str(backend.port).encode() not in resp.body
        request_id = resp.header("X-Request-ID")
        assert request_id
        logged = wait_until(lambda: _log_lines(ferryman, request_id, "proxy_error"), WAIT, "the proxy_error line")
        assert f"127.0.0.1:{backend.port}" in logged[0]["error"]


class TestEveryAnswerIsAccounted:
    """Every answer Ferryman sends has a request id, an access line with its body's bytes, and counts."""

    @pytest.mark.parametrize(("raw", "status"), [
        pytest.param(b"GET / HTTP/1.1\r\nHost: edge.test\r\nContent-Length: abc\r\n\r\n", 400, id="400-parser"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: edge.test\r\nHost: other.test\r\n\r\n", 400, id="400-two-hosts"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 32, 400, id="400-tls-on-plain"),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: edge.test\r\n\r\n", 414, id="414-target"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: edge.test\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431,
                     id="431-header"),
        pytest.param(b"GET /none-such HTTP/1.1\r\nHost: edge.test\r\n\r\n", 404, id="404-no-route"),
        pytest.param(b"GET /none-such HTTP/1.1\r\nHost: edge.test\r\nX-Request-ID: mine-1\r\n\r\n", 404,
                     id="404-client-id-kept"),
    ])
    async def test_answer_has_id_access_line_and_bytes(
        self, ferryman: FerrymanProcess, raw: bytes, status: int,
    ) -> None:
        resp = await _exchange(ferryman, raw)
        assert resp.status == status, resp.body
        request_id = resp.header("X-Request-ID")
        assert request_id
        if b"X-Request-ID: mine-1" in raw:
            assert request_id == "mine-1"
        line = _access_line(ferryman, request_id)
        assert (line["status"], line["bytes"]) == (status, len(resp.body))
        assert len(resp.body) > 0

    async def test_408_for_a_head_that_does_not_arrive(self, ferryman: FerrymanProcess) -> None:
        wire = await Wire.open(ferryman.port)
        try:
            wire.send(b"GET / HTTP/1.1\r\nHost: edge.test\r\nX-Slow: a")
            resp = await wire.response()
        finally:
            wire.abort()
        assert resp.status == 408
        request_id = resp.header("X-Request-ID")
        assert request_id
        line = _access_line(ferryman, request_id)
        assert (line["status"], line["bytes"]) == (408, len(resp.body))

    async def test_refusals_count_in_the_metrics(self, ferryman: FerrymanProcess) -> None:
        def count_400() -> float:
            with urllib.request.urlopen(f"{ferryman.admin_url}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("ferryman_requests_total{") and 'code="400"' in line)

        before = await asyncio.to_thread(count_400)
        resp = await _exchange(ferryman, b"GET / HTTP/1.1\r\nHost: edge.test\r\nContent-Length: x\r\n\r\n")
        assert resp.status == 400
        await asyncio.to_thread(wait_until, lambda: count_400() == before + 1, WAIT, "the 400 to be counted")


class TestRequestIds:
    async def test_fresh_ids_cannot_be_guessed_from_one_another(self, ferryman: FerrymanProcess) -> None:
        """Consecutive ids are 128 random bits each: not a counter, and no shared per-process prefix."""
        wire = await Wire.open(ferryman.port)
        try:
            ids = []
            for _ in range(5):
                wire.send(request("GET", "/none-such"))
                ids.append(int((await wire.response()).header("X-Request-ID") or "", 16))
        finally:
            wire.abort()
        assert len({i >> 64 for i in ids}) == 5
        assert all(abs(b - a) > 1 << 32 for a, b in itertools.pairwise(ids))


class TestServiceReadTimeout:
    """A long poll through a service with its own read timeout; the global one for the others."""

    @pytest.mark.parametrize(("tag_options", "meta"), [
        pytest.param("", {"ferryman-read-timeout": "360"}, id="service-meta"),
        pytest.param("read_timeout=360", None, id="route-tag"),
    ])
    async def test_slow_answer_through_its_own_timeout(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, registered: list[str], backends: list[Backend],
        tag_options: str, meta: dict[str, str] | None,
    ) -> None:
        # The global read_timeout here is 1 s; the answer takes 3 s (the README's 40 s against 30 s, scaled).
        name = _name("poll")
        backend = await Backend(f"{name}-1").start()
        backends.append(backend)
        await _register(consul, ferryman, registered, name, backend.port, tag_options, meta)
        started = time.monotonic()
        resp = await _exchange(ferryman, request("GET", f"/{name}/slow?delay=3"))
        assert (resp.status, resp.body) == (200, b"late\n")
        assert time.monotonic() - started >= 3

    async def test_without_one_504_after_the_global_timeout(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, registered: list[str], backends: list[Backend],
    ) -> None:
        name = _name("plain")
        backend = await Backend(f"{name}-1").start()
        backends.append(backend)
        await _register(consul, ferryman, registered, name, backend.port)
        started = time.monotonic()
        resp = await _exchange(ferryman, request("GET", f"/{name}/slow?delay=3"))
        took = time.monotonic() - started
        assert resp.status == 504
        assert 1 <= took < 2.5, took  # 1 s and a sweep tick


class TestUnknownDatacenter:
    def test_named_as_a_configuration_problem(self, consul: ConsulAgent, workdir: Path) -> None:
        proxy = FerrymanProcess(consul.addr, workdir, extra=["--consul-dc", "dc-typo"])
        proxy.start()
        try:
            unknown = wait_until(lambda: [e for e in proxy.log_events() if e.get("event") == "consul_dc_unknown"],
                                 10, "consul_dc_unknown")
            assert unknown[0]["level"] == "error" and unknown[0]["problem"] == "configuration"
            assert unknown[0]["datacenters"] == ["dc-typo"] and "consul_dc" in unknown[0]["detail"]
        finally:
            proxy.stop()


# --- drain: SIGTERM with drain_delay under clients sending back to back on kept-alive connections ---------------


class KeptAliveClient(threading.Thread):
    """A client behind a load balancer: it sends GETs back to back on one kept-alive connection (http.client),
    and opens a new one only while Ferryman says it is ready, as a load balancer would route new connections
    elsewhere once /ready answers 503. Every request that fails is a failure."""

    def __init__(self, proxy: FerrymanProcess, path: str, until: float) -> None:
        super().__init__(daemon=True)
        self.proxy, self.path, self.until = proxy, path, until
        self.served = self.closes = 0
        self.first_close = 0.0  # when an answer first said Connection: close
        self.failures: list[str] = []

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.proxy.admin_url}/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < self.until:
            if conn is None:
                if not self.ready():
                    return  # new connections go to another replica now
                conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=5)
            try:
                conn.request("GET", self.path)
                answer = conn.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = None
                continue
            if answer.status != 200:
                self.failures.append(f"status {answer.status}")
            self.served += 1
            if answer.getheader("Connection", "").lower() == "close":
                self.closes += 1
                self.first_close = self.first_close or time.monotonic()
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


class TestDrain:
    """From the first moment of a drain every answer says Connection: close; idle connections close only after."""

    @pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
    async def test_no_request_lost_through_a_sigterm(
        self, consul: ConsulAgent, workdir: Path, registered: list[str], backends: list[Backend], workers: int,
    ) -> None:
        proxy = FerrymanProcess(consul.addr, workdir, workers=workers, extra=["--drain-delay", "2"])
        proxy.start()
        try:
            name = _name("drain")
            backend = await Backend(f"{name}-1").start()
            backends.append(backend)
            await _register(consul, proxy, registered, name, backend.port)
            clients = [KeptAliveClient(proxy, f"/{name}/x", time.monotonic() + 10) for _ in range(4)]
            await asyncio.to_thread(wait_until, clients[0].ready, 10, "Ferryman ready (every worker synced)")
            # Every worker routes the service (new connections spread over them): probes in a row all answered.
            deadline = time.monotonic() + WAIT
            in_a_row = 0
            while in_a_row < 4 * workers:
                probe = await _exchange(proxy, request("GET", f"/{name}/probe"))
                in_a_row = in_a_row + 1 if probe.status == 200 else 0
                assert time.monotonic() < deadline, "the workers did not all route the service"
            for client in clients:
                client.start()
            await asyncio.sleep(0.7)
            before = sum(c.served for c in clients)
            assert proxy.proc is not None
            proxy.proc.terminate()  # SIGTERM
            sigterm_at = time.monotonic()
            for client in clients:
                await asyncio.to_thread(client.join, 15)
            exit_code = await asyncio.to_thread(proxy.proc.wait, 15)

            failures = [f for c in clients for f in c.failures]
            served = sum(c.served for c in clients)
            assert failures == [], f"{len(failures)} of {served + len(failures)} failed: {failures[:5]}"
            assert before > 20 and served > before
            # Each kept-alive connection was told to close at the start of the drain (2 s), not at its end.
            assert all(0 < c.first_close - sigterm_at < 1 for c in clients), [c.first_close - sigterm_at
                                                                               for c in clients]
            assert exit_code == 0
        finally:
            proxy.stop()

