"""After a 101: raw bytes both ways between a client and an instance, until either side closes or it idles.

A `Tunnel` takes over the two connections of an upgraded exchange (WebSocket). Flow control is as for bodies:
an upstream that does not take the client's bytes pauses reading from the client, and a client that does not
read pauses reading from the upstream (the upstream connection does that itself). `websocket_idle_timeout`
(not `read_timeout`) closes a tunnel with no byte either way; the listener's sweeper asks `check_idle`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .logs import request_log

if TYPE_CHECKING:
    from discovery.model import Endpoint

    from .exchange import Exchange
    from .h1.upstream import UpstreamConnection


class Tunnel:
    __slots__ = ("closed", "conn", "exchange", "last_activity", "sent")

    def __init__(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        self.exchange = exchange
        self.conn = conn
        self.closed = False
        self.sent = 0  # bytes to the client
        self.last_activity = exchange.loop.time()

    @classmethod
    def open(
        cls, exchange: Exchange, conn: UpstreamConnection, endpoint: Endpoint, reason: bytes,
        headers: list[tuple[bytes, bytes]], rest: bytes,
    ) -> Tunnel:
        """The upstream answered 101: the client gets it, then what the upstream sent after it."""
        exchange.pool.upgraded(endpoint)
        tunnel = exchange.tunnel = cls(exchange, conn)
        exchange.client.open_tunnel(exchange.req, tunnel, reason, headers)
        if rest:
            tunnel.on_tunnel_data(rest)
        return tunnel

    # --- upstream -> client (the upstream connection calls these) ---
    def on_tunnel_data(self, data: bytes) -> None:
        exchange = self.exchange
        self.last_activity = exchange.loop.time()
        self.sent += len(data)
        exchange.client.write(data)

    def on_tunnel_closed(self) -> None:
        self.close()

    def upstream_pause_writing(self) -> None:
        self.exchange.client.pause_body()

    def upstream_resume_writing(self) -> None:
        self.exchange.client.resume_body()

    # --- client -> upstream ---
    def from_client(self, data: bytes) -> None:
        if not self.closed:
            exchange = self.exchange
            self.last_activity = exchange.loop.time()
            exchange.req.body_sent += len(data)
            self.conn.write(data)

    def check_idle(self, now: float) -> None:
        exchange = self.exchange
        idle = exchange.ctx.limits.tunnel_idle_timeout
        if now - self.last_activity >= idle:
            request_log(exchange.req, "info", "tunnel_idle_closed", service=exchange.service, idle_s=idle)
            self.close()

    def close(self) -> None:
        """Either side closed (or the tunnel idled out): close the other after what it has buffered."""
        if self.closed:
            return
        self.closed = True
        exchange = self.exchange
        exchange.ctx.upstream.release(self.conn, False)
        exchange.client.close()
        exchange.tunnel_ended(self.sent)
