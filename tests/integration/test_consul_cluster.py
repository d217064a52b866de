"""Several Consul addresses against a real three-server Consul cluster on loopback: the leader is killed under
load and Ferryman moves to another server without a failed request, and follows the catalog after the election.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .harness import (
    Backend,
    ConsulServer,
    FerrymanProcess,
    SteadyLoad,
    _http_json,
    async_wait_until,
    fetch,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


Server = ConsulServer


class ConsulCluster:
    """Three `consul agent -server -bootstrap-expect=3` on loopback, each on its own ports; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers = [Server(f"s{i}", workdir / f"s{i}") for i in (1, 2, 3)]

    def start(self) -> None:
        """Start the three servers and wait for a leader. A server that exits at once (one of its twelve free
        ports taken between choosing it and binding it) has the whole cluster started again on new ports,
        up to three times."""
        for attempt in range(3):
            for server in self.servers:
                joins = [arg for other in self.servers if other is not server
                         for arg in ("-retry-join", f"127.0.0.1:{other.serf_lan}")]
                server.start("-bootstrap-expect", "3", *joins)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                exited = [s for s in self.servers if s.proc is not None and s.proc.poll() is not None]
                if exited:
                    break
                with contextlib.suppress(OSError, ValueError):
                    if self._settled(self.servers):
                        return
                time.sleep(0.1)
            else:
                raise TimeoutError(f"three Consul servers elected no leader in 60 s; see {self.workdir}")
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"{exited[0].name} exited at start three times; see {exited[0].log_path}")
            self.servers = [Server(f"s{i}-{attempt + 1}", self.workdir / f"s{i}-{attempt + 1}") for i in (1, 2, 3)]

    def _settled(self, servers: list[Server]) -> bool:
        leaders = {server.get("/v1/status/leader") for server in servers}
        if len(leaders) != 1 or not next(iter(leaders)):
            return False
        # every server in the catalog (the `consul` service), so the cluster is past its first reconcile
        return len(servers[0].get("/v1/catalog/service/consul")) == len(self.servers) and all(
            len(server.get("/v1/status/peers")) == len(self.servers) for server in servers
        )

    def leader(self, among: list[Server] | None = None) -> Server | None:
        for server in among or self.servers:
            with contextlib.suppress(Exception):
                raft_addr = server.get("/v1/status/leader")
                for candidate in self.servers:
                    if raft_addr == f"127.0.0.1:{candidate.server_port}":
                        return candidate
        return None

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def cluster(workdir: Path) -> Iterator[ConsulCluster]:
    path = workdir / f"cluster-{time.monotonic_ns()}"
    path.mkdir()
    c = ConsulCluster(path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _register(server: Server, service: str, instance: str, port: int, tags: list[str]) -> None:
    # No TTL check: the instance is healthy while its node (a server that stays up) is.
    _http_json("PUT", f"{server.url}/v1/agent/service/register",
               {"Name": service, "ID": instance, "Address": "127.0.0.1", "Port": port, "Tags": tags})


def _index_of(url: str) -> tuple[int, float]:
    """(X-Consul-Index, seconds the answer took)."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as resp:
        return int(resp.headers["X-Consul-Index"]), time.monotonic() - started


class TestLeaderLoss:
    async def test_leader_killed_under_load_no_failed_request_and_discovery_goes_on(
        self, cluster: ConsulCluster, workdir: Path, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        leader = cluster.leader()
        assert leader is not None
        followers = [s for s in cluster.servers if s is not leader]
        home = followers[0]  # services live on a server that stays up (an agent's services go with it)

        # A blocking-query index read from one server is valid on another: the same Raft index, so a query
        # on a follower with the leader's index blocks (nothing changed) instead of answering at once.
        index, _ = await asyncio.to_thread(_index_of, f"{leader.url}/v1/catalog/services")
        same_index, waited = await asyncio.to_thread(
            _index_of, f"{followers[1].url}/v1/catalog/services?index={index}&wait=1s"
        )
        assert same_index == index and waited >= 0.9, (same_index, index, waited)

        started = [await Backend(name).start() for name in ("ha-a", "ha-b", "ha-c")]
        backends.extend(started)
        for backend in started[:2]:
            await asyncio.to_thread(_register, home, "ha", backend.instance, backend.port, ["urlprefix-/ha"])

        # The leader first, so the failover has to happen.
        addrs = ",".join(s.addr for s in [leader, *followers])
        proxy = FerrymanProcess(addrs, workdir, extra=["--consul-wait", "2"])
        try:
            proxy.start()
            await asyncio.to_thread(proxy.wait_instances, "ha@*any*/ha", ["ha-a", "ha-b"])

            load = SteadyLoad(http, f"{proxy.url}/ha/ping", limit_s=20)
            await asyncio.sleep(2)
            assert leader.proc is not None
            leader.proc.kill()  # SIGKILL, by PID
            killed_at = time.monotonic()
            await asyncio.to_thread(leader.proc.wait, 5)
            await asyncio.sleep(6)
            await load.stop()
            failures = load.failures
            served = Counter(name for _, name in load.served)
            total = sum(served.values())
            assert failures == [], f"{len(failures)} of {total + len(failures)} failed: {failures[:5]}"
            assert total > 200, served

            # A new leader among the two left; Ferryman's discovery answers again.
            new_leader = await asyncio.to_thread(
                wait_until, lambda: cluster.leader(followers), 20, "a new leader among the servers left"
            )
            assert new_leader is not leader

            async def reachable() -> bool:
                status, body, _ = await fetch(http, f"{proxy.admin_url}/api/status")
                return status == 200 and bool(json.loads(body)["discovery"]["reachable"])

            await async_wait_until(reachable, 20, "Ferryman to reach Consul again")
            recovered_s = time.monotonic() - killed_at

            # A registration made now is served within seconds.
            registered_at = time.monotonic()
            await asyncio.to_thread(_register, home, "ha", "ha-c", started[2].port, ["urlprefix-/ha"])

            async def c_served() -> bool:
                status, body, _ = await fetch(http, f"{proxy.url}/ha/ping")
                return status == 200 and json.loads(body)["instance"] == "ha-c"

            await async_wait_until(c_served, 5, "the instance registered after the election to be served")
            picked_up_s = time.monotonic() - registered_at

            events = proxy.log_events()
            moves = [e for e in events if e["event"] == "consul_failover"]
            assert moves and moves[0]["from"] == leader.url, moves
            assert moves[0]["to"] == followers[0].url and moves[0]["reason"] == "unreachable"
            assert not [e for e in events if e["event"] in ("consul_forbidden", "consul_access_unchecked")]
            outages = [e["outage_s"] for e in events if e["event"] == "consul_recovered"]
            assert outages and outages[-1] < recovered_s, outages
            print(f"\nrequests={total} failures=0 failover_warnings={len(moves)} discovery_outage={outages}s "
                  f"registration_served_after={picked_up_s:.2f}s")
        finally:
            proxy.stop()
