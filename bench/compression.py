#!/usr/bin/env python3
"""What response compression costs Ferryman: a 64 KiB text answer with and without gzip (and brotli), side by
side in one run, in requests per Ferryman CPU-second.

    .venv/bin/python bench/compression.py [--rounds 3] [--duration 5] [--connections 16] [--level 1]

How it works. bench/run.py's pieces on loopback: one nginx (1 worker) serving a 64 KiB text file (words from
a small vocabulary, so it compresses about as well as a real page: about 2.6x) as `text/plain`, from two
ports registered in a Consul dev agent as one service (`urlprefix-/`); one Ferryman (1 process, access log on,
`--gzip-content-type ^text/`, `--gzip-level` as given). wrk (1 thread) drives it in interleaved rounds, the
order rotated each round, of three kinds of client: one that sends no Accept-Encoding (the answer goes out as
it came: the setting's decision runs and adds `Vary`, nothing else), one that accepts gzip, one that rates br
above gzip. Ferryman's CPU time (utime+stime from /proc) is read around each run, so "requests per CPU-second"
says what a compressed answer costs the proxy whatever else ran. Before the runs, one request of each kind
checks that the answer really is identity / gzip / br. Every process is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/ is a directory of scripts, not a package: run.py is found beside this file
    BenchError,
    Proc,
    Run,
    Stack,
    answers,
    ferryman_argv,
    free_ports,
    measure,
    nginx_common,
    nginx_temp_paths,
    routes_ready,
    running_stack,
    start_consul,
    start_nginx,
    tool,
    wait_until,
)

ROOT: Final = Path(__file__).resolve().parent.parent
PATH: Final = "/64k.txt"
SIZE: Final = 64 * 1024
KINDS: Final = (  # (name, Accept-Encoding sent by wrk, Content-Encoding expected)
    ("identity", (), None),
    ("gzip", ("Accept-Encoding: gzip",), "gzip"),
    ("br", ("Accept-Encoding: br;q=1, gzip;q=0.5",), "br"),
)


def text(size: int) -> bytes:
    rng = random.Random(64)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(2000)]
    return " ".join(rng.choice(words) for _ in range(size // 3)).encode()[: size - 1] + b"\n"


def start_text_backends(stack: Stack) -> tuple[Proc, list[int]]:
    www = stack.tmp / "www"
    www.mkdir()
    (www / PATH.lstrip("/")).write_bytes(text(SIZE))
    ports = free_ports(2)
    prefix = stack.tmp / "backends"
    servers = "\n".join(f"  server {{ listen 127.0.0.1:{p} backlog=4096; root {www}; }}" for p in ports)
    proc = start_nginx(stack, "backends", nginx_common(prefix) + f"""
http {{
  access_log off;
  types {{ text/plain txt; }}
  sendfile on;
  keepalive_timeout 120s;
  keepalive_requests 10000000;
{nginx_temp_paths(prefix)}
{servers}
}}
""")
    for port in ports:
        wait_until(f"backend on port {port}", functools.partial(answers, port, PATH), 15, [proc])
    return proc, ports


def probe(port: int, headers: Sequence[str]) -> tuple[str | None, int]:
    """(Content-Encoding, body bytes on the wire) of one answer."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}")
    for header in headers:
        name, _, value = header.partition(": ")
        req.add_header(name, value)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        return resp.headers.get("Content-Encoding"), len(resp.read())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--level", type=int, default=1, help="--gzip-level for Ferryman (default 1, its default)")
    ap.add_argument("--consul-bin", default=os.environ.get("CONSUL_BIN", str(ROOT / ".venv" / "bin" / "consul")))
    args = ap.parse_args(argv)
    for name in ("wrk", "nginx"):
        if not os.access(tool(name), os.X_OK):
            print(f"bench: no {name} in .venv/bin or on PATH", file=sys.stderr)
            return 2
    runs: dict[str, list[Run]] = {name: [] for name, _, _ in KINDS}
    wire: dict[str, int] = {}
    try:
        with running_stack() as stack:
            backends, ports = start_text_backends(stack)
            _, consul = start_consul(stack, args.consul_bin, ports)
            listen, admin = free_ports(2)
            argv_ = [*ferryman_argv(listen, admin, consul, 1, True), "--gzip-content-type", "^text/",
                     "--gzip-level", str(args.level)]
            ferryman = stack.spawn("ferryman", argv_, stdout=stack.tmp / "ferryman-access.log",
                                   env={k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")})
            wait_until("Ferryman's route with 2 instances", lambda: routes_ready(admin), 45, [ferryman])
            wait_until("Ferryman to answer", lambda: answers(listen, PATH), 15, [ferryman])
            for name, headers, expected in KINDS:
                encoding, size = probe(listen, headers)
                if encoding != expected:
                    raise BenchError(f"{name}: Content-Encoding {encoding!r}, expected {expected!r}")
                wire[name] = size
                measure(name, ferryman, listen, PATH, args.connections, 1, backends, headers)  # warm-up
            for round_no in range(args.rounds):
                order = KINDS[round_no % 3:] + KINDS[:round_no % 3]
                for name, headers, _ in order:
                    run = measure(name, ferryman, listen, PATH, args.connections, args.duration, backends, headers)
                    if run.wrk.failure or run.wrk.errors:
                        raise BenchError(f"{name}: {run.wrk.failure or f'{run.wrk.errors} errors'}")
                    runs[name].append(run)
                    print(f"round {round_no + 1} {name:8} {run.wrk.rps:9,.0f} req/s {run.per_cpu_s:9,.0f} "
                          f"req/CPU-s", flush=True)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    base = statistics.median(r.per_cpu_s for r in runs["identity"])
    print(f"\n64 KiB text/plain through Ferryman (1 process, gzip level {args.level}, brotli quality 4), "
          f"{args.connections} connections, {args.rounds} rounds of {args.duration} s, medians:\n")
    print("| client sends | Content-Encoding | bytes on the wire | req/s | req per CPU-s | vs identity |")
    print("|---|---|---|---|---|---|")
    for name, headers, expected in KINDS:
        rps = statistics.median(r.wrk.rps for r in runs[name])
        per_cpu = statistics.median(r.per_cpu_s for r in runs[name])
        sent = headers[0] if headers else "no Accept-Encoding"
        print(f"| {sent} | {expected or 'none'} | {wire[name]:,} | {rps:,.0f} | {per_cpu:,.0f} | "
              f"{per_cpu / base:.2f}x |")
    print(f"\n(finished {time.strftime('%Y-%m-%d %H:%M')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
