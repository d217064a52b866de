"""PROXY protocol on TCP listeners, behind a real HAProxy in TCP mode sending PROXY v2 (`send-proxy-v2`), as an
L4 balancer in front of Ferryman: the client a TCP route sees is the one HAProxy accepted, for the access line,
deny=, `lb=hash` and the `pxyproto=v2` header Ferryman sends on to a backend that reads it; an SNI listener
behind it routes the ClientHello that follows the header. Debian's
redis-server and redis-cli behind; a real Consul agent; Ferryman as a process.

The client connects from 127.0.0.5 and up (a bound source address), HAProxy from 127.0.0.1, the only trusted
proxy: an address other than 127.0.0.1 that reaches a backend or the access line came from the header.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .certs import TestCA
from .harness import ConsulAgent, FerrymanProcess, _stop_pid, free_port, start_haproxy, wait_until
from .tcp_peers import ProxyV2Backend, Redis, TlsEcho, redis_binary

pytestmark = pytest.mark.integration

CLIENT = "127.0.0.5"
HEADER_S = 1.0
ROUTES = ("redis", "hash", "pxy", "deny")  # Ferryman's TCP listeners, each behind its own HAProxy frontend
SNI = "sni"  # and its SNI listener, behind one more


@dataclass
class World:
    ferryman: FerrymanProcess
    listeners: dict[str, int]  # Ferryman's TCP listeners
    fronts: dict[str, int]  # HAProxy's frontends, one per listener
    redises: list[Redis]
    pxy: ProxyV2Backend
    ca: TestCA


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.fixture(scope="module")
def world(consul: ConsulAgent, workdir: Path) -> Iterator[World]:
    listeners = {name: free_port() for name in (*ROUTES, SNI)}
    fronts = {name: free_port() for name in (*ROUTES, SNI)}
    addresses = ",".join(f"127.0.0.1:{listeners[name]}" for name in ROUTES)
    ferryman = FerrymanProcess(consul.addr, workdir, extra=[
        "--tcp-listen", addresses, "--sni-listen", f"127.0.0.1:{listeners[SNI]}", "--proxy-protocol", "*",
        "--trusted-proxies", "127.0.0.1",
        "--proxy-protocol-timeout", str(HEADER_S), "--connect-timeout", "1"])
    ferryman.start()
    config = workdir / "haproxy-tcp.cfg"
    lines = ["defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 10s", "    timeout server 10s"]
    for name in (*ROUTES, SNI):
        lines += [f"listen {name}", f"    bind 127.0.0.1:{fronts[name]}",
                  f"    server ferryman 127.0.0.1:{listeners[name]} send-proxy-v2"]
    config.write_text("\n".join(lines) + "\n")
    haproxy = start_haproxy(config, workdir / "haproxy-tcp.log")
    redises = [Redis(workdir).start(), Redis(workdir).start()]
    pxy = ProxyV2Backend()
    pxy.start()
    ca = TestCA(workdir / "pp-tcp-ca")
    _, cert, key = ca.issue_files(ca.directory, "sni", "sni.pp.test")
    tls = TlsEcho("sni", cert, key)
    tls.start()
    try:
        for port in fronts.values():
            wait_until(functools.partial(_accepts, port), 10, f"HAProxy on {port}")
        for i, redis in enumerate(redises):
            assert redis.command("SET", "where", f"redis-{i}") == "OK"
            consul.register("pp-redis", f"pp-redis-{i}", redis.port, [
                f"urlprefix-:{listeners['redis']} proto=tcp",
                f"urlprefix-:{listeners['deny']} proto=tcp deny=ip:{CLIENT}"])
            consul.register("pp-hash", f"pp-hash-{i}", redis.port,
                            [f"urlprefix-:{listeners['hash']} proto=tcp lb=hash"])
        consul.register("pp-pxy", "pp-pxy-0", pxy.port, [f"urlprefix-:{listeners['pxy']} proto=tcp pxyproto=v2"])
        consul.register("pp-sni", "pp-sni-0", tls.port, ["urlprefix-sni.pp.test/ proto=tcp"])
        ferryman.wait_instances("pp-sni@sni.pp.test", ["pp-sni-0"])
        ferryman.wait_instances(f"pp-redis@*any*:{listeners['redis']}", ["pp-redis-0", "pp-redis-1"])
        ferryman.wait_instances(f"pp-hash@*any*:{listeners['hash']}", ["pp-hash-0", "pp-hash-1"])
        ferryman.wait_instances(f"pp-pxy@*any*:{listeners['pxy']}", ["pp-pxy-0"])
        yield World(ferryman, listeners, fronts, redises, pxy, ca)
    finally:
        for instance in ("pp-redis-0", "pp-redis-1", "pp-hash-0", "pp-hash-1", "pp-pxy-0", "pp-sni-0"):
            consul.deregister(instance)
        _stop_pid(haproxy)
        ferryman.stop()
        for redis in redises:
            redis.stop()
        pxy.stop()
        tls.stop()


def _connect(port: int, source: str = CLIENT) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def _redis(port: int, command: bytes, source: str = CLIENT) -> tuple[bytes, int]:
    """One inline Redis command from `source` through `port`: (the answer, the client's own port)."""
    with _connect(port, source) as sock:
        sock.sendall(command + b"\r\n")
        answer = b""
        while not answer.endswith(b"\r\n") or (answer.startswith(b"$") and answer.count(b"\r\n") < 2):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer, sock.getsockname()[1]


def _access(world: World, service: str) -> list[dict[str, object]]:
    return [e for e in world.ferryman.log_events() if e.get("event") == "tcp_access" and e.get("service") == service]


def _closed_unanswered(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class TestBehindHaproxy:
    """HAProxy sends PROXY v2 to Ferryman's TCP listeners; the header's client is the connection's client."""

    def test_redis_through_haproxy_logs_the_real_client(self, world: World) -> None:
        """redis-cli's commands pass HAProxy and Ferryman; the access line names the client and its port."""
        answer, port = _redis(world.fronts["redis"], b"PING")
        assert answer == b"+PONG\r\n"
        wait_until(lambda: any(e["client"] == f"{CLIENT}:{port}" for e in _access(world, "pp-redis")), 5,
                   "the access line naming the client behind HAProxy")
        cli = [redis_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(world.fronts["redis"]), "GET", "where"]
        done = subprocess.run(cli, capture_output=True, timeout=10, check=False)
        assert done.stdout.decode().strip() in ("redis-0", "redis-1")

    def test_pxyproto_v2_to_the_instance_names_the_client(self, world: World) -> None:
        """The backend reads, in the PROXY v2 header Ferryman sends it, the address and port HAProxy accepted."""
        with _connect(world.fronts["pxy"]) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().decode().split() == [CLIENT, str(sock.getsockname()[1])]
            sock.sendall(b"after both headers\n")
            assert reader.readline() == b"after both headers\n"

    def test_deny_judges_the_client_behind_haproxy(self, world: World) -> None:
        """deny=ip:CLIENT closes the client's connection unanswered; another client behind HAProxy passes."""
        accepted = sum(r.clients() for r in world.redises)
        with _connect(world.fronts["deny"]) as sock:
            sock.sendall(b"PING\r\n")
            assert _closed_unanswered(sock, 5)
        assert _redis(world.fronts["deny"], b"PING", source="127.0.0.6")[0] == b"+PONG\r\n"
        wait_until(lambda: any(e["end"] == "denied" and str(e["client"]).startswith(f"{CLIENT}:")
                               for e in _access(world, "pp-redis")), 5, "the denied access line")
        assert sum(r.clients() for r in world.redises) == accepted + 1 + 2  # the other client, and clients() twice

    def test_lb_hash_hashes_the_client_behind_haproxy(self, world: World) -> None:
        """Each client address behind HAProxy keeps one instance, and the addresses spread over both (had the
        hash seen HAProxy's 127.0.0.1, every client would land on one)."""
        sources = [f"127.0.0.{n}" for n in range(5, 17)]
        seen = {source: {_redis(world.fronts["hash"], b"GET where", source)[0] for _ in range(3)}
                for source in sources}
        assert all(len(answers) == 1 for answers in seen.values()), seen
        assert {next(iter(answers)) for answers in seen.values()} == {b"$7\r\nredis-0\r\n", b"$7\r\nredis-1\r\n"}


    def test_sni_listener_behind_haproxy(self, world: World) -> None:
        """An SNI listener reads the PROXY header, then routes the ClientHello after it: the backend's own
        certificate reaches the client, and the access line names the client behind HAProxy."""
        with _connect(world.fronts[SNI]) as raw, \
                world.ca.client_context().wrap_socket(raw, server_hostname="sni.pp.test") as tls:
            tls.sendall(b"hi\n")
            assert tls.makefile("rb").readline() == b"sni hi\n"
            port = tls.getsockname()[1]
        wait_until(lambda: any(e["client"] == f"{CLIENT}:{port}" and e["server_name"] == "sni.pp.test"
                               for e in _access(world, "pp-sni")), 5, "the SNI access line naming the client")


class TestRefused:
    """Only trusted proxies may send a header, and it must come in time; nothing is opened upstream otherwise."""

    @pytest.mark.parametrize(
        ("source", "data", "reason"),
        [("127.0.0.2", b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x05\x7f\x00\x00\x01\x10\x00\x00\x10PING\r\n",
          "untrusted_peer"),
         ("127.0.0.1", b"", "header_timeout"),
         ("127.0.0.1", b"PING\r\n", "invalid_header")],
        ids=["untrusted-peer", "silent", "no-header"],
    )
    def test_closed_without_an_upstream(self, world: World, source: str, data: bytes, reason: str) -> None:
        """A direct connection from an untrusted peer, a trusted one that sends nothing, or bytes that are no
        header: closed unanswered within proxy_protocol_timeout, no instance contacted."""
        accepted = [r.clients() for r in world.redises]
        with _connect(world.listeners["redis"], source) as sock:
            started = time.monotonic()
            sock.sendall(data)
            assert _closed_unanswered(sock, HEADER_S + 3)
            assert time.monotonic() - started < HEADER_S + 2
        assert [r.clients() - 1 for r in world.redises] == accepted  # clients() itself is one connection
        refused = [e for e in world.ferryman.log_events() if e.get("event") == "proxy_protocol_refused"]
        assert refused
