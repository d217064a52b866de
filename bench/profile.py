#!/usr/bin/env python3
"""Where Ferryman's CPU goes under load: py-spy samples it while wrk drives it, and the stacks are summed up.

    .venv/bin/python bench/profile.py [--duration 10] [--connections 64] [--path /1k] [--native]

How it works. The same stack as bench/run.py (one nginx with two backends, a Consul dev agent, Ferryman with
its access log on; no nginx/HAProxy proxies) is started on loopback. wrk runs against Ferryman for a
warm-up, then again while `py-spy record --format raw` samples the Ferryman process. Raw output is one
collapsed stack per line ("frame;frame;frame count"); it is kept in bench/out/ferryman-profile.txt (speedscope
opens that format as is) and summarised here:
  * each sample is charged to one component: the innermost frame that belongs to a known component wins
    (json.dumps inside structlog is structlog's, the C parser inside aiohttp's protocol is aiohttp's);
  * per component, "self" is that exclusive share and "total" the share of samples with any of its frames;
  * the top functions by self and by total time, and the 20 heaviest stacks (leaf end).
py-spy is installed into the venv when missing (`pip install py-spy`). Every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/ is not a package: run.py is found beside this file
    OUT_DIR,
    PATH_1K,
    VENV_BIN,
    BenchError,
    measure,
    running_stack,
    start_backends,
    start_consul,
    start_ferryman,
)

PY_SPY: Final = VENV_BIN / "py-spy"

# Each sample is charged to the innermost frame that names a component. Frames that name none are passed
# over on the way out: C code (uvloop's loop.c, libuv, libc) and aiohttp modules both sides share (the
# writer, the parsers, StreamReader), so a send() under StreamWriter._write is charged to whoever wrote:
# aiohttp's client (ClientRequest.send) or its server (StreamResponse.prepare/write).
HEADERS: Final = "header handling (proxy/headers.py, aiohttp client copying them in)"
CLIENT: Final = "aiohttp client (request, connector, response)"
SERVER: Final = "aiohttp server (protocol, request, response writing)"
COMPONENTS: Final[Sequence[tuple[str, re.Pattern[str]]]] = [
    ("CPython cyclic GC", re.compile(r"^(gc_collect|collect_with_callback|_PyObject_GC_Link|gc_collect_main)")),
    ("structlog access log", re.compile(r"\(structlog/")),
    ("prometheus metrics", re.compile(r"\(prometheus_client/|\(proxy/metrics\.py")),
    (HEADERS, re.compile(r"\(proxy/headers\.py|^ClientRequest\.update_(auto_)?headers")),
    (CLIENT, re.compile(r"\(aiohttp/(client|connector|tracing|cookiejar|resolver)|\(yarl/")),
    (SERVER, re.compile(r"\(aiohttp/web")),
    ("our code (proxy/, discovery/)", re.compile(r"\((discovery/|proxy/(?!cli\.py))")),
]
# Every sample starts with the entry point and the event loop's run(): the frames up to the innermost loop
# runner are left out. A sample with nothing known past them is time in the loop itself: uvloop's C code,
# epoll, reads, C parsers fed from the loop.
LOOP_RUNNER: Final = re.compile(r"\((asyncio/runners|uvloop/__init__|asyncio/base_events)\.py")
LOOP: Final = "event loop (uvloop C code, epoll, socket reads, C parsers fed from the loop)"
SYSCALLS: Final = re.compile(r"^(write|writev|send|sendmsg|sendto|read|readv|recv|recvfrom|epoll_wait|"
                             r"epoll_ctl) \(libc")


@dataclass
class Profile:
    stacks: Counter[tuple[str, ...]]

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())


def parse_raw(text: str) -> Profile:
    """py-spy's raw format: `frame;frame;...;leaf count` per line, the root first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = tuple(f for f in stack.split(";") if f and not f.startswith(("process ", "thread ")))
        stacks[frames] += int(count)
    return Profile(stacks)


def component(frame: str) -> str | None:
    for name, pattern in COMPONENTS:
        if pattern.search(frame):
            return name
    return None


def function_of(frame: str) -> str:
    """`handle (aiohttp/web_protocol.py:512)` -> `handle (aiohttp/web_protocol.py)`: lines merged."""
    return re.sub(r":\d+\)$", ")", frame)


def summarise(profile: Profile, top: int = 20) -> list[str]:
    total = profile.samples
    if not total:
        return ["no samples: was Ferryman busy while py-spy ran?"]

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    exclusive: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    leaf_stacks: Counter[tuple[str, ...]] = Counter()
    syscalls: Counter[str] = Counter()
    for frames, n in profile.stacks.items():
        runners = [i for i, f in enumerate(frames) if LOOP_RUNNER.search(f)]
        work = frames[runners[-1] + 1 :] if runners else frames
        owner = next((c for c in map(component, reversed(work)) if c), LOOP)
        exclusive[owner] += n
        for c in {component(f) for f in work} - {None}:
            inclusive[str(c)] += n
        if frames:
            self_fn[function_of(frames[-1])] += n
            if SYSCALLS.search(frames[-1]):
                py = [f for f in work if ".py" in f]
                where = " <- ".join(function_of(f) for f in reversed(py[-2:])) or "the loop"
                syscalls[f"{frames[-1].split()[0]}() under {where}"] += n
        for fn in {function_of(f) for f in work}:
            total_fn[fn] += n
        leaf_stacks[tuple(function_of(f) for f in frames[-5:])] += n

    out = [f"{total} samples", "", "## By component", "",
           "self: each sample charged to the innermost frame of a known component (C frames and shared aiohttp "
           "modules charged to their caller); total: samples with any frame of it.", "",
           "| component | self | total |", "|---|---|---|"]
    for name, n in exclusive.most_common():
        out.append(f"| {name} | {pct(n)} | {pct(inclusive[name]) if name in inclusive else '-'} |")
    if syscalls:
        out += ["", "## System calls at the leaf (native frames)", ""]
        out += [f"{pct(n)}  {what}" for what, n in syscalls.most_common(10)]
    out += ["", f"## Top {top} functions by self time", ""]
    out += [f"{pct(n)}  {fn}" for fn, n in self_fn.most_common(top)]
    out += ["", f"## Top {top} functions by total time (entry frames left out)", ""]
    out += [f"{pct(n)}  {fn}" for fn, n in total_fn.most_common(top)]
    out += ["", f"## Top {top} stacks (innermost 5 frames, leaf first)", ""]
    for frames, n in leaf_stacks.most_common(top):
        out.append(f"{pct(n)}  " + " <- ".join(reversed(frames)))
    return out


def ensure_py_spy() -> None:
    if PY_SPY.exists():
        return
    print("profile: installing py-spy into the venv (pip install py-spy)")
    subprocess.run([str(VENV_BIN / "python"), "-m", "pip", "install", "--quiet", "py-spy"], check=True,
                   timeout=300)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds py-spy samples (default 10)")
    ap.add_argument("--rate", type=int, default=200, help="samples per second (default 200)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--path", default=PATH_1K, help="/1k or /64k (default /1k)")
    ap.add_argument("--native", action="store_true", help="include C frames (uvloop, parsers, multidict)")
    ap.add_argument("--nonblocking", action="store_true",
                    help="do not pause Ferryman per sample (less overhead, less exact)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--consul-bin", default=str(VENV_BIN / "consul"))
    ap.add_argument("--output", type=Path, default=OUT_DIR / "ferryman-profile.txt",
                    help="collapsed stacks (py-spy raw format), default bench/out/ferryman-profile.txt")
    args = ap.parse_args(argv)
    if not 1 <= args.duration <= 60:
        ap.error("--duration must be between 1 and 60 seconds")

    ensure_py_spy()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    try:
        with running_stack() as stack:
            _, backends = start_backends(stack)
            _, consul_port = start_consul(stack, args.consul_bin, backends)
            ferry, port, _, _ = start_ferryman(stack, consul_port, 1, notes)
            print(f"profile: Ferryman pid {ferry.pid} on :{port}; warm-up 2 s")
            measure("ferryman", ferry, port, args.path, args.connections, 2)
            spy_argv = [str(PY_SPY), "record", "--pid", str(ferry.pid), "--duration", str(args.duration),
                        "--rate", str(args.rate), "--format", "raw", "--output", str(args.output)]
            if args.native:
                spy_argv.append("--native")
            if args.nonblocking:
                spy_argv.append("--nonblocking")
            spy = stack.spawn("py-spy", spy_argv)
            time.sleep(0.5)
            # wrk outlasts the sampling window by a second on each side.
            run = measure("ferryman", ferry, port, args.path, args.connections, args.duration + 2)
            try:
                spy.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stack.stop(spy)
            if spy.popen.returncode != 0:
                raise BenchError(f"py-spy failed (exit {spy.popen.returncode}):\n{spy.tail()}")
    except BenchError as exc:
        print(f"profile: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("profile: interrupted; every process started was stopped", file=sys.stderr)
        return 130

    w = run.wrk
    print(f"\nload while sampling: {w.rps:,.0f} req/s, p50 {w.p50_ms:.2f} ms, p99 {w.p99_ms:.2f} ms, "
          f"{run.per_cpu_s:,.0f} req per CPU-s (sampling slows Ferryman down), errors {w.errors}")
    profile = parse_raw(args.output.read_text())
    print(f"collapsed stacks: {args.output}\n")
    print("\n".join(summarise(profile, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
