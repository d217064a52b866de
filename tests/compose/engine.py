"""A Docker engine of the compose test's own: Debian's dockerd, unpacked into .venv/debs by `make compose-debs`.

How it works: dockerd runs from the unpacked tree (.venv/debs/root) with its own data root, exec root, pid file
and unix socket under STATE (/var/tmp/ferryman-docker, so images survive between runs on a machine); it starts
its own containerd. It finds containerd, runc, docker-init (tini), docker-proxy and iptables on its PATH: a
directory of symlinks into the unpacked tree, `iptables` being Debian's xtables-nft-multi (an alternative the
package would register if installed). The libraries the unpacked binaries need come through LD_LIBRARY_PATH.
A lock file keeps two test runs (two worktrees) from using the state at once. The engine is stopped by its PID.

When the engine cannot run here (not root, a binary missing, dockerd exiting at start), `EngineUnavailable`
says what is missing: the compose tests fail with that message instead of being skipped.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
UNPACKED = REPO / ".venv" / "debs" / "root"
STATE = Path(os.environ.get("FERRYMAN_DOCKER_STATE", "/var/tmp/ferryman-docker"))
# Binaries dockerd runs, as found in Debian's docker.io, containerd, runc, tini and iptables packages.
ENGINE_BINARIES = {
    "docker": "usr/bin/docker",  # the CLI of the same release as the engine
    "dockerd": "usr/sbin/dockerd",
    "docker-proxy": "usr/sbin/docker-proxy",
    "containerd": "usr/bin/containerd",
    "containerd-shim-runc-v2": "usr/bin/containerd-shim-runc-v2",
    "runc": "usr/sbin/runc",
    "docker-init": "usr/bin/tini-static",  # bind-mounted into containers for `init: true`: must be static
    "iptables": "usr/sbin/xtables-nft-multi",
    "ip6tables": "usr/sbin/xtables-nft-multi",
}
LOCK_WAIT = 900.0  # another run of the compose test (another worktree) holds the engine: wait that long


class EngineUnavailable(Exception):
    """The Docker engine cannot be started here; the message says what is missing."""


def _lib_dirs(root: Path) -> list[str]:
    return [str(p) for base in ("usr/lib", "lib") for p in sorted((root / base).glob("*-linux-gnu")) if p.is_dir()]


class DockerEngine:
    """dockerd with its own state under `state`; `env` points the docker CLI and docker-compose at it."""

    def __init__(self, state: Path = STATE, unpacked: Path = UNPACKED) -> None:
        self.state = state
        self.unpacked = unpacked
        self.socket = state / "docker.sock"
        self.pidfile = state / "dockerd.pid"
        self.log_path = state / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """The environment for docker and docker-compose: this engine, the classic builder (no buildx here)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env.update(DOCKER_HOST=self.host, DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0")
        return env

    def preflight(self) -> None:
        """What the engine needs, checked before starting it: root, the unpacked binaries, kernel features."""
        if os.geteuid() != 0:
            raise EngineUnavailable(
                "the compose test needs a Docker engine and starts its own dockerd, which needs root here "
                "(rootless Docker is not set up): run `make compose-test` as root")
        missing = [name for name, rel in ENGINE_BINARIES.items() if not (self.unpacked / rel).is_file()]
        if missing:
            raise EngineUnavailable(
                f"Docker engine binaries missing under {self.unpacked}: {', '.join(missing)}; "
                "`make compose-debs` unpacks Debian's docker.io, containerd, runc, tini and iptables there")
        filesystems = Path("/proc/filesystems").read_text()
        if "overlay" not in filesystems:
            raise EngineUnavailable("the kernel has no overlay filesystem (dockerd's overlay2 storage driver)")
        if not Path("/sys/fs/cgroup").is_dir() or not any(Path("/sys/fs/cgroup").iterdir()):
            raise EngineUnavailable("no cgroup filesystem under /sys/fs/cgroup: containers cannot be started")

    def _bin_dir(self) -> Path:
        """Symlinks to the unpacked binaries under the names dockerd looks up on its PATH."""
        bin_dir = self.state / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, rel in ENGINE_BINARIES.items():
            link = bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(self.unpacked / rel)
        return bin_dir

    def _acquire_lock(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        lock = (self.state / "lock").open("w")
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise EngineUnavailable(f"{self.state}/lock is held by another compose test run") from None
                time.sleep(1)
        self._lock = lock

    def start(self) -> None:
        self.preflight()
        self._acquire_lock()
        if self.pidfile.exists():
            pid = self.pidfile.read_text().strip()
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                self.release()
                raise EngineUnavailable(
                    f"a dockerd left by an earlier run still uses {self.state} (pid {pid}, not started by this "
                    f"run): stop it with `kill {pid}`")
            self.pidfile.unlink()
        self.socket.unlink(missing_ok=True)
        env = {
            "PATH": f"{self._bin_dir()}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LD_LIBRARY_PATH": ":".join(_lib_dirs(self.unpacked)),
            "XTABLES_LIBDIR": str(self.unpacked / "usr/lib/x86_64-linux-gnu/xtables"),
            "HOME": str(self.state),
        }
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(self.unpacked / ENGINE_BINARIES["dockerd"]), "--data-root", str(self.state / "data"),
             "--exec-root", str(self.state / "exec"), "--pidfile", str(self.pidfile), "--host", self.host,
             "--log-level", "warn"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.release()
                raise EngineUnavailable(f"dockerd exited with code {self.proc.returncode} at start; its log "
                                        f"({self.log_path}) ends with:\n{self.log_tail()}")
            if self.socket.exists() and self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        self.stop()
        raise EngineUnavailable(f"dockerd did not answer on {self.socket} within 60 s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def docker(self, *args: str, check: bool = True, timeout: float = 300,
               input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this engine; raises with its output when `check` and it fails."""
        cli = str(self.unpacked / ENGINE_BINARIES["docker"])
        result = subprocess.run([cli, *args], env=self.env(), capture_output=True, timeout=timeout, check=False,
                                input=input)
        done = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                           result.stderr.decode(errors="replace"))
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def stop(self) -> None:
        """SIGTERM to the dockerd this object started (it stops its containers and its containerd), by PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
