"""HTTP/2 benchmark (issue 17): h2load through Ferryman (h2c with prior knowledge) beside nginx with `http2` on, and
beside Ferryman's own HTTP/1.1 (`h2load --h1`), in requests per CPU-second of the proxy's processes (read from
/proc: user + system time of the process and its children over the run).

Every proxy forwards to the same upstream, an nginx answering a short static body, over HTTP/1.1 with keep-alive;
Ferryman runs one worker on its static provider (no Consul), nginx one worker process. Everything on 127.0.0.1,
every process started here and stopped by its PID. Run: `.venv/bin/python bench/http2.py [--requests N]`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams per HTTP/2 connection")
    opts = parser.parse_args()
    nginx = tool("nginx")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ferryman-h2-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            up, ng, fm = free_port(), free_port(), free_port()
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
            ferryman = subprocess.Popen(
                [str(Path(sys.executable).parent / "ferryman"), "--static-file", str(routes), "--listen",
                 f"127.0.0.1:{fm}", "--admin-listen", f"127.0.0.1:{free_port()}", "--workers", "1",
                 "--access-log", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ferryman)
            for port in (up, ng, fm):
                wait_port(port)
            time.sleep(1)
            common = ["-n", str(opts.requests), "-c", str(opts.clients)]
            rows = [
                measure("ferryman http/2 (h2c)", ferryman.pid, [*common, "-m", str(opts.streams),
                                                                 f"http://127.0.0.1:{fm}/"]),
                measure("nginx http/2 (h2c)", nginx_proxy.pid, [*common, "-m", str(opts.streams),
                                                              f"http://127.0.0.1:{ng}/"]),
                measure("ferryman http/1.1", ferryman.pid, [*common, "--h1", f"http://127.0.0.1:{fm}/"]),
            ]
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"{'proxy':<24}{'req/CPU-s':>12}{'req/s':>10}{'CPU s':>8}")
    for name, per_cpu, per_s, cpu in rows:
        print(f"{name:<24}{per_cpu:>12.0f}{per_s:>10.0f}{cpu:>8.2f}")
    print(f"ferryman h2 / ferryman h1 (per CPU-second): {rows[0][1] / rows[2][1]:.2f}")
    print(f"ferryman h2 / nginx h2 (per CPU-second):    {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
