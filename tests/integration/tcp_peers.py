"""Real peers for the TCP and TLS pass-through tests: Debian's redis-server, a TLS echo server with its own
certificate, and a backend that reads a PROXY protocol v2 header; each counts the connections it accepted.

Everything listens on 127.0.0.1 on a free port and is stopped by the test that started it (redis-server by its
PID). Redis comes from .venv/bin (unpacked there by `make test-debs`) or from PATH.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

from .harness import debian_binary, free_port, wait_until


def redis_binary(name: str) -> str:
    """A Redis command (redis-server from Debian's redis-server, redis-cli and redis-benchmark from redis-tools)."""
    return debian_binary(name, "redis-server" if name == "redis-server" else "redis-tools")


class Redis:
    """A throwaway redis-server: no persistence, loopback only."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            [redis_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_until(lambda: self.command("PING") == "PONG", 10, f"redis-server on {self.port}")
        return self

    def command(self, *args: str, port: int | None = None) -> str:
        """redis-cli's answer to one command, against this server or `port` (Ferryman's listener)."""
        done = subprocess.run([redis_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port or self.port), *args],
                              capture_output=True, timeout=10, check=False)
        return done.stdout.decode().strip()

    def clients(self) -> int:
        """Client connections redis-server has accepted since it started (INFO stats)."""
        for line in self.command("INFO", "stats").splitlines():
            if line.startswith("total_connections_received:"):
                return int(line.split(":")[1])
        raise AssertionError("no total_connections_received in INFO stats")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class LineServer:
    """A threaded TCP server; `handle(conn)` serves one accepted connection. Counts what it accepted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> LineServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                self.handle(conn)
            except (OSError, ssl.SSLError, ValueError):
                pass  # the tests that close early or send garbage end here

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(5)
        self._sock.close()


class TlsEcho(LineServer):
    """TLS with its own certificate; answers each line with `<name> <line>`."""

    def __init__(self, name: str, cert: Path, key: Path) -> None:
        super().__init__()
        self.name = name
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))

    def handle(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            reader = tls.makefile("rb")
            for line in reader:
                tls.sendall(f"{self.name} ".encode() + line)


def read_proxy_v2(conn: socket.socket) -> tuple[str, int, str, int]:
    """Read a PROXY protocol v2 header (HAProxy's spec, section 2.2) off `conn`: (source address, source port,
    destination address, destination port)."""
    head = _exactly(conn, 16)
    if head[:12] != b"\r\n\r\n\x00\r\nQUIT\n" or head[12] != 0x21:
        raise ValueError(f"not a PROXY v2 PROXY command: {head!r}")
    family, length = head[13], struct.unpack("!H", head[14:16])[0]
    body = _exactly(conn, length)
    size = {0x11: 4, 0x21: 16}[family]
    source = str(ipaddress.ip_address(body[:size]))
    destination = str(ipaddress.ip_address(body[size:2 * size]))
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return source, sport, destination, dport


def _exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("closed inside the PROXY header")
        data += chunk
    return data


class ProxyV2Backend(LineServer):
    """Reads the PROXY v2 header Ferryman sends, then answers `source-ip source-port` and echoes the rest."""

    def handle(self, conn: socket.socket) -> None:
        source, sport, _, _ = read_proxy_v2(conn)
        conn.sendall(f"{source} {sport}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


def client_hello(name: str | None, context: ssl.SSLContext | None = None,
                 ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A client's TLS state and the ClientHello it sends first (SNI `name`, or none); `context` checks the
    server's certificate, by default nothing is checked."""
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return tls, incoming, outgoing, outgoing.read()
    raise AssertionError("a TLS client finished its handshake with no server")


def handshake_in_byte_segments(port: int, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                               hello: bytes) -> bytes:
    """A TLS handshake through 127.0.0.1:`port` whose ClientHello (`hello`, read off `outgoing`) goes one byte
    per segment; the server's certificate, as it arrived (DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in hello:
            sock.sendall(bytes([byte]))
            time.sleep(0.001)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        sock.sendall(outgoing.read())
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der
