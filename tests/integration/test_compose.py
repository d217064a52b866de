"""What the compose stack runs, run here without Docker: the image's healthcheck command against a real Ferryman,
and demo/backend.py the way docker-compose.yml starts it (an HTTP check Consul runs against GET /health) against
a real Consul agent and Ferryman. The compose file and the Dockerfile themselves are checked statically by
tests/unit/project/test_compose.py; tests/compose builds the images and runs the stack on a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from .harness import REPO, ConsulAgent, FerrymanProcess, _http_json, free_port, wait_until

pytestmark = pytest.mark.integration


def _image_healthcheck() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (exec form), its `python` being this interpreter."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert match, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def _run_healthcheck(admin_listen: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    env["FERRYMAN_ADMIN_LISTEN"] = admin_listen
    return subprocess.run(_image_healthcheck(), env=env, capture_output=True, text=True, timeout=10, check=False)


def _ready(ferryman: FerrymanProcess) -> bool:
    with urllib.request.urlopen(f"{ferryman.admin_url}/ready", timeout=2) as resp:
        status: int = resp.status
        return status == 200


def test_image_healthcheck_passes_on_a_ready_ferryman_and_fails_without_one(ferryman: FerrymanProcess) -> None:
    wait_until(lambda: _ready(ferryman), 20, "Ferryman's /ready")
    # The image sets FERRYMAN_ADMIN_LISTEN=0.0.0.0:9919; the command asks its port on 127.0.0.1.
    result = _run_healthcheck(f"0.0.0.0:{ferryman.admin_port}")
    assert result.returncode == 0, result.stderr
    nothing = _run_healthcheck(f"0.0.0.0:{free_port()}")
    assert nothing.returncode == 1, "unhealthy is exit code 1 for Docker"


def _checks(consul: ConsulAgent, service: str) -> dict[str, str]:
    """{check id: status} of a service's checks, from Consul's health endpoint."""
    entries = _http_json("GET", f"{consul.url}/v1/health/checks/{service}", timeout=2)
    return {c["CheckID"]: c["Status"] for c in entries or []}


class DemoBackend:
    """demo/backend.py as docker-compose.yml runs it, on loopback: `--check http`, a named Consul address."""

    def __init__(self, consul: ConsulAgent, service: str, instance: str, tags: list[str]) -> None:
        self.port = free_port()
        self.instance = instance
        env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN")}
        env["CONSUL_HTTP_ADDR"] = f"http://{consul.addr}"  # the scheme form, as CONSUL_HTTP_ADDR allows
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo.backend", "--service", service, "--id", instance, "--listen", "127.0.0.1",
             "--port", str(self.port), "--advertise", "localhost", "--check", "http",
             *[a for t in tags for a in ("--tag", t)]],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def post(self, path: str) -> Any:
        return _http_json("POST", f"http://127.0.0.1:{self.port}{path}")

    def stop(self) -> str:
        """SIGTERM, as `docker compose stop` sends; the output it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5)
        return out.decode(errors="replace")


def test_demo_backend_with_an_http_check_joins_fails_over_and_deregisters(
    consul: ConsulAgent, ferryman: FerrymanProcess
) -> None:
    route = "composeweb@*any*/composeweb"
    backend = DemoBackend(consul, "composeweb", "composeweb-1", ["urlprefix-/composeweb"])
    try:
        http_check = "service:composeweb-1:http"
        wait_until(lambda: _checks(consul, "composeweb") == {http_check: "passing"}, 20,
                   "Consul's HTTP check of the demo backend to pass")
        ferryman.wait_instances(route, ["composeweb-1"], 20)
        with urllib.request.urlopen(f"{ferryman.url}/composeweb/hello", timeout=5) as resp:
            assert json.loads(resp.read())["instance"] == "composeweb-1"

        assert backend.post("/admin/fail")["healthy"] is False
        wait_until(lambda: _checks(consul, "composeweb")[http_check] == "critical", 10,
                   "GET /health to answer 503 and the HTTP check to turn critical")
        ferryman.wait_instances(route, [], 10)

        backend.post("/admin/recover")
        ferryman.wait_instances(route, ["composeweb-1"], 10)

        # The agent forgets the service (a dev agent restarted): the backend registers it again.
        consul.deregister("composeweb-1")
        wait_until(lambda: _checks(consul, "composeweb") == {http_check: "passing"}, 20,
                   "the demo backend to register itself again")
    finally:
        out = backend.stop()
    assert backend.proc.returncode == 0, out
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events[0] == "backend_registered" and "backend_reregistered" in events, out
    assert events[-1] == "backend_deregistered", out
    services = _http_json("GET", f"{consul.url}/v1/agent/services", timeout=2)
    assert "composeweb-1" not in services
    ferryman.wait_instances(route, [], 10)
