#!/usr/bin/env python3
"""Ferryman beside nginx, HAProxy and Caddy on this machine: one command, loopback only, bounded in time.

    .venv/bin/python bench/run.py [--quick] [--ferryman-workers N]      (or: make bench)

How it works. Everything runs on 127.0.0.1 ports picked free at start, from one temporary directory:
  * backends: one nginx instance (1 worker) with two server blocks, each serving /1k (1 KiB) and /64k
    (64 KiB) as static files, so the backend is never the bottleneck;
  * a Consul dev agent, with both backends registered as one service tagged `urlprefix-/ lb=round_robin`;
  * the proxies under test, all with access logging on and the same forwarding headers:
    Ferryman (routes from Consul, round robin over its pool), nginx (1 worker, upstream keepalive 64),
    HAProxy (1 thread, http-reuse always) and Caddy (Go, GOMAXPROCS left at its default, round robin,
    upstream keep-alive; its own Caddyfile, admin API off, HOME and XDG_* dirs in the temp dir);
  * a second Ferryman with --workers 2 on its own ports, for issue 3's "with 2 workers, more req/s than
    Caddy": it takes part in the 1 KiB / 64-connection rounds only, and is reported in its own table.
wrk (1 thread) drives one proxy at a time (so never two Ferryman instances are under load together):
interleaved rounds with the order rotated (so drift in the machine hits every proxy alike), then one round
at 8 connections for p99, then one round of 64 KiB bodies. The CPU time each proxy spent (utime+stime of
its process, all its threads, and its children, from /proc) is read before and after each wrk run, so
"requests per proxy CPU-second" says what a proxy costs whatever the other processes took.

Every process started here is stopped by its PID (SIGTERM, then SIGKILL after a grace period), on success,
on error and on Ctrl-C. Every load run is bounded in duration and guarded by a timeout, and the whole
benchmark has a deadline; runs that would overshoot it are skipped and reported.
The table is printed and written to bench/out/results.md.

A/B mode: this tree's Ferryman against another checkout's, for "no slower than before" (issue 13).

    .venv/bin/python bench/run.py --ab OTHER_TREE [--ab-label NAME] [--rounds N] [--duration S]
                                  [--ferryman-workers N] [--max-others CPUS] [--no-pin]
    make bench BENCH_ARGS="--ab /work/base"          (e.g. a git worktree of the commit before a change)

  * Two Ferryman instances, A (this tree) and B (OTHER_TREE), against one Consul agent and one nginx backend
    pair (set up as above); nginx, HAProxy and Caddy are not run as proxies. OTHER_TREE needs no venv: both
    run with this tree's .venv python through a small launcher (LAUNCHER), with PYTHONPATH=<checkout>, cwd
    <checkout>, no FERRYMAN_* or other PYTHON* variables and no bytecode written. The entry point and the
    package names are read from each checkout's pyproject.toml. The venv's editable install of this tree
    cannot win (PYTHONPATH comes first and the editable finder is the last meta path finder), and this is
    checked, not assumed: the launcher writes on stderr the file each package was imported from, once for
    `ferryman --help` before anything starts and again by the process that is measured; a file outside its
    checkout stops the bench with an error before any load is sent.
  * Load: 1 KiB bodies, 64 connections, wrk (1 thread), one instance at a time, a warm-up run each, then
    rounds of one run of A and one of B in ABBA order (A,B then B,A ...), so a drift hits both alike.
  * Pinning (1 worker, 2 CPUs or more; --no-pin to turn it off): A and B run on the last usable CPU, and this
    script, wrk, the backends and Consul on the others, so the ~1.5 CPUs' worth of busy processes are not
    placed differently from one run to the next.
  * Screening: for each run the machine's busy time (/proc/stat) less that of the instance, wrk and the
    backends says how many CPUs other processes (other users of a shared machine) took meanwhile. A round
    counts only when that is at most --max-others (0.1 CPUs) in both its runs; else one more round is run,
    up to 3 x --rounds or the deadline. Even a little outside load moves req per CPU-s by several percent
    (a starved or load-limited instance batches differently), and CPU seconds alone do not normalise that.
  * Figures: per round and in total, req/s and req per proxy CPU-second of A and B and A/B; the summary is
    the median of the per-round A/B ratios of the counted rounds with their min and max (the pooled ratio
    and the ratio over every round, busy ones included, are given too), and issue 13's check: A's req per
    CPU-s at least 97% of B's. Fewer than 3 counted rounds give no verdict (exit status 3). Printed and written to
    bench/out/ab.md. The deadline is set from the plan (at most 20 minutes); the same process bounds apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
OUT_DIR: Final = ROOT / "bench" / "out"
VENV_BIN: Final = ROOT / ".venv" / "bin"

DEADLINE_S: Final = 285.0  # the whole run, set-up and tear-down included, stays under 5 minutes
SERVICE: Final = "bench-backend"
PATH_1K: Final = "/1k"
PATH_64K: Final = "/64k"
PROXIES: Final = ("nginx", "haproxy", "caddy", "ferryman")  # the main tables, in this order
FERRY2: Final = "ferryman-2w"  # Ferryman with --workers 2: 1 KiB / c64 rounds only, its own table
FERRY2_WORKERS: Final = 2
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

# urllib must never go through a proxy from the environment: everything here is loopback.
_HTTP: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """Set-up failed; the message says which part and where its log is."""


# --------------------------------------------------------------------------------------------------------
# processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    errlog: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The end of what the process wrote on stderr (and stdout when that is not a separate log)."""
        try:
            text = self.errlog.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    """Owns the temporary directory and every process started in it; stops them by PID, newest first."""

    def __init__(self, keep_tmp: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ferryman-bench-"))
        self.tmp.chmod(0o755)  # nginx workers may run as another user and must read the files in here
        self.keep_tmp = keep_tmp
        self.procs: list[Proc] = []

    def spawn(self, name: str, argv: Sequence[str], *, stdout: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              cpus: frozenset[int] | None = None) -> Proc:
        log = stdout or self.tmp / f"{name}.log"
        # With a separate stdout (an access log), stderr goes to <name>.stderr; else both to <name>.log.
        errlog = self.tmp / f"{name}.stderr" if stdout is not None else log
        with open(log, "ab") as out, open(errlog, "ab") as err:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd or self.tmp,
                preexec_fn=pinned(cpus),
            )
        proc = Proc(name, popen, log, errlog)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.alive():
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # tear-down goes on for the others
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def pinned(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that restricts the child (and whatever it starts) to `cpus`; None leaves it as it is.
    The bench has no threads of its own, so preexec_fn is safe here."""
    if cpus is None:
        return None
    return functools.partial(os.sched_setaffinity, 0, cpus)


@contextmanager
def running_stack(keep_tmp: bool = False) -> Iterator[Stack]:
    """A Stack that is torn down however the block ends, SIGTERM included (turned into KeyboardInterrupt)."""
    stack = Stack(keep_tmp)

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stack
    finally:
        signal.signal(signal.SIGTERM, previous)
        stack.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def wait_until(what: str, check: Callable[[], bool], timeout: float, procs: Sequence[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited (code {proc.popen.returncode}) while waiting for "
                                 f"{what}; {proc.errlog}:\n{proc.tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name} ({p.errlog}):\n{p.tail()}" for p in procs)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with _HTTP.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def answers(port: int, path: str = "/1k") -> bool:
    return http("GET", f"http://127.0.0.1:{port}{path}")[0] == 200


# --------------------------------------------------------------------------------------------------------
# /proc: CPU time and memory of a process tree


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants (nginx master -> workers, ferryman -> worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime+stime (fields 14 and 15) of each process that still exists, in clock ticks."""
    out = {}
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        out[pid] = int(f[11]) + int(f[12])
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(root: int) -> dict[int, int]:
    return {pid: rss_kib(pid) for pid in process_tree(root)}


# --------------------------------------------------------------------------------------------------------
# the pieces


def nginx_user_line() -> str:
    """nginx run as root switches its workers to `nobody` (whose group Debian calls nogroup); keep the
    invoking user instead so the temp files stay readable and writable. Ignored by nginx when not root."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


def nginx_common(prefix: Path) -> str:
    return f"""
daemon off;
master_process on;
worker_processes 1;
{nginx_user_line()}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
"""


def tool(name: str) -> str:
    """The path of a benchmark tool: .venv/bin (where `make bench` unpacks Debian's packages without installing
    them), else PATH, else the bare name (the caller reports it missing)."""
    local = VENV_BIN / name
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name) or name


def nginx_temp_paths(prefix: Path) -> str:
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n".join(f"  {kind}_temp_path {prefix}/{kind}_temp;" for kind in kinds)


def start_nginx(stack: Stack, name: str, config: str) -> Proc:
    prefix = stack.tmp / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    nginx = tool("nginx")
    argv = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    test = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise BenchError(f"{name}: nginx rejected {conf}:\n{test.stderr}")
    return stack.spawn(name, argv)


def start_backends(stack: Stack) -> tuple[Proc, list[int]]:
    www = stack.tmp / "www"
    www.mkdir()
    (www / PATH_1K.lstrip("/")).write_bytes(b"x" * 1023 + b"\n")
    (www / PATH_64K.lstrip("/")).write_bytes(b"y" * (64 * 1024 - 1) + b"\n")
    ports = free_ports(2)
    prefix = stack.tmp / "backends"
    servers = "\n".join(f"  server {{ listen 127.0.0.1:{p} backlog=4096; root {www}; }}" for p in ports)
    config = nginx_common(prefix) + f"""
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 120s;
  keepalive_requests 10000000;
  open_file_cache max=16 inactive=600s;
  open_file_cache_valid 600s;
{nginx_temp_paths(prefix)}
{servers}
}}
"""
    proc = start_nginx(stack, "backends", config)
    for port in ports:
        wait_until(f"backend on port {port}", functools.partial(answers, port), 15, [proc])
    return proc, ports


def start_consul(stack: Stack, consul_bin: str, backends: Sequence[int]) -> tuple[Proc, int]:
    http_port, lan, wan, server = free_ports(4)
    proc = stack.spawn("consul", [
        consul_bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-node", "bench",
        "-http-port", str(http_port), "-dns-port", "-1", "-grpc-port", "-1", "-serf-lan-port", str(lan),
        "-serf-wan-port", str(wan), "-server-port", str(server), "-log-level", "warn",
    ])
    base = f"http://127.0.0.1:{http_port}"
    def has_leader() -> bool:
        return http("GET", f"{base}/v1/status/leader")[1].strip() not in (b"", b'""')

    wait_until("the Consul leader", has_leader, 30, [proc])
    for i, port in enumerate(backends, 1):
        doc = {"ID": f"{SERVICE}-{i}", "Name": SERVICE, "Address": "127.0.0.1", "Port": port,
               "Tags": ["urlprefix-/ lb=round_robin"]}
        status, body = http("PUT", f"{base}/v1/agent/service/register", json.dumps(doc).encode())
        if status != 200:
            raise BenchError(f"Consul refused the registration of {doc['ID']}: {status} {body!r}")
    return proc, http_port


def ferryman_has_workers_flag() -> bool:
    """Whether this Ferryman knows --workers (its default may then be one process per CPU)."""
    try:
        out = subprocess.run([str(VENV_BIN / "ferryman"), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout


def ferryman_version() -> str:
    """What `ferryman --version` says: the version and which build runs (compiled or pure Python, issue 18)."""
    try:
        out = subprocess.run([str(VENV_BIN / "ferryman"), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or out.stderr.strip() or "unknown"


def ferryman_argv(listen: int, admin: int, consul: int, workers: int, workers_flag: bool) -> list[str]:
    argv = [str(VENV_BIN / "ferryman"), "--listen", f"127.0.0.1:{listen}",
            "--admin-listen", f"127.0.0.1:{admin}", "--consul-addr", f"127.0.0.1:{consul}",
            # The issue measures with everything on: the access log is on, JSON, to a file.
            "--access-log", "true", "--log-format", "json", "--log-level", "info",
            "--shutdown-timeout", "2"]
    # Always say how many processes when Ferryman knows the flag (its default may be one per CPU); without
    # the flag, only ask for more than one (and fall back to one if it is refused).
    if workers_flag or workers > 1:
        argv += ["--workers", str(workers)]
    return argv


def routes_ready(admin: int) -> bool:
    status, body = http("GET", f"http://127.0.0.1:{admin}/api/routes", timeout=2)
    if status != 200:
        return False
    for route in json.loads(body).get("routes", []):
        instances = route.get("instances", ())
        if route.get("service") == SERVICE and route.get("path") == "/" and len(instances) == 2:
            return True
    return False


# A Ferryman from a given checkout (A/B mode) is started as `python -c LAUNCHER MODULE FUNCTION PACKAGES
# ARGS...` with this tree's venv python, PYTHONPATH=<checkout> and cwd <checkout>. PYTHONPATH comes before
# site-packages in sys.path and the venv's editable finder is appended to sys.meta_path (after the path
# finder), so the checkout's packages win; the launcher does not trust that: it first writes on stderr the
# file each package was imported from, which the bench checks (Tree.check_code) before measuring anything.
CODE_MARK: Final = "ferryman-bench-code "
LAUNCHER: Final = """\
import importlib, json, sys
module, function, packages = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.argv = ["ferryman", *sys.argv[4:]]
files = {name: importlib.import_module(name).__file__ for name in packages}
entry = importlib.import_module(module)
files[module] = entry.__file__
sys.stderr.write("ferryman-bench-code " + json.dumps(files) + "\\n")
sys.stderr.flush()
sys.exit(getattr(entry, function)())
"""
assert CODE_MARK in LAUNCHER


def git_commit(path: Path, paths: Sequence[str] = ()) -> str:
    """The checkout's short commit, with `+changes` when tracked files under `paths` (all when none) differ
    from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    sha = git("rev-parse", "--short", "HEAD") or "?"
    return sha + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "--", *paths) else "")


def code_files(text: str) -> dict[str, str] | None:
    """The launcher's report of where each package came from, from a process's stderr (the first one)."""
    for line in text.splitlines():
        if line.startswith(CODE_MARK):
            files: dict[str, str] = json.loads(line[len(CODE_MARK):])
            return files
    return None


@dataclass(frozen=True)
class Tree:
    """A Ferryman checkout run with this tree's venv (A/B mode): where it is, its commit, its `ferryman`
    entry point and packages (from its own pyproject.toml), and whether its CLI knows --workers."""

    role: str  # "A" or "B"
    label: str
    path: Path
    commit: str
    module: str
    function: str
    packages: tuple[str, ...]
    workers_flag: bool
    files: tuple[tuple[str, str], ...]  # package -> file it was imported from, by the probe

    @classmethod
    def load(cls, role: str, label: str, path: Path) -> Tree:
        """Read the checkout's pyproject.toml and probe it: `ferryman --help` through the launcher, whose
        code report must name files inside the checkout (else BenchError: the other tree's code would run)."""
        path = path.resolve()
        pyproject = path / "pyproject.toml"
        if not pyproject.is_file():
            raise BenchError(f"{role}: {path} is not a Ferryman checkout (no pyproject.toml)")
        meta = tomllib.loads(pyproject.read_text())
        script = meta.get("project", {}).get("scripts", {}).get("ferryman", "proxy.cli:main")
        module, _, function = script.partition(":")
        packages = tuple(meta.get("tool", {}).get("setuptools", {}).get("packages", ["discovery", "proxy"]))
        # Only changes to the code that runs mark the commit (this tree's bench/ may be edited meanwhile).
        commit = git_commit(path, [*packages, "pyproject.toml"])
        tree = cls(role, label, path, commit, module, function or "main", packages, False, ())
        try:
            probe = subprocess.run(tree.argv(["--help"]), capture_output=True, text=True, timeout=60,
                                   env=tree.env(), cwd=path)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"{role}: `ferryman --help` from {path} did not run: {exc}") from exc
        files = code_files(probe.stderr)
        if probe.returncode != 0 or files is None:
            raise BenchError(f"{role}: `ferryman --help` from {path} failed (exit {probe.returncode}):\n"
                             f"{probe.stderr[-2000:]}")
        tree.check_code(files)
        return dataclasses.replace(tree, workers_flag="--workers" in probe.stdout,
                                   files=tuple(sorted(files.items())))

    def env(self) -> dict[str, str]:
        # No FERRYMAN_* settings and no PYTHON* variable from the caller's environment; nothing is written into
        # the checkout (no __pycache__ in another engineer's tree).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRYMAN_", "PYTHON"))}
        env.update(PYTHONPATH=str(self.path), PYTHONDONTWRITEBYTECODE="1")
        return env

    def argv(self, args: Sequence[str]) -> list[str]:
        return [str(VENV_BIN / "python"), "-c", LAUNCHER, self.module, self.function, ",".join(self.packages),
                *args]

    def check_code(self, files: dict[str, str]) -> None:
        """Every package must have been imported from inside this checkout; fail loudly otherwise."""
        wrong = {name: f for name, f in files.items() if not Path(f).resolve().is_relative_to(self.path)}
        if wrong or not files:
            raise BenchError(f"{self.role} ({self.label}) must run the code of {self.path}, but its process "
                             f"imported {wrong or 'nothing'}; refusing to measure the wrong code")


def start_ferryman(stack: Stack, consul: int, workers: int, notes: list[str], name: str = "ferryman",
                   fallback: bool = True, tree: Tree | None = None,
                   cpus: frozenset[int] | None = None) -> tuple[Proc, int, int, int]:
    """Ferryman with its access log on, sent to <name>-access.log. Returns (proc, listen port, admin port,
    workers). When --workers N > 1 is refused: with `fallback`, start 1 process instead (and say so in the
    notes); without, raise BenchError. With a `tree` (A/B mode), that checkout's code runs, through the
    launcher, and the started process's own report of its code is checked once it answers."""
    env = tree.env() if tree else {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    cwd = tree.path if tree else None
    listen, admin = free_ports(2)
    stdout = stack.tmp / f"{name}-access.log"
    workers_flag = tree.workers_flag if tree else ferryman_has_workers_flag()

    def argv(n: int) -> list[str]:
        plain = ferryman_argv(listen, admin, consul, n, workers_flag)
        return tree.argv(plain[1:]) if tree else plain

    if workers > 1 and not workers_flag:
        print(f"NOTE: `ferryman --help` lists no --workers; trying --workers {workers} all the same")
    proc = stack.spawn(name, argv(workers), stdout=stdout, env=env, cwd=cwd, cpus=cpus)
    if workers > 1:
        time.sleep(1.5)
        if not proc.alive():
            err = proc.errlog.read_text(errors="replace").strip()
            why = (f"Ferryman did not start with --workers {workers} (exit {proc.popen.returncode}: "
                   f"{err.splitlines()[-1] if err else 'no message'})")
            stack.stop(proc)
            if not fallback:
                raise BenchError(why)
            note = f"{why}; measured with 1 process instead."
            print(f"NOTE: {note}")
            notes.append(note)
            workers = 1
            listen, admin = free_ports(2)
            proc = stack.spawn(name, argv(1), stdout=stdout, env=env, cwd=cwd, cpus=cpus)
    wait_until("Ferryman's /api/routes to list the route with 2 instances", lambda: routes_ready(admin), 45,
               [proc])
    # Several answers in a row, each on a new connection: with SO_REUSEPORT they land on different workers.
    for _ in range(10 * workers):
        wait_until(f"{name} to answer through the route", lambda: answers(listen), 15, [proc])
    if tree:
        files = code_files(proc.errlog.read_text(errors="replace"))
        if files is None:
            raise BenchError(f"{name} did not report which code it runs; {proc.errlog}:\n{proc.tail()}")
        tree.check_code(files)
    return proc, listen, admin, workers


FORWARD_HEADERS_NGINX: Final = """
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header X-Real-IP $remote_addr;"""


def start_nginx_proxy(stack: Stack, backends: Sequence[int]) -> tuple[Proc, int]:
    port = free_port()
    prefix = stack.tmp / "nginx"
    upstreams = "\n".join(f"    server 127.0.0.1:{p};" for p in backends)
    config = nginx_common(prefix) + f"""
http {{
  access_log {prefix}/access.log;
  keepalive_timeout 120s;
  keepalive_requests 10000000;
{nginx_temp_paths(prefix)}
  upstream backends {{
{upstreams}
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";{FORWARD_HEADERS_NGINX}
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""
    proc = start_nginx(stack, "nginx", config)
    wait_until("nginx (proxy)", lambda: answers(port), 15, [proc])
    return proc, port


def start_haproxy(stack: Stack, backends: Sequence[int]) -> tuple[Proc, int]:
    port = free_port()
    prefix = stack.tmp / "haproxy"
    prefix.mkdir()
    servers = "\n".join(f"  server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    conf = prefix / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 1
  maxconn 4096
  log stdout format raw local0 info

defaults
  mode http
  log global
  option httplog
  option http-keep-alive
  option forwardfor
  http-reuse always
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 120s

frontend proxy
  bind 127.0.0.1:{port}
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header X-Forwarded-Port %[dst_port]
  http-request set-header X-Real-IP %[src]
  default_backend backends

backend backends
  balance roundrobin
{servers}
""")
    haproxy = tool("haproxy")
    test = subprocess.run([haproxy, "-c", "-q", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise BenchError(f"haproxy rejected {conf}:\n{test.stdout}{test.stderr}")
    # -db: stay in the foreground, one process, so the PID we hold is the one that works.
    proc = stack.spawn("haproxy", [haproxy, "-db", "-f", str(conf)], stdout=prefix / "access.log")
    wait_until("haproxy", lambda: answers(port), 15, [proc])
    return proc, port


def start_caddy(stack: Stack, backends: Sequence[int]) -> tuple[Proc, int]:
    """Caddy from its own Caddyfile: plain HTTP on a loopback port, admin API off, round robin over both
    backends with keep-alive, JSON access log to a file. Caddy itself sets X-Forwarded-For/-Proto/-Host
    and keeps Host; X-Forwarded-Port (the listen port, written in: Caddy 2.6 has no placeholder for the
    local port) and X-Real-IP are set here like the others do. HOME and the XDG dirs point into the temp
    dir, so nothing (autosave.json, instance id, storage) is written anywhere else."""
    port = free_port()
    prefix = stack.tmp / "caddy"
    prefix.mkdir()
    upstreams = " ".join(f"127.0.0.1:{p}" for p in backends)
    conf = prefix / "Caddyfile"
    conf.write_text(f"""{{
  admin off
  auto_https off
  grace_period 2s
  storage file_system {prefix}/storage
}}

:{port} {{
  bind 127.0.0.1
  log {{
    output file {prefix}/access.log {{
      roll_disabled
    }}
    format json
  }}
  reverse_proxy {upstreams} {{
    lb_policy round_robin
    header_up X-Forwarded-Port {port}
    header_up X-Real-IP {{http.request.remote.host}}
    transport http {{
      keepalive 120s
      keepalive_idle_conns 128
      keepalive_idle_conns_per_host 64
    }}
  }}
}}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CADDY", "XDG_"))}
    env.update(HOME=str(prefix / "home"), XDG_DATA_HOME=str(prefix / "data"),
               XDG_CONFIG_HOME=str(prefix / "config"), XDG_CACHE_HOME=str(prefix / "cache"))
    for sub in ("home", "data", "config", "cache"):
        (prefix / sub).mkdir()
    caddy = tool("caddy")
    proc = stack.spawn("caddy", [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"], env=env)
    wait_until("caddy", lambda: answers(port), 20, [proc])
    return proc, port


# --------------------------------------------------------------------------------------------------------
# load


_UNITS_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unknown latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    rps: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    failure: str = ""

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    r = WrkResult()
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r.rps = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m:
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2) + m.group(3)) / 1000
    m = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    if m:
        r.p50_ms = _ms(m.group(1))
    m = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if m:
        r.p99_ms = _ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        r.non2xx = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        kinds = ("connect", "read", "write", "timeout")
        r.socket_errors = {k: int(v) for k, v in zip(kinds, m.groups(), strict=True) if int(v)}
    if not r.requests:
        r.failure = "wrk reported no requests"
    return r


@dataclass
class Run:
    proxy: str
    wrk: WrkResult
    cpu_s: float
    rss_peak_kib: int = 0
    round_no: int = 0
    wall_s: float = 0.0
    busy_cpu_s: float = 0.0  # the whole machine's busy CPU time during the run (/proc/stat)
    bench_cpu_s: float = 0.0  # the part of it that was ours: the proxy, wrk and the backends

    @property
    def others_cores(self) -> float:
        """CPUs' worth of work done by processes not part of this run (other engineers, the idle instances)."""
        return max(0.0, self.busy_cpu_s - self.bench_cpu_s) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.wrk.requests / self.cpu_s if self.cpu_s > 0 else 0.0


def _stop_wrk(wrk: subprocess.Popen[bytes]) -> None:
    if wrk.poll() is None:
        os.kill(wrk.pid, signal.SIGKILL)
        wrk.wait(timeout=5)


def machine_busy_ticks(cpus: frozenset[int] | None = None) -> int:
    """Busy clock ticks since boot of the given CPUs (all when None): /proc/stat less idle and iowait."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if (name == "cpu") if cpus is None else (name[3:].isdigit() and int(name[3:]) in cpus):
                fields = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(fields) - fields[3] - fields[4]
    return total


def measure(proxy: str, proc: Proc, port: int, path: str, connections: int, duration: int,
            backends: Proc | None = None, headers: Sequence[str] = ()) -> Run:
    """One wrk run against one proxy, with the proxy tree's CPU time read before and after, and the busy time
    of the whole machine, wrk and the backends, to tell how much other processes took meanwhile (on any CPU:
    others beside wrk slow the load down, and an instance that is not saturated spends more per request)."""
    url = f"http://127.0.0.1:{port}{path}"
    pids = process_tree(proc.pid)
    backend_pids = process_tree(backends.pid) if backends else []
    before = cpu_ticks(pids)
    backends_before = cpu_ticks(backend_pids)
    rss_peak = sum(tree_rss_kib(proc.pid).values())
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = machine_busy_ticks()
    wall_start = time.monotonic()
    wrk = subprocess.Popen(
        [tool("wrk"), "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "2s", "--latency",
         *(arg for header in headers for arg in ("-H", header)), url],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    limit = time.monotonic() + duration + 20
    try:
        while wrk.poll() is None:
            if time.monotonic() > limit:
                raise subprocess.TimeoutExpired(wrk.args, duration + 20)
            time.sleep(0.25)
            rss_peak = max(rss_peak, sum(tree_rss_kib(proc.pid).values()))
        out = wrk.stdout.read().decode(errors="replace") if wrk.stdout else ""
        after = cpu_ticks(process_tree(proc.pid))
        backends_after = cpu_ticks(backend_pids)
        busy = machine_busy_ticks() - busy_before
        wall = time.monotonic() - wall_start
        # wrk was reaped by poll(); no other child of ours ends during a run, so the difference is wrk's.
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    except subprocess.TimeoutExpired:
        _stop_wrk(wrk)
        return Run(proxy, WrkResult(failure=f"wrk did not finish within {duration + 20}s"), 0.0, rss_peak)
    except BaseException:  # Ctrl-C or SIGTERM: wrk goes too
        _stop_wrk(wrk)
        raise
    finally:
        if wrk.stdout:
            wrk.stdout.close()
    # Processes that exited during the run are not counted; new ones count from 0.
    ticks = sum(after[p] - before.get(p, 0) for p in after)
    backend_ticks = sum(backends_after[p] - backends_before.get(p, 0) for p in backends_after)
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime
               - children_before.ru_utime - children_before.ru_stime)
    result = parse_wrk(out)
    if wrk.returncode != 0 and not result.failure:
        result.failure = f"wrk exited {wrk.returncode}"
    if result.failure:
        result.failure += ": " + " ".join(out.split())[-300:]
    if not proc.alive():
        result.failure = f"{proxy} died during the run (exit {proc.popen.returncode})"
    return Run(proxy, result, ticks / CLK_TCK, rss_peak, wall_s=wall, busy_cpu_s=busy / CLK_TCK,
               bench_cpu_s=(ticks + backend_ticks) / CLK_TCK + wrk_cpu)


# --------------------------------------------------------------------------------------------------------
# report


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    proxy: str
    runs: list[Run]

    def _ok(self) -> list[Run]:
        return [r for r in self.runs if not r.wrk.failure] or self.runs

    @property
    def rps(self) -> float:
        return _median([r.wrk.rps for r in self._ok()])

    @property
    def p50(self) -> float:
        return _median([r.wrk.p50_ms for r in self._ok()])

    @property
    def p99(self) -> float:
        return _median([r.wrk.p99_ms for r in self._ok()])

    @property
    def cpu(self) -> float:
        return _median([r.cpu_s for r in self._ok()])

    @property
    def per_cpu(self) -> float:
        return _median([r.per_cpu_s for r in self._ok()])

    @property
    def errors(self) -> str:
        parts = []
        failures = [r.wrk.failure for r in self.runs if r.wrk.failure]
        if failures:
            parts.append(f"{len(failures)}/{len(self.runs)} runs failed ({failures[0]})")
        non2xx = sum(r.wrk.non2xx for r in self.runs)
        if non2xx:
            parts.append(f"non-2xx {non2xx}")
        sock: dict[str, int] = {}
        for r in self.runs:
            for k, v in r.wrk.socket_errors.items():
                sock[k] = sock.get(k, 0) + v
        if sock:
            parts.append("socket " + ", ".join(f"{k} {v}" for k, v in sock.items()))
        return "**" + "; ".join(parts) + "**" if parts else "0"


def _num(v: float, fmt: str = ",.0f") -> str:
    return "n/a" if v != v else format(v, fmt)


def _pct(a: float, b: float) -> str:
    return "n/a" if not (a == a and b == b and b) else f"{100 * a / b:.1f}%"


def table(rows: Sequence[Row], p99_delta: bool = False) -> list[str]:
    base = next((r for r in rows if r.proxy == "nginx"), None)
    head = ["proxy", "req/s", "p50", "p99", "proxy CPU s", "req per CPU-s", "req/s vs nginx",
            "req per CPU-s vs nginx"]
    if p99_delta:
        head.append("p99 vs nginx")
    head.append("errors")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.proxy, _num(r.rps), f"{_num(r.p50, '.2f')} ms", f"{_num(r.p99, '.2f')} ms",
                 _num(r.cpu, ".2f"), _num(r.per_cpu), _pct(r.rps, base.rps) if base else "n/a",
                 _pct(r.per_cpu, base.per_cpu) if base else "n/a"]
        if p99_delta:
            delta = r.p99 - base.p99 if base else float("nan")
            cells.append("n/a" if delta != delta else f"{delta:+.2f} ms")
        cells.append(r.errors)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cmd_version(argv: Sequence[str], pattern: str) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else "?"


def machine(consul_bin: str) -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    mem = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    probe = ("import aiohttp, sys\ntry:\n import uvloop; u = uvloop.__version__\nexcept ImportError:\n"
             " u = 'not installed'\nprint(sys.version.split()[0], aiohttp.__version__, u)")
    py = subprocess.run([str(VENV_BIN / "python"), "-c", probe], capture_output=True, text=True,
                        timeout=30).stdout.split()
    py += ["?"] * (3 - len(py))
    nginx = _cmd_version([tool("nginx"), "-v"], r"nginx/(\S+)")
    haproxy = _cmd_version([tool("haproxy"), "-v"], r"version (\S+)")
    wrk = _cmd_version([tool("wrk"), "-v"], r"wrk (\S+)")
    caddy = _cmd_version([tool("caddy"), "version"], r"v?(\d\S*)")
    consul = _cmd_version([consul_bin, "version"], r"v(\S+)")
    return [
        f"- machine: {usable} CPUs usable (nproc), {os.cpu_count()} online, {model}, {mem} RAM",
        f"- kernel: {platform.system()} {platform.release()} ({platform.machine()})",
        f"- software: Python {py[0]}, aiohttp {py[1]}, uvloop {py[2]}; nginx {nginx}, HAProxy {haproxy}, "
        f"Caddy {caddy}, wrk {wrk}, Consul {consul}",
    ]


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def count_lines(path: Path) -> int:
    n = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
    except OSError:
        pass
    return n


# --------------------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s runs, 1 round (about 50 s in all)")
    ap.add_argument("--ferryman-workers", type=int, default=1, metavar="N",
                    help="Ferryman processes; passed as --workers N only when N > 1 (default 1)")
    ap.add_argument("--consul-bin", default=os.environ.get("CONSUL_BIN", str(VENV_BIN / "consul")))
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep the temp dir (configs, logs) for inspection")
    ab = ap.add_argument_group("A/B mode", "this tree (A) against another checkout (B), Ferryman only")
    ab.add_argument("--ab", metavar="OTHER_TREE", help="the other checkout, e.g. a git worktree of an older commit")
    ab.add_argument("--ab-label", metavar="NAME", help="what the report calls B (default: the checkout's name)")
    ab.add_argument("--rounds", type=int, default=AB_ROUNDS, metavar="N",
                    help=f"interleaved rounds, each one run of A and one of B (default {AB_ROUNDS})")
    ab.add_argument("--duration", type=int, default=AB_DURATION_S, metavar="S",
                    help=f"seconds per run (default {AB_DURATION_S})")
    ab.add_argument("--max-others", type=float, default=AB_MAX_OTHERS, metavar="CPUS",
                    help="a round counts only when other processes took at most this many CPUs during both "
                         f"its runs; else one more round is run (default {AB_MAX_OTHERS})")
    ab.add_argument("--no-pin", action="store_true",
                    help="do not pin the instances to a CPU of their own (pinned by default with 1 worker)")
    args = ap.parse_args(argv)
    if args.ab:
        return main_ab(args)

    started = time.monotonic()
    duration = 2 if args.quick else 8
    rounds = 1 if args.quick else 3
    warmup = 1 if args.quick else 2
    for name in ("wrk", "nginx", "haproxy", "caddy"):
        if not os.access(tool(name), os.X_OK):
            print(f"bench: no {name} in .venv/bin or on PATH (make bench unpacks Debian's wrk, nginx-light, "
                  "haproxy, caddy into .venv)", file=sys.stderr)
            return 2
    if not Path(args.consul_bin).exists():
        print(f"bench: no Consul binary at {args.consul_bin} (make consul)", file=sys.stderr)
        return 2

    notes: list[str] = []
    runs: dict[str, list[Run]] = {}  # scenario -> runs
    skipped: list[str] = []
    mem: dict[str, Any] = {}
    workers = args.ferryman_workers

    def left() -> float:
        return DEADLINE_S - (time.monotonic() - started)

    try:
        with running_stack(args.keep_tmp) as stack:
            print(f"bench: temp dir {stack.tmp}")
            backends_proc, backends = start_backends(stack)
            _, consul_port = start_consul(stack, args.consul_bin, backends)
            ferry, ferry_port, _, workers = start_ferryman(stack, consul_port, workers, notes)
            nginx, nginx_port = start_nginx_proxy(stack, backends)
            haproxy, haproxy_port = start_haproxy(stack, backends)
            caddy, caddy_port = start_caddy(stack, backends)
            targets = {"nginx": (nginx, nginx_port), "haproxy": (haproxy, haproxy_port),
                       "caddy": (caddy, caddy_port), "ferryman": (ferry, ferry_port)}
            print(f"bench: backends :{backends[0]} :{backends[1]} (nginx pid {backends_proc.pid}), "
                  f"Consul :{consul_port}, Ferryman :{ferry_port} (pid {ferry.pid}, {workers} worker(s)), "
                  f"nginx :{nginx_port} (pid {nginx.pid}), HAProxy :{haproxy_port} (pid {haproxy.pid}), "
                  f"Caddy :{caddy_port} (pid {caddy.pid})")
            time.sleep(1.0)
            mem["idle"] = tree_rss_kib(ferry.pid)
            # The second Ferryman, --workers 2, own ports and access log. It only ever gets load in its own
            # turn of the 1 KiB / c64 rounds, never at the same time as the first one.
            try:
                ferry2, ferry2_port, _, _ = start_ferryman(stack, consul_port, FERRY2_WORKERS, notes, name=FERRY2,
                                                           fallback=False)
            except BenchError as exc:
                note = f"Ferryman with --workers {FERRY2_WORKERS} not measured: {exc}"
                print(f"NOTE: {note}")
                notes.append(note)
            else:
                targets[FERRY2] = (ferry2, ferry2_port)
                print(f"bench: Ferryman --workers {FERRY2_WORKERS} :{ferry2_port} (pid {ferry2.pid})")
                time.sleep(1.0)
                mem["idle2"] = tree_rss_kib(ferry2.pid)
            in_rounds = [*PROXIES, FERRY2] if FERRY2 in targets else list(PROXIES)

            def go(scenario: str, name: str, path: str, conns: int, secs: int, round_no: int = 0) -> None:
                if left() < secs + 25:
                    skipped.append(f"{scenario} / {name}")
                    print(f"  {scenario:<8} {name:<11} skipped: the {DEADLINE_S:.0f} s deadline is near")
                    return
                proc, port = targets[name]
                run = measure(name, proc, port, path, conns, secs)
                run.round_no = round_no
                runs.setdefault(scenario, []).append(run)
                w = run.wrk
                status = f"  errors {w.errors}" if w.errors else ""
                if w.failure:
                    status = f"  FAILED: {w.failure}"
                print(f"  {scenario:<8} {name:<11} {w.rps:>10,.0f} req/s  p50 {w.p50_ms:6.2f} ms  "
                      f"p99 {w.p99_ms:6.2f} ms  cpu {run.cpu_s:5.2f} s  {run.per_cpu_s:>8,.0f} req/cpu-s"
                      f"{status}")

            print(f"warm-up ({warmup} s each)")
            for name in in_rounds:
                go("warm-up", name, PATH_1K, 64, warmup)
            runs.pop("warm-up", None)
            n = len(in_rounds)
            for r in range(rounds):
                order = in_rounds[r % n:] + in_rounds[: r % n]
                print(f"round {r + 1}/{rounds}: 1 KiB, 64 connections, {duration} s, "
                      f"order {', '.join(order)}")
                for name in order:
                    go("1k-c64", name, PATH_1K, 64, duration, r + 1)
            order = list(PROXIES[1:] + PROXIES[:1])
            print(f"1 KiB, 8 connections, {duration} s")
            for name in order:
                go("1k-c8", name, PATH_1K, 8, duration)
            order = list(PROXIES[2:] + PROXIES[:2])
            print(f"64 KiB, 64 connections, {duration} s")
            for name in order:
                go("64k-c64", name, PATH_64K, 64, duration)
            ferry_runs = [r for rs in runs.values() for r in rs if r.proxy == "ferryman"]
            mem["load_peak"] = max((r.rss_peak_kib for r in ferry_runs), default=0)
            time.sleep(0.5)
            mem["after"] = tree_rss_kib(ferry.pid)
            logs = {"Ferryman": stack.tmp / "ferryman-access.log", "nginx": stack.tmp / "nginx" / "access.log",
                    "HAProxy": stack.tmp / "haproxy" / "access.log", "Caddy": stack.tmp / "caddy" / "access.log"}
            if FERRY2 in targets:
                logs[f"Ferryman --workers {FERRY2_WORKERS}"] = stack.tmp / f"{FERRY2}-access.log"
            counts = ", ".join(f"{who} {count_lines(path):,}" for who, path in logs.items())
            notes.append(f"Access log lines written during the run (warm-up included): {counts}.")
    except BenchError as exc:
        print(f"bench: set-up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process started was stopped", file=sys.stderr)
        return 130

    report = render(runs, mem, workers, duration, rounds, notes, skipped, time.monotonic() - started,
                    args.consul_bin)
    print()
    print(report)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "results.md").write_text(report + "\n")
    print(f"\n(written to {OUT_DIR / 'results.md'})")
    failed = any(r.wrk.failure for rs in runs.values() for r in rs)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------------
# A/B mode: this tree against another checkout, one Consul agent and one set of backends


AB_ROUNDS: Final = 6
AB_DURATION_S: Final = 5
AB_WARMUP_S: Final = 3
AB_CONNECTIONS: Final = 64  # with 1 KiB bodies: the figure issue 13 names
AB_SETUP_S: Final = 60.0  # backends, Consul, two Ferryman instances, tear-down; with slack
AB_RUN_OVERHEAD_S: Final = 2.0  # per wrk run: start, /proc reads, the pause between runs
AB_PAUSE_S: Final = 0.5  # between two runs, so the previous one's connections are closed
AB_DEADLINE_MAX_S: Final = 1200.0  # plans longer than 20 minutes are refused
AB_BOUND: Final = 0.97  # issue 13: A's req per CPU-s within 3% of B's
AB_MAX_OTHERS: Final = 0.1  # a round counts when other processes took at most this many CPUs, in both runs
AB_EXTRA_ROUNDS: Final = 3  # at most this many times --rounds are run, to find enough quiet ones
AB_MIN_COUNTED: Final = 3  # fewer counted rounds than this: no verdict


def ab_plan_s(rounds: int, duration: int) -> float:
    return AB_SETUP_S + 2 * (AB_WARMUP_S + AB_RUN_OVERHEAD_S) + 2 * rounds * (duration + AB_RUN_OVERHEAD_S)


def main_ab(args: argparse.Namespace) -> int:
    """A/B mode (see the module docstring): two Ferryman instances, this tree's and another checkout's."""
    started = time.monotonic()
    rounds, duration, workers = args.rounds, args.duration, args.ferryman_workers
    if rounds < 1 or duration < 1 or workers < 1:
        print("bench: --rounds, --duration and --ferryman-workers must be at least 1", file=sys.stderr)
        return 2
    planned = ab_plan_s(rounds, duration)
    # Busy rounds are run again, up to AB_EXTRA_ROUNDS times the rounds asked for, within the cap.
    deadline = min(ab_plan_s(rounds * AB_EXTRA_ROUNDS, duration) + 60.0, AB_DEADLINE_MAX_S)
    if planned + 60.0 > AB_DEADLINE_MAX_S:
        print(f"bench: {rounds} rounds of {duration} s would take about {planned:.0f} s; the A/B mode stays "
              f"under {AB_DEADLINE_MAX_S:.0f} s (fewer rounds or shorter runs)", file=sys.stderr)
        return 2
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed (make bench installs Debian's wrk and nginx-light)",
                  file=sys.stderr)
            return 2
    if not Path(args.consul_bin).exists():
        print(f"bench: no Consul binary at {args.consul_bin} (make consul)", file=sys.stderr)
        return 2
    other = Path(args.ab).resolve()
    try:
        if other == ROOT:
            raise BenchError(f"--ab {args.ab} is this tree; give another checkout")
        a = Tree.load("A", "this tree", ROOT)
        b = Tree.load("B", args.ab_label or other.name, other)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    for tree in (a, b):
        print(f"bench: {tree.role} = {tree.label}: {tree.path} at {tree.commit}; code from "
              + ", ".join(f for _, f in tree.files))

    notes: list[str] = []
    skipped: list[str] = []
    runs: list[Run] = []
    counted: set[int] = set()  # rounds in which others left both runs alone (--max-others)
    # With 1 worker and 2 CPUs or more: the instance under load (A or B alike) gets the last usable CPU, and
    # this script, wrk, the backends and Consul (children inherit it) the others. Else where the scheduler puts
    # each of the ~1.5 CPUs' worth of busy processes changes from run to run and so does req per CPU-s.
    usable = sorted(os.sched_getaffinity(0))
    ferry_cpus: frozenset[int] | None = None
    if args.no_pin:
        notes.append("not pinned (--no-pin)")
    elif workers > 1 or len(usable) < 2:
        notes.append(f"not pinned: {workers} worker(s) on {len(usable)} usable CPU(s)")
    else:
        ferry_cpus = frozenset(usable[-1:])
        os.sched_setaffinity(0, usable[:-1])
        notes.append(f"pinned: A and B on CPU {usable[-1]}; wrk, the backends, Consul and this script on "
                     f"CPU {', '.join(map(str, usable[:-1]))}")

    def left() -> float:
        return deadline - (time.monotonic() - started)

    try:
        with running_stack(args.keep_tmp) as stack:
            print(f"bench: temp dir {stack.tmp}; plan {planned:.0f} s, deadline {deadline:.0f} s")
            backends_proc, backends = start_backends(stack)
            _, consul_port = start_consul(stack, args.consul_bin, backends)
            targets: dict[str, tuple[Proc, int]] = {}
            for tree in (a, b):
                name = f"ferryman-{tree.role.lower()}"
                proc, port, _, _ = start_ferryman(stack, consul_port, workers, notes, name=name, fallback=False,
                                                  tree=tree, cpus=ferry_cpus)
                targets[tree.role] = (proc, port)
                print(f"bench: {tree.role} :{port} (pid {proc.pid}, {workers} worker(s)); the process reports "
                      f"its code in {tree.path}")
            print(f"bench: backends :{backends[0]} :{backends[1]} (nginx pid {backends_proc.pid}), "
                  f"Consul :{consul_port}")
            time.sleep(1.0)

            def go(role: str, secs: int, round_no: int) -> Run | None:
                if left() < secs + 25:
                    skipped.append(f"round {round_no} / {role}" if round_no else f"warm-up / {role}")
                    print(f"  {role} skipped: the {deadline:.0f} s deadline is near")
                    return None
                time.sleep(AB_PAUSE_S)
                proc, port = targets[role]
                run = measure(role, proc, port, PATH_1K, AB_CONNECTIONS, secs, backends_proc)
                run.round_no = round_no
                w = run.wrk
                status = f"  errors {w.errors}" if w.errors else ""
                if w.failure:
                    status = f"  FAILED: {w.failure}"
                print(f"  {role}  {w.rps:>9,.0f} req/s  cpu {run.cpu_s:5.2f} s  {run.per_cpu_s:>8,.0f} req/cpu-s  "
                      f"others {run.others_cores:4.2f} CPUs{status}")
                return run

            print(f"warm-up ({AB_WARMUP_S} s each)")
            for role in ("A", "B"):
                go(role, AB_WARMUP_S, 0)
            r = 0
            while len(counted) < rounds and r < rounds * AB_EXTRA_ROUNDS:
                # ABBA...: each instance goes first in every other round, so a drift hits both alike.
                order = ("A", "B") if r % 2 == 0 else ("B", "A")
                r += 1
                print(f"round {r} ({len(counted)}/{rounds} counted so far): 1 KiB, {AB_CONNECTIONS} connections, "
                      f"{duration} s, order {', '.join(order)}")
                pair = [go(role, duration, r) for role in order]
                runs.extend(run for run in pair if run is not None)
                if any(run is None for run in pair):
                    break  # the deadline is near
                busiest = max(run.others_cores for run in pair if run is not None)
                if busiest <= args.max_others and not any(run.wrk.failure for run in pair if run is not None):
                    counted.add(r)
                else:
                    print(f"  not counted: other processes took {busiest:.2f} CPUs (at most {args.max_others:.2f})")
    except BenchError as exc:
        print(f"bench: set-up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process started was stopped", file=sys.stderr)
        return 130

    report = render_ab(a, b, runs, counted, args.max_others, workers, duration, rounds, notes, skipped,
                       time.monotonic() - started, args.consul_bin)
    print()
    print(report)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "ab.md").write_text(report + "\n")
    print(f"\n(written to {OUT_DIR / 'ab.md'})")
    if any(r.wrk.failure for r in runs):
        return 1
    return 3 if len(counted) < AB_MIN_COUNTED else 0  # 3: too few quiet rounds for a verdict


@dataclass(frozen=True)
class Spread:
    """Per-round A/B ratios, summarised."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return _median(self.ratios)

    def describe(self) -> str:
        if not self.ratios:
            return "n/a"
        return (f"{self.median:.3f} (min {min(self.ratios):.3f}, max {max(self.ratios):.3f}, "
                f"{len(self.ratios)} rounds)")


def ab_pairs(runs: Sequence[Run]) -> list[tuple[int, Run, Run]]:
    """(round, A's run, B's run) for each round in which both ran without failure."""
    by_round: dict[int, dict[str, Run]] = {}
    for r in runs:
        if not r.wrk.failure:
            by_round.setdefault(r.round_no, {})[r.proxy] = r
    return [(n, d["A"], d["B"]) for n, d in sorted(by_round.items()) if "A" in d and "B" in d]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def render_ab(a: Tree, b: Tree, runs: Sequence[Run], counted: set[int], max_others: float, workers: int,
              duration: int, rounds: int, notes: list[str], skipped: list[str], elapsed: float,
              consul_bin: str) -> str:
    every = ab_pairs(runs)
    pairs = [p for p in every if p[0] in counted]
    per_cpu = Spread(tuple(_ratio(ra.per_cpu_s, rb.per_cpu_s) for _, ra, rb in pairs))
    rps = Spread(tuple(_ratio(ra.wrk.rps, rb.wrk.rps) for _, ra, rb in pairs))
    per_cpu_all = Spread(tuple(_ratio(ra.per_cpu_s, rb.per_cpu_s) for _, ra, rb in every))
    out = [f"# A/B: this tree against {b.label}", ""]
    out += machine(consul_bin)
    out += [
        f"- A = {a.label}: `{a.path}` at {a.commit}",
        f"- B = {b.label}: `{b.path}` at {b.commit}",
        "- both run by this tree's venv python with PYTHONPATH and cwd set to their checkout; each process "
        "reported the files it imported, checked to lie in its own checkout: "
        + "; ".join(f"{t.role}: " + ", ".join(f"`{f}`" for _, f in t.files) for t in (a, b)),
        f"- load: `wrk -t1 -c{AB_CONNECTIONS} -d{duration}s` on /1k (1 KiB), one instance at a time, "
        f"rounds in ABBA order after a {AB_WARMUP_S} s warm-up each, until {rounds} rounds count (at most "
        f"{rounds * AB_EXTRA_ROUNDS}); a round counts when other processes took at most {max_others:.2f} "
        f"CPUs during both its runs; both instances {workers} "
        "worker(s), the same Consul agent and the same backends (1 nginx, 1 worker, two ports), access log on",
        "- req per CPU-s: requests completed / utime+stime of the instance's process tree during the run; "
        "A/B: per round, A's figure over B's from the same round; others: CPUs' worth of work done meanwhile "
        "by processes not in the run (machine busy time from /proc/stat less the instance, wrk and the "
        "backends)",
        "",
        "## Rounds",
        "",
        "| round | order | A req/s | B req/s | A/B req/s | A req per CPU-s | B req per CPU-s | A/B req per CPU-s "
        "| others (CPUs) A, B | counted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, ra, rb in every:
        order = "A, B" if n % 2 == 1 else "B, A"
        out.append(f"| {n} | {order} | {ra.wrk.rps:,.0f} | {rb.wrk.rps:,.0f} | {_ratio(ra.wrk.rps, rb.wrk.rps):.3f} "
                   f"| {ra.per_cpu_s:,.0f} | {rb.per_cpu_s:,.0f} | {_ratio(ra.per_cpu_s, rb.per_cpu_s):.3f} "
                   f"| {ra.others_cores:.2f}, {rb.others_cores:.2f} | {'yes' if n in counted else 'no'} |")
    rows = {role: Row(role, [r for r in runs if r.proxy == role and r.round_no in counted]) for role in ("A", "B")}
    pooled = {role: (sum(r.wrk.requests for r in row._ok()), sum(r.cpu_s for r in row._ok()))
              for role, row in rows.items()}
    pooled_ratio = _ratio(_ratio(*pooled["A"]), _ratio(*pooled["B"]))
    out += [
        "",
        "## In total",
        "",
        f"Counted rounds only ({len(pairs)} of {len(every)}).",
        "",
        "| | A (median) | B (median) | A/B: median of the per-round ratios (min, max) |",
        "|---|---|---|---|",
        f"| req/s | {_num(rows['A'].rps)} | {_num(rows['B'].rps)} | {rps.describe()} |",
        f"| req per CPU-s | {_num(rows['A'].per_cpu)} | {_num(rows['B'].per_cpu)} | {per_cpu.describe()} |",
        f"| errors | {rows['A'].errors} | {rows['B'].errors} | |",
        "",
        f"A/B of req per CPU-s over all rounds pooled (all requests / all CPU seconds): {_num(pooled_ratio, '.3f')}.",
    ]
    out.append(f"A/B of req per CPU-s over every round, busy ones included: {per_cpu_all.describe()}.")
    if len(per_cpu.ratios) >= AB_MIN_COUNTED:
        met = "yes" if per_cpu.median >= AB_BOUND else "no"
        out.append(f"A's 1 KiB req per CPU-s is {100 * per_cpu.median:.1f}% of B's (median of the per-round "
                   f"ratios); at least {100 * AB_BOUND:.0f}% (issue 13): {met}.")
    else:
        out.append(f"No verdict: {len(per_cpu.ratios)} round(s) counted, fewer than {AB_MIN_COUNTED}; the machine "
                   "was too busy (run again later, or raise --max-others and read the spread).")
    if skipped or notes or len(pairs) < rounds:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in notes]
        if len(pairs) < rounds:
            out.append(f"- only {len(pairs)} of the {rounds} rounds asked for counted")
        if skipped:
            out.append(f"- skipped to stay within the deadline: {', '.join(skipped)}")
    out += ["", f"Whole run: {elapsed:.0f} s. Reproduce: `make bench BENCH_ARGS=\"--ab {b.path} "
            f"--rounds {rounds} --duration {duration}\"`."]
    return "\n".join(out)


def caddy_vs_ferry2(c64: Sequence[Run]) -> tuple[Row, Row] | None:
    caddy = Row("caddy", [r for r in c64 if r.proxy == "caddy"])
    f2 = Row(FERRY2, [r for r in c64 if r.proxy == FERRY2])
    if not caddy.runs or not f2.runs or caddy.rps != caddy.rps or f2.rps != f2.rps:
        return None
    return caddy, f2


def ferry2_section(c64: Sequence[Run], rounds: int) -> list[str]:
    """Ferryman --workers 2 next to Caddy, both from the same interleaved 1 KiB / c64 rounds."""
    out = ["", f"## Ferryman with {FERRY2_WORKERS} workers beside Caddy (1 KiB, 64 connections, the same "
           f"{rounds} interleaved round{'s' if rounds > 1 else ''})", ""]
    pair = caddy_vs_ferry2(c64)
    if pair is None:
        return [*out, "Not measured (see the notes)."]
    caddy, f2 = pair
    head = ["proxy", "req/s", "p50", "p99", "proxy CPU s", "req per CPU-s", "req/s vs Caddy",
            "req per CPU-s vs Caddy", "errors"]
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, row in (("caddy", caddy), (f"ferryman, {FERRY2_WORKERS} workers", f2)):
        out.append("| " + " | ".join([
            label, _num(row.rps), f"{_num(row.p50, '.2f')} ms", f"{_num(row.p99, '.2f')} ms",
            _num(row.cpu, ".2f"), _num(row.per_cpu), _pct(row.rps, caddy.rps), _pct(row.per_cpu, caddy.per_cpu),
            row.errors]) + " |")
    by_round: dict[int, dict[str, Run]] = {}
    for r in c64:
        if r.proxy in ("caddy", FERRY2) and not r.wrk.failure:
            by_round.setdefault(r.round_no, {})[r.proxy] = r
    per_round = [f"{100 * d[FERRY2].wrk.rps / d['caddy'].wrk.rps:.0f}%" for _, d in sorted(by_round.items())
                 if FERRY2 in d and "caddy" in d and d["caddy"].wrk.rps]
    if per_round:
        out += ["", f"Ferryman {FERRY2_WORKERS} workers' req/s as a share of Caddy's, round by round: "
                f"{', '.join(per_round)}."]
    return out


def render(runs: dict[str, list[Run]], mem: dict[str, Any], workers: int, duration: int, rounds: int,
           notes: list[str], skipped: list[str], elapsed: float, consul_bin: str) -> str:
    def rows(scenario: str) -> list[Row]:
        return [Row(p, [r for r in runs.get(scenario, []) if r.proxy == p]) for p in PROXIES
                if any(r.proxy == p for r in runs.get(scenario, []))]

    out = ["# Ferryman beside nginx, HAProxy and Caddy", ""]
    out += machine(consul_bin)
    out += [
        f"- load: `wrk -t1 -c64 -d{duration}s --latency` (and `-c8`), one proxy at a time, loopback; "
        f"backends: 1 nginx (1 worker) with two ports, registered in a Consul dev agent as one service",
        f"- Ferryman's build: `{ferryman_version()}`",
        f"- proxies: Ferryman {workers} worker(s) (routing from Consul, round robin, metrics, JSON access "
        "log to a file), nginx 1 worker (upstream keepalive 64), HAProxy nbthread 1 (http-reuse always), "
        f"Caddy (Go, GOMAXPROCS = its default, {os.cpu_count()} here; round robin, upstream keep-alive 64 per "
        "backend, JSON access log to a file); all four log each request and set X-Forwarded-For/-Proto/-Host/"
        "-Port and X-Real-IP",
        "- proxy CPU s: utime+stime of the proxy's process tree, all threads (nginx: master and worker; "
        "Ferryman: supervisor and workers) during one wrk run; "
        "req per CPU-s: requests completed / proxy CPU s; median over the rounds",
        "",
        f"## 1 KiB responses, 64 connections (median of {rounds} interleaved "
        f"round{'s' if rounds > 1 else ''}, order rotated)",
        "",
    ]
    out += table(rows("1k-c64"))
    out += ferry2_section(runs.get("1k-c64", []), rounds)
    out += ["", "## 1 KiB responses, 8 connections (1 round)", ""]
    out += table(rows("1k-c8"), p99_delta=True)
    out += ["", "## 64 KiB responses, 64 connections (1 round)", ""]
    out += table(rows("64k-c64"))

    idle = mem.get("idle", {})
    after = mem.get("after", {})
    out += ["", "## Ferryman memory (VmRSS)", ""]
    if idle:
        per = ", ".join(mib(v) for v in idle.values())
        out.append(f"- idle, after start-up: {mib(sum(idle.values()))} in {len(idle)} process(es) ({per})")
    if mem.get("load_peak"):
        out.append(f"- under load (peak sampled every 0.25 s): {mib(mem['load_peak'])}")
    if after:
        out.append(f"- idle again, after the runs: {mib(sum(after.values()))}")
    idle2 = mem.get("idle2", {})
    if idle2:
        per = ", ".join(mib(v) for v in idle2.values())
        out.append(f"- the --workers {FERRY2_WORKERS} instance, idle after start-up: {mib(sum(idle2.values()))} "
                   f"in {len(idle2)} process(es) ({per})")

    out += ["", "## Against the targets of issue 3", "", "| target | measured | met |", "|---|---|---|"]

    def ratio(scenario: str) -> float | None:
        rs = {r.proxy: r for r in rows(scenario)}
        if "ferryman" in rs and "nginx" in rs and rs["nginx"].per_cpu:
            return rs["ferryman"].per_cpu / rs["nginx"].per_cpu
        return None

    r1 = ratio("1k-c64")
    out.append(f"| req per CPU-s ≥ 25% of nginx (1 KiB, c64, Ferryman {workers} worker(s)) | "
               f"{'n/a' if r1 is None else f'{100 * r1:.1f}%'} | "
               f"{verdict(None if r1 is None else r1 >= 0.25)} |")
    rs8 = {r.proxy: r for r in rows("1k-c8")}
    d = rs8["ferryman"].p99 - rs8["nginx"].p99 if "ferryman" in rs8 and "nginx" in rs8 else None
    out.append(f"| p99 at 8 connections within 2 ms of nginx | {'n/a' if d is None else f'{d:+.2f} ms'} | "
               f"{verdict(None if d is None else d <= 2.0)} |")
    r64 = ratio("64k-c64")
    out.append(f"| 64 KiB: req per CPU-s ≥ 40% of nginx | {'n/a' if r64 is None else f'{100 * r64:.1f}%'} | "
               f"{verdict(None if r64 is None else r64 >= 0.40)} |")
    if idle:
        worst = max(idle.values())
        out.append(f"| idle RSS per worker < 60 MiB | {mib(worst)} (largest process) | "
                   f"{verdict(worst < 60 * 1024)} |")
        if mem.get("load_peak"):
            growth = mem["load_peak"] / sum(idle.values())
            out.append(f"| RSS under load ≤ 2 x idle | {growth:.2f} x | {verdict(growth <= 2.0)} |")
    c2 = caddy_vs_ferry2(runs.get("1k-c64", []))
    if c2 is None:
        out.append(f"| with {FERRY2_WORKERS} workers, more req/s than Caddy (1 KiB, c64) | n/a (not measured) | n/a |")
    else:
        caddy_row, f2_row = c2
        out.append(f"| with {FERRY2_WORKERS} workers, more req/s than Caddy (1 KiB, c64) | "
                   f"{_num(f2_row.rps)} vs {_num(caddy_row.rps)} req/s ({_pct(f2_row.rps, caddy_row.rps)} of "
                   f"Caddy) | {verdict(f2_row.rps > caddy_row.rps)} |")

    out += issue18_targets(r1, d, c2)
    if skipped or notes:
        out += ["", "## Notes", ""]
        out += [f"- {n}" for n in notes]
        if skipped:
            out.append(f"- skipped to stay within {DEADLINE_S:.0f} s: {', '.join(skipped)}")
    out += ["", f"Whole run: {elapsed:.0f} s. Reproduce: `make bench` "
            "(or `.venv/bin/python bench/run.py --quick` for a smoke run)."]
    return "\n".join(out)


def verdict(ok: bool | None) -> str:
    """A target table's "met" column: n/a when not measured."""
    return "n/a" if ok is None else ("yes" if ok else "no")


def issue18_targets(r1: float | None, p99_delta: float | None, c2: tuple[Row, Row] | None) -> list[str]:
    """The goals of issue 18 (a compiled hot path), from the same rounds as issue 3's table."""
    out = ["", "## Against the targets of issue 18", "", "| target | measured | met |", "|---|---|---|"]
    out.append(f"| req per CPU-s ≥ 50% of nginx (1 KiB, c64, access log on) | "
               f"{'n/a' if r1 is None else f'{100 * r1:.1f}%'} | {verdict(None if r1 is None else r1 >= 0.5)} |")
    out.append(f"| p99 at 8 connections within 1 ms of nginx | "
               f"{'n/a' if p99_delta is None else f'{p99_delta:+.2f} ms'} | "
               f"{verdict(None if p99_delta is None else p99_delta <= 1.0)} |")
    if c2 is None:
        out.append(f"| {FERRY2_WORKERS} workers ≥ 2 x Caddy's req/s (1 KiB, c64) | n/a (not measured) | n/a |")
    else:
        caddy_row, f2_row = c2
        out.append(f"| {FERRY2_WORKERS} workers ≥ 2 x Caddy's req/s (1 KiB, c64) | "
                   f"{_pct(f2_row.rps, caddy_row.rps)} of Caddy | {verdict(f2_row.rps >= 2 * caddy_row.rps)} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
