"""peek_hello: a TLS listener of tls_passthrough reads the ClientHello's server name without taking a byte from
the socket, however the client splits it, so the TLS handshake or the relay that takes the connection next reads
it whole. A real loopback connection on the running event loop."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from proxy.proxied import peek_hello
from proxy.tcp.sni import NotHello


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """An accepted loopback TCP connection (non-blocking) and its client (TCP_NODELAY: small writes go out as
    small segments)."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        client = socket.create_connection(listening.getsockname())
        server, _ = listening.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setblocking(False)
    return server, client


def _client_hello(name: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class TestPeekHello:
    """The name, with every byte left in the socket; NotHello for what is no ClientHello."""

    @pytest.mark.parametrize("segment", [1, 7, 100_000], ids=["one-byte-segments", "seven-byte", "one-write"])
    async def test_name_read_and_bytes_left(self, segment: int) -> None:
        hello = _client_hello("pass.example.test")
        server, client = _tcp_pair()
        loop = asyncio.get_running_loop()
        try:
            peek = loop.create_task(peek_hello(loop, server))
            for start in range(0, len(hello), segment):
                client.sendall(hello[start:start + segment])
                await asyncio.sleep(0.001 if segment == 1 and start % 64 == 0 else 0)
            found = await asyncio.wait_for(peek, 5)
            assert found.name == "pass.example.test"
            assert server.recv(len(hello) + 10) == hello  # nothing was taken
        finally:
            server.close()
            client.close()

    @pytest.mark.parametrize(
        "data",
        [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", b""],
        ids=["plain-text", "not-a-client-hello", "closed-at-once"],
    )
    async def test_not_a_client_hello(self, data: bytes) -> None:
        server, client = _tcp_pair()
        loop = asyncio.get_running_loop()
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            with pytest.raises(NotHello):
                await asyncio.wait_for(peek_hello(loop, server), 5)
        finally:
            server.close()
            client.close()
