"""The Grafana dashboard against the real thing: every query of grafana/dashboards/ferryman.json returns data.

A real Consul agent, real backends and a real Ferryman; a real Prometheus (Debian's binary, this test's own config
and data directory, never the system service) scrapes Ferryman's admin port every second while traffic runs:
normal requests, request bodies, answers with 5xx, an instance nobody listens on (connection refused: retries,
then an ejection), requests no route matches, and, last, Consul stopped (discovery errors). Then every panel
query and every template variable query is evaluated by Prometheus' HTTP API, with the variables set to All and
then to one service, and each must return at least one series. `promtool check metrics` must accept /metrics.

With FERRYMAN_ARTIFACTS set, the panel list (titles, queries, series counts) is written there as HTML, and as
a PNG when Chromium is installed (for the README; nothing here depends on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import REPO, Backend, ConsulAgent, FerrymanProcess, async_wait_until, fetch, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DASHBOARD = REPO / "grafana" / "dashboards" / "ferryman.json"
SCRAPE_INTERVAL_S = 1
# Grafana's built-ins, as Grafana would set them for a short time range over 1 s scrapes; $__rate_interval spans
# ten scrapes, so rate() always has several samples even when a scrape comes late.
BUILTINS = {"__rate_interval": "10s", "__interval": "2s", "__range": "60s"}
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


def _binary(env: str, name: str) -> str:
    """$env, else the venv's bin directory (where `make test` unpacks Debian's prometheus package without
    installing it), else PATH."""
    local = Path(sys.executable).parent / name
    path = os.environ.get(env) or (str(local) if os.access(local, os.X_OK) else shutil.which(name))
    if not path:
        pytest.fail(f"no `{name}` binary (set {env}, run `make test-debs`, which unpacks Debian's prometheus "
                    f"package into .venv/bin, or put it on PATH)", pytrace=False)
    return path


# --- a Prometheus of our own ---
@dataclass
class PrometheusServer:
    workdir: Path
    target: str  # host:port of Ferryman's admin listener
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self) -> None:
        config = self.workdir / "prometheus.yml"
        # honor_labels stays at its default (false): Ferryman's own `instance` label (ferryman_upstream_up) is
        # then stored as `exported_instance`, which is what the dashboard queries.
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": "15s"},
            "scrape_configs": [{"job_name": "ferryman", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [self.target]}]}],
        }, indent=2))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [_binary("PROMETHEUS_BIN", "prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--web.console.templates={self.workdir}", f"--web.console.libraries={self.workdir}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
        )
        log.close()
        wait_until(self._ready, 30, "Prometheus to be ready", interval=0.1)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
            status: int = resp.status
            return status == 200

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class PromAPI:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        async with self.session.get(f"{self.url}{path}", params=params) as resp:
            body = await resp.text()
        try:
            answer: dict[str, Any] = json.loads(body)
            return answer
        except ValueError:
            return {"status": "error", "error": f"HTTP body is not JSON: {body[:300]!r}"}

    async def scrapes(self) -> int:
        """Samples of `up` Prometheus holds for Ferryman: how many scrapes it made so far."""
        doc = await self.get("/api/v1/query", query='count_over_time(up{job="ferryman"}[5m])')
        result = doc.get("data", {}).get("result", [])
        return int(float(result[0]["value"][1])) if result else 0


# --- the dashboard's queries ---
@dataclass
class Query:
    panel: str
    ref: str
    expr: str  # as in the dashboard, variables and all
    is_variable: bool = False
    results: dict[str, tuple[int, str]] = field(default_factory=dict)  # pass name -> (series, verdict text)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows, collapsed or not


def dashboard_queries() -> tuple[list[Query], list[dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        queries.append(Query(f"variable ${variable['name']}", "var", str(text or variable["definition"]), True))
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append(Query(panel["title"], target.get("refId", "?"), target["expr"]))
    return queries, dashboard["templating"]["list"]


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in values:
            return values[name]
        raise KeyError(f"undeclared variable ${name} in {expr}")
    return VARIABLE.sub(one, expr)


def grafana_regex_escape(value: str) -> str:
    """How Grafana's Prometheus datasource puts one value of a multi-value variable into a regex matcher."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


async def evaluate(prom: PromAPI, expr: str) -> tuple[int, str, list[Any]]:
    """Series count, a verdict for the report, and the raw result (label values for label_values())."""
    now = time.time()
    variable = LABEL_VALUES.match(expr)
    if variable:
        selector, label = variable.groups()
        params = {"start": str(now - 300), "end": str(now)}
        if selector:
            params["match[]"] = selector
        doc = await prom.get(f"/api/v1/label/{label}/values", **params)
    else:
        doc = await prom.get("/api/v1/query", query=expr, time=str(now))
    if doc.get("status") != "success":
        return 0, f"{doc.get('errorType', 'error')}: {doc.get('error')}", []
    data = doc["data"]
    if variable:
        return len(data), f"values {data}", data
    if data["resultType"] in ("scalar", "string"):
        return 1, f"{data['resultType']} {data['result'][1]}", [data["result"]]
    result = data["result"]
    shown = "; ".join(f"{s['metric']} = {s['value'][1] if 'value' in s else '[matrix]'}" for s in result[:6])
    return len(result), f"{len(result)} series: {shown}" + (" ..." if len(result) > 6 else ""), result


async def evaluate_all(prom: PromAPI, queries: list[Query], values: dict[str, str], name: str) -> list[str]:
    failures = []
    for query in queries:
        expr = substitute(query.expr, values)
        count, verdict, _ = await evaluate(prom, expr)
        query.results[name] = (count, verdict)
        if count < 1:
            failures.append(f"[{name}] {query.panel!r} ({query.ref}): {expr}\n    -> {verdict}")
    return failures


async def poll_until_all_pass(prom: PromAPI, queries: list[Query], values: dict[str, str], name: str,
                              timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        failures = await evaluate_all(prom, queries, values, name)
        if not failures or time.monotonic() > deadline:
            return failures
        await asyncio.sleep(1)


# --- the artifact ---
def write_artifacts(queries: list[Query], passes: list[str]) -> None:
    out = os.environ.get("FERRYMAN_ARTIFACTS")
    if not out:
        return
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for query in queries:
        cells = "".join(
            f"<td class='{'ok' if query.results.get(p, (0, ''))[0] else 'bad'}' "
            f"title='{html.escape(query.results.get(p, (0, 'not evaluated'))[1])}'>"
            f"{query.results.get(p, (0, ''))[0]}</td>"
            for p in passes
        )
        rows.append(f"<tr><td>{html.escape(query.panel)}</td><td>{html.escape(query.ref)}</td>"
                    f"<td><code>{html.escape(query.expr)}</code></td>{cells}</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Ferryman dashboard: panels and series</title>
<style>
body {{ font: 13px/1.35 system-ui, sans-serif; margin: 16px; color: #1f2328; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }} p {{ margin: 0 0 12px; color: #57606a; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border: 1px solid #d0d7de; padding: 3px 6px; vertical-align: top; text-align: left; }}
th {{ background: #f6f8fa; }} code {{ font-size: 11.5px; word-break: break-all; }}
td.ok {{ background: #dafbe1; text-align: right; }} td.bad {{ background: #ffebe9; text-align: right; }}
</style></head><body>
<h1>Ferryman dashboard: every query against a real Prometheus</h1>
<p>grafana/dashboards/ferryman.json, evaluated by tests/integration/test_dashboard.py; the last columns give the
series each query returned with the variables set to All and to one service.</p>
<table><tr><th>Panel</th><th>Ref</th><th>Query</th>{"".join(f"<th>{html.escape(p)}</th>" for p in passes)}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
    page_path = directory / "dashboard-panels.html"
    page_path.write_text(page)
    chromium = shutil.which("chromium")
    if chromium:
        with tempfile.TemporaryDirectory(prefix="ferryman-chromium-") as profile:
            proc = subprocess.Popen(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1200,1600",
                 f"--screenshot={directory / 'dashboard-panels.png'}", page_path.resolve().as_uri()],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: its helpers are stopped with it
            )
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


# --- fixtures ---
@pytest.fixture
def own_consul(tmp_path: Path) -> Iterator[ConsulAgent]:
    """A Consul agent of this test's own: it is stopped halfway, so that Ferryman counts discovery errors."""
    workdir = tmp_path / "consul"
    workdir.mkdir()
    agent = ConsulAgent(workdir)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def tcp_port() -> int:
    """The TCP listener's port: the dash service is also routed there (`urlprefix-:PORT proto=tcp`)."""
    return free_port()


@pytest.fixture
def proxy(own_consul: ConsulAgent, tmp_path: Path, tcp_port: int) -> Iterator[FerrymanProcess]:
    # Short blocking queries, so Consul's latency histogram fills within the test.
    proc = FerrymanProcess(own_consul.addr, tmp_path, extra=["--consul-wait", "1", "--access-log", "false",
                                                             "--tcp-listen", f"127.0.0.1:{tcp_port}"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def prometheus(proxy: FerrymanProcess, tmp_path: Path) -> Iterator[PrometheusServer]:
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = PrometheusServer(workdir, f"127.0.0.1:{proxy.admin_port}")
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- traffic ---
BODY = b"x" * 4096


async def traffic(http: aiohttp.ClientSession, base: str, stop: asyncio.Event, statuses: Counter[int],
                  tcp_base: str) -> None:
    """Bounded in time and count. Every kind of request the dashboard has a panel for; HTTP through the TCP
    listener too (a new connection each time: TCP connections opened and ended, bytes relayed)."""
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/dash/page", {}),                                         # 200
        ("POST", "/dash/upload", {"data": BODY}),                          # 200, request and response bytes
        ("GET", "/dash/healthcheck", {}),                                  # 500 from the upstream
        ("GET", "/", {"headers": {"Host": "shop.example"}}),               # 200, a second service
        ("GET", "/", {"headers": {"Host": "nobody.example"}}),             # 404, service "none"
    ]
    deadline = time.monotonic() + 100
    for i in range(5000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        batch = list(requests)
        if i % 5 == 0:
            batch.append(("GET", "/dash/slow?delay=0.15", {}))  # in flight for a while; the latency spreads out
        for method, path, kwargs in batch:
            status, _, _ = await fetch(http, f"{base}{path}", method=method, **kwargs)
            statuses[status] += 1
        status, _, _ = await fetch(http, f"{tcp_base}/dash/page", headers={"Connection": "close"})
        statuses[status] += 1
        await asyncio.sleep(0.02)


async def test_every_dashboard_query_returns_data(
    own_consul: ConsulAgent, proxy: FerrymanProcess, prometheus: PrometheusServer, backends: list[Backend],
    http: aiohttp.ClientSession, tcp_port: int,
) -> None:
    promtool = _binary("PROMTOOL_BIN", "promtool")
    queries, _ = dashboard_queries()
    assert queries, f"no queries in {DASHBOARD}"

    dash = [await Backend(name).start() for name in ("dash-a", "dash-b")]
    shop = await Backend("shop-a").start()
    backends.extend([*dash, shop])
    dash_tags = ["urlprefix-/dash lb=round_robin", f"urlprefix-:{tcp_port} proto=tcp"]
    for backend in dash:
        backend.health_status = 500  # GET /dash/healthcheck answers 500 (no active checks are configured)
        await asyncio.to_thread(own_consul.register, "dash", backend.instance, backend.port, dash_tags)
    # Registered and passing in Consul, but nothing listens there: refused connections, retries, an ejection.
    await asyncio.to_thread(own_consul.register, "dash", "dash-dead", free_port(), dash_tags)
    await asyncio.to_thread(own_consul.register, "shop", shop.instance, shop.port, ["urlprefix-shop.example/"])
    await asyncio.to_thread(proxy.wait_instances, "dash@*any*/dash", ["dash-a", "dash-b", "dash-dead"])
    await asyncio.to_thread(proxy.wait_instances, "shop@shop.example/", ["shop-a"])

    prom = PromAPI(http, prometheus.url)
    stop = asyncio.Event()
    statuses: Counter[int] = Counter()
    clients = [asyncio.create_task(traffic(http, proxy.url, stop, statuses, f"http://127.0.0.1:{tcp_port}"))
               for _ in range(2)]
    passes = ["All", "service=dash"]
    failures: list[str] = []
    try:
        # Enough scrapes under traffic for rate() over $__rate_interval, then Consul goes away: discovery errors.
        start_scrapes = await prom.scrapes()

        async def scraped_enough() -> bool:
            return await prom.scrapes() >= start_scrapes + 6

        await async_wait_until(scraped_enough, 30, f"6 scrapes under traffic (see {prometheus.log_path})", 0.5)
        await asyncio.to_thread(own_consul.stop)

        failures = await poll_until_all_pass(prom, queries, {"service": ".*", "instance": ".*"}, passes[0], 30)
        # The variables as a user picks them: one service, then one of its instances (once more, without
        # waiting, when the first pass already failed: its failures are reported too).
        _, _, instances = await evaluate(prom, substitute(
            next(q.expr for q in queries if q.panel == "variable $instance"), {"service": "dash"}))
        passes[1] = f"service=dash, instance={instances[0] if instances else '(none)'}"
        one = {"service": "dash", "instance": grafana_regex_escape(str(instances[0])) if instances else "(none)"}
        failures += await poll_until_all_pass(prom, queries, one, passes[1], 0 if failures else 10)
        metrics_text = (await fetch(http, f"{proxy.admin_url}/metrics"))[1]
        up_series = (await prom.get("/api/v1/series", **{"match[]": "ferryman_upstream_up"}))["data"]
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        write_artifacts(queries, passes)

    assert statuses[200] and statuses[500] and statuses[404], f"the traffic did not cover 200/500/404: {statuses}"
    assert not failures, (
        f"{len(failures)} dashboard queries returned no data (statuses sent: {dict(statuses)}):\n"
        + "\n".join(failures)
    )

    # Prometheus kept the target's `instance` and renamed Ferryman's own: the dashboard's exported_instance.
    assert up_series, "no ferryman_upstream_up series in Prometheus"
    for series in up_series:
        assert series.get("instance") == f"127.0.0.1:{proxy.admin_port}", series
        assert series.get("exported_instance"), series
    dash_instances = {s["exported_instance"] for s in up_series if s.get("service") == "dash"}
    assert len(dash_instances) == 3, dash_instances

    check = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=metrics_text, capture_output=True, timeout=30,
    )
    assert check.returncode == 0, (
        f"promtool check metrics exited {check.returncode}:\n{check.stdout.decode()}{check.stderr.decode()}"
    )
