"""HTTP/2 benchmark (issue 17): h2load through Ferryman (h2c with prior knowledge) beside nginx with `http2` on, and
beside Ferryman's own HTTP/1.1 (`h2load --h1`), in requests per CPU-second of the proxy's processes (read from
/proc: user + system time of the process and its children over the run).

Every proxy forwards to the same upstream, an nginx answering a short static body, over HTTP/1.1 with keep-alive;
Ferryman runs one worker on its static provider (no Consul), nginx one worker process. Everything on 127.0.0.1,
every process started here and stopped by its PID. Run: `.venv/bin/python bench/http2.py [--requests N]`.

Each figure is the median of --rounds runs, the three interleaved (a shared machine's load falls on all of them).
With `--ab OTHER_TREE`, a second Ferryman runs from another checkout (this venv's python, PYTHONPATH=<checkout>)
and is measured in the same rounds: "before and after" in one session.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    unpacked = Path(sys.executable).parent / name
    found = str(unpacked) if unpacked.exists() else shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if not found:
        sys.exit(f"{name} not found (make test-debs / bench-debs, or Debian's nginx and nghttp2-client)")
    return found


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and every descendant alive now (Ferryman's workers, nginx's)."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                pids += [int(c) for c in children]
        except (OSError, ValueError):
            continue
    return total


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the processes this script started, by their PIDs, the last started first (SIGTERM, then SIGKILL
    after 10 s)."""
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def nginx_conf(tmp: Path, name: str, body: str) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off; keepalive_requests 10000000;
    client_body_temp_path {tmp}/{name}-body; proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fcgi; uwsgi_temp_path {tmp}/{name}-uwsgi; scgi_temp_path {tmp}/{name}-scgi;
    {body}
}}
""")
    return conf


def h2load(args: list[str]) -> float:
    out = subprocess.run([tool("h2load"), *args], capture_output=True, text=True, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if done is None or done.group(1) != done.group(2):
        raise RuntimeError(f"h2load reported failures:\n{out}")
    return float(done.group(2))


def measure(name: str, pid: int, args: list[str]) -> tuple[str, float, float, float]:
    h2load([*args[:-1], "-n", "2000", args[-1]])  # warm-up
    before, started = cpu_seconds(pid), time.monotonic()
    done = h2load(args)
    cpu, wall = cpu_seconds(pid) - before, time.monotonic() - started
    return name, done / cpu, done / wall, cpu


def start_ferryman(tree: str | None, routes: Path, port: int) -> subprocess.Popen[bytes]:
    """Ferryman from this tree, or from another checkout (its code first on PYTHONPATH, run from inside it)."""
    args = ["--static-file", str(routes), "--listen", f"127.0.0.1:{port}", "--admin-listen",
            f"127.0.0.1:{free_port()}", "--workers", "1", "--access-log", "false"]
    if tree is None:
        return subprocess.Popen([str(Path(sys.executable).parent / "ferryman"), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRYMAN_", "PYTHON"))}
    env.update(PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())", *args],
                            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams per HTTP/2 connection")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs; each figure is their median")
    parser.add_argument("--ab", metavar="OTHER_TREE", help="also measure Ferryman from another checkout")
    opts = parser.parse_args()
    nginx = tool("nginx")
    procs: list[subprocess.Popen[bytes]] = []
    runs: dict[str, list[tuple[str, float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ferryman-h2-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            up, ng, fm, fb = free_port(), free_port(), free_port(), free_port()
            upstream = nginx_conf(tmp, "upstream", f"""server {{ listen 127.0.0.1:{up};
                location / {{ return 200 "hello from the upstream\\n"; }} }}""")
            proxy = nginx_conf(tmp, "proxy", f"""upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
                server {{ listen 127.0.0.1:{ng} http2; location / {{ proxy_pass http://up;
                proxy_http_version 1.1; proxy_set_header Connection ""; }} }}""")
            procs.append(subprocess.Popen([nginx, "-c", str(upstream), "-p", tmpdir], stderr=subprocess.DEVNULL))
            nginx_proxy = subprocess.Popen([nginx, "-c", str(proxy), "-p", tmpdir], stderr=subprocess.DEVNULL)
            procs.append(nginx_proxy)
            routes = tmp / "routes.toml"
            routes.write_text(f'[[services]]\nname = "web"\nroutes = ["/"]\ninstances = ["127.0.0.1:{up}"]\n')
            ferryman = start_ferryman(None, routes, fm)
            procs.append(ferryman)
            other = start_ferryman(opts.ab, routes, fb) if opts.ab else None
            if other is not None:
                procs.append(other)
            for port in (up, ng, fm, *((fb,) if other else ())):
                wait_port(port)
            time.sleep(1)
            common = ["-n", str(opts.requests), "-c", str(opts.clients)]
            h2 = [*common, "-m", str(opts.streams)]
            plan = [("ferryman http/2 (h2c)", ferryman.pid, [*h2, f"http://127.0.0.1:{fm}/"]),
                    ("nginx http/2 (h2c)", nginx_proxy.pid, [*h2, f"http://127.0.0.1:{ng}/"]),
                    ("ferryman http/1.1", ferryman.pid, [*common, "--h1", f"http://127.0.0.1:{fm}/"])]
            if other is not None:
                plan += [("B: ferryman http/2 (h2c)", other.pid, [*h2, f"http://127.0.0.1:{fb}/"]),
                         ("B: ferryman http/1.1", other.pid, [*common, "--h1", f"http://127.0.0.1:{fb}/"])]
            for _ in range(opts.rounds):
                for name, pid, args in plan:
                    runs.setdefault(name, []).append(measure(name, pid, args))
        finally:
            stop_all(procs)
    rows = {name: tuple(statistics.median(r[i] for r in rs) for i in (1, 2, 3)) for name, rs in runs.items()}
    print(f"{'proxy':<26}{'req/CPU-s':>12}{'req/s':>10}{'CPU s':>8}   (median of {opts.rounds})")
    for name, (per_cpu, per_s, cpu) in rows.items():
        print(f"{name:<26}{per_cpu:>12.0f}{per_s:>10.0f}{cpu:>8.2f}   all: "
              + " ".join(f"{r[1]:.0f}" for r in runs[name]))
    fm2, fm1, ng2 = (rows[n][0] for n in ("ferryman http/2 (h2c)", "ferryman http/1.1", "nginx http/2 (h2c)"))
    print(f"ferryman h2 / ferryman h1 (per CPU-second): {fm2 / fm1:.2f}")
    print(f"ferryman h2 / nginx h2 (per CPU-second):    {fm2 / ng2:.2f}")
    if opts.ab:
        b2, b1 = rows["B: ferryman http/2 (h2c)"][0], rows["B: ferryman http/1.1"][0]
        print(f"B ({opts.ab}): h2 / h1 {b2 / b1:.2f}; A / B: http/2 {fm2 / b2:.2f}, http/1.1 {fm1 / b1:.2f}")


if __name__ == "__main__":
    main()
