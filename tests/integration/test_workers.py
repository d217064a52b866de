"""Several worker processes behind one listener act as one proxy: same routes, one set of metrics."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, fetch, wait_until

pytestmark = pytest.mark.integration


def _worker_pids(log_events: list[dict[str, Any]]) -> set[int]:
    return {e["pid"] for e in log_events if e.get("event") == "worker_started"}


def _http_text(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=2) as resp:
        return str(resp.read().decode())


class TestWorkers:
    """`--workers 2`: both workers serve, follow Consul, and their metrics add up on the admin port."""

    async def test_two_workers_follow_consul_and_sum_metrics(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend]
    ) -> None:
        proxy = FerrymanProcess(consul.addr, workdir, workers=2, log_flush_interval=0.25)
        try:
            proxy.start()
            a, b = Backend("multi-a"), Backend("multi-b")
            for backend in (a, b):
                backends.append(await backend.start())
                await asyncio.to_thread(consul.register, "multi", backend.instance, backend.port,
                                        ["urlprefix-/multi"])
            await asyncio.to_thread(proxy.wait_instances, "multi@*any*/multi", ["multi-a", "multi-b"])
            # The supervisor's table has both; every worker follows Consul on its own within the same 1 s bound.
            await asyncio.sleep(1.0)

            # A new connection per request, so the kernel spreads them over both workers.
            total = 60
            for _ in range(total):
                async with aiohttp.ClientSession() as http:
                    status, _, _ = await fetch(http, f"{proxy.url}/multi/")
                    assert status == 200
            # Access lines are buffered (log_flush_interval 0.25 s) and reach the log within the interval.
            def access_lines() -> list[dict[str, Any]]:
                return [e for e in proxy.log_events() if e.get("event") == "access"]

            await asyncio.to_thread(wait_until, lambda: len(access_lines()) == total, 5, "every access line")
            assert {e.get("worker") for e in access_lines()} == {0, 1}

            # Workers hand their counts to the shared metric files every second: the sum is there within that.
            def metrics_text() -> str:
                return str(_http_text(f"{proxy.admin_url}/metrics"))

            def counted() -> str | None:
                text = metrics_text()
                count = re.search(
                    r'ferryman_requests_total\{code="200",method="GET",route="multi@\*any\*/multi",service="multi"\}'
                    r' (\S+)', text,
                )
                return text if count is not None and float(count.group(1)) == total else None

            text = await asyncio.to_thread(wait_until, counted, 5, f"{total} requests summed over both workers")
            assert re.search(r'ferryman_upstream_instances\{service="multi",state="healthy"\} 2\.0', text)

            # A deregistration reaches every worker: no request on any connection lands on multi-b after 1 s.
            deregistered_at = time.monotonic()
            await asyncio.to_thread(consul.deregister, "multi-b")
            await asyncio.sleep(1.0)
            b.hits.clear()
            for _ in range(30):
                async with aiohttp.ClientSession() as http:
                    status, _, _ = await fetch(http, f"{proxy.url}/multi/")
                    assert status == 200
            assert b.hits == [], f"multi-b got traffic {time.monotonic() - deregistered_at:.2f}s after leaving"

            # SIGTERM to the supervisor stops every worker and exits 0.
            pids = _worker_pids(proxy.log_events())
            assert len(pids) == 2
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proxy.proc.wait, 20) == 0
            for pid in pids:
                with pytest.raises(ProcessLookupError):
                    import os

                    os.kill(pid, 0)
        finally:
            proxy.stop()
