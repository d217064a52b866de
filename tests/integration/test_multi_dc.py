"""Datacenter failover against two real single-server Consul datacenters joined over the WAN on loopback:
Ferryman talks to dc1's server only (`--consul-dc dc1,dc2`), a service registered in both is served from dc1,
then from dc2 while every dc1 instance fails its check (without a failed request: dc2's health is followed all
the time), then from dc1 again. Also reads KV through the client (`ConsulClient.kv`) and checks what Consul
answers for a datacenter it has no path to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from discovery.consul import ConsulAddress, ConsulClient, ConsulError

from .harness import (
    Backend,
    ConsulServer,
    FerrymanProcess,
    SteadyLoad,
    _http_json,
    async_wait_until,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROUTE = "mdc@*any*/mdc"


class Datacenter(ConsulServer):
    """One `consul agent -server -bootstrap` forming its own datacenter, on its own loopback ports."""

    def start_dc(self, join_wan: Datacenter | None = None) -> None:
        # Retried every second (the default is 30 s): the first attempt may come before dc1 listens.
        join = ["-retry-join-wan", f"127.0.0.1:{join_wan.serf_wan}", "-retry-interval-wan", "1s"] if join_wan else []
        self.start("-bootstrap", "-datacenter", self.name, *join)

    # --- agent API ---
    def register(self, service: str, instance: str, port: int, tags: list[str]) -> None:
        _http_json("PUT", f"{self.url}/v1/agent/service/register", {
            "Name": service, "ID": instance, "Address": "127.0.0.1", "Port": port, "Tags": tags,
            "Check": {"CheckID": f"service:{instance}", "TTL": "300s", "Status": "passing"},
        })

    def ttl(self, instance: str, passing: bool) -> None:
        _http_json("PUT", f"{self.url}/v1/agent/check/{'pass' if passing else 'fail'}/service:{instance}")


@pytest.fixture(scope="module")
def federation(workdir: Path) -> Iterator[tuple[Datacenter, Datacenter]]:
    """Both datacenters, shared by the tests of this module (they use distinct services and keys)."""
    base = workdir / f"mdc-{time.monotonic_ns()}"
    base.mkdir()
    dc1, dc2 = Datacenter("dc1", base / "dc1", node="s-dc1"), Datacenter("dc2", base / "dc2", node="s-dc2")
    try:
        dc1.start_dc()
        dc2.start_dc(join_wan=dc1)

        def federated() -> bool:
            for dc in (dc1, dc2):
                dc.alive()
                if not dc.get("/v1/status/leader") or sorted(dc.get("/v1/catalog/datacenters")) != ["dc1", "dc2"]:
                    return False
            # each answers for the other over the WAN (the `consul` service is each server's own)
            return bool(dc1.get("/v1/catalog/services?dc=dc2")) and bool(dc2.get("/v1/catalog/services?dc=dc1"))

        wait_until(federated, 60, "two datacenters to elect their leaders and join over the WAN", interval=0.1)
        yield dc1, dc2
    finally:
        dc2.stop()
        dc1.stop()


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _put(url: str, body: bytes) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT"), timeout=5) as resp:
        resp.read()


class TestDatacenterFailover:
    async def test_served_from_the_next_datacenter_while_the_first_has_no_healthy_instance(
        self, federation: tuple[Datacenter, Datacenter], workdir: Path, backends: list[Backend],
        http: aiohttp.ClientSession,
    ) -> None:
        dc1, dc2 = federation
        started = [await Backend(name).start() for name in ("mdc-1a", "mdc-1b", "mdc-2a")]
        backends.extend(started)
        one_a, one_b, two_a = started
        for dc, backend in ((dc1, one_a), (dc1, one_b), (dc2, two_a)):
            await asyncio.to_thread(dc.register, "mdc", backend.instance, backend.port, ["urlprefix-/mdc"])

        proxy = FerrymanProcess(dc1.addr, workdir, extra=["--consul-dc", "dc1,dc2", "--consul-wait", "2"])
        try:
            proxy.start()
            await asyncio.to_thread(proxy.wait_instances, ROUTE, ["mdc-1a", "mdc-1b"])

            def datacenters() -> set[str | None]:
                for route in proxy.routes()["routes"]:
                    if route["id"] == ROUTE:
                        return {i["datacenter"] for i in route["instances"]}
                return set()

            assert datacenters() == {"dc1"}

            load = SteadyLoad(http, f"{proxy.url}/mdc/ping", limit_s=30)
            failures, served = load.failures, load.served
            try:
                await asyncio.sleep(1)
                # dc1 loses its instances one by one; the last one leaving hands the service to dc2
                await asyncio.to_thread(dc1.ttl, "mdc-1a", False)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(dc1.ttl, "mdc-1b", False)
                failed_at = time.monotonic()
                await asyncio.to_thread(proxy.wait_instances, ROUTE, ["mdc-2a"], 5)
                switched_s = time.monotonic() - failed_at
                assert datacenters() == {"dc2"}

                async def answered_by(instance: str, since: float) -> bool:
                    return any(at > since and name == instance for at, name in served)

                await async_wait_until(lambda: answered_by("mdc-2a", failed_at), 5, "dc2 to answer")
                await asyncio.sleep(1)

                # dc1 is healthy again: back to it
                await asyncio.to_thread(dc1.ttl, "mdc-1a", True)
                await asyncio.to_thread(dc1.ttl, "mdc-1b", True)
                passed_at = time.monotonic()
                await asyncio.to_thread(proxy.wait_instances, ROUTE, ["mdc-1a", "mdc-1b"], 5)
                back_s = time.monotonic() - passed_at
                assert datacenters() == {"dc1"}
                await async_wait_until(lambda: answered_by("mdc-1b", passed_at), 5, "dc1 to answer again")
                await asyncio.sleep(1)
            finally:
                await load.stop()

            total = len(served)
            assert failures == [], f"{len(failures)} of {total + len(failures)} failed: {failures[:5]}"
            assert total > 100, total
            # never dc2 before dc1 lost its last instance, never dc1 while it had none
            by_instance = Counter(name for _, name in served)
            assert set(by_instance) == {"mdc-1a", "mdc-1b", "mdc-2a"}, by_instance
            assert not any(name == "mdc-2a" for at, name in served if at < failed_at - 0.6)

            events = proxy.log_events()
            moves = [(e["service"], e["from"], e["to"]) for e in events if e["event"] == "datacenter_failover"]
            assert moves == [("mdc", "dc1", "dc2"), ("mdc", "dc2", "dc1")], moves
            assert not [e for e in events if e["event"] in ("consul_unreachable", "consul_failover",
                                                            "consul_dc_unknown", "consul_access_unchecked")]
            print(f"\nrequests={total} failures=0 switched_to_dc2_after={switched_s:.2f}s "
                  f"back_to_dc1_after={back_s:.2f}s")
        finally:
            proxy.stop()

    async def test_kv_and_a_datacenter_without_a_path(self, federation: tuple[Datacenter, Datacenter]) -> None:
        dc1, dc2 = federation
        await asyncio.to_thread(_put, f"{dc1.url}/v1/kv/ferryman/tls/cert.pem", b"-----BEGIN\x00\xff")
        await asyncio.to_thread(_put, f"{dc1.url}/v1/kv/ferryman/tls/empty", b"")
        await asyncio.to_thread(_put, f"{dc2.url}/v1/kv/ferryman/tls/cert.pem", b"dc2")
        client = ConsulClient(ConsulAddress.parse(dc1.addr), token=None, dc="dc1,dc2", wait_s=1)
        try:
            index, values = await client.kv("ferryman/tls/", 0)
            assert index > 0
            assert values == {"ferryman/tls/cert.pem": b"-----BEGIN\x00\xff", "ferryman/tls/empty": b""}
            assert (await client.kv("ferryman/tls/", 0, dc="dc2"))[1] == {"ferryman/tls/cert.pem": b"dc2"}

            # no key under the prefix: empty, with an index a blocking read waits on until the first key
            missing_index, missing = await client.kv("ferryman/none/", 0)
            assert missing == {} and missing_index > 0
            waiter = asyncio.create_task(client.kv("ferryman/none/", missing_index))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await asyncio.to_thread(_put, f"{dc1.url}/v1/kv/ferryman/none/x", b"1")
            later, appeared = await asyncio.wait_for(waiter, 5)
            assert appeared == {"ferryman/none/x": b"1"} and later > missing_index

            # a datacenter Consul has no path to: 500 "No path to datacenter", not a reason to leave the address
            status, body = await asyncio.to_thread(_status, f"{dc1.url}/v1/catalog/services?dc=dc9")
            assert (status, "No path to datacenter" in body) == (500, True), (status, body)
            with pytest.raises(ConsulError) as info:
                await client.services(0, dc="dc9")
            assert (info.value.status, info.value.failover) == (500, False)
            with contextlib.suppress(ConsulError):
                await client.kv("ferryman/", 0, dc="dc9")
        finally:
            await client.close()
