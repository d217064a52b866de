"""An HTTP/2 client connection in process: Ferryman's side on a fake transport and a fake upstream, the client an
`h2` client-side state machine, so tests drive and read the protocol frame by frame (no sockets, no Consul)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import Event
from prometheus_client import CollectorRegistry

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.h1.client import ClientConnection
from proxy.h1.upstream import PoolKey, UpstreamConnection, UpstreamPool
from proxy.h2.connection import H2ClientConnection
from proxy.h2.limits import H2Limits
from proxy.listener import DEFAULT_H2, ListenerLimits, ProxyContext, ProxyServer, Router
from proxy.metrics import Metrics
from proxy.pool import Pools
from proxy.table import RoutingTable

from .. import worlds

A = Endpoint("web", "web-a", "127.0.0.1", 9001)


class FakeLoop(worlds.FakeLoop):
    """An exchange's fake loop, plus what the HTTP/2 connection asks: a call at the end of this turn (run at once,
    unless `soon` collects them for a test to run with `run_soon`)."""

    def __init__(self) -> None:
        super().__init__()
        self.soon: list[Callable[[], None]] | None = None

    def call_soon(self, callback: Callable[[], None]) -> None:
        if self.soon is None:
            callback()
        else:
            self.soon.append(callback)

    def run_soon(self) -> None:
        calls, self.soon = self.soon or [], []
        for callback in calls:
            callback()


# Subclasses of the real classes: the compiled build (proxy/compiled.py) checks the types the exchange is given.
class FakeConn(UpstreamConnection):
    """An upstream connection: records the bytes it is sent and whether it is read."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.sent = bytearray()
        self.sink: Any = None
        self.reading = True
        self.detached = False

    def send(self, head: bytes, sink: Any, *, head_request: bool, upgrade: bool = False) -> None:
        self.sent += head
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.sent += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def detach(self) -> None:
        self.detached = True


class FakeUpstream(UpstreamPool):
    def __init__(self) -> None:
        self.conns: list[FakeConn] = []
        self.released: list[tuple[FakeConn, bool]] = []

    def take_idle(self, key: PoolKey, now: float) -> FakeConn:
        conn = FakeConn(key)
        self.conns.append(conn)
        return conn

    async def connect(self, key: PoolKey, timeout: float = 0.0) -> FakeConn:
        return self.take_idle(key, 0.0)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        assert isinstance(conn, FakeConn)
        self.released.append((conn, reusable))


class FakeTransport(asyncio.Transport):
    def __init__(self, tls_alpn: str | None = None) -> None:
        super().__init__()
        self.out = bytearray()
        self.writes = 0
        self.closed = False
        self.protocol: Any = None
        self.buffered = 0
        self.alpn = tls_alpn

    def write(self, data: Any) -> None:
        self.out += data
        self.writes += 1

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("10.0.0.1", 5000)
        if name == "ssl_object" and self.alpn is not None:
            return _SslObject(self.alpn)
        return default


class _SslObject:
    def __init__(self, alpn: str) -> None:
        self.alpn = alpn

    def selected_alpn_protocol(self) -> str:
        return self.alpn


def context(loop: Any, upstream: Any, h2: H2Limits | None = DEFAULT_H2, **limits: Any) -> ProxyContext:
    snapshot = Snapshot((ServiceRoutes("web", (parse_route_tag("urlprefix-example.com/"),), (A,)),))
    pools = Pools()
    pools.reconcile(snapshot)
    return ProxyContext(
        router=Router(RoutingTable.from_snapshot(snapshot)), pools=pools, upstream=upstream,
        metrics=Metrics(registry=CollectorRegistry()), listen_port=8080, proto="https", access_log=None,
        loop=loop, limits=replace(ListenerLimits(), h2=h2, **limits),
    )


class Wire:
    """Ferryman's HTTP/2 connection and a client speaking to it; `send()` delivers the client's frames and
    returns the client's events from Ferryman's answer."""

    def __init__(self, limits: H2Limits | None = None, *, client_settings: dict[int, int] | None = None,
                 **listener: Any) -> None:
        self.loop = FakeLoop()
        self.upstream = FakeUpstream()
        self.limits = limits or H2Limits()
        self.ctx = context(self.loop, self.upstream, self.limits, **listener)
        self.server = ProxyServer(self.ctx)
        self.proxy = H2ClientConnection(self.ctx, self.server, self.limits)
        self.transport = FakeTransport()
        self.proxy.connection_made(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.events: list[Event] = []
        self.send()

    def send(self, raw: bytes = b"") -> list[Event]:
        """The client's pending frames (and `raw` bytes) to Ferryman; Ferryman's answer back to the client."""
        self.proxy.data_received(self.client.data_to_send() + raw)
        return self.receive()

    def receive(self) -> list[Event]:
        events = self.client.receive_data(self.transport.take())
        self.events += events
        out = self.client.data_to_send()
        if out and not self.transport.closed:
            self.proxy.data_received(out)
            events += self.client.receive_data(self.transport.take())
        return events

    def request(self, path: bytes = b"/", *, method: bytes = b"GET", authority: bytes = b"example.com",
                extra: list[tuple[bytes, bytes]] | None = None, end_stream: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [
            (b":method", method), (b":scheme", b"https"), (b":authority", authority), (b":path", path),
            *(extra or []),
        ], end_stream=end_stream)
        return sid

    @property
    def conn(self) -> FakeConn:
        self.loop.run_tasks()
        return self.upstream.conns[-1]


def plain_client(h2: H2Limits | None = DEFAULT_H2, alpn: str | None = None) -> tuple[ClientConnection, FakeTransport]:
    """An HTTP/1.1 client connection (what every listener accepts first), for the hand-over to HTTP/2."""
    loop = FakeLoop()
    ctx = context(loop, FakeUpstream(), h2)
    conn = ClientConnection(ctx, ProxyServer(ctx))
    transport = FakeTransport(alpn)
    conn.connection_made(transport)
    return conn, transport
