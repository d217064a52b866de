from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, new_workdir


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = new_workdir("ferryman-it-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def consul(workdir: Path) -> Iterator[ConsulAgent]:
    """One real Consul dev agent for the session; tests use distinct service names and routes."""
    agent = ConsulAgent(workdir)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def ferryman(consul: ConsulAgent, workdir: Path) -> Iterator[FerrymanProcess]:
    proc = FerrymanProcess(consul.addr, workdir, extra=["--read-timeout", "1"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    """Start backends with `backends.append(await Backend(name).start())`; all are stopped afterwards."""
    started: list[Backend] = []
    yield started
    for backend in started:
        await backend.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20), auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
    ) as s:
        yield s
