"""gRPC benchmark (issue 17): grpcio unary calls a second through Ferryman (h2c from the client, a `proto=grpc`
route, HTTP/2 to the instance) beside the same calls straight to the instance, in one run, and Ferryman's CPU per
call (user + system time of its processes over the run, read from /proc).

The instance is a grpcio server in a process of its own (a generic handler echoing bytes, no protobuf); the
client is grpc.aio in this process with `--concurrency` calls in flight on one channel; Ferryman runs one worker
on its static provider (no Consul). Everything on 127.0.0.1, every process started here and stopped by its PID.
Run: `.venv/bin/python bench/grpc_calls.py [--calls N] [--concurrency C] [--size BYTES]`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

# The process-tree CPU reading and port helpers bench/http2.py measures with (one copy for both benches).
from http2 import cpu_seconds, free_port, stop_all, wait_port


def serve(port: int) -> None:
    """The instance: bench.Echo/Call returns what it gets."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def calls(port: int, total: int, concurrency: int, payload: bytes) -> float:
    """`total` unary calls with `concurrency` in flight; the wall-clock seconds they took."""
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/bench.Echo/Call", request_serializer=None, response_deserializer=None)
        for _ in range(50):  # warm-up: connections open, caches filled
            await call(payload, timeout=10)
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                answer = await call(payload, timeout=10)
                assert answer == payload

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def measure(name: str, port: int, pid: int | None, opts: argparse.Namespace) -> tuple[str, float, float]:
    cpu_before = cpu_seconds(pid) if pid else 0.0
    wall = asyncio.run(calls(port, opts.calls, opts.concurrency, b"x" * opts.size))
    cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
    return name, opts.calls / wall, (opts.calls / cpu if cpu else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight on the one channel")
    parser.add_argument("--size", type=int, default=100, help="bytes of each request (echoed back)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is shown")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        serve(opts.serve)
        return
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ferryman-grpc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            up, fm = free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "--serve", str(up)]))
            routes = tmp / "routes.toml"
            routes.write_text(f'[[services]]\nname = "echo"\nroutes = ["/bench.Echo proto=grpc"]\n'
                              f'instances = ["127.0.0.1:{up}"]\n')
            ferryman = subprocess.Popen(
                [str(Path(sys.executable).parent / "ferryman"), "--static-file", str(routes), "--listen",
                 f"127.0.0.1:{fm}", "--admin-listen", f"127.0.0.1:{free_port()}", "--workers", "1",
                 "--access-log", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ferryman)
            for port in (up, fm):
                wait_port(port)
            time.sleep(1)
            best: dict[str, tuple[str, float, float]] = {}
            for _ in range(opts.rounds):
                for row in (measure("direct", up, None, opts), measure("through ferryman", fm, ferryman.pid, opts)):
                    if row[0] not in best or row[1] > best[row[0]][1]:
                        best[row[0]] = row
        finally:
            stop_all(procs)
    direct, through = best["direct"], best["through ferryman"]
    print(f"{opts.calls} unary calls of {opts.size} bytes, {opts.concurrency} in flight, one channel, "
          f"best of {opts.rounds} rounds")
    print(f"{'path':<20}{'calls/s':>10}{'calls/CPU-s of ferryman':>26}")
    print(f"{direct[0]:<20}{direct[1]:>10.0f}{'-':>26}")
    print(f"{through[0]:<20}{through[1]:>10.0f}{through[2]:>26.0f}")
    print(f"through / direct (calls a second): {through[1] / direct[1]:.2f}")


if __name__ == "__main__":
    main()
