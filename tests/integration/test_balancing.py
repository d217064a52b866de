"""Load-balancing algorithms chosen by route tag (`lb=`), seen from the backends' side."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, fetch

pytestmark = pytest.mark.integration


async def _routed(consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], service: str,
                  count: int, tag: str) -> list[Backend]:
    started = [await Backend(f"{service}-{i}").start() for i in range(count)]
    backends.extend(started)
    for backend in started:
        await asyncio.to_thread(consul.register, service, backend.instance, backend.port, [tag])
    await asyncio.to_thread(ferryman.wait_instances, f"{service}@*any*/{service}", [b.instance for b in started])
    return started


class TestHash:
    """`lb=hash hash_key=header:X-User`: every request of one user reaches the same instance."""

    async def test_each_user_sticks_to_one_instance(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        started = await _routed(consul, ferryman, backends, "hashed", 3,
                                "urlprefix-/hashed lb=hash hash_key=header:X-User")
        users = [f"user-{i}" for i in range(12)]
        for _ in range(3):
            for user in users:
                status, _, _ = await fetch(http, f"{ferryman.url}/hashed/{user}", headers={"X-User": user})
                assert status == 200
        seen: dict[str, set[str]] = defaultdict(set)
        for backend in started:
            for hit in backend.hits:
                seen[hit.path.rsplit("/", 1)[-1]].add(backend.instance)
        assert set(seen) == set(users)
        assert all(len(instances) == 1 for instances in seen.values()), dict(seen)
        assert len(set().union(*seen.values())) > 1, "12 users all hashed to one of 3 instances"


class TestLeastConn:
    """`lb=least_conn`: while one instance is busy, new requests go to the idle one."""

    async def test_requests_avoid_the_busy_instance(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        a, b = await _routed(consul, ferryman, backends, "leastc", 2, "urlprefix-/leastc lb=least_conn")
        slow = asyncio.create_task(fetch(http, f"{ferryman.url}/leastc/slow?delay=0.8"))
        for _ in range(100):  # bounded: wait until the slow request reached one of them
            if a.hits or b.hits:
                break
            await asyncio.sleep(0.01)
        busy, idle = (a, b) if a.hits else (b, a)
        for _ in range(10):
            status, _, _ = await fetch(http, f"{ferryman.url}/leastc/quick")
            assert status == 200
        assert (await slow)[0] == 200
        assert [h.path for h in busy.hits] == ["/leastc/slow?delay=0.8"]
        assert len(idle.hits) == 10


class TestSticky:
    """`sticky=NAME`: a Set-Cookie pins the client to one instance; when it leaves, another is pinned."""

    async def test_cookie_pins_and_repins(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend]
    ) -> None:
        import aiohttp

        started = await _routed(consul, ferryman, backends, "sticky", 3, "urlprefix-/sticky sticky=srv")
        # Its cookie jar plays the browser (unsafe=True: aiohttp keeps no cookies for IP hosts otherwise).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
            for _ in range(100):
                status, _, _ = await fetch(client, f"{ferryman.url}/sticky/page")
                assert status == 200
            served = [b for b in started if b.hits]
            assert len(served) == 1 and len(served[0].hits) == 100
            pinned = served[0]

            await asyncio.to_thread(consul.deregister, pinned.instance)
            await asyncio.to_thread(ferryman.wait_instances, "sticky@*any*/sticky",
                                    [b.instance for b in started if b is not pinned])
            status, _, headers = await fetch(client, f"{ferryman.url}/sticky/page")
            assert status == 200
            assert headers.get("Set-Cookie", "").startswith("srv="), "re-pinned to another instance"
            for _ in range(20):
                await fetch(client, f"{ferryman.url}/sticky/page")
            others = [b for b in started if b is not pinned and b.hits]
            assert len(others) == 1 and len(others[0].hits) == 21
            assert len(pinned.hits) == 100


class TestWeightsFromMeta:
    """`ferryman-weight` service meta, read from Consul, splits traffic for `lb=weighted` (smooth WRR)."""

    async def test_three_to_one(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        heavy, light = await Backend("wmeta-heavy").start(), await Backend("wmeta-light").start()
        backends.extend([heavy, light])
        for backend, weight in ((heavy, "3"), (light, "1")):
            await asyncio.to_thread(consul.register, "wmeta", backend.instance, backend.port,
                                    ["urlprefix-/wmeta lb=weighted"], meta={"ferryman-weight": weight})
        await asyncio.to_thread(ferryman.wait_instances, "wmeta@*any*/wmeta", ["wmeta-heavy", "wmeta-light"])
        for _ in range(40):
            status, _, _ = await fetch(http, f"{ferryman.url}/wmeta/")
            assert status == 200
        assert (len(heavy.hits), len(light.hits)) == (30, 10)


class TestActiveChecks:
    """Service meta `ferryman-health-path`: Ferryman's own checks take a failing instance out and back in."""

    async def test_failing_check_removes_and_passing_check_restores(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        import random

        proxy = FerrymanProcess(consul.addr, workdir, extra=["--active-check-interval", "0.2"])
        try:
            proxy.start()
            starting_a, starting_b = Backend("active-a").start(), Backend("active-b").start()
            a, b = await starting_a, await starting_b
            backends.extend([a, b])
            for backend in (a, b):
                await asyncio.to_thread(consul.register, "active", backend.instance, backend.port,
                                        ["urlprefix-/active lb=round_robin"],
                                        meta={"ferryman-health-path": "/active/healthcheck"})
            await asyncio.to_thread(proxy.wait_instances, "active@*any*/active", ["active-a", "active-b"])

            b.health_status = 503
            await asyncio.sleep(1.0)  # a few check intervals
            a_before, b_before = len(a.hits), len(b.hits)
            for _ in range(10):
                status, _, _ = await fetch(http, f"{proxy.url}/active/x?{random.random()}")
                assert status == 200
            served_b = [h for h in b.hits[b_before:] if "healthcheck" not in h.path]
            assert served_b == [], "a failing active check keeps the instance out"
            assert len([h for h in a.hits[a_before:] if "healthcheck" not in h.path]) == 10
            assert any(e.get("event") == "upstream_check_failed" for e in proxy.log_events())

            b.health_status = 200
            await asyncio.sleep(1.0)
            b_before = len(b.hits)
            for _ in range(10):
                await fetch(http, f"{proxy.url}/active/y")
            assert [h for h in b.hits[b_before:] if "healthcheck" not in h.path], "back in after passing"
        finally:
            proxy.stop()
