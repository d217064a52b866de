#!/usr/bin/env python3
"""The HTTP/2 side's own cost per request, in process: bench/engine.py for a client speaking HTTP/2.

    .venv/bin/python bench/engine_h2.py [--requests 50000] [--streams 10] [--profile]

An `H2ClientConnection` on a fake transport gets what h2load sends with `-m STREAMS`: STREAMS request HEADERS
frames (END_STREAM, HPACK with a dynamic table, as nghttp2 encodes them) in one read; a fake pooled upstream
connection answers each at once (a 1 KiB body, Content-Length). The client's frames are prepared before the
clock starts and the client opened huge windows, so what is timed is Ferryman's side alone: the `h2` state
machine, the request head, the dispatch, the exchange, the answer's HEADERS and DATA frames, metrics (the
access log is off), with the garbage collector settled as a worker settles it. Timed in this process's CPU time
(a shared machine's load weighs less on it than on wall time): use it for A/B of the HTTP/2 hot path.
"""

from __future__ import annotations

import argparse
import pstats
import sys
import time
from typing import Any

from engine import FakeTransport, proxy_context  # bench/engine.py, beside this script
from hpack import Encoder
from hyperframe.frame import HeadersFrame, SettingsFrame, WindowUpdateFrame

from proxy.h2.connection import H2ClientConnection
from proxy.h2.limits import PREFACE
from proxy.listener import DEFAULT_H2, ProxyServer
from proxy.workers import _settle_gc as settle_gc
from proxy.workers import run_event_loop

FIELDS = [
    (b":method", b"GET"), (b":path", b"/1k"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"),
    (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"), (b"user-agent", b"h2load nghttp2/1.64.0"),
]
_BIG: int = 2**31 - 1
SORT = "tottime"
CALLERS = ""


def client_reads(requests: int, streams: int) -> tuple[bytes, list[bytes]]:
    """The client's opening (preface, SETTINGS with a huge stream window, a huge connection window, the ACK of
    Ferryman's SETTINGS) and then one read of `streams` request heads at a time."""
    opening = PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: _BIG}).serialize() \
        + WindowUpdateFrame(0, _BIG - 65535).serialize() + SettingsFrame(0, flags=["ACK"]).serialize()
    encoder = Encoder()
    reads = []
    sid = 1
    for _ in range(requests // streams):
        batch = []
        for _ in range(streams):
            batch.append(HeadersFrame(sid, encoder.encode(FIELDS), flags=["END_HEADERS", "END_STREAM"]).serialize())
            sid += 2
        reads.append(b"".join(batch))
    return opening, reads


async def run(requests: int, streams: int, profile: bool) -> None:
    ctx = proxy_context()
    assert DEFAULT_H2 is not None
    conn = H2ClientConnection(ctx, ProxyServer(ctx), DEFAULT_H2)
    transport = FakeTransport()
    conn.connection_made(transport)
    runs = 5
    per_run = requests // runs
    opening, reads = client_reads(2000 + per_run * runs, streams)
    conn.data_received(opening)
    settle_gc()  # as a worker does once started
    warm, reads = reads[:2000 // streams], reads[2000 // streams:]
    for data in warm:  # warm-up: caches, the route memo, the HPACK tables
        conn.data_received(data)
    best = float("inf")
    profiler = None
    if profile:
        # bench/profile.py, first on sys.path when run as a script, would hide the standard library's `profile`
        # that cProfile imports.
        sys.path.remove(sys.path[0])
        import cProfile

        profiler = cProfile.Profile()
    step = per_run // streams
    for i in range(runs):
        batch = reads[i * step:(i + 1) * step]
        if profiler is not None and i == runs - 1:
            profiler.enable()
        started = time.process_time()
        for data in batch:
            conn.data_received(data)
        best = min(best, (time.process_time() - started) / (step * streams))
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler).sort_stats(SORT)
        stats.print_callers(CALLERS) if CALLERS else stats.print_stats(45)
    assert not conn.closing and not conn.streams, "every stream answered and gone"
    print(f"engine h2: {best * 1e6:.2f} µs a request (best of {runs} runs of {step * streams}, {streams} streams a "
          f"read; in process, no sockets; {transport.written / (requests + 2000):.0f} bytes out a request)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="cProfile the last run, by own time")
    args: Any = ap.parse_args()
    run_event_loop(run(args.requests, args.streams, args.profile))


if __name__ == "__main__":
    main()
