"""One request's life upstream, in process: an Exchange between a fake client side and fake upstream
connections (no sockets, no Consul). What the client is sent, what the pool is told, when it retries."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.config import DEFAULTS
from proxy.errors import ProxyError, UpstreamConnectError
from proxy.exchange import Exchange
from proxy.h1.head import Request, check_head
from proxy.h1.upstream import FRAMING_LENGTH, PoolKey, UpstreamConnection, UpstreamPool
from proxy.listener import ListenerLimits, ProxyContext, Router
from proxy.metrics import Metrics
from proxy.pool import Pool, Pools
from proxy.settings import HealthPolicy
from proxy.table import RoutingTable
from proxy.timeouts import check_timeout
from proxy.tunnel import Tunnel

from .worlds import FakeLoop

A = Endpoint("web", "web-a", "127.0.0.1", 9001)
B = Endpoint("web", "web-b", "127.0.0.1", 9002)


# Subclasses of the real classes: the compiled build (proxy/compiled.py) checks the types the exchange is given.
class FakeConn(UpstreamConnection):
    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.sent: list[bytes] = []
        self.sink: Any = None
        self.detached = False

    def send(self, head: bytes, sink: Any, *, head_request: bool, upgrade: bool = False) -> None:
        self.sent.append(head)
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def detach(self) -> None:
        self.detached = True


class FakeUpstream(UpstreamPool):
    """Idle connections on hand for some instances; connecting to others fails (refused) or succeeds."""

    def __init__(self, idle: AbstractSet[int] = frozenset(), refuse: AbstractSet[int] = frozenset()) -> None:
        self.idle, self.refuse = set(idle), set(refuse)
        self.conns: list[FakeConn] = []
        self.released: list[tuple[FakeConn, bool]] = []

    def take_idle(self, key: PoolKey, now: float) -> FakeConn | None:
        if key[2] in self.idle:
            conn = FakeConn(key)
            self.conns.append(conn)
            return conn
        return None

    async def connect(self, key: PoolKey, timeout: float = 0.0) -> FakeConn:
        if key[2] in self.refuse:
            raise UpstreamConnectError(f"cannot connect to port {key[2]}: refused")
        conn = FakeConn(key)
        self.conns.append(conn)
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        assert isinstance(conn, FakeConn)
        self.released.append((conn, reusable))


class FakeClient:
    """A Downstream that records what it is sent and told."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.peer, self.peer_text, self.trusted = b"10.0.0.1", "10.0.0.1", False
        self.closing = self.writing_paused = self.body_paused = False
        self.events: list[tuple[Any, ...]] = []
        self.done_status: int | None = None

    def backlog(self) -> int:
        return 0

    def send_head(self, req: Request, status: int, reason: bytes, headers: Any, framing: int, extra: Any,
                  route: Any) -> None:
        self.events.append(("head", status))

    def send_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def write(self, data: bytes) -> None:
        self.events.append(("raw", data))

    def flush(self) -> None: ...

    def close(self) -> None:
        self.events.append(("close",))

    def end(self) -> None:
        self.events.append(("end",))

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("trailers", fields))

    def abort(self) -> None:
        self.events.append(("abort",))

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def take_body(self, req: Request, exchange: Exchange) -> None: ...

    def open_tunnel(self, req: Request, tunnel: Tunnel, reason: bytes, headers: Any) -> None:
        self.events.append(("101",))

    def answer_error(self, req: Request, err: ProxyError, service: str, started: float, path: str,
                     route_id: str) -> None:
        self.events.append(("error", err.status, err.reason))

    def done(self, exchange: Exchange, status: int) -> None:
        self.done_status = status


def setup(
    upstream: FakeUpstream, endpoints: tuple[Endpoint, ...] = (A, B), method: str = "GET",
    policy: HealthPolicy | None = None, headers: tuple[tuple[bytes, bytes], ...] = (),
    members: frozenset[str] | None = None,
) -> tuple[Exchange, FakeClient, FakeLoop, Pool]:
    snapshot = Snapshot((ServiceRoutes("web", (parse_route_tag("urlprefix-/"),), endpoints),))
    pools = Pools(policy=policy)
    pools.reconcile(snapshot)
    pool = pools.get("web")
    assert pool is not None
    loop = FakeLoop()
    ctx = ProxyContext(
        router=Router(RoutingTable.from_snapshot(snapshot)), pools=pools,
        upstream=upstream,
        metrics=Metrics(registry=CollectorRegistry()), listen_port=8080, proto="http", access_log=None,
        loop=loop,  # type: ignore[arg-type]  # an exchange asks its loop only for time() and create_task()
        limits=ListenerLimits(read_timeout=5.0),
    )
    client = FakeClient(ctx)
    req = Request()
    req.target = b"/"
    req.headers = [(b"Host", b"example.com"), *headers]
    check_head(req, method, "1.1", True, False)
    req.request_id = b"r1"
    route = replace(ctx.router.current.routes[0], members=members)
    return Exchange(client, req, route, pool, b"/", 0.0, "/", "web"), client, loop, pool


class TestRelay:
    """A plain request: the answer goes to the client as it comes, and the pool hears of every step."""

    def test_pooled_connection_answers_without_a_task(self) -> None:
        upstream = FakeUpstream(idle={9001, 9002})
        ex, client, loop, pool = setup(upstream)
        ex.attempt()
        assert not loop.tasks and pool.active == 1 and sum(pool.in_flight.values()) == 1
        conn = upstream.conns[0]
        assert conn.sent[0].startswith(b"GET / HTTP/1.1\r\n") and b"X-Request-ID: r1\r\n" in conn.sent[0]
        ex.on_head(200, b"OK", [(b"Content-Length", b"2")], FRAMING_LENGTH)
        ex.on_body(b"hi")
        ex.on_complete(True)
        assert client.events == [("head", 200), ("body", b"hi"), ("end",)]
        assert client.done_status == 200 and ex.bytes_out == 2
        assert pool.active == 0 and not pool.in_flight and upstream.released == [(conn, True)]

    def test_new_connection_opened_in_a_task(self) -> None:
        upstream = FakeUpstream()
        ex, _client, loop, _pool = setup(upstream)
        ex.attempt()
        assert len(loop.tasks) == 1 and not upstream.conns
        loop.run_tasks()
        assert len(upstream.conns) == 1
        assert ex.conn is upstream.conns[0]


class TestRoutesPerInstance:
    """A route only some instances declare goes to those instances alone (Fabio builds routes per instance)."""

    def test_only_members_are_picked(self) -> None:
        for _ in range(10):
            upstream = FakeUpstream(idle={9001, 9002})
            ex, _client, _loop, _pool = setup(upstream, members=frozenset({B.key}))
            ex.attempt()
            assert ex.endpoint == B

    def test_no_member_left_is_a_503(self) -> None:
        upstream = FakeUpstream(idle={9001, 9002})
        ex, client, _loop, _pool = setup(upstream, endpoints=(A,), members=frozenset({B.key}))
        ex.attempt()
        assert client.events == [("error", 503, "no_healthy_instance")]


class TestRetries:
    """Failures before the answer: other instances within the limits, counted against the instance."""

    def test_refused_instance_is_skipped_and_counted(self) -> None:
        upstream = FakeUpstream(refuse={9001, 9002})
        ex, client, loop, pool = setup(upstream, method="POST")
        ex.attempt()
        loop.run_tasks()
        assert client.events == [("error", 502, "upstream_connect_failed")]
        assert ex.tried == {A.key, B.key}  # both tried, whatever the method: nothing reached them
        assert pool.recent_errors(A.key, loop.now) == 1 and pool.recent_errors(B.key, loop.now) == 1
        assert pool.active == 0

    def test_instance_that_left_the_pool_while_connecting_is_followed_by_the_one_left(self) -> None:
        """A deploy: the picked instance leaves Consul and refuses; the request goes to the instance still there."""
        upstream = FakeUpstream()
        ex, client, loop, pool = setup(upstream, method="GET")
        ex.attempt()  # a connect task to the picked instance
        (picked,) = ex.tried
        left, other = (A, B) if picked == A.key else (B, A)
        upstream.refuse.add(left.port)
        ex.ctx.pools.reconcile(Snapshot((ServiceRoutes("web", (parse_route_tag("urlprefix-/"),), (other,)),)))
        assert [e.key for e in pool.endpoints] == [other.key]
        loop.run_tasks()
        assert ex.endpoint == other and ex.tried == {A.key, B.key}
        assert ("error", 502, "upstream_connect_failed") not in client.events

    def test_stale_keepalive_connection_retried_on_a_new_one_to_the_same_instance(self) -> None:
        upstream = FakeUpstream(idle={9001, 9002})
        ex, _client, loop, pool = setup(upstream, endpoints=(A,))
        ex.attempt()
        first = upstream.conns[0]
        ex.on_error(UpstreamConnectError("closed"), nothing_received=True)
        assert len(loop.tasks) == 1  # a fresh connection, not another pooled one
        loop.run_tasks()
        assert upstream.conns[-1] is not first and ex.endpoint == A
        assert pool.recent_errors(A.key, loop.now) == 0  # a dropped pooled connection is not the instance's fault

    def test_eject_on_5xx(self) -> None:
        upstream = FakeUpstream(idle={9001, 9002})
        for _ in range(3):
            ex, client, _loop, pool = setup(upstream, policy=replace(DEFAULTS.health, eject_after=1, eject_on_5xx=True))
            ex.attempt()
            ex.on_head(503, b"Unavailable", [], FRAMING_LENGTH)
            assert client.events == [("head", 503)]  # the answer still goes to the client
            assert len(pool.ejected) == 1


class TestTimeouts:
    """Whose fault silence is decides the answer."""

    def test_upstream_that_does_not_answer_gets_504_and_no_retry(self) -> None:
        upstream = FakeUpstream(idle={9001, 9002})
        ex, client, loop, _pool = setup(upstream)
        ex.attempt()
        loop.now += 5.0
        check_timeout(ex, loop.now)
        assert client.events == [("error", 504, "upstream_timeout")]
        assert upstream.conns[0].detached and len(upstream.conns) == 1

    def test_stall_after_the_head_cuts_the_client(self) -> None:
        upstream = FakeUpstream(idle={9001})
        ex, client, loop, _pool = setup(upstream, endpoints=(A,))
        ex.attempt()
        ex.on_head(200, b"OK", [], FRAMING_LENGTH)
        loop.now += 6.0
        check_timeout(ex, loop.now)
        assert client.events[-1] == ("abort",) and client.done_status == 200

    def test_nothing_before_the_clock_runs_out(self) -> None:
        upstream = FakeUpstream(idle={9001})
        ex, client, loop, _pool = setup(upstream, endpoints=(A,))
        ex.attempt()
        loop.now += 4.9
        check_timeout(ex, loop.now)
        assert client.events == [] and client.done_status is None


class TestTunnel:
    """A 101 hands both connections to a tunnel; its end finishes the request."""

    def test_upgrade(self) -> None:
        upstream = FakeUpstream(idle={9001})
        ex, client, _loop, pool = setup(upstream, endpoints=(A,))
        ex.attempt()
        conn = upstream.conns[0]
        tunnel = ex.on_upgrade(b"Switching Protocols", [(b"Upgrade", b"websocket")], b"early")
        assert tunnel is not None and ex.tunnel is tunnel and pool.tunnels == 1
        assert client.events == [("101",), ("raw", b"early")]
        tunnel.from_client(b"ping")
        assert conn.sent[-1] == b"ping"
        tunnel.on_tunnel_closed()
        assert client.done_status == 101 and pool.tunnels == 0 and ex.bytes_out == 5
        assert upstream.released == [(conn, False)]
