"""Every limit with its own answer, seen on the wire: body size (413, declared and chunked, per route, per service
and global), header count (431), the client header timeout against slowloris (408, closed), concurrent requests
per service (503 with Retry-After), client connections (503 with Retry-After, the proxy staying responsive), and
absolute-form targets naming hosts the proxy does not route (400: never an open proxy).

Every wait is bounded (by `WAIT`); sleeps only pace a sender.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, wait_until
from .rawhttp import WAIT, Connect, Handler, RawUpstream, Truncated, UpstreamExchange, Wire, echo, ok, request
from .rawhttp import connect as connect  # pytest fixtures, requested by name
from .rawhttp import upstreams as upstreams

pytestmark = pytest.mark.integration

CONFIG = """\
client_header_timeout = 1.0
max_body_size = "1m"

[services.lim-svc]
max_body_size = "100k"

[services.lim-busy]
max_concurrent = 2
"""


@pytest.fixture(scope="module")
def ferryman(consul: ConsulAgent, workdir: Path) -> Iterator[FerrymanProcess]:
    """A proxy with small limits (the module's own; `connect` opens raw connections to it)."""
    config = workdir / "limits.toml"
    config.write_text(CONFIG)
    proc = FerrymanProcess(consul.addr, workdir, extra=["--config", str(config)])
    proc.start()
    yield proc
    proc.stop()


async def _route(consul: ConsulAgent, proxy: FerrymanProcess, upstreams: list[RawUpstream], name: str,
                 handler: Handler = echo, options: str = "") -> RawUpstream:
    upstream = await RawUpstream(handler).start()
    upstreams.append(upstream)
    tag = f"urlprefix-/{name} {options}".strip()
    await asyncio.to_thread(consul.register, name, f"{name}-1", upstream.port, [tag])
    await asyncio.to_thread(proxy.wait_instances, f"{name}@*any*/{name}", [f"{name}-1"])
    return upstream


async def _refused(wire: Wire, status: int) -> bytes:
    try:
        resp = await wire.response()
    except Truncated as exc:
        pytest.fail(f"expected {status}; got {exc.received!r} ({exc.ended})")
    assert resp.status == status, resp.body
    assert resp.header("Connection") == "close"
    await wire.until_closed()
    return resp.body


class TestBodySize:
    async def test_declared_length_over_the_route_limit_is_413_and_never_forwarded(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
    ) -> None:
        upstream = await _route(consul, ferryman, upstreams, "lim-tag", options="maxbody=1k")
        wire = await connect()
        wire.send(request("POST", "/lim-tag/x", body=b"a" * 1000))
        assert (await wire.response()).status == 200

        wire = await connect()
        wire.send(request("POST", "/lim-tag/x", "Content-Length: 2000") + b"a" * 2000)
        body = await _refused(wire, 413)
        assert b"limit is 1024" in body
        assert len(upstream.heads) == 1  # only the first request

    async def test_chunked_body_growing_over_the_service_limit_is_cut_at_the_limit(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
    ) -> None:
        upstream = await _route(consul, ferryman, upstreams, "lim-svc")
        wire = await connect()
        wire.send(request("POST", "/lim-svc/x", "Transfer-Encoding: chunked"))
        chunk = b"%x\r\n%b\r\n" % (10 * 1024, b"c" * 10 * 1024)
        for _ in range(20):  # 200 KiB against a limit of 100 KiB
            if wire.ended is not None:
                break
            wire.send(chunk)
            await asyncio.sleep(0.01)
        body = await _refused(wire, 413)
        assert b"larger than 102400 bytes" in body
        await asyncio.sleep(0.2)
        assert upstream.requests == []  # the upstream never got a whole request: its connection was cut

    async def test_declared_length_over_the_global_limit_is_413(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await _route(consul, ferryman, upstreams, "lim-global")
        wire = await connect()
        wire.send(b"PUT /lim-global/x HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1000)
        assert b"limit is 1048576" in await _refused(wire, 413)
        assert upstream.heads == []


class TestHeaders:
    async def test_101_header_fields_is_431(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await _route(consul, ferryman, upstreams, "lim-hdr")
        wire = await connect()
        wire.send(request("GET", "/lim-hdr/x", *[f"X-F{i}: 1" for i in range(99)]))  # with Host: 100
        assert (await wire.response()).status == 200
        wire = await connect()
        wire.send(request("GET", "/lim-hdr/x", *[f"X-F{i}: 1" for i in range(100)]))
        assert b"more than 100 request header fields" in await _refused(wire, 431)
        assert len(upstream.heads) == 1


class TestSlowloris:
    async def test_a_head_sent_a_byte_at_a_time_gets_408_and_is_closed_within_the_header_timeout(
        self, connect: Connect,
    ) -> None:
        wire = await connect()
        started = time.monotonic()
        for byte in b"GET / HTTP/1.1\r\nHost: edge.test\r\nX-Slow: " + b"a" * 100:
            if wire.ended is not None or wire.buffer:
                break
            wire.send(bytes([byte]))
            await asyncio.sleep(0.1)
        body = await _refused(wire, 408)
        assert b"request head not received within 1 s" in body
        assert time.monotonic() - started < 2.5  # 1 s and a sweep tick, with room for a loaded machine

    async def test_a_connection_that_sends_nothing_is_closed_within_the_header_timeout(self, connect: Connect) -> None:
        wire = await connect()
        started = time.monotonic()
        assert await wire.until_closed() == b""
        assert time.monotonic() - started < 2.5


class TestServiceConcurrency:
    async def test_beyond_max_concurrent_503_with_retry_after_then_served_again(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
    ) -> None:
        release = asyncio.Event()

        async def held(ex: UpstreamExchange) -> bool:
            await asyncio.wait_for(release.wait(), WAIT)
            ex.writer.write(ok())
            return True

        upstream = await _route(consul, ferryman, upstreams, "lim-busy", handler=held)
        first, second = await connect(), await connect()
        for wire in (first, second):
            wire.send(request("GET", "/lim-busy/x"))
        await asyncio.to_thread(wait_until, lambda: len(upstream.heads) == 2, WAIT, "two requests upstream")

        third = await connect()
        third.send(request("GET", "/lim-busy/x"))
        resp = await third.response()
        assert resp.status == 503 and resp.header("Retry-After") == "1"
        assert b"2 requests in progress" in resp.body
        assert resp.header("Connection") is None  # a keep-alive answer: the client may retry on it

        release.set()
        assert (await first.response()).status == 200 and (await second.response()).status == 200
        third.send(request("GET", "/lim-busy/x"))
        assert (await third.response()).status == 200


class TestNeverAnOpenProxy:
    async def test_absolute_form_naming_an_unrouted_host_is_400(self, connect: Connect) -> None:
        wire = await connect()
        wire.send(b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n")
        resp = await wire.response()
        assert resp.status == 400 and b"does not route" in resp.body


@pytest.fixture
async def few_connections(consul: ConsulAgent, workdir: Path) -> AsyncIterator[FerrymanProcess]:
    proc = FerrymanProcess(consul.addr, workdir, extra=["--max-connections", "3"])
    await asyncio.to_thread(proc.start)
    yield proc
    await asyncio.to_thread(proc.stop)


class TestClientConnections:
    async def test_beyond_max_connections_503_and_closed_while_open_ones_are_served(
        self, few_connections: FerrymanProcess
    ) -> None:
        proxy = few_connections
        # The harness's start-up probes connected and left; wait until the proxy has counted them out.
        opened = [await Wire.open(proxy.port) for _ in range(3)]
        try:
            extra = await Wire.open(proxy.port)
            resp = await extra.response()
            if resp.status != 503:  # a probe connection was still counted: one more try
                pytest.fail(f"expected 503, got {resp.status}")
            assert resp.header("Retry-After") == "1" and resp.header("Connection") == "close"
            assert b"more than 3 client connections" in resp.body
            await extra.until_closed()

            # The connections it has are served.
            opened[0].send(request("GET", "/none-such"))
            assert (await opened[0].response()).status == 404

            # One leaves: a new one gets in.
            opened.pop().close()
            deadline = time.monotonic() + WAIT
            while True:
                wire = await Wire.open(proxy.port)
                wire.send(request("GET", "/none-such"))
                resp = await wire.response()
                wire.abort()
                if resp.status == 404:
                    break
                assert resp.status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            for wire in opened:
                wire.abort()


class TestSlowClients:
    async def test_a_slow_reader_is_served_and_one_that_stops_reading_is_cut_after_read_timeout(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend],
    ) -> None:
        """read_timeout is 1 s: a client that keeps reading, however slowly, gets its body (its progress counts);
        one that stops reading for longer is cut with a reset, and the log says it was the client."""
        from .harness import Backend
        proxy = FerrymanProcess(consul.addr, workdir, extra=["--read-timeout", "1"])
        await asyncio.to_thread(proxy.start)
        try:
            backend = await Backend("lim-slow-1").start()
            backends.append(backend)
            await asyncio.to_thread(consul.register, "lim-slow", "lim-slow-1", backend.port, ["urlprefix-/lim-slow"])
            await asyncio.to_thread(proxy.wait_instances, "lim-slow@*any*/lim-slow", ["lim-slow-1"])
            wire = await Wire.open(proxy.port, receive_buffer=16 * 1024)
            wire.send(request("GET", "/lim-slow/download?size=33554432"))  # 32 MiB: more than socket buffers hold
            started = time.monotonic()
            await wire.trickle(4 * 1024 * 1024, 0.05)  # small reads with pauses, for longer than read_timeout
            assert time.monotonic() - started > 1.5 and wire.ended is None
            assert wire.transport is not None
            wire.transport.pause_reading()  # now it stops reading
            await asyncio.to_thread(
                wait_until, lambda: any(e.get("event") == "client_send_timeout" for e in proxy.log_events()), 6,
                "client_send_timeout logged")
            assert not any(e.get("event") == "upstream_body_aborted" for e in proxy.log_events())
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, "lim-slow-1")


class TestTrustedProxies:
    async def test_forwarding_headers_from_a_trusted_peer_are_kept_from_others_replaced(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend],
    ) -> None:
        """The test client connects from 127.0.0.1: trusted in one proxy, not in the other."""
        import json

        from .harness import Backend
        backend = await Backend("lim-trust-1").start()
        backends.append(backend)
        await asyncio.to_thread(consul.register, "lim-trust", "lim-trust-1", backend.port, ["urlprefix-/lim-trust"])
        sent = ("X-Forwarded-For: 203.0.113.9, 10.0.0.5", "X-Forwarded-Proto: https", "X-Real-IP: 6.6.6.6",
                "Forwarded: for=203.0.113.9;proto=https")
        seen = {}
        for trusted in ("127.0.0.1/32,10.0.0.0/8", "192.0.2.0/24"):
            proxy = FerrymanProcess(consul.addr, workdir, extra=["--trusted-proxies", trusted])
            await asyncio.to_thread(proxy.start)
            try:
                await asyncio.to_thread(proxy.wait_instances, "lim-trust@*any*/lim-trust", ["lim-trust-1"])
                wire = await Wire.open(proxy.port)
                wire.send(request("GET", "/lim-trust/x", *sent))
                resp = await wire.response()
                wire.abort()
                seen[trusted] = dict(json.loads(resp.body)["headers"])
            finally:
                await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(consul.deregister, "lim-trust-1")
        kept, replaced = seen["127.0.0.1/32,10.0.0.0/8"], seen["192.0.2.0/24"]
        assert kept["X-Forwarded-For"] == replaced["X-Forwarded-For"] == "203.0.113.9, 10.0.0.5, 127.0.0.1"
        assert (kept["X-Forwarded-Proto"], kept["X-Real-IP"]) == ("https", "203.0.113.9")
        assert kept["Forwarded"].startswith("for=203.0.113.9;proto=https, for=127.0.0.1;")
        assert (replaced["X-Forwarded-Proto"], replaced["X-Real-IP"]) == ("http", "127.0.0.1")
        assert replaced["Forwarded"].startswith("for=127.0.0.1;")


class TestPathNormalization:
    async def test_dot_segments_route_where_the_upstream_will_read_them(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
    ) -> None:
        public = await _route(consul, ferryman, upstreams, "norm-pub")
        admin = await _route(consul, ferryman, upstreams, "norm-adm")
        for raw in ("/norm-pub/../norm-adm/x", "/norm-pub/%2e%2e/norm-adm/x", "/norm-pub/./../norm-adm/x"):
            wire = await connect()
            wire.send(request("GET", raw))
            assert (await wire.response()).status == 200
        assert public.heads == []
        # Matched on the normalized path, and forwarded as matched (issue 15, defect 5): the upstream sees the
        # path the route was chosen on.
        assert admin.heads == ["GET /norm-adm/x"] * 3
        wire = await connect()
        wire.send(request("GET", "/norm-pub%2F..%2Fnorm-adm/x"))  # an encoded slash separates nothing
        await wire.response()
        assert len(admin.heads) == 3  # one segment `norm-pub%2F..%2Fnorm-adm`: never the admin route


class TestPipelinedSlowReader:
    async def test_a_client_that_stops_reading_is_cut_and_the_upstream_not_blamed(
        self, consul: ConsulAgent, workdir: Path, backends: list[Backend],
    ) -> None:
        """Two pipelined requests, the first with a large answer the client does not read: the second waits on
        the client, not on the upstream. After read_timeout the client is cut (`client_send_timeout`); no 504,
        no upstream failure counted, no ejection."""
        from .harness import Backend
        proxy = FerrymanProcess(consul.addr, workdir, extra=["--read-timeout", "1", "--eject-after", "1"])
        await asyncio.to_thread(proxy.start)
        try:
            backend = await Backend("lim-pipe-1").start()
            backends.append(backend)
            await asyncio.to_thread(consul.register, "lim-pipe", "lim-pipe-1", backend.port, ["urlprefix-/lim-pipe"])
            await asyncio.to_thread(proxy.wait_instances, "lim-pipe@*any*/lim-pipe", ["lim-pipe-1"])
            wire = await Wire.open(proxy.port, receive_buffer=16 * 1024)
            assert wire.transport is not None
            wire.transport.pause_reading()  # it never reads
            wire.send(request("GET", "/lim-pipe/download?size=33554432") + request("GET", "/lim-pipe/small"))
            await asyncio.to_thread(
                wait_until, lambda: any(e.get("event") == "client_send_timeout" for e in proxy.log_events()), 8,
                "client_send_timeout")
            await asyncio.sleep(0.5)
            events = proxy.log_events()
            assert not [e for e in events if e.get("event") in ("upstream_ejected", "proxy_error")
                        and e.get("service") == "lim-pipe"], [e for e in events if e.get("service") == "lim-pipe"]
            wire.abort()
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, "lim-pipe-1")
