"""Consul ACLs against a real agent with `acl { enabled = true, default_policy = "deny" }`.

Ferryman works with a token holding only service:read and node:read; no token, a token Consul does not know, or
one missing either permission stops it at start with exit code 2 and a message naming what is missing; a token
deleted while Ferryman runs is counted as `forbidden` while the last table keeps serving.

The agent's ACL system is bootstrapped over the HTTP API (PUT /v1/acl/bootstrap), which Consul 1.4 and every
later release speak, so no version-specific config key (`master` / `initial_management`) is needed.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import (
    Backend,
    ConsulAgent,
    FerrymanProcess,
    async_wait_until,
    fetch,
    free_port,
    registration,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MINIMAL_RULES = '''
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "ferryman/" { policy = "read" }
'''


def _request(method: str, url: str, token: str | None, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


@dataclass
class AclConsul(ConsulAgent):
    """A `consul agent -dev` with ACLs on, default deny, bootstrapped: `management` is its management token."""

    management: str = ""
    log_name = "consul-acl.log"

    def start(self) -> None:
        self.spawn("-hcl", 'acl { enabled = true, default_policy = "deny" }')
        # Bootstrapping answers once the agent has a leader and the ACL system is up; it works once.
        try:
            boot = wait_until(self._bootstrap, 30, "Consul's ACL system to bootstrap", interval=0.2)
            self.management = boot["SecretID"]
            wait_until(lambda: self.call("GET", "/v1/catalog/service/consul"), 30, "the agent in the catalog")
        except BaseException:
            self.stop()
            raise

    def _bootstrap(self) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"consul exited with {self.proc.returncode}; see {self.workdir / self.log_name}")
        return _request("PUT", f"{self.url}/v1/acl/bootstrap", None)

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return _request(method, f"{self.url}{path}", token or self.management, body)

    def token(self, name: str, rules: str) -> tuple[str, str]:
        """A new policy `name` with `rules` and a token holding only it: (SecretID, AccessorID)."""
        self.call("PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})
        made = self.call("PUT", "/v1/acl/token", {"Description": name, "Policies": [{"Name": name}]})
        return made["SecretID"], made["AccessorID"]

    def register(self, name: str, instance: str, port: int, tags: list[str], *, ttl: bool = False,
                 address: str = "127.0.0.1", meta: dict[str, str] | None = None) -> None:
        """As the plain agent's, with the management token, and without a TTL check unless asked."""
        self.call("PUT", "/v1/agent/service/register",
                  registration(name, instance, port, tags, ttl=ttl, address=address, meta=meta))


@pytest.fixture(scope="module")
def acl_consul(workdir: Path) -> Iterator[AclConsul]:
    agent = AclConsul(workdir)
    agent.start()
    yield agent
    agent.stop()


def _status(agent: AclConsul, path: str, token: str | None) -> tuple[int, Any]:
    try:
        return 200, _request("GET", f"{agent.url}{path}", token)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def _run_ferryman(consul_addr: str, workdir: Path, *extra: str, workers: int = 1) -> subprocess.CompletedProcess[str]:
    """Ferryman run to its exit (or killed by the timeout)."""
    exe = Path(sys.executable).parent / "ferryman"
    return subprocess.run(
        [str(exe), "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
         "--consul-addr", consul_addr, "--log-format", "json", "--consul-wait", "2", "--workers", str(workers),
         *extra],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        cwd=workdir, env={"PATH": "/usr/bin:/bin"},
    )


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


class TestWhatConsulAnswers:
    """The facts the start-time check builds on, as this Consul answers them (no token at all; a token it does
    not know; tokens with node:read only, service:read only, and both)."""

    def test_answers_per_token(self, acl_consul: AclConsul) -> None:
        node_only, _ = acl_consul.token("probe-node-only", 'node_prefix "" { policy = "read" }')
        service_only, _ = acl_consul.token("probe-service-only", 'service_prefix "" { policy = "read" }')
        both, _ = acl_consul.token("probe-both", MINIMAL_RULES)
        unknown = str(uuid.uuid4())
        paths = ("/v1/acl/token/self", "/v1/catalog/services", "/v1/health/service/consul")
        seen = {
            case: [_status(acl_consul, path, token) for path in paths]
            for case, token in [("none", None), ("unknown", unknown), ("node", node_only),
                                ("service", service_only), ("both", both)]
        }
        # No token: the anonymous token, which /acl/token/self does not show (403 on Consul 1.8) or shows
        # (200); either way reads are filtered to nothing, not refused.
        assert seen["none"][0][0] in (200, 403) and seen["none"][1:] == [(200, {}), (200, [])]
        assert seen["unknown"] == [(403, "ACL not found")] * 3
        assert seen["node"][0][0] == 200 and seen["node"][1:] == [(200, {}), (200, [])]
        assert seen["service"][0][0] == 200 and "consul" in seen["service"][1][1] and seen["service"][2] == (200, [])
        assert "consul" in seen["both"][1][1] and len(seen["both"][2][1]) >= 1


class TestStartCheck:
    @pytest.mark.parametrize(
        ("case", "expected"),
        [
            ("none", "no consul_token is set, and the anonymous token may not read any service"),
            ("unknown", "Consul does not know the consul_token (ACL not found)"),
            ("node-only", "may not read any service (the catalog comes back empty, without even `consul`)"),
            ("service-only", "may read services but not nodes (the health of `consul` comes back empty)"),
        ],
    )
    def test_a_missing_or_wrong_token_stops_ferryman_at_start(
        self, acl_consul: AclConsul, workdir: Path, case: str, expected: str
    ) -> None:
        token = {
            "none": None,
            "unknown": str(uuid.uuid4()),
            "node-only": acl_consul.token(f"start-{case}", 'node_prefix "" { policy = "read" }')[0]
            if case == "node-only" else None,
            "service-only": acl_consul.token(f"start-{case}", 'service_prefix "" { policy = "read" }')[0]
            if case == "service-only" else None,
        }[case]
        started = time.monotonic()
        result = _run_ferryman(acl_consul.addr, workdir, *(["--consul-token", token] if token else []))
        took = time.monotonic() - started
        assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
        assert result.stderr.startswith("ferryman: config error: consul_token: "), result.stderr
        assert expected in result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        forbidden = [e for e in events if e["event"] == "consul_forbidden"]
        assert len(forbidden) == 1 and expected in forbidden[0]["error"] and forbidden[0]["level"] == "error"
        assert "ferryman_started" not in [e["event"] for e in events]
        if token:
            assert token not in result.stdout + result.stderr  # the secret is never printed
        assert took < 10

    def test_with_workers_nothing_starts(self, acl_consul: AclConsul, workdir: Path) -> None:
        result = _run_ferryman(acl_consul.addr, workdir, "--consul-token", str(uuid.uuid4()), workers=2)
        assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
        assert "Consul does not know the consul_token" in result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        # The supervisor checks the token before it starts any worker.
        assert [e for e in events if e["event"] == "worker_started"] == []

    def test_failover_finds_the_agent_that_answers_before_judging_the_token(
        self, acl_consul: AclConsul, workdir: Path
    ) -> None:
        result = _run_ferryman(f"127.0.0.1:{free_port()},{acl_consul.addr}", workdir,
                               "--consul-token", str(uuid.uuid4()))
        assert result.returncode == 2 and "ACL not found" in result.stderr

    def test_acls_disabled_pass_silently(self, consul: ConsulAgent, workdir: Path) -> None:
        proxy = FerrymanProcess(consul.addr, workdir, extra=["--consul-token", str(uuid.uuid4())])
        try:
            proxy.start()
            names = [e["event"] for e in proxy.log_events()]
            assert "ferryman_started" in names
            assert not {"consul_forbidden", "consul_access_unchecked"} & set(names)
        finally:
            proxy.stop()

    def test_an_unreachable_consul_at_start_is_not_a_token_error(self, workdir: Path) -> None:
        proxy = FerrymanProcess(f"127.0.0.1:{free_port()}", workdir, extra=["--consul-token", "whatever"])
        try:
            proxy.start()  # serves (404 until Consul answers), as without ACLs
            names = [e["event"] for e in proxy.log_events()]
            assert "consul_access_unchecked" in names and "ferryman_started" in names
            assert "consul_forbidden" not in names
        finally:
            proxy.stop()


class TestRunningWithAcls:
    async def test_minimal_token_routes_and_a_deleted_token_counts_forbidden(
        self, acl_consul: AclConsul, workdir: Path, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        secret, accessor = await asyncio.to_thread(acl_consul.token, "ferryman", MINIMAL_RULES)
        backend = await Backend("acl-a").start()
        backends.append(backend)
        await asyncio.to_thread(acl_consul.register, "acl-web", "acl-a", backend.port, ["urlprefix-/acl"])

        proxy = FerrymanProcess(acl_consul.addr, workdir, extra=["--consul-token", secret, "--consul-wait", "2"])
        try:
            proxy.start()
            await asyncio.to_thread(proxy.wait_instances, "acl-web@*any*/acl", ["acl-a"])
            status, body, _ = await fetch(http, f"{proxy.url}/acl/x")
            assert status == 200 and json.loads(body)["instance"] == "acl-a"

            async def forbidden_count() -> float:
                _, text, _ = await fetch(http, f"{proxy.admin_url}/metrics")
                return _metric(text.decode(), "ferryman_discovery_errors_total", 'reason="forbidden"')

            assert await forbidden_count() == 0
            await asyncio.to_thread(acl_consul.call, "DELETE", f"/v1/acl/token/{accessor}")
            # The blocking queries end within consul_wait; the next ones are refused.
            await async_wait_until(forbidden_count, 15, 'ferryman_discovery_errors_total{reason="forbidden"}')

            # The last table keeps serving.
            for _ in range(5):
                status, body, _ = await fetch(http, f"{proxy.url}/acl/x")
                assert status == 200
            events = proxy.log_events()
            outage = [e for e in events if e["event"] == "consul_unreachable"]
            assert outage and outage[0]["reason"] == "forbidden" and "ACL not found" in outage[0]["error"]
            assert not [e for e in events if e["event"] == "consul_failover"]  # a refusal is no reason to move
        finally:
            proxy.stop()
