"""Request ids, access log formats, /ready (staleness watchdog, draining) and series hygiene, through a real
Consul agent and Ferryman processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, fetch, wait_until

HEX_ID = re.compile(r"[0-9a-f]{32}")


async def _route(consul: ConsulAgent, proxy: FerrymanProcess, backends: list[Backend], service: str,
                 instance: str, tags: list[str] | None = None) -> Backend:
    backend = await Backend(instance).start()
    backends.append(backend)
    await asyncio.to_thread(consul.register, service, instance, backend.port, tags or [f"urlprefix-/{service}"])
    await asyncio.to_thread(proxy.wait_instances, f"{service}@*any*/{service}", [instance])
    return backend


def _series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


class TestRequestIds:
    async def test_kept_generated_or_replaced_and_in_every_line(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
    ) -> None:
        await _route(consul, ferryman, backends, "rid", "rid-a")

        async def through(request_id: str | None) -> tuple[str, list[str]]:
            headers = {"X-Request-ID": request_id} if request_id is not None else {}
            status, body, resp_headers = await fetch(http, f"{ferryman.url}/rid/x", headers=headers)
            assert status == 200
            import json
            seen = [v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"]
            return resp_headers["X-Request-ID"], seen

        returned, seen = await through("checkout-7f3a.b_c:1")
        assert returned == "checkout-7f3a.b_c:1" and seen == [returned]
        returned, seen = await through(None)
        assert HEX_ID.fullmatch(returned) and seen == [returned]
        returned, seen = await through("two words\u00e9")
        assert HEX_ID.fullmatch(returned) and seen == [returned]
        forged = returned

        # The proxy's own answers carry one too, and their log lines say which.
        status, _, headers = await fetch(http, f"{ferryman.url}/nowhere-{time.time()}", headers={"Host": "nope.test"})
        assert status == 404
        not_found = headers["X-Request-ID"]
        assert HEX_ID.fullmatch(not_found)

        def lines() -> list[dict[str, Any]]:
            return ferryman.log_events()

        events = await asyncio.to_thread(
            wait_until, lambda: [e for e in lines() if e.get("request_id") == not_found and e["event"] == "access"]
            or None, 5, "the 404's access line")
        assert events[0]["status"] == 404 and events[0]["service"] == "none"
        errors = [e for e in lines() if e["event"] == "proxy_error" and e.get("request_id") == not_found]
        assert errors and errors[0]["status"] == 404
        assert any(e["event"] == "access" and e.get("request_id") == forged and e["status"] == 200 for e in lines())

        # Unmatched requests count under service="none", route="none".
        _, body, _ = await fetch(http, f"{ferryman.admin_url}/metrics")
        assert re.search(r'ferryman_requests_total\{code="404",method="GET",route="none",service="none"\} [1-9]',
                         body.decode())


class TestAccessLogFormats:
    async def test_combined_to_a_file_with_successes_sampled_out(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend]
    ) -> None:
        log_file = workdir / f"access-{time.time_ns()}.log"
        proxy = FerrymanProcess(consul.addr, workdir, extra=[
            "--access-log-format", "combined", "--access-log-file", str(log_file), "--access-log-sample", "0",
        ])
        await asyncio.to_thread(proxy.start)
        try:
            await _route(consul, proxy, backends, "clf", "clf-a")
            async with aiohttp.ClientSession() as http:
                for _ in range(5):
                    assert (await fetch(http, f"{proxy.url}/clf/ok"))[0] == 200
                status, body, _ = await fetch(http, f"{proxy.url}/clf-missing?q=1",
                                           headers={"Host": "missing.test", "Referer": "http://r.test/",
                                                    "User-Agent": "probe/1.0"})
                assert status == 404
            line = await asyncio.to_thread(
                wait_until, lambda: (log_file.exists() and log_file.read_text().strip()) or None, 5, "an access line")
            # Only the error was logged (successes sampled at 0), in the combined format, with the bytes of
            # Ferryman's own answer.
            assert len(line.splitlines()) == 1, line
            assert body and re.fullmatch(
                r'127\.0\.0\.1 - - \[[^\]]+ \+0000\] "GET /clf-missing\?q=1 HTTP/1\.1" 404 '
                + str(len(body)) + r' "http://r\.test/" "probe/1\.0"', line), line
            assert not [e for e in proxy.log_events() if e.get("event") == "access"]
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, "clf-a")


class TestReadiness:
    async def test_stale_when_consul_is_gone_and_ready_again_after(
        self, workdir: Path, backends: list[Backend]
    ) -> None:
        """A dedicated agent (the session's keeps running): stopped, /ready turns 503 after max_sync_age while
        the proxy keeps serving its last table; restarted, /ready is 200 again."""
        agent = ConsulAgent(workdir)
        await asyncio.to_thread(agent.start)
        proxy = FerrymanProcess(agent.addr, workdir, extra=["--consul-wait", "1", "--max-sync-age", "3"])
        try:
            await asyncio.to_thread(proxy.start)
            await _route(agent, proxy, backends, "stale", "stale-a")
            async with aiohttp.ClientSession() as http:
                status, body, _ = await fetch(http, f"{proxy.admin_url}/ready")
                assert (status, body) == (200, b"ready\n")
                await asyncio.to_thread(agent.stop)
                stopped = time.monotonic()
                while (await fetch(http, f"{proxy.admin_url}/ready"))[0] == 200:
                    assert time.monotonic() - stopped < 10, "/ready stayed 200 with Consul gone"
                    await asyncio.sleep(0.2)
                status, body, _ = await fetch(http, f"{proxy.admin_url}/ready")
                assert status == 503 and b"stale" in body and b"max_sync_age 3" in body
                assert (await fetch(http, f"{proxy.admin_url}/healthz"))[0] == 200  # liveness is not readiness
                assert (await fetch(http, f"{proxy.url}/stale/x"))[0] == 200  # the last table still serves
                _, body, _ = await fetch(http, f"{proxy.admin_url}/api/status")
                import json
                status_doc = json.loads(body)
                assert status_doc["ready"] is False and status_doc["discovery"]["reachable"] is False
                assert status_doc["discovery"]["last_sync_age_s"] > 3

                await asyncio.to_thread(agent.start)
                await asyncio.to_thread(
                    wait_until, lambda: _status(proxy.admin_url + "/ready") == 200, 15, "/ready back to 200")
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(agent.stop)

    @pytest.mark.parametrize("workers", [1, 2])
    async def test_sigterm_drains_not_ready_while_still_serving(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend], workers: int
    ) -> None:
        proxy = FerrymanProcess(consul.addr, workdir, workers=workers, extra=["--drain-delay", "2"])
        await asyncio.to_thread(proxy.start)
        instance = f"drain{workers}-a"
        try:
            await _route(consul, proxy, backends, f"drain{workers}", instance)
            async with aiohttp.ClientSession() as http:
                await asyncio.to_thread(
                    wait_until, lambda: _status(proxy.admin_url + "/ready") == 200, 10, "ready")
                assert proxy.proc is not None
                os.kill(proxy.proc.pid, signal.SIGTERM)
                await asyncio.to_thread(
                    wait_until, lambda: _status(proxy.admin_url + "/ready") == 503, 1.5, "/ready 503 on SIGTERM")
                _, body, _ = await fetch(http, f"{proxy.admin_url}/ready")
                assert body == b"draining: shutting down\n"
                # Within drain_delay the listener still takes new connections and answers.
                async with aiohttp.ClientSession() as fresh:
                    assert (await fetch(fresh, f"{proxy.url}/drain{workers}/x"))[0] == 200
            proc = proxy.proc
            assert proc is not None
            await asyncio.to_thread(wait_until, lambda: proc.poll() is not None, 15, "the process to exit")
            assert proc.returncode == 0
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, instance)


def _status(url: str) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class TestSeriesHygiene:
    async def test_two_hundred_instances_come_and_go_and_the_series_count_returns(
        self, workdir: Path, backends: list[Backend]
    ) -> None:
        """Register and remove 200 instances (4 rounds of 50, all pointing at one live backend, with traffic
        while they are in): every per-instance series leaves with its instance. Two workers, the default
        deployment, so the supervisor's merged view is what is checked. A Consul agent of its own, so that
        other tests' services (whose TTL checks lapse) do not change the series meanwhile."""
        consul = ConsulAgent(workdir)
        await asyncio.to_thread(consul.start)
        proxy = FerrymanProcess(consul.addr, workdir, workers=2)
        await asyncio.to_thread(proxy.start)
        route = "churn@*any*/churn"
        registered: list[str] = []
        try:
            backend = await _route(consul, proxy, backends, "churn", "churn-base")
            async with aiohttp.ClientSession() as http:
                # /api/routes shows the supervisor's table; each worker follows Consul on its own, as fast.
                deadline = time.monotonic() + 5
                while (await fetch(http, f"{proxy.url}/churn/x"))[0] != 200:
                    assert time.monotonic() < deadline, "the workers never routed /churn"
                    await asyncio.sleep(0.1)
                for _ in range(20):
                    assert (await fetch(http, f"{proxy.url}/churn/x"))[0] == 200
                await asyncio.sleep(1.5)  # the workers' reports and byte counters settle
                start = _series((await fetch(http, f"{proxy.admin_url}/metrics"))[1].decode())
                peak: list[str] = []
                for round_ in range(4):
                    names = [f"churn-{round_}-{i}" for i in range(50)]
                    for name in names:
                        await asyncio.to_thread(consul.register, "churn", name, backend.port, ["urlprefix-/churn"],
                                                ttl=False)
                        registered.append(name)
                    await asyncio.to_thread(proxy.wait_instances, route, ["churn-base", *names], 20)
                    for _ in range(50):
                        assert (await fetch(http, f"{proxy.url}/churn/x"))[0] == 200
                    await asyncio.sleep(1.2)  # a worker report with them in
                    text = (await fetch(http, f"{proxy.admin_url}/metrics"))[1].decode()
                    if len(_series(text)) > len(peak):
                        peak = _series(text)
                    assert text.count('ferryman_upstream_up{instance="churn-') >= 51
                    for name in names:
                        await asyncio.to_thread(consul.deregister, name)
                        registered.remove(name)
                    await asyncio.to_thread(proxy.wait_instances, route, ["churn-base"], 20)
                await asyncio.sleep(1.5)
                end = _series((await fetch(http, f"{proxy.admin_url}/metrics"))[1].decode())
            strip = re.compile(r" \S+$")
            peak_names = {strip.sub("", s) for s in peak}
            assert len(peak) >= len(start) + 50, [s for s in start if strip.sub("", s) not in peak_names]
            # Same series (values change: counters went up); nothing about a departed instance is left.
            assert sorted(strip.sub("", s) for s in end) == sorted(strip.sub("", s) for s in start)
            assert not [s for s in end if "churn-" in s and "churn-base" not in s]
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.stop)
