"""`docker compose up --build` as a user runs it, checked the way a user would look at it.

The project's docker-compose.yml, with an override that only leaves Grafana out, runs on a Docker engine of
the test's own (tests/compose/engine.py), on stand-ins for the public images (tests/compose/standins.py);
Ferryman's two images are built from the Dockerfile. Then, in this order (the last two take the stack down):
every container healthy and published on loopback only; routing through Ferryman; the status page; Prometheus
scraping Ferryman with every metric the Grafana dashboard queries; a demo service stopped and started under
client load without one failed request; SIGTERM draining Ferryman within its grace period; `down` leaving
nothing behind. The image itself: a non-root user and no compiler or build tool.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from .engine import REPO
from .stack import ComposeStack

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

SERVICES = {"consul", "ferryman", "web-1", "web-2", "api-1", "prometheus"}  # grafana: left out (override.yml)
PROXY = ("127.0.0.1", 8080)
ADMIN = "http://127.0.0.1:9919"
CONSUL = "http://127.0.0.1:8500"
PROMETHEUS = "http://127.0.0.1:9090"
DASHBOARD = REPO / "grafana" / "dashboards" / "ferryman.json"


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def proxy_get(path: str, host: str = "localhost", conn: http.client.HTTPConnection | None = None,
              ) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(*PROXY, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def instance_of(body: bytes) -> str:
    instance: str = json.loads(body)["instance"]
    return instance


def _everything_ready(stack: ComposeStack) -> list[str] | None:
    """None when every service is up (healthy where it has a healthcheck) and routed; else what is not."""
    not_ready = []
    containers = stack.containers()
    for service in sorted(SERVICES):
        state = containers.get(service, {}).get("State", {})
        health = state.get("Health", {}).get("Status", "none")
        if state.get("Status") == "exited" and containers[service]["HostConfig"]["RestartPolicy"]["Name"] in ("", "no"):
            raise AssertionError(f"{service} exited with code {state['ExitCode']}:\n{stack.logs(40)}")
        if not state.get("Running") or health not in ("healthy", "none"):
            not_ready.append(f"{service}: {state.get('Status', 'no container')}, health {health}")
    if not_ready:
        return not_ready
    try:
        routes = get_json(f"{ADMIN}/api/routes")["routes"]
        checks = get_json(f"{CONSUL}/v1/health/state/any")
    except OSError as exc:
        return [f"admin or Consul API: {exc}"]
    instances = {i["id"] for r in routes for i in r["instances"]}
    failing = [f"{c['ServiceID'] or c['Node']}: {c['Status']}" for c in checks if c["Status"] != "passing"]
    if failing or instances != {"web-1", "web-2", "api-1"}:
        return [*failing, f"routed instances {sorted(instances)}"]
    return None


@pytest.fixture(scope="module")
def ready(stack: ComposeStack) -> ComposeStack:
    wait_everything_ready(stack, 180)
    return stack


def wait_everything_ready(stack: ComposeStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (pending := _everything_ready(stack)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pending is None, f"not ready within {timeout:.0f} s: {pending}\n{stack.logs()}"


class TestTheStackUp:
    """What `docker compose up --build` gives: every container healthy, reachable on 127.0.0.1 only."""

    def test_every_container_is_healthy(self, ready: ComposeStack) -> None:
        """Each service of the stack runs; consul and ferryman report healthy; every Consul check passes."""
        containers = ready.containers()
        assert set(containers) == SERVICES, "grafana alone is left out, by the override"
        for service in ("consul", "ferryman"):
            assert containers[service]["State"]["Health"]["Status"] == "healthy", service
        assert _everything_ready(ready) is None

    def test_ports_are_published_on_loopback_only(self, ready: ComposeStack) -> None:
        """Every published port is bound to 127.0.0.1 of the host; the containers share one compose network."""
        networks = set()
        for service, container in ready.containers().items():
            for port, bindings in (container["HostConfig"]["PortBindings"] or {}).items():
                assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, f"{service} {port}"
            networks |= set(container["NetworkSettings"]["Networks"])
        assert networks == {"ferrymantest_default"}

    def test_the_image_runs_as_a_user_that_is_not_root_and_has_no_build_tools(self, ready: ComposeStack) -> None:
        """ferryman:local and ferryman-demo:local run as uid 10001, with no compiler, make or linker on PATH."""
        for image in ("ferryman:local", "ferryman-demo:local"):
            result = ready.engine.docker("run", "--rm", "--entrypoint", "sh", image, "-c",
                                         "id -u; command -v gcc cc c++ g++ clang make ld as || true")
            assert result.stdout.split() == ["10001"], f"{image}: {result.stdout}"
        config = json.loads(ready.engine.docker("image", "inspect", "ferryman:local").stdout)[0]["Config"]
        assert config["User"] == "10001:10001" and config["Entrypoint"] == ["ferryman"]

    def test_the_image_ships_the_compiled_hot_path(self, ready: ComposeStack) -> None:
        """`ferryman --version` in the image and its /api/status say the mypyc-compiled build runs (issue 18)."""
        version = ready.engine.docker("run", "--rm", "ferryman:local", "--version").stdout
        assert re.fullmatch(r"ferryman \S+ \(compiled: mypyc, \d+ modules\)\n", version), version
        build = get_json(f"{ADMIN}/api/status")["build"]
        assert build["compiled"] and build["describe"] == version.split("(")[1].rstrip(")\n"), build


class TestThroughFerryman:
    """Requests to 127.0.0.1:8080 reach the demo services by their route tags."""

    def test_round_robin_over_web_1_and_web_2(self, ready: ComposeStack) -> None:
        """On one connection (one worker), GET / alternates between web-1 and web-2."""
        conn = http.client.HTTPConnection(*PROXY, timeout=10)
        try:
            seen = []
            for _ in range(8):
                status, body = proxy_get("/", conn=conn)
                assert status == 200
                seen.append(instance_of(body))
        finally:
            conn.close()
        assert set(seen) == {"web-1", "web-2"}
        assert all(a != b for a, b in itertools.pairwise(seen)), seen

    @pytest.mark.parametrize(("host", "path", "upstream_path"), [
        ("localhost", "/api/hello", "/hello"),
        ("api.localhost", "/hello", "/hello"),
    ], ids=["path-prefix-stripped", "host-route"])
    def test_api_routes_reach_api_1(self, ready: ComposeStack, host: str, path: str, upstream_path: str) -> None:
        """/api/hello goes to service api with /api stripped; Host api.localhost goes there too."""
        status, body = proxy_get(path, host=host)
        assert status == 200
        answer = json.loads(body)
        assert (answer["service"], answer["instance"], answer["path"]) == ("api", "api-1", upstream_path)

    def test_the_status_page_and_routes_api(self, ready: ComposeStack) -> None:
        """The admin port serves the status page and /api/routes naming the three instances."""
        with urllib.request.urlopen(f"{ADMIN}/", timeout=5) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
            assert b"<title>Ferryman status</title>" in resp.read()
        routes = get_json(f"{ADMIN}/api/routes")["routes"]
        by_service: dict[str, set[str]] = {}
        for route in routes:
            by_service.setdefault(route["service"], set()).update(i["id"] for i in route["instances"])
        assert by_service == {"web": {"web-1", "web-2"}, "api": {"api-1"}}


def dashboard_metrics() -> set[str]:
    """The Ferryman metric names the Grafana dashboard's queries use (histograms by their _bucket series)."""
    text = json.dumps(json.loads(DASHBOARD.read_text()))
    return set(re.findall(r"\b(ferryman_[a-z0-9_]+)", text))


def prometheus_names() -> set[str]:
    query = urllib.parse.quote('count by (__name__) ({__name__=~"ferryman_.+", job="ferryman"})')
    result = get_json(f"{PROMETHEUS}/api/v1/query?query={query}")["data"]["result"]
    return {r["metric"]["__name__"] for r in result}


def test_prometheus_scrapes_ferryman_with_every_metric_the_dashboard_uses(ready: ComposeStack) -> None:
    """Prometheus' ferryman target is up and every ferryman_* name in the dashboard's HTTP rows has series (the
    stack has no TCP service: the TCP row is proven by tests/integration/test_dashboard.py)."""
    def target_up() -> bool:
        targets = get_json(f"{PROMETHEUS}/api/v1/targets")["data"]["activeTargets"]
        return [(t["labels"]["job"], t["health"]) for t in targets] == [("ferryman", "up")]

    ready.wait("Prometheus' ferryman target to be up", 60, target_up)
    for path in ("/", "/api/hello", "/nowhere-routed-404"):
        proxy_get(path)
    wanted = {name for name in dashboard_metrics() if not name.startswith("ferryman_tcp_")}
    assert len(wanted) > 10
    deadline = time.monotonic() + 60  # a scrape every 5 s (compose/prometheus.yml)
    while (missing := wanted - prometheus_names()) and time.monotonic() < deadline:
        time.sleep(1)
    assert missing == set(), "dashboard metrics Prometheus has no series of"


@dataclass
class Load:
    """A bounded loop of GET / on new connections, run in a thread while the stack changes."""

    limit: int = 50_000
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    instances: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        for _ in range(self.limit):
            if self.stop.is_set():
                return
            try:
                status, body = proxy_get("/")
            except OSError as exc:
                self.errors.append(repr(exc))
                continue
            self.statuses[status] += 1
            if status == 200:
                self.instances.append((time.monotonic(), instance_of(body)))
            else:
                self.errors.append(f"{status} at {time.monotonic():.2f}: {body[:200]!r}")

    def served_by(self, instance: str, since: float) -> bool:
        return any(at > since and name == instance for at, name in self.instances)


def test_a_demo_service_stopped_and_started_under_load_fails_no_request(ready: ComposeStack) -> None:
    """`docker compose stop web-1`, then `start web-1`, while a client sends GET /: every answer is a 200."""
    load = Load()
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    stopping = stopped = started = 0.0
    try:
        ready.wait("load to reach both web instances", 20,
                   lambda: load.served_by("web-1", 0) and load.served_by("web-2", 0))
        stopping = time.monotonic()
        ready.compose("stop", "web-1")
        stopped = time.monotonic()
        assert not ready.container("web-1")["State"]["Running"]
        ready.wait("web-2 alone to answer", 20, lambda: load.served_by("web-2", stopped + 1))
        assert not load.served_by("web-1", stopped + 1), "a stopped instance answered"
        ready.compose("start", "web-1")
        started = time.monotonic()
        ready.wait("web-1 back in the round robin", 30, lambda: load.served_by("web-1", started))
    finally:
        load.stop.set()
        thread.join(timeout=30)
    total = sum(load.statuses.values()) + len(load.errors)
    if load.errors:
        answers = [line for line in ready.compose("logs", "--no-color", "ferryman").stdout.splitlines()
                   if re.search(r'"status": ?5\d\d|"level": ?"(warning|error)"', line)]
        timeline = f"stop from {stopping:.2f} to {stopped:.2f}, start at {started:.2f}"
        raise AssertionError(f"{load.statuses}, {timeline}: {load.errors[:5]}\n" + "\n".join(answers[-20:]))
    assert set(load.statuses) == {200}
    assert total > 100, f"only {total} requests: the load did not run through the change"


def test_sigterm_drains_ferryman_within_its_grace_period(ready: ComposeStack) -> None:
    """`docker compose stop ferryman` (SIGTERM): the request in flight completes, Ferryman exits 0 in time."""
    grace = 15.0  # stop_grace_period of the ferryman service
    outcome: dict[str, Any] = {}
    first_chunk = threading.Event()

    def slow_request() -> None:  # 6 chunks, 0.5 s apart: 3 s of streaming from a demo service
        conn = http.client.HTTPConnection(*PROXY, timeout=20)
        try:
            conn.request("GET", "/stream?chunks=6&delay=0.5", headers={"Host": "localhost"})
            resp = conn.getresponse()
            chunks = [resp.read(8)]  # the start of the first chunk: the request is in flight
            first_chunk.set()
            chunks.append(resp.read())
            outcome.update(status=resp.status, body=b"".join(chunks))
        except (OSError, http.client.HTTPException) as exc:
            outcome["error"] = repr(exc)
        finally:
            first_chunk.set()
            conn.close()

    thread = threading.Thread(target=slow_request, daemon=True)
    thread.start()
    assert first_chunk.wait(10)
    started = time.monotonic()
    ready.compose("stop", "ferryman")  # SIGTERM, then SIGKILL after stop_grace_period
    took = time.monotonic() - started
    thread.join(timeout=20)
    state = ready.container("ferryman")["State"]
    assert outcome.get("status") == 200 and outcome["body"].count(b" chunk ") == 6, outcome
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert took < grace, f"stop took {took:.1f} s: killed at the end of the grace period"
    ready.compose("start", "ferryman")
    wait_everything_ready(ready, 60)


def test_down_leaves_nothing_behind(ready: ComposeStack) -> None:
    """`docker compose down` removes every container and network of the stack and leaves no volume."""
    ready.compose("down")
    assert ready.containers() == {}
    assert ready.networks() == []
    assert ready.volumes() - ready.volumes_before == set(), "volumes left behind (anonymous: an image's VOLUME)"
