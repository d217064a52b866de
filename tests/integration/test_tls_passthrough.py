"""Fabio's `https+tcp+sni` on a TLS listener (`tls_passthrough`): a ClientHello whose server name has a
`proto=tcp` route passes through untouched to a backend that terminates TLS itself (the client receives the
backend's certificate), every other name is terminated by Ferryman as on any TLS listener (its certificate, HTTP
routes). A TLS listener without the setting terminates every name. A real Consul agent; Ferryman as a process;
curl for the terminated side.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .certs import TestCA, describe
from .harness import Backend, ConsulAgent, FerrymanProcess, free_port
from .tcp_peers import TlsEcho, client_hello, handshake_in_byte_segments

pytestmark = pytest.mark.integration

HELLO_S = 1.0


@dataclass
class World:
    ferryman: FerrymanProcess
    passing: int  # the TLS listener of tls_passthrough
    terminating: int  # a TLS listener without it
    ca: TestCA
    own_serial: int  # Ferryman's certificate
    echo: TlsEcho
    echo_serial: int  # the pass-through backend's certificate


@pytest.fixture(scope="module")
def world(consul: ConsulAgent, workdir: Path) -> Iterator[World]:
    ca = TestCA(workdir / "passthrough-ca")
    own, cert, key = ca.issue_files(ca.directory, "ferryman", "term.pt.test", "*.pt.test")
    backend_leaf, backend_cert, backend_key = ca.issue_files(ca.directory, "backend", "pass.pt.test")
    passing, terminating = free_port(), free_port()
    ferryman = FerrymanProcess(consul.addr, workdir, extra=[
        "--tls-listen", f"127.0.0.1:{passing},127.0.0.1:{terminating}", "--tls-certs", f"{cert}:{key}",
        "--tls-passthrough", f"127.0.0.1:{passing}", "--sni-hello-timeout", str(HELLO_S)])
    ferryman.start()
    echo = TlsEcho("passed", backend_cert, backend_key)
    echo.start()
    consul.register("pt-echo", "pt-echo-0", echo.port, ["urlprefix-pass.pt.test/ proto=tcp"])
    try:
        ferryman.wait_instances("pt-echo@pass.pt.test", ["pt-echo-0"])
        yield World(ferryman, passing, terminating, ca, own.serial, echo, backend_leaf.serial)
    finally:
        consul.deregister("pt-echo-0")
        ferryman.stop()
        echo.stop()


@pytest.fixture
async def http_backend(consul: ConsulAgent, world: World) -> AsyncIterator[Backend]:
    backend = await Backend("pt-http-0").start()
    consul.register("pt-http", "pt-http-0", backend.port, ["urlprefix-term.pt.test/"])
    try:
        world.ferryman.wait_instances("pt-http@term.pt.test/", ["pt-http-0"])
        yield backend
    finally:
        consul.deregister("pt-http-0")
        await backend.stop()


def _handshake(port: int, name: str, ca: TestCA, line: bytes | None = None) -> tuple[int, bytes]:
    """A verified TLS handshake asking for `name`: (the presented certificate's serial, the answer to `line`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ca.client_context().wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        if line is None:
            return describe(der).serial, b""
        tls.sendall(line)
        return describe(der).serial, tls.makefile("rb").readline()


def _curl(port: int, name: str, ca: TestCA, path: str = "/") -> tuple[int, bytes]:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "10", "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", str(ca.ca_path),
         "-w", "\n%{http_code}", f"https://{name}:{port}{path}"], capture_output=True, check=True)
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status), body


class TestPassedThrough:
    """A server name with a proto=tcp route reaches its backend's own TLS, untouched."""

    def test_client_gets_the_backends_certificate(self, world: World) -> None:
        """The backend's certificate, verified for its name, and its own answer; an access line names it."""
        serial, answer = _handshake(world.passing, "pass.pt.test", world.ca, b"hello\n")
        assert (serial, answer) == (world.echo_serial, b"passed hello\n")
        assert serial != world.own_serial
        lines = [e for e in world.ferryman.log_events() if e.get("event") == "tcp_access"
                 and e.get("server_name") == "pass.pt.test"]
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = [e for e in world.ferryman.log_events() if e.get("event") == "tcp_access"
                     and e.get("server_name") == "pass.pt.test"]
        assert lines and lines[-1]["service"] == "pt-echo" and lines[-1]["listener"] == f"127.0.0.1:{world.passing}"

    def test_client_hello_in_one_byte_segments(self, world: World) -> None:
        """A ClientHello trickling in one byte per segment is still peeked at whole, then passed through."""
        tls, incoming, outgoing, hello = client_hello("pass.pt.test", world.ca.client_context())
        der = handshake_in_byte_segments(world.passing, tls, incoming, outgoing, hello)
        assert describe(der).serial == world.echo_serial

    def test_listener_without_the_setting_terminates_the_name(self, world: World) -> None:
        """The same name on a TLS listener not in tls_passthrough gets Ferryman's certificate."""
        context = world.ca.client_context()
        with socket.create_connection(("127.0.0.1", world.terminating), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="pass.pt.test") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None and describe(der).serial == world.own_serial


class TestTerminated:
    """Every other name on the same listener is Ferryman's TLS and HTTP, as on any TLS listener."""

    async def test_http_route_gets_ferrymans_certificate(self, world: World, http_backend: Backend) -> None:
        """An HTTP route's name: Ferryman's certificate, the HTTP backend's answer, X-Forwarded-Proto https."""
        assert (await asyncio.to_thread(_handshake, world.passing, "term.pt.test", world.ca))[0] == world.own_serial
        status, body = await asyncio.to_thread(_curl, world.passing, "term.pt.test", world.ca, "/hello")
        assert status == 200
        headers = dict(json.loads(body)["headers"])
        assert headers["X-Forwarded-Proto"] == "https"
        assert http_backend.hits[-1].path == "/hello"

    def test_unknown_name_is_terminated(self, world: World) -> None:
        """A name no route has, TCP or HTTP: Ferryman's certificate and its 404."""
        assert _handshake(world.passing, "nobody.pt.test", world.ca)[0] == world.own_serial
        assert _curl(world.passing, "nobody.pt.test", world.ca)[0] == 404

    @pytest.mark.parametrize(
        "data", [b"GET / HTTP/1.1\r\nHost: pass.pt.test\r\n\r\n", b""], ids=["not-tls", "silent"])
    def test_no_client_hello_never_reaches_the_backend(self, world: World, data: bytes) -> None:
        """Plain text, or nothing within sni_hello_timeout: closed, the pass-through backend never contacted."""
        accepted = world.echo.accepted
        with socket.create_connection(("127.0.0.1", world.passing), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(data)
            sock.settimeout(HELLO_S + 5)
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < HELLO_S + 4
        assert world.echo.accepted == accepted
