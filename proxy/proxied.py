"""Listeners that read a connection's first bytes themselves before handing it to asyncio: behind a TCP load
balancer that speaks the PROXY protocol (`proxy_protocol`), and TLS listeners that pass some server names
through untouched (`tls_passthrough`, Fabio's `https+tcp+sni`).

Such a listener accepts sockets itself rather than through `loop.create_server` (`Acceptor`). With a PROXY
header expected, a connection from a peer that is not one of `trusted_proxies` is closed at once (anyone else
could name any address); from a trusted peer the header is read straight from the socket within
`proxy_protocol_timeout`, peeking first and then taking exactly the header's bytes, so whatever follows (an
HTTP request, a TLS ClientHello, a TCP client's bytes) is still in the socket when the connection is handed
over; the header's client is then the client for the access log, X-Forwarded-For, allow/deny and hashing.
A pass-through TLS listener then peeks at the ClientHello (`peek_hello`, without taking a byte) and hands a
connection whose server name has a `proto=tcp` route to a TCP relay, the others to asyncio's TLS as always.
Nothing here runs for a listener without these settings: its connections are created as always, and no request
pays for the features. Parsing is proxy/proxyproto.py's and proxy/tcp/sni.py's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import structlog

from .h1.client import ClientConnection
from .proxyproto import MAX_HEADER, ProxyHeader, ProxyProtocolError, parse
from .tcp.sni import MAX_HELLO, Hello, NotHello, read_hello

if TYPE_CHECKING:
    from .headers import TrustedProxies
    from .listener import ProxyContext, ProxyServer
    from .tcp.listener import TcpServer

log = structlog.get_logger("ferryman.proxy")

_LOG_EVERY_S: Final = 10.0  # refusals are counted and logged at most this often: a scan must not flood the log

# What a listener hands an accepted socket to, once its PROXY header (if any) is read: True when the socket
# is handed over (its new owner closes it), False to have it closed.
HandOver = Callable[[socket.socket, ProxyHeader | None], Awaitable[bool]]
# The listener's PROXY settings now (a reload replaces them): the trusted proxies and the header's timeout.
HeaderLimits = Callable[[], "tuple[TrustedProxies | None, float]"]


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


async def peek_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket, limit: int = MAX_HELLO) -> Hello:
    """The TLS ClientHello at the start of a non-blocking socket, read without taking a byte (the TLS handshake
    or the relay reads them after); NotHello when the bytes are no ClientHello or the peer closes first."""
    lowered = False
    try:
        while True:
            await _readable(loop, sock)
            try:
                peeked = sock.recv(limit + 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not peeked:
                raise NotHello("the connection closed before its ClientHello ended")
            hello = read_hello(peeked, limit)
            if hello is not None:
                return hello
            # The peeked bytes stay in the socket, so it stays readable: wake only when more than these are
            # there (Linux's poll honours SO_RCVLOWAT on TCP; a close still wakes), or a split ClientHello
            # would spin.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(peeked) + 1)
            lowered = True
    finally:
        if lowered:  # whoever reads next reads as usual
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


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


class Acceptor:
    """The accept loop of one listener that reads before the hand-over, and the connections being read.
    `header_limits` None: no PROXY header is expected (a pass-through TLS listener alone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, hand: HandOver,
                 header_limits: HeaderLimits | None) -> None:
        self.loop, self.sock, self.hand, self.header_limits = loop, sock, hand, header_limits
        self.pending: set[asyncio.Task[None]] = set()
        self._refused: dict[str, int] = {}
        self._logged_at = float("-inf")

    async def run(self) -> None:
        loop = self.loop
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
        handed = False
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            header = None
            if self.header_limits is not None:
                trusted, timeout = self.header_limits()
                if trusted is None or peer.encode() not in trusted:
                    self._refuse("untrusted_peer", peer)
                    return
                try:
                    async with asyncio.timeout(timeout):
                        header = await read_header(self.loop, conn)
                except TimeoutError:
                    self._refuse("header_timeout", peer)
                    return
                except (ProxyProtocolError, OSError) as exc:
                    self._refuse("invalid_header", peer, str(exc))
                    return
            handed = await self.hand(conn, header)  # from here the new owner closes the socket
        except (OSError, ssl.SSLError) as exc:
            log.debug("accepted_connection_failed", client=peer, error=str(exc))
        finally:
            if not handed:
                conn.close()

    def _refuse(self, reason: str, peer: str, error: str = "") -> None:
        """Closed without a word (the peer is no client yet); logged at most every 10 s, with counts."""
        self._refused[reason] = self._refused.get(reason, 0) + 1
        now = self.loop.time()
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


def http_hand_over(server: ProxyServer, tls: ssl.SSLContext | None, passthrough: TcpServer | None) -> HandOver:
    """How an HTTP(S) listener takes an accepted socket: with `passthrough` (a TLS listener of tls_passthrough),
    a ClientHello whose server name has a `proto=tcp` route goes to that TCP relay, untouched; everything else
    to asyncio (with TLS for an HTTPS listener) as a client connection."""
    cfg = server.cfg

    async def hand(conn: socket.socket, header: ProxyHeader | None) -> bool:
        if passthrough is not None:
            try:
                async with asyncio.timeout(passthrough.ctx.settings.hello_timeout):
                    hello = await peek_hello(cfg.loop, conn)
            except TimeoutError:
                return False  # nothing to terminate nor to pass on: closed, as a silent client is
            except NotHello:
                hello = None  # the TLS handshake says what it is to the client, as on any TLS listener
            if hello is not None and hello.name and passthrough.route_for(hello.name) is not None:
                return await passthrough.adopt(conn, header)
        client = header.source[0] if header is not None and header.source is not None else None
        try:
            await cfg.loop.connect_accepted_socket(lambda: ProxiedConnection(cfg, server, client), conn, ssl=tls)
        except (OSError, ssl.SSLError) as exc:  # a failed handshake: the transport has closed the socket
            log.debug("accepted_connection_failed", client=client, error=str(exc))
        return True

    return hand
