"""Load-balancing algorithms chosen by route tag (`lb=`), seen from the backends' side."""

from __future__ import annotations

import asyncio
from collections import defaultdict

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

    async def test_each_user_sticks_to_one_instance(self, consul, ferryman, backends, http):
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

    async def test_requests_avoid_the_busy_instance(self, consul, ferryman, backends, http):
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
