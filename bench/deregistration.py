"""Time from a Consul deregistration to the last request that reached the removed instance.

    .venv/bin/python bench/deregistration.py [--rounds 20]

Real Consul dev agent, real Ferryman process, two aiohttp backends in this process, 4 clients sending
requests back to back through Ferryman. Each round: both instances registered and routed, traffic flowing,
instance B deregistered at t0 (just before the HTTP call to the agent), traffic goes on for 1.5 s. The figure
of a round is (arrival time of the last request B received) - t0; failed client requests are counted too.
Loopback only; every loop is bounded; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.harness import Backend, ConsulAgent, FerrymanProcess, new_workdir

ROUTE = "lat@*any*/lat"


async def one_round(consul: ConsulAgent, proxy: FerrymanProcess, a: Backend, b: Backend,
                    http: aiohttp.ClientSession) -> tuple[float, int, int]:
    for backend in (a, b):
        await asyncio.to_thread(consul.register, "lat", backend.instance, backend.port, ["urlprefix-/lat"])
    await asyncio.to_thread(proxy.wait_instances, ROUTE, [a.instance, b.instance])
    b.hits.clear()
    failures = 0
    sent = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal failures, sent
        deadline = time.monotonic() + 10
        for _ in range(20_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                async with http.get(f"{proxy.url}/lat/") as resp:
                    await resp.read()
                    failures += resp.status != 200
            except aiohttp.ClientError:
                failures += 1
            sent += 1

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    await asyncio.to_thread(consul.deregister, b.instance)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*clients)
    last = max((h.at for h in b.hits), default=t0)
    return last - t0, failures, sent


async def main(rounds: int) -> None:
    work = new_workdir("ferryman-dereg-")
    consul = ConsulAgent(work)
    consul.start()
    proxy = FerrymanProcess(consul.addr, work, extra=["--access-log", "false"])
    a, b = Backend("lat-a"), Backend("lat-b")
    try:
        proxy.start()
        await a.start()
        await b.start()
        results = []
        async with aiohttp.ClientSession() as http:
            for i in range(rounds):
                latency, failures, sent = await one_round(consul, proxy, a, b, http)
                results.append((latency, failures, sent))
                print(f"round {i + 1:2d}: last request at removed instance {latency * 1000:7.1f} ms after "
                      f"deregistration; {sent} requests, {failures} failed", flush=True)
        latencies = sorted(r[0] * 1000 for r in results)
        print(f"\n{rounds} rounds: median {statistics.median(latencies):.1f} ms, worst {latencies[-1]:.1f} ms, "
              f"best {latencies[0]:.1f} ms; failed requests {sum(r[1] for r in results)} of "
              f"{sum(r[2] for r in results)}")
    finally:
        await a.stop()
        await b.stop()
        proxy.stop()
        consul.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(max(1, min(parser.parse_args().rounds, 200))))
