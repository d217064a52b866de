"""Listeners behind a TCP load balancer that speaks the PROXY protocol (`proxy_protocol`): each connection starts
with a header naming the client, which then is the client for the access log, X-Forwarded-For, allow/deny and
`hash_key=ip`.

Such a listener accepts sockets itself rather than through `loop.create_server`: a connection from a peer that
is not one of `trusted_proxies` is closed at once (anyone else could name any address); from a trusted peer the
header is read straight from the socket within `proxy_protocol_timeout`, peeking first and then taking exactly
the header's bytes, so whatever follows (an HTTP request, or a TLS ClientHello: the header comes before the
handshake) is still in the socket when the connection is handed to asyncio (`connect_accepted_socket`, with TLS
for an HTTPS listener). Nothing here runs for a listener without the setting: its connections are created as
always, and no request pays for the feature. Parsing is proxy/proxyproto.py's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Final

import structlog

from .h1.client import ClientConnection
from .proxyproto import MAX_HEADER, ProxyHeader, ProxyProtocolError, parse

if TYPE_CHECKING:
    from .listener import ProxyContext, ProxyServer

log = structlog.get_logger("ferryman.proxy")

_LOG_EVERY_S: Final = 10.0  # refusals are counted and logged at most this often: a scan must not flood the log


class ProxiedConnection(ClientConnection):
    """A client connection whose client is the one its PROXY header named (None: the socket's own peer)."""

    __slots__ = ("proxied",)

    def __init__(self, cfg: ProxyContext, server: ProxyServer, proxied: str | None) -> None:
        super().__init__(cfg, server)
        self.proxied = proxied

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.proxied is None:
            super().connection_made(transport)
        else:
            self.begin(transport, self.proxied)


def listening_socket(host: str, port: int, *, reuse_port: bool, backlog: int) -> socket.socket:
    """A bound, listening, non-blocking socket for the first address `host` resolves to."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ProxyHeader:
    """The PROXY header at the start of a non-blocking socket, taking exactly its bytes from the socket;
    ProxyProtocolError when the bytes are not one or the peer closes first."""
    taken = b""
    while True:
        await _readable(loop, sock)
        try:
            peeked = sock.recv(MAX_HEADER - len(taken), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peeked:
            raise ProxyProtocolError("the connection closed before its PROXY header ended")
        header = parse(taken + peeked)
        if header is not None:
            _take(sock, header.length - len(taken))
            return header
        _take(sock, len(peeked))  # every byte so far belongs to the header: taken, so readiness means news
        taken += peeked


def _take(sock: socket.socket, count: int) -> None:
    while count > 0:  # the bytes were peeked: they are in the socket's buffer
        count -= len(sock.recv(count))


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class ProxiedAcceptor:
    """The accept loop of one PROXY-protocol listener and the headers being read."""

    def __init__(self, server: ProxyServer, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self.server, self.sock, self.tls = server, sock, tls
        self.pending: set[asyncio.Task[None]] = set()
        self._refused: dict[str, int] = {}
        self._logged_at = float("-inf")

    async def run(self) -> None:
        loop = self.server.cfg.loop
        while True:
            try:
                conn, address = await loop.sock_accept(self.sock)
            except OSError as exc:  # out of file descriptors: the kernel keeps the rest queued meanwhile
                log.error("accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn, address[0] if isinstance(address, tuple) else ""))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        cfg = self.server.cfg
        handed = False
        try:
            trusted = cfg.limits.trusted
            if trusted is None or peer.encode() not in trusted:
                self._refuse("untrusted_peer", peer)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                async with asyncio.timeout(cfg.limits.proxy_header_timeout):
                    header = await read_header(cfg.loop, conn)
            except TimeoutError:
                self._refuse("header_timeout", peer)
                return
            except (ProxyProtocolError, OSError) as exc:
                self._refuse("invalid_header", peer, str(exc))
                return
            client = header.source[0] if header.source is not None else None
            handed = True  # from here the transport owns the socket (and closes it on a failed handshake)
            await cfg.loop.connect_accepted_socket(
                lambda: ProxiedConnection(cfg, self.server, client), conn, ssl=self.tls)
        except (OSError, ssl.SSLError) as exc:
            log.debug("proxied_connection_failed", client=peer, error=str(exc))
        finally:
            if not handed:
                conn.close()

    def _refuse(self, reason: str, peer: str, error: str = "") -> None:
        """Closed without a word (the peer is no HTTP client yet); logged at most every 10 s, with counts."""
        self._refused[reason] = self._refused.get(reason, 0) + 1
        now = self.server.cfg.loop.time()
        if now - self._logged_at >= _LOG_EVERY_S:
            log.warning("proxy_protocol_refused", reason=reason, client=peer, error=error or None,
                        refused=dict(self._refused))
            self._refused.clear()
            self._logged_at = now

    async def stop(self) -> None:
        for task in list(self.pending):
            task.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)
        self.sock.close()
