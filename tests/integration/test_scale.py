"""Discovery at cluster scale on Consul's default limits (issue 14): 500 services, Ferryman with 4 workers.

The session's agent runs with Consul's defaults (200 HTTP connections per client address, and every process
here connects from 127.0.0.1). The services are written straight into the catalog on an external node
(`ConsulAgent.register_external`: `PUT /v1/txn` batches, service checks "passing" that nothing runs), each with
its tag `urlprefix-/scale-NNNNN`. All but one have a single instance on one shared echo backend; `scale-00000`
has two, `scale-a` and `scale-b`, on backends of their own, so the test sees which one a request reached and
when. Clients open a NEW connection for every request, so the kernel spreads them over the workers
(SO_REUSEPORT); each worker's own view comes from `/api/status` ("worker_reports": one object per worker with
its pid, generation, and the number of routes and services in its table).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from .harness import (
    Backend,
    CatalogInstance,
    ConsulAgent,
    FerrymanProcess,
    SteadyLoad,
    _http_json,
    async_wait_until,
    fetch,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SERVICES = 500
WORKERS = 4
NODE = "scale-node"
ROUTED_WITHIN_S = 30  # generous for a shared CI machine; the bench (bench/scale.py) measures it
FOLLOWED_WITHIN_S = 1.0  # issue 14: a deregistration is followed everywhere within 1 s


def service(n: int) -> str:
    return f"scale-{n:05d}"


@dataclass
class Scale:
    consul: ConsulAgent
    ferryman: FerrymanProcess
    shared: Backend
    a: Backend
    b: Backend


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scale(consul: ConsulAgent, workdir: Path) -> AsyncIterator[Scale]:
    """500 services in the catalog, then Ferryman with 4 workers; the node and its services leave afterwards."""
    shared, a, b = Backend("shared"), Backend("scale-a"), Backend("scale-b")
    for backend in (shared, a, b):
        await backend.start()
    instances = [CatalogInstance(service(0), "scale-a", a.port, (f"urlprefix-/{service(0)}",)),
                 CatalogInstance(service(0), "scale-b", b.port, (f"urlprefix-/{service(0)}",))]
    instances += [CatalogInstance(service(n), f"{service(n)}-1", shared.port, (f"urlprefix-/{service(n)}",))
                  for n in range(1, SERVICES)]
    await asyncio.to_thread(consul.register_external, NODE, instances)
    ferryman = FerrymanProcess(consul.addr, workdir, workers=WORKERS, extra=["--access-log", "false"])
    try:
        await asyncio.to_thread(ferryman.start)
        yield Scale(consul, ferryman, shared, a, b)
    finally:
        await asyncio.to_thread(ferryman.stop)
        await asyncio.to_thread(consul.deregister_external, NODE)
        for backend in (shared, a, b):
            await backend.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def new_connections() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection for every request (`Connection: close`)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=16), timeout=aiohttp.ClientTimeout(total=10),
    ) as http:
        yield http


def worker_reports(ferryman: FerrymanProcess) -> list[dict[str, Any]]:
    """The per-worker reports of /api/status; AssertionError (with the keys it has) when there are none."""
    doc = _http_json("GET", f"{ferryman.admin_url}/api/status", timeout=5)
    assert "worker_reports" in doc, f"/api/status has no per-worker reports; its keys: {sorted(doc)}"
    return doc["worker_reports"]  # type: ignore[no-any-return]


def all_routed(reports: list[dict[str, Any]]) -> bool:
    return len(reports) == WORKERS and all(r["routes"] >= SERVICES and r["services"] >= SERVICES for r in reports)


async def wait_all_routed(ferryman: FerrymanProcess) -> list[dict[str, Any]]:
    deadline = time.monotonic() + ROUTED_WITHIN_S
    reports: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        reports = await asyncio.to_thread(worker_reports, ferryman)
        if all_routed(reports):
            return reports
        await asyncio.sleep(0.2)
    seen = [{k: r.get(k) for k in ("pid", "generation", "routes", "services")} for r in reports]
    pytest.fail(f"not every worker routes the {SERVICES} services within {ROUTED_WITHIN_S} s: {seen}")


async def ask(http: aiohttp.ClientSession, url: str) -> str:
    """'' when the request was answered 200, else what went wrong."""
    try:
        status, body, _ = await fetch(http, url)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "" if status == 200 else f"{status} {body[:80]!r}"


class TestAtScale:
    """500 services and 4 workers on an agent with Consul's default connection limit."""

    async def test_every_service_answers_at_every_worker(
        self, scale: Scale, new_connections: aiohttp.ClientSession
    ) -> None:
        """Every worker reports a table with every service, and every service answers over new connections."""
        reports = await wait_all_routed(scale.ferryman)
        assert len({r["pid"] for r in reports}) == WORKERS
        urls = [f"{scale.ferryman.url}/{service(n)}/" for n in range(SERVICES) for _ in range(WORKERS)]
        answers = await asyncio.gather(*(ask(new_connections, url) for url in urls))
        failed = [f"{url}: {why}" for url, why in zip(urls, answers, strict=True) if why]
        assert failed == [], f"{len(failed)} of {len(urls)} requests failed, e.g. {failed[:5]}"

    async def test_the_services_are_read_by_node_at_start(self, scale: Scale) -> None:
        """500 services on two nodes are read with a few node reads, not one read each: the discovery says so."""
        await wait_all_routed(scale.ferryman)
        reads = [e for e in scale.ferryman.log_events() if e.get("event") == "read_by_node"]
        assert reads, "the discovery did not read the datacenter by node"
        assert reads[0]["services"] >= SERVICES and reads[0]["nodes"] < 10

    async def test_a_deregistration_is_followed_everywhere_within_a_second(
        self, scale: Scale, new_connections: aiohttp.ClientSession
    ) -> None:
        """Once `scale-b` leaves the catalog, requests over new connections (every worker) stop reaching it
        within a second, and none fails."""
        await wait_all_routed(scale.ferryman)
        load = SteadyLoad(new_connections, f"{scale.ferryman.url}/{service(0)}/", clients=8, limit_s=30)
        try:
            async def reached() -> bool:
                return bool(scale.b.hits)

            await async_wait_until(reached, 10, "a request to reach scale-b before its deregistration")
            t0 = time.monotonic()
            await asyncio.to_thread(scale.consul.deregister_external, NODE, "scale-b")
            await asyncio.sleep(FOLLOWED_WITHIN_S + 1.0)
        finally:
            await load.stop()
        last = max(hit.at for hit in scale.b.hits) - t0
        after = [instance for at, instance in load.served if at > t0 + FOLLOWED_WITHIN_S]
        assert load.failures == [], f"{len(load.failures)} requests failed, e.g. {load.failures[:5]}"
        assert last <= FOLLOWED_WITHIN_S, f"scale-b still received a request {last:.3f} s after its deregistration"
        assert after and set(after) == {"scale-a"}, f"served after {FOLLOWED_WITHIN_S} s: {sorted(set(after))}"
