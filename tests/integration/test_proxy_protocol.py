"""PROXY protocol on Ferryman's listeners, behind a real HAProxy in TCP mode (`send-proxy` and `send-proxy-v2`,
on the plain listener and, before the TLS handshake, on the HTTPS one): the client curl connects from is the
client Ferryman logs, forwards in X-Forwarded-For and judges with deny=. And the hostile cases, on raw sockets:
a header from a peer that is not a trusted proxy, truncated, oversized, never ending, garbage: closed, never
answered, never forwarded.

The client connects from 127.0.0.5 (curl --interface), HAProxy from 127.0.0.1, the only trusted proxy: an
address that reaches the backend as 127.0.0.5 came from the header.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.proxyproto import encode_v1, encode_v2

from .certs import TestCA
from .harness import Backend, ConsulAgent, FerrymanProcess, _stop_pid, free_port, start_haproxy, wait_until

pytestmark = pytest.mark.integration

CLIENT = "127.0.0.5"
_INSTANCES = itertools.count(1)


@dataclass
class World:
    ferryman: FerrymanProcess
    tls_port: int
    haproxy: dict[str, int]  # frontend name -> port
    ca_path: Path
    backend: Backend


def _haproxy_config(ports: dict[str, int], plain: int, tls: int) -> str:
    out = ["defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 10s", "    timeout server 10s"]
    targets = {"v1": (plain, "send-proxy"), "v2": (plain, "send-proxy-v2"), "tls-v2": (tls, "send-proxy-v2"),
               "tls-v1": (tls, "send-proxy")}
    for name, (port, option) in targets.items():
        out += [f"listen {name}", f"    bind 127.0.0.1:{ports[name]}", f"    server ferryman 127.0.0.1:{port} {option}"]
    return "\n".join(out) + "\n"


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.fixture(scope="module")
def haproxy_world(consul: ConsulAgent, workdir: Path) -> Iterator[tuple[FerrymanProcess, int, dict[str, int], Path]]:
    ca = TestCA(workdir / "pp-ca")
    _, cert, key = ca.issue_files(workdir, "pp", "pp.test")
    tls_port = free_port()
    ferryman = FerrymanProcess(consul.addr, workdir, extra=[
        "--proxy-protocol", "*", "--trusted-proxies", "127.0.0.1", "--proxy-protocol-timeout", "1",
        "--tls-listen", f"127.0.0.1:{tls_port}", "--tls-certs", f"{cert}:{key}"])
    ports = {name: free_port() for name in ("v1", "v2", "tls-v1", "tls-v2")}
    config = workdir / "haproxy-pp.cfg"
    # The harness waits for the plain listener by connecting to it: a connection without a header, from a
    # trusted peer, closed at proxy_protocol_timeout. That is all it needs to know.
    ferryman.start()
    config.write_text(_haproxy_config(ports, ferryman.port, tls_port))
    haproxy = start_haproxy(config, workdir / "haproxy-pp.log")
    try:
        for port in ports.values():
            wait_until(functools.partial(_accepts, port), 10, f"HAProxy on {port}")
        yield ferryman, tls_port, ports, ca.ca_path
    finally:
        _stop_pid(haproxy)
        ferryman.stop()


@pytest.fixture
async def world(consul: ConsulAgent,
                haproxy_world: tuple[FerrymanProcess, int, dict[str, int], Path]) -> AsyncIterator[World]:
    ferryman, tls_port, ports, ca_path = haproxy_world
    instance = f"pp-{next(_INSTANCES)}"  # a new instance each test: its backend's port is new too
    backend = await Backend(instance).start()
    await asyncio.to_thread(consul.register, "pp", instance, backend.port,
                            ["urlprefix-/pp", f"urlprefix-/pp-deny deny=ip:{CLIENT}"])
    await asyncio.to_thread(ferryman.wait_instances, "pp@*any*/pp", [instance])
    try:
        yield World(ferryman, tls_port, ports, ca_path, backend)
    finally:
        await asyncio.to_thread(consul.deregister, instance)
        await backend.stop()


def _curl(url: str, *args: str) -> tuple[int, bytes]:
    out = subprocess.run(["curl", "-s", "--max-time", "10", "--interface", CLIENT, "-w", "\n%{http_code}", *args, url],
                         capture_output=True, check=True)
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status), body


@pytest.mark.parametrize("frontend", ["v1", "v2", "tls-v1", "tls-v2"])
@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2.0"])
async def test_client_behind_haproxy_is_the_one_the_header_names(world: World, frontend: str, protocol: str) -> None:
    """Through HAProxy, over HTTP/1.1 or HTTP/2 (ALPN over TLS, prior knowledge on plain), the instance gets the
    client's address in X-Forwarded-For and X-Real-IP, the access log names it, and deny= refuses it."""
    port = world.haproxy[frontend]
    if frontend.startswith("tls"):
        base = f"https://pp.test:{port}"
        args = ["--resolve", f"pp.test:{port}:127.0.0.1", "--cacert", str(world.ca_path)]
        args.append("--http2" if protocol == "HTTP/2.0" else "--http1.1")
    else:
        base, args = f"http://127.0.0.1:{port}", ["--http2-prior-knowledge"] if protocol == "HTTP/2.0" else []
    status, body = await asyncio.to_thread(_curl, f"{base}/pp/{frontend}", *args)
    assert status == 200
    headers = dict(json.loads(body)["headers"])
    assert (headers["X-Forwarded-For"], headers["X-Real-IP"]) == (CLIENT, CLIENT)
    assert headers["X-Forwarded-Proto"] == ("https" if frontend.startswith("tls") else "http")
    assert (await asyncio.to_thread(_curl, f"{base}/pp-deny/x", *args))[0] == 403
    lines = [e for e in world.ferryman.log_events() if e.get("event") == "access" and e["path"] == f"/pp/{frontend}"
             and e["protocol"] == protocol]
    assert [line["client"] for line in lines] == [CLIENT]


def _raw(port: int, data: bytes, *, source: str = "127.0.0.1", linger: float = 0.0) -> tuple[bytes, float]:
    """Send `data` from `source`, then wait for Ferryman's answer: (what came back, seconds until closed)."""
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        started = time.monotonic()
        sock.sendall(data)
        if linger:
            time.sleep(linger)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got, time.monotonic() - started


REQUEST = b"GET /pp/raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
HEADER_V1 = encode_v1(("192.0.2.9", 4000), ("127.0.0.1", 80))
HEADER_V2 = encode_v2(("192.0.2.9", 4000), ("127.0.0.1", 80))


async def test_header_from_this_socket_works(world: World) -> None:
    """The raw client below is right when it sends a proper header: the answer comes, with the header's client."""
    for header in (HEADER_V1, HEADER_V2):
        got, _ = await asyncio.to_thread(_raw, world.ferryman.port, header + REQUEST)
        assert got.startswith(b"HTTP/1.1 200") and b'"X-Forwarded-For", "192.0.2.9"' in got


HOSTILE = [
    ("untrusted-peer", HEADER_V1 + REQUEST, "127.0.0.2", "untrusted_peer"),
    ("untrusted-peer-v2", HEADER_V2 + REQUEST, "127.0.0.3", "untrusted_peer"),
    ("truncated-v1", HEADER_V1[:20], "127.0.0.1", "header_timeout"),
    ("truncated-v2", HEADER_V2[:20], "127.0.0.1", "header_timeout"),
    ("never-completes", b"PROXY ", "127.0.0.1", "header_timeout"),
    ("oversized-v1", b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n" + REQUEST, "127.0.0.1", "invalid_header"),
    ("oversized-v2", HEADER_V2[:14] + b"\xff\xff" + bytes(100), "127.0.0.1", "invalid_header"),
    ("garbage", b"\x00\x01garbage" + REQUEST, "127.0.0.1", "invalid_header"),
    ("no-header", REQUEST, "127.0.0.1", "invalid_header"),
]


@pytest.mark.parametrize(("data", "source", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
async def test_hostile_connections_are_closed_unanswered(world: World, data: bytes, source: str,
                                                         reason: str) -> None:
    """Closed without a byte of answer, nothing forwarded; a header that never ends closes at the timeout."""
    hits = len(world.backend.hits)
    got, took = await asyncio.to_thread(_raw, world.ferryman.port, data, source=source)
    assert got == b""
    assert took < 5  # proxy_protocol_timeout is 1 s: never left open
    assert len(world.backend.hits) == hits
    refused = [e for e in world.ferryman.log_events() if e.get("event") == "proxy_protocol_refused"]
    assert refused, "refusals are logged"
    if reason == "header_timeout":
        assert took >= 0.9  # it was the timeout that closed it, not the bytes
