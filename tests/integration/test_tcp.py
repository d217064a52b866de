"""TCP and TLS pass-through routes (Fabio's `urlprefix-:PORT proto=tcp` and `urlprefix-NAME/ proto=tcp`), with
real peers: Debian's redis-server and redis-cli behind a TCP listener, two TLS servers with their own
certificates behind an SNI listener (the client gets each one's certificate untouched), a backend reading the
PROXY v2 header, and hostile clients on the SNI listener. A real Consul agent; Ferryman as a process."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .certs import TestCA, describe
from .harness import ConsulAgent, FerrymanProcess, free_port, wait_until
from .tcp_peers import ProxyV2Backend, Redis, TlsEcho, client_hello, handshake_in_byte_segments

pytestmark = pytest.mark.integration

IDLE_S = 3.0
HELLO_S = 1.0


class Ports:
    def __init__(self) -> None:
        self.redis, self.proxied, self.sni = free_port(), free_port(), free_port()


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def proxy(consul: ConsulAgent, workdir: Path, ports: Ports) -> Iterator[FerrymanProcess]:
    proc = FerrymanProcess(consul.addr, workdir, extra=[
        "--tcp-listen", f"127.0.0.1:{ports.redis},127.0.0.1:{ports.proxied}", "--sni-listen", f"127.0.0.1:{ports.sni}",
        "--tcp-idle-timeout", str(IDLE_S), "--sni-hello-timeout", str(HELLO_S), "--connect-timeout", "1",
    ])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def redises(workdir: Path) -> Iterator[list[Redis]]:
    started = [Redis(workdir).start(), Redis(workdir).start()]
    yield started
    for redis in started:
        redis.stop()


@pytest.fixture(scope="module")
def tls_backends(
    workdir: Path, consul: ConsulAgent, proxy: FerrymanProcess,
) -> Iterator[tuple[TestCA, TlsEcho, TlsEcho]]:
    ca = TestCA(workdir / "tcp-ca")
    _, cert_a, key_a = ca.issue_files(ca.directory, "a", "a.tls.test")
    _, cert_b, key_b = ca.issue_files(ca.directory, "b", "*.b.tls.test")
    a, b = TlsEcho("alpha", cert_a, key_a), TlsEcho("beta", cert_b, key_b)
    a.start()
    b.start()
    consul.register("tls-a", "tls-a-0", a.port, ["urlprefix-a.tls.test/ proto=tcp"])
    consul.register("tls-b", "tls-b-0", b.port, ["urlprefix-*.b.tls.test/ proto=tcp"])
    proxy.wait_instances("tls-a@a.tls.test", ["tls-a-0"])
    proxy.wait_instances("tls-b@*.b.tls.test", ["tls-b-0"])
    yield ca, a, b
    consul.deregister("tls-a-0")
    consul.deregister("tls-b-0")
    a.stop()
    b.stop()


def _metrics(proxy: FerrymanProcess) -> str:
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _tcp_lines(proxy: FerrymanProcess) -> list[dict[str, object]]:
    return [e for e in proxy.log_events() if e.get("event") == "tcp_access"]


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the other side closed the connection (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


class TestRedisBehindATcpRoute:
    """redis-cli through `urlprefix-:PORT proto=tcp` reaches the service's redis-servers, balanced."""

    def test_commands_answered_and_both_instances_used(
        self, consul: ConsulAgent, proxy: FerrymanProcess, redises: list[Redis], ports: Ports,
    ) -> None:
        """SET then GET through Ferryman; fresh connections land on both instances; each is counted and logged."""
        for i, redis in enumerate(redises):
            consul.register("redis-tcp", f"redis-tcp-{i}", redis.port, [f"urlprefix-:{ports.redis} proto=tcp"])
        proxy.wait_instances(f"redis-tcp@*any*:{ports.redis}", ["redis-tcp-0", "redis-tcp-1"])
        before = [r.clients() for r in redises]
        assert redises[0].command("SET", "where", "first") == "OK"
        assert redises[1].command("SET", "where", "second") == "OK"
        answers = {redises[0].command("GET", "where", port=ports.redis) for _ in range(12)}
        assert answers == {"first", "second"}
        assert all(r.clients() > b for r, b in zip(redises, before, strict=True))
        route = next(r for r in proxy.routes()["routes"] if r["id"] == f"redis-tcp@*any*:{ports.redis}")
        assert route["proto"] == "tcp"
        wait_until(lambda: _sample(_metrics(proxy), "ferryman_tcp_connections_total", service="redis-tcp",
                                   result="client_closed") >= 12, 10, "12 connections counted")
        text = _metrics(proxy)
        assert _sample(text, "ferryman_tcp_bytes_total", service="redis-tcp", direction="in") > 0
        assert _sample(text, "ferryman_tcp_bytes_total", service="redis-tcp", direction="out") > 0
        assert _sample(text, "ferryman_tcp_connect_duration_seconds_count", service="redis-tcp") >= 12
        line = _tcp_lines(proxy)[-1]
        assert line["service"] == "redis-tcp" and line["instance"] in ("redis-tcp-0", "redis-tcp-1")
        assert line["listener"] == f"127.0.0.1:{ports.redis}" and line["end"] == "client_closed"
        assert isinstance(line["bytes_in"], int) and line["bytes_in"] > 0 and isinstance(line["bytes_out"], int)

    def test_failed_connect_tried_on_another_instance(
        self, consul: ConsulAgent, proxy: FerrymanProcess, redises: list[Redis], ports: Ports,
    ) -> None:
        """An instance nothing listens on costs no client a failed connection: the next instance takes it."""
        consul.register("redis-tcp", "redis-tcp-dead", free_port(), [f"urlprefix-:{ports.redis} proto=tcp"])
        proxy.wait_instances(f"redis-tcp@*any*:{ports.redis}", ["redis-tcp-0", "redis-tcp-1", "redis-tcp-dead"])
        try:
            assert [redises[0].command("PING", port=ports.redis) for _ in range(15)] == ["PONG"] * 15
            failed = [e for e in proxy.log_events() if e.get("event") == "tcp_connect_failed"]
            assert failed and all(e["instance"] == "redis-tcp-dead" for e in failed)
        finally:
            consul.deregister("redis-tcp-dead")

    def test_deregistered_instance_drains(
        self, consul: ConsulAgent, proxy: FerrymanProcess, redises: list[Redis], ports: Ports,
    ) -> None:
        """A connection open to an instance that leaves Consul goes on; new connections go to the others."""
        held = socket.create_connection(("127.0.0.1", ports.redis), timeout=5)
        held.sendall(b"GET where\r\n")
        owner = held.recv(100).split(b"\r\n")[1].decode()  # first or second
        leaving = 0 if owner == "first" else 1
        consul.deregister(f"redis-tcp-{leaving}")
        try:
            proxy.wait_instances(f"redis-tcp@*any*:{ports.redis}", [f"redis-tcp-{1 - leaving}"])
            answers = {redises[0].command("GET", "where", port=ports.redis) for _ in range(6)}
            assert answers == {"second" if leaving == 0 else "first"}
            held.sendall(b"GET where\r\n")
            assert held.recv(100).split(b"\r\n")[1].decode() == owner
        finally:
            held.close()
            consul.register("redis-tcp", f"redis-tcp-{leaving}", redises[leaving].port,
                            [f"urlprefix-:{ports.redis} proto=tcp"])
        proxy.wait_instances(f"redis-tcp@*any*:{ports.redis}", ["redis-tcp-0", "redis-tcp-1"])

    def test_idle_connection_closed(self, proxy: FerrymanProcess, redises: list[Redis], ports: Ports) -> None:
        """A connection passing no byte for tcp_idle_timeout is closed, and its access line says idle."""
        with socket.create_connection(("127.0.0.1", ports.redis), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
            started = time.monotonic()
            assert _closed_by_peer(sock, IDLE_S + 3)
            assert time.monotonic() - started >= IDLE_S - 0.5
        wait_until(lambda: any(e["end"] == "idle" for e in _tcp_lines(proxy)), 5, "an idle access line")


class TestProxyProtocol:
    """`pxyproto=v2` sends the client's address to the instance in a PROXY v2 header."""

    def test_backend_reads_the_client_address(self, consul: ConsulAgent, proxy: FerrymanProcess,
                                              ports: Ports) -> None:
        """The backend reads the client socket's own address and port from the header, then the bytes follow."""
        backend = ProxyV2Backend().start()
        try:
            consul.register("pxy", "pxy-0", backend.port, [f"urlprefix-:{ports.proxied} proto=tcp pxyproto=v2"])
            proxy.wait_instances(f"pxy@*any*:{ports.proxied}", ["pxy-0"])
            with socket.create_connection(("127.0.0.1", ports.proxied), timeout=5) as sock:
                reader = sock.makefile("rb")
                assert reader.readline().decode().split() == ["127.0.0.1", str(sock.getsockname()[1])]
                sock.sendall(b"after the header\n")
                assert reader.readline() == b"after the header\n"
        finally:
            consul.deregister("pxy-0")
            backend.stop()


def _tls_exchange(port: int, name: str | None, ca: TestCA, line: bytes = b"hello\n") -> tuple[int, bytes]:
    """A verified TLS handshake through Ferryman's SNI listener asking for `name`: (the presented
    certificate's serial, the answer to `line`)."""
    context = ca.client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(line)
        return describe(der).serial, tls.makefile("rb").readline()


class TestSniPassThrough:
    """TLS connections routed by the ClientHello's server name, never decrypted."""

    def test_each_backend_presents_its_own_certificate(
        self, proxy: FerrymanProcess, ports: Ports, tls_backends: tuple[TestCA, TlsEcho, TlsEcho],
    ) -> None:
        """An exact name and a `*.` wildcard reach their own servers, whose certificates arrive untouched."""
        ca, _, _ = tls_backends
        serial_a, answer_a = _tls_exchange(ports.sni, "a.tls.test", ca)
        serial_b, answer_b = _tls_exchange(ports.sni, "x.b.tls.test", ca)
        assert (answer_a, answer_b) == (b"alpha hello\n", b"beta hello\n")
        assert serial_a == x509_serial(ca, "a") and serial_b == x509_serial(ca, "b")
        wait_until(lambda: any(e["service"] == "tls-b" and e["server_name"] == "x.b.tls.test"
                               for e in _tcp_lines(proxy)), 5, "the access line of the tls-b connection")

    def test_client_hello_in_one_byte_segments(
        self, ports: Ports, tls_backends: tuple[TestCA, TlsEcho, TlsEcho],
    ) -> None:
        """A ClientHello trickling in one byte per segment is still read, routed and replayed whole."""
        ca, _, _ = tls_backends
        tls, incoming, outgoing, hello = client_hello("a.tls.test")
        der = handshake_in_byte_segments(ports.sni, tls, incoming, outgoing, hello)
        assert describe(der).serial == x509_serial(ca, "a")

    @pytest.mark.parametrize(
        "send",
        [
            pytest.param(lambda: client_hello(None)[3], id="no-sni"),
            pytest.param(lambda: client_hello("nobody.example")[3], id="unknown-name"),
            pytest.param(lambda: b"GET / HTTP/1.1\r\nHost: a.tls.test\r\n\r\n", id="not-tls"),
            pytest.param(lambda: b"\x16\x03\x01\x00\x09\x01\x00\x00\x05\x03\x03\x00\x00\x00", id="truncated"),
            pytest.param(lambda: b"\x16\x03\x01\x3e\x80\x01\x00\x9c\x40" + bytes(16_000 - 4), id="oversized"),
            pytest.param(lambda: b"", id="silent"),
        ],
    )
    def test_hostile_clients_closed_without_an_upstream(
        self, proxy: FerrymanProcess, ports: Ports, tls_backends: tuple[TestCA, TlsEcho, TlsEcho],
        send: object,
    ) -> None:
        """No name, an unknown name, plain text, a truncated or oversized ClientHello, or nothing at all: the
        connection is closed within the ClientHello's time bound and no backend is connected to."""
        _, alpha, beta = tls_backends
        accepted = alpha.accepted + beta.accepted
        assert callable(send)
        with socket.create_connection(("127.0.0.1", ports.sni), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(send())
            assert _closed_by_peer(sock, HELLO_S + 3)
            assert time.monotonic() - started < HELLO_S + 2
        time.sleep(0.2)
        assert alpha.accepted + beta.accepted == accepted


def x509_serial(ca: TestCA, stem: str) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate((ca.directory / f"{stem}.pem").read_bytes()).serial_number)


class TestVisible:
    """/api/routes and the metrics show TCP routes and their open connections."""

    def test_routes_and_open_connection_gauge(self, proxy: FerrymanProcess, redises: list[Redis], ports: Ports,
                                              consul: ConsulAgent) -> None:
        """The TCP route is listed with its instances; an open connection shows in ferryman_tcp_connections."""
        for i, redis in enumerate(redises):
            consul.register("redis-tcp", f"redis-tcp-{i}", redis.port, [f"urlprefix-:{ports.redis} proto=tcp"])
        proxy.wait_instances(f"redis-tcp@*any*:{ports.redis}", ["redis-tcp-0", "redis-tcp-1"])
        document = proxy.routes()
        assert json.dumps(document)  # a JSON document
        ids = {r["id"] for r in document["routes"]}
        assert f"redis-tcp@*any*:{ports.redis}" in ids
        with socket.create_connection(("127.0.0.1", ports.redis), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
            wait_until(lambda: _sample(_metrics(proxy), "ferryman_tcp_connections", service="redis-tcp") == 1, 10,
                       "one open connection in the gauge")
        wait_until(lambda: _sample(_metrics(proxy), "ferryman_tcp_connections", service="redis-tcp") == 0, 10,
                   "the gauge back at 0")
        assert re.search(r"ferryman_tcp_connections\{service=\"redis-tcp\"\} 0", _metrics(proxy))


class TestUnlistenedRoute:
    """A TCP route naming a port no TCP listener has is logged once and shown with a warning."""

    def test_logged_once_and_shown(self, consul: ConsulAgent, proxy: FerrymanProcess, redises: list[Redis]) -> None:
        """The warning comes once while the route stays, however often its service changes; /api/routes says why;
        routes a listener takes carry no warning."""
        port = free_port()
        route_id = f"orphan@*any*:{port}"
        consul.register("orphan", "orphan-0", redises[0].port, [f"urlprefix-:{port} proto=tcp"])
        try:
            proxy.wait_instances(route_id, ["orphan-0"])
            consul.register("orphan", "orphan-1", redises[1].port, [f"urlprefix-:{port} proto=tcp"])
            proxy.wait_instances(route_id, ["orphan-0", "orphan-1"])
            warnings = [e for e in proxy.log_events() if e.get("event") == "tcp_route_without_listener"
                        and e.get("route") == route_id]
            assert len(warnings) == 1
            assert warnings[0]["detail"] == f"no TCP listener on port {port} (tcp_listen)"
            routes = {r["id"]: r for r in proxy.routes()["routes"]}
            assert routes[route_id]["warning"] == f"no TCP listener on port {port} (tcp_listen)"
            assert all(r["warning"] is None for r in routes.values() if r["id"] != route_id)
        finally:
            consul.deregister("orphan-0")
            consul.deregister("orphan-1")
