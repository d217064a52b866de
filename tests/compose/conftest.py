"""Fixtures of the compose test: the engine (session), the stand-ins (session), the stack (module).

A missing engine is a failure, never a skip: each test errors with what is missing (EngineUnavailable).
The time each step took is printed at the end of the run (cold: stand-ins built; warm: reused).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from .engine import DockerEngine, EngineUnavailable
from .stack import ComposeStack
from .standins import StandinUnavailable, ensure_standins, image_size

TIMES: dict[str, float] = {}
SIZES: dict[str, int] = {}
# Every host port docker-compose.yml publishes on 127.0.0.1, Grafana's excepted (left out by the override).
HOST_PORTS = (8080, 9919, 8500, 9090, 18081, 18082, 18083)


@pytest.fixture(scope="session")
def engine() -> Iterator[DockerEngine]:
    started = time.monotonic()
    docker = DockerEngine()
    try:
        docker.start()
    except EngineUnavailable as exc:
        pytest.fail(f"no Docker engine for the compose test: {exc}", pytrace=False)
    TIMES["engine start"] = time.monotonic() - started
    yield docker
    docker.stop()


@pytest.fixture(scope="session")
def standins(engine: DockerEngine) -> None:
    started = time.monotonic()
    try:
        built = ensure_standins(engine, say=lambda _: None)
    except StandinUnavailable as exc:
        pytest.fail(f"the stand-in images cannot be built: {exc}", pytrace=False)
    TIMES.update({f"stand-in {name}": seconds for name, seconds in built.items()})
    TIMES["stand-ins (total)"] = time.monotonic() - started


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.fixture(scope="module")
def stack(engine: DockerEngine, standins: None) -> Iterator[ComposeStack]:
    """docker-compose.yml up (images built from the Dockerfile), every service ready; down at the end."""
    compose = ComposeStack(engine)
    compose.compose("down", "--volumes", "--remove-orphans", "--timeout", "20")  # what a killed run left
    taken = [port for port in HOST_PORTS if _port_taken(port)]
    if taken:
        pytest.fail(f"the stack publishes these ports on 127.0.0.1, taken here: {taken} (`make demo`?)",
                    pytrace=False)
    compose.volumes_before = compose.volumes()
    started = time.monotonic()
    compose.compose("build")
    TIMES["images built from the Dockerfile"] = time.monotonic() - started
    for tag in ("ferryman:local", "ferryman-demo:local"):
        SIZES[tag] = image_size(engine, tag)
    started = time.monotonic()
    compose.compose("up", "--detach")
    try:
        yield compose
    finally:
        if compose.containers() or compose.networks():
            compose.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)
        TIMES["stack up to down"] = time.monotonic() - started


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMES:
        return
    terminalreporter.section("compose test: where the time went")
    for what, seconds in TIMES.items():
        terminalreporter.write_line(f"{seconds:7.1f} s  {what}")
    for tag, size in SIZES.items():
        terminalreporter.write_line(f"image {tag}: {size / 1e6:.0f} MB")
