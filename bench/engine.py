#!/usr/bin/env python3
"""The engine's own cost per request, in process: no sockets, no wrk, no other process to share the CPU with.

    .venv/bin/python bench/engine.py [--requests 50000]

A `ClientConnection` gets a pipelined-style stream of one small GET at a time on a fake transport; a fake
pooled upstream connection answers each at once (a 1 KiB body, Content-Length) by calling the exchange's
callbacks as the real one would after llhttp parsed its answer. What is timed is everything Ferryman's Python
code does for a request between the client's bytes and the response bytes: the reader and head checks, the
dispatch, the exchange, the upstream head, the response framing, metrics (the access log is off). It leaves
out the sockets and llhttp on the upstream side, so it is a lower bound of the real per-request cost and a
repeatable one (a few percent between runs), which `make bench`'s figures on a shared machine are not: use it
to see what a change to the hot path costs before measuring it for real (`make bench BENCH_ARGS="--ab ..."`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.h1.client import ClientConnection
from proxy.h1.upstream import FRAMING_LENGTH, PoolKey, UpstreamConnection, UpstreamPool
from proxy.listener import ProxyContext, ProxyServer, Router
from proxy.metrics import Metrics
from proxy.pool import Pools
from proxy.table import RoutingTable
from proxy.workers import run_event_loop

REQUEST = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
BODY = b"x" * 1024


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 5000) if name == "peername" else default


class AnsweringConnection(UpstreamConnection):
    """A pooled upstream connection that answers at once."""

    closed = False
    reading_paused = False
    idle_since = 0.0

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.transport = FakeTransport()

    def send(self, head: bytes, sink: Any, *, head_request: bool, upgrade: bool = False) -> None:
        self.transport.write(head)
        sink.on_head(200, b"OK", [(b"Content-Length", b"1024"), (b"Content-Type", b"text/plain")], FRAMING_LENGTH)
        sink.on_body(BODY)
        sink.on_complete(True)  # no flush before: h1/upstream.py ends a response complete in one read at once

    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def detach(self) -> None: ...


class AnsweringPool(UpstreamPool):
    def __init__(self) -> None:
        super().__init__(connect_timeout=1.0, keepalive=8, idle_timeout=30.0)
        self.conns: dict[PoolKey, AnsweringConnection] = {}

    def take_idle(self, key: PoolKey, now: float) -> Any:
        return self.conns.setdefault(key, AnsweringConnection(key))

    def release(self, conn: Any, reusable: bool) -> None: ...


def proxy_context() -> ProxyContext:
    """One service `web` of two instances on `urlprefix-/`, answered by AnsweringPool; no access log (also
    bench/engine_h2.py's)."""
    snapshot = Snapshot((ServiceRoutes("web", (parse_route_tag("urlprefix-/"),), (
        Endpoint("web", "a", "127.0.0.1", 9001), Endpoint("web", "b", "127.0.0.1", 9002))),))
    pools = Pools()
    pools.reconcile(snapshot)
    return ProxyContext(
        router=Router(RoutingTable.from_snapshot(snapshot, 1)), pools=pools, upstream=AnsweringPool(),
        metrics=Metrics(registry=CollectorRegistry()), listen_port=8080, proto="http", access_log=None,
        loop=asyncio.get_running_loop(),
    )


async def run(requests: int) -> None:
    ctx = proxy_context()
    conn = ClientConnection(ctx, ProxyServer(ctx))
    conn.connection_made(FakeTransport())
    for _ in range(2000):  # warm-up: caches, the route memo
        conn.data_received(REQUEST)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(requests // 5):
            conn.data_received(REQUEST)
        best = min(best, (time.perf_counter() - started) / (requests // 5))
    print(f"engine: {best * 1e6:.2f} µs a request (best of 5 runs of {requests // 5}; in process, no sockets)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50_000)
    args = ap.parse_args()
    run_event_loop(run(args.requests))  # uvloop, as Ferryman runs (its loop.time() is cheaper than asyncio's)


if __name__ == "__main__":
    main()
