"""The end-to-end slice against a real Consul agent, a real Ferryman process and real aiohttp backends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, async_wait_until, fetch, pattern_bytes

pytestmark = pytest.mark.integration


async def _register(consul: ConsulAgent, service: str, backend: Backend, tags: list[str]) -> None:
    await asyncio.to_thread(consul.register, service, backend.instance, backend.port, tags)


async def _start(backends: list[Backend], *names: str) -> list[Backend]:
    started = [await Backend(name).start() for name in names]
    backends.extend(started)
    return started


async def _routed(consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], service: str,
                  *names: str, tags: list[str] | None = None) -> list[Backend]:
    """Start backends, register them as `service` with route `/service` (or `tags`), wait until routed."""
    started = await _start(backends, *names)
    for backend in started:
        await _register(consul, service, backend, tags or [f"urlprefix-/{service}"])
    await asyncio.to_thread(ferryman.wait_instances, f"{service}@*any*/{service}", list(names))
    return started


async def _instance_of(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> str:
    async with http.get(url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["instance"])


class TestDiscoveryToTraffic:
    """Instances registered in Consul receive traffic; instances that leave or fail stop receiving it."""

    async def test_two_instances_share_traffic(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "share", "share-a", "share-b",
                      tags=["urlprefix-/share lb=round_robin"])

        seen = Counter([await _instance_of(http, f"{ferryman.url}/share/x") for _ in range(20)])

        assert seen == {"share-a": 10, "share-b": 10}

    async def test_deregistered_instance_stops_receiving_within_1s_with_zero_failures(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        a, b = await _routed(consul, ferryman, backends, "dereg", "dereg-a", "dereg-b")

        failures: list[str] = []
        stop = asyncio.Event()

        async def client() -> None:
            deadline = time.monotonic() + 10  # bounded even if the test goes wrong
            for _ in range(5000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                status, body, _ = await fetch(http, f"{ferryman.url}/dereg/ping")
                if status != 200:
                    failures.append(f"{status} {body[:100]!r}")

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(0.5)
        deregistered_at = time.monotonic()
        await asyncio.to_thread(consul.deregister, "dereg-b")
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*clients)

        after = [h.at - deregistered_at for h in b.hits if h.at > deregistered_at]
        assert failures == []
        assert max(after, default=0.0) < 1.0, f"dereg-b still got traffic {max(after):.3f}s after leaving"
        assert any(h.at > deregistered_at + 1.0 for h in a.hits), "traffic kept flowing to dereg-a"

    async def test_instance_with_critical_ttl_check_is_removed_and_returns_when_passing(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "ttl", "ttl-a", "ttl-b")

        await asyncio.to_thread(consul.ttl, "ttl-b", "critical")
        await asyncio.to_thread(ferryman.wait_instances, "ttl@*any*/ttl", ["ttl-a"], 1.0)
        seen = {await _instance_of(http, f"{ferryman.url}/ttl/") for _ in range(6)}
        assert seen == {"ttl-a"}

        await asyncio.to_thread(consul.ttl, "ttl-b", "passing")
        await asyncio.to_thread(ferryman.wait_instances, "ttl@*any*/ttl", ["ttl-a", "ttl-b"], 1.0)

    async def test_new_instance_receives_traffic_within_1s(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        a, b = await _start(backends, "grow-a", "grow-b")
        await _register(consul, "grow", a, ["urlprefix-/grow"])
        await asyncio.to_thread(ferryman.wait_instances, "grow@*any*/grow", ["grow-a"])

        registered_at = time.monotonic()
        await _register(consul, "grow", b, ["urlprefix-/grow"])

        async def b_served() -> bool:
            return await _instance_of(http, f"{ferryman.url}/grow/") == "grow-b"

        await async_wait_until(b_served, 1.0, "grow-b to receive a request")
        assert b.hits[0].at - registered_at < 1.0


class TestConsulOutage:
    """Losing Consul never empties the table; when it returns, changes are picked up again."""

    async def test_proxy_keeps_serving_while_consul_is_down_and_resyncs_after(
        self, workdir: Path, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        consul = ConsulAgent(workdir)
        consul.start()
        proxy = FerrymanProcess(consul.addr, workdir)
        try:
            proxy.start()
            (a,) = await _start(backends, "outage-a")
            await _register(consul, "outage", a, ["urlprefix-/outage"])
            await asyncio.to_thread(proxy.wait_instances, "outage@*any*/outage", ["outage-a"])

            await asyncio.to_thread(consul.stop)
            for _ in range(20):  # two seconds of traffic with Consul gone
                assert await _instance_of(http, f"{proxy.url}/outage/") == "outage-a"
                await asyncio.sleep(0.1)
            assert proxy.instances("outage@*any*/outage") == ["outage-a"]

            await asyncio.to_thread(consul.start)
            (b,) = await _start(backends, "after-b")
            await _register(consul, "after", b, ["urlprefix-/after"])

            async def routed() -> bool:
                status, _, _ = await fetch(http, f"{proxy.url}/after/")
                return status == 200

            await async_wait_until(routed, 15, "the service registered after the outage to be routed")
            events = [e["event"] for e in proxy.log_events()]
            consul_events = [e for e in proxy.log_events() if e["event"].startswith("consul_")]
            assert events.count("consul_unreachable") == 1, consul_events
            assert events.count("consul_recovered") == 1
        finally:
            proxy.stop()
            consul.stop()


class TestStreaming:
    """Bodies stream through both ways, intact, without being buffered whole."""

    async def test_5_mib_upload_and_download_arrive_intact(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "bulk", "bulk-a")
        size = 5 * 1024 * 1024
        payload = os.urandom(size)

        status, body, _ = await fetch(http, f"{ferryman.url}/bulk/upload", method="POST", data=payload)
        assert status == 200
        assert (await _json(body)) == {"sha256": hashlib.sha256(payload).hexdigest(), "size": size,
                                       "chunked": False}

        async def chunks() -> AsyncIterator[bytes]:  # a chunked upload: no Content-Length
            for i in range(0, size, 100_000):
                yield payload[i : i + 100_000]

        status, body, _ = await fetch(http, f"{ferryman.url}/bulk/upload", method="PUT", data=chunks())
        assert status == 200
        assert (await _json(body))["sha256"] == hashlib.sha256(payload).hexdigest()

        status, body, headers = await fetch(http, f"{ferryman.url}/bulk/download?size={size}")
        assert status == 200
        assert headers["Content-Length"] == str(size)
        assert hashlib.sha256(body).digest() == hashlib.sha256(pattern_bytes(0, size)).digest()

    async def test_response_chunks_reach_the_client_as_they_are_sent(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        (a,) = await _routed(consul, ferryman, backends, "gate", "gate-a")

        async with http.get(f"{ferryman.url}/gate/gated") as resp:
            # The backend sends "second" only after the gate opens, and the gate opens only once "first"
            # came through the proxy: a buffering proxy would time out here.
            first = await asyncio.wait_for(resp.content.readline(), 5)
            assert first == b"first\n"
            a.gate.set()
            assert await asyncio.wait_for(resp.content.read(), 5) == b"second\n"

    async def test_request_body_reaches_the_backend_before_the_client_finished_sending(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        (a,) = await _routed(consul, ferryman, backends, "upgate", "upgate-a")

        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            await asyncio.wait_for(a.first_chunk_received.wait(), 5)  # fails if the proxy buffers
            yield b"y" * 1000

        status, raw, _ = await fetch(http, f"{ferryman.url}/upgate/upload", method="POST", data=body())
        assert status == 200
        assert (await _json(raw))["size"] == 2000


class TestHeaders:
    """Forwarding headers are set as a reverse proxy must; hop-by-hop headers never cross."""

    async def test_forwarded_headers_host_and_hop_by_hop(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "hdr", "hdr-a")

        status, body, _ = await fetch(http, f"{ferryman.url}/hdr/echo", headers={
            "Host": "shop.example.com:8443",
            "X-Forwarded-For": "203.0.113.7, 198.51.100.2",
            "X-Forwarded-Proto": "https",
            "X-Real-IP": "10.9.9.9",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Custom": "kept",
        })
        assert status == 200
        headers = dict((await _json(body))["headers"])
        assert headers["Host"] == "shop.example.com:8443"
        assert headers["X-Forwarded-For"] == "203.0.113.7, 198.51.100.2, 127.0.0.1"
        assert headers["X-Forwarded-Proto"] == "http"
        assert headers["X-Forwarded-Host"] == "shop.example.com:8443"
        assert headers["X-Forwarded-Port"] == str(ferryman.port)
        assert headers["X-Real-IP"] == "127.0.0.1"
        assert headers["X-Custom"] == "kept"
        for hop in ("X-Secret-Hop", "Keep-Alive", "TE"):
            assert hop not in headers
        assert "Accept-Encoding" not in headers, "the proxy must not invent headers the client did not send"

    async def test_response_hop_by_hop_removed_and_set_cookies_kept(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "resp", "resp-a")

        status, _, headers = await fetch(http, f"{ferryman.url}/resp/hopbyhop")
        assert status == 200
        assert headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert "X-Hop" not in headers
        assert headers.get("Keep-Alive") is None
        assert headers["X-End-To-End"] == "kept"

    async def test_strip_option_removes_the_prefix_upstream(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "strip", "strip-a", tags=["urlprefix-/strip strip=/strip"])

        status, body, _ = await fetch(http, f"{ferryman.url}/strip/users/7?full=1")
        assert status == 200
        assert (await _json(body))["path"] == "/users/7?full=1"


class TestErrorAnswers:
    """Failures get the status a user of a reverse proxy expects, with a short reason."""

    async def test_no_route_is_404(self, ferryman: FerrymanProcess, http: aiohttp.ClientSession) -> None:
        status, body, _ = await fetch(http, f"{ferryman.url}/nothing-routes-here", headers={"Host": "none.test"})
        assert status == 404
        assert b"no route" in body

    async def test_route_without_healthy_instance_is_503(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "sick", "sick-a")
        await asyncio.to_thread(consul.ttl, "sick-a", "critical")
        await asyncio.to_thread(ferryman.wait_instances, "sick@*any*/sick", [])

        status, body, _ = await fetch(http, f"{ferryman.url}/sick/")
        assert status == 503
        assert b"no healthy instance" in body

    async def test_refused_connection_is_retried_on_another_instance(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        (live,) = await _start(backends, "retry-live")
        await _register(consul, "retry", live, ["urlprefix-/retry"])
        dead_port = Backend("unused").port  # nothing listens there
        await asyncio.to_thread(consul.register, "retry", "retry-dead", dead_port, ["urlprefix-/retry"])
        await asyncio.to_thread(ferryman.wait_instances, "retry@*any*/retry", ["retry-dead", "retry-live"])

        for method in ("GET", "POST"):
            for _ in range(4):
                status, body, _ = await fetch(http, f"{ferryman.url}/retry/", method=method, data=b"{}")
                assert status == 200, body
        assert len(live.hits) == 8

    async def test_all_instances_refusing_is_502(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, http: aiohttp.ClientSession
    ) -> None:
        dead_port = Backend("unused").port
        await asyncio.to_thread(consul.register, "gone", "gone-1", dead_port, ["urlprefix-/gone"])
        await asyncio.to_thread(ferryman.wait_instances, "gone@*any*/gone", ["gone-1"])

        status, body, _ = await fetch(http, f"{ferryman.url}/gone/")
        assert status == 502
        assert body == b"502 the upstream could not be reached\n"  # the instance's address only in the log

    async def test_upstream_read_timeout_is_504(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "slow", "slow-a")

        status, body, _ = await fetch(http, f"{ferryman.url}/slow/slow?delay=3")  # read timeout is 1 s
        assert status == 504
        assert b"did not answer in time" in body
        reasons = [e.get("reason") for e in ferryman.log_events() if e["event"] == "proxy_error"]
        assert "upstream_timeout" in reasons


class TestAdmin:
    """The admin listener exposes metrics, liveness and the routing table."""

    async def test_metrics_count_requests_by_service_and_code(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _routed(consul, ferryman, backends, "metric", "metric-a")
        for _ in range(3):
            await fetch(http, f"{ferryman.url}/metric/")

        status, body, headers = await fetch(http, f"{ferryman.admin_url}/metrics")
        text = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        route = 'route="metric@*any*/metric"'
        assert f'ferryman_requests_total{{code="200",method="GET",{route},service="metric"}} 3.0' in text
        assert 'ferryman_upstream_instances{service="metric",state="healthy"} 1.0' in text
        assert f'ferryman_request_duration_seconds_count{{{route},service="metric"}} 3.0' in text
        assert 'ferryman_upstream_duration_seconds_count{service="metric"} 3.0' in text
        assert "ferryman_discovery_updates_total" in text

        status, body, _ = await fetch(http, f"{ferryman.admin_url}/healthz")
        assert status == 200


async def _json(raw: bytes) -> Any:
    import json

    return json.loads(raw)
