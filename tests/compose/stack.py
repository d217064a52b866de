"""docker-compose.yml run as a user runs it, with the test's override, against the test's own Docker engine.

How it works: Debian's docker-compose (v1, the tool `make test` installs; it talks to the engine through
DOCKER_HOST with its own client library) under a fixed project name, so the test finds every container,
network and volume of the stack by the labels compose puts on them, and tears down what a failed run left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import REPO, DockerEngine

COMPOSE_FILE = REPO / "docker-compose.yml"
OVERRIDE = Path(__file__).resolve().parent / "override.yml"
PROJECT = "ferrymantest"
PROJECT_LABEL = f"label=com.docker.compose.project={PROJECT}"


@dataclass
class ComposeStack:
    engine: DockerEngine
    volumes_before: set[str] = field(default_factory=set)  # the engine's volumes before `up`

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("docker-compose")
        if exe is None:
            raise AssertionError("docker-compose is not on PATH: `make test-debs` installs Debian's docker-compose")
        result = subprocess.run([exe, "--ansi", "never", "-p", PROJECT, "-f", str(COMPOSE_FILE), "-f", str(OVERRIDE),
                                 *args], cwd=REPO, env=self.engine.env(), capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def containers(self) -> dict[str, dict[str, Any]]:
        """{compose service: `docker inspect` of its container} for every container of the project."""
        ids = self.engine.docker("ps", "-aq", "--filter", PROJECT_LABEL).stdout.split()
        if not ids:
            return {}
        inspected = json.loads(self.engine.docker("inspect", *ids).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}

    def container(self, service: str) -> dict[str, Any]:
        return self.containers()[service]

    def networks(self) -> list[str]:
        return self.engine.docker("network", "ls", "-q", "--filter", PROJECT_LABEL).stdout.split()

    def volumes(self) -> set[str]:
        """Every volume of the engine: the project's named ones and any anonymous one its images declare."""
        return set(self.engine.docker("volume", "ls", "-q").stdout.split())

    def wait(self, what: str, timeout: float, check: Any) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{what} within {timeout:.0f} s; last seen: {last!r}\n{self.logs()}")

    def logs(self, tail: int = 15) -> str:
        result = self.compose("logs", "--no-color", "--tail", str(tail), check=False, timeout=60)
        return result.stdout + result.stderr
