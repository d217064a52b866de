"""SIGTERM with TCP connections open: the TCP listener stops accepting at once, an open relayed connection keeps
working for `shutdown_timeout`, then is cut, and the process exits 0. Debian's redis-server behind the route;
a real Consul agent; Ferryman as a process, signalled by its PID."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import ConsulAgent, FerrymanProcess, free_port, wait_until
from .tcp_peers import Redis

pytestmark = pytest.mark.integration

SHUTDOWN_S = 3.0


@pytest.fixture
def redis(workdir: Path) -> Iterator[Redis]:
    server = Redis(workdir).start()
    yield server
    server.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _ping(sock: socket.socket) -> bytes:
    sock.sendall(b"PING\r\n")
    return sock.recv(100)


def test_open_connection_served_through_shutdown_timeout_then_cut(
    consul: ConsulAgent, workdir: Path, redis: Redis,
) -> None:
    """After SIGTERM a new connection is refused, the open one answers PINGs until shutdown_timeout, then is
    closed; its access line says shutdown, and Ferryman exits 0."""
    port = free_port()
    ferryman = FerrymanProcess(consul.addr, workdir, extra=[
        "--tcp-listen", f"127.0.0.1:{port}", "--shutdown-timeout", str(SHUTDOWN_S)])
    ferryman.start()
    consul.register("shut-redis", "shut-redis-0", redis.port, [f"urlprefix-:{port} proto=tcp"])
    try:
        ferryman.wait_instances(f"shut-redis@*any*:{port}", ["shut-redis-0"])
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _ping(held) == b"+PONG\r\n"
        client = f"127.0.0.1:{held.getsockname()[1]}"
        proc = ferryman.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: _refused(port), 2, "the TCP listener closed")
        answered = 0
        while time.monotonic() - signalled < SHUTDOWN_S - 0.7:
            assert _ping(held) == b"+PONG\r\n"
            answered += 1
            time.sleep(0.1)
        assert answered >= 10
        held.settimeout(SHUTDOWN_S + 3)
        try:
            assert held.recv(100) == b""
        except ConnectionResetError:
            pass  # cut: a reset is as good as a close here
        cut = time.monotonic() - signalled
        assert SHUTDOWN_S - 0.5 <= cut <= SHUTDOWN_S + 2.5
        held.close()
        assert proc.wait(10) == 0
        ferryman.proc = None
        events = ferryman.log_events()
        assert any(e.get("event") == "tcp_shutdown_timeout" for e in events)
        # (the probes for a closed listener may have got through before it closed: they ended client_closed)
        assert [e["end"] for e in events if e.get("event") == "tcp_access" and e["client"] == client] == ["shutdown"]
    finally:
        consul.deregister("shut-redis-0")
        ferryman.stop()
