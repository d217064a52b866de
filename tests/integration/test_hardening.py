"""Regression tests for the review fixes of a149b34, each seen on the wire from both sides of the proxy.

Smuggling through Upgrade and CONNECT heads, trailer fields merged into the head, endless header lines,
pooled upstream connections left paused by a slow reader, request bodies that stall, deep pipelines, the
`Connection: close` of a stopping server, `Forwarded` written by the client, absolute-form targets,
unsupported transfer codings, and upstreams that send more than their framing says. The client side is a raw
`Wire`, the upstream side an aiohttp `Backend` or a `RawUpstream` (see rawhttp.py); each test registers its own
service in the real Consul agent.

Every wait is bounded (by `WAIT` unless said otherwise); sleeps only pace a sender or a reader, they never stand
for an assertion about timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, _http_json, async_wait_until
from .rawhttp import (
    HOST,
    WAIT,
    Connect,
    RawUpstream,
    Response,
    Truncated,
    UpstreamExchange,
    Wire,
    echo,
    ok,
    request,
    routed_raw,
)
from .rawhttp import connect as connect  # pytest fixtures, requested by name
from .rawhttp import upstreams as upstreams

pytestmark = pytest.mark.integration


# --- helpers --------------------------------------------------------------------------------------------------


def agent_instances(consul: ConsulAgent) -> set[str]:
    return set(_http_json("GET", f"{consul.url}/v1/agent/services") or {})


@pytest.fixture(autouse=True)
async def consul_left_as_found(consul: ConsulAgent) -> AsyncIterator[None]:
    """Every instance a test registered leaves the shared agent after it, so that later tests (and their route
    tables) see only their own services."""
    before = await asyncio.to_thread(agent_instances, consul)
    yield
    for instance in await asyncio.to_thread(agent_instances, consul) - before:
        await asyncio.to_thread(consul.deregister, instance)


async def answer(wire: Wire, *, method: str = "GET") -> Response:
    """The next response; a connection that ended instead fails the test with what it carried."""
    try:
        return await wire.response(method=method)
    except Truncated as exc:
        pytest.fail(f"no complete response: the proxy sent {exc.received[:300]!r} and closed ({exc.ended})")
    except TimeoutError:
        pytest.fail(f"no complete response within {WAIT} s; received {bytes(wire.buffer[:300])!r}")


async def rest_of(wire: Wire) -> bytes:
    """Whatever else arrives until the connection ends; `wire.ended` stays None if it is still open after WAIT."""
    try:
        return await wire.until_closed()
    except TimeoutError:
        data = bytes(wire.buffer)
        wire.buffer.clear()
        return data


def seen(resp: Response) -> dict[str, Any]:
    """The account an `echo` upstream gave of the request it received."""
    assert resp.status == 200, f"{resp.status} {resp.reason}: {resp.body[:300]!r}"
    account: dict[str, Any] = json.loads(resp.body)
    return account


async def truthy(value: object) -> bool:
    """A predicate for `async_wait_until`."""
    return bool(value)


def values(headers: list[list[str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


async def heads_after_a_round_trip(upstream: RawUpstream, connect: Connect, name: str) -> list[str]:
    """Every request head the upstream received, once a probe on a new connection came back: what the proxy had
    read before was forwarded (or not) by then."""
    probe = await connect()
    probe.send(request("GET", f"/{name}/probe"))
    assert (await answer(probe)).status == 200
    return upstream.heads


async def route_tags(
    consul: ConsulAgent, ferryman: FerrymanProcess, name: str, port: int, tags: list[str], route_ids: list[str]
) -> None:
    """Register one instance of service `name` with `tags` and wait until every route in `route_ids` has it."""
    instance = f"{name}-1"
    await asyncio.to_thread(consul.register, name, instance, port, tags)
    for route_id in route_ids:
        await asyncio.to_thread(ferryman.wait_instances, route_id, [instance])


# --- the specification ----------------------------------------------------------------------------------------


class TestUpgradeHeads:
    """An Upgrade head is never a way to get bytes past the proxy's parser: what follows it is not read."""

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    async def test_upgrade_request_with_a_body_is_refused_and_nothing_after_its_head_reaches_the_upstream(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        framing: str
    ) -> None:
        name = f"hard-upgrade-body-{framing}"
        upstream = await routed_raw(upstreams, consul, ferryman, name, echo)
        wire = await connect()
        smuggled = request("GET", f"/{name}/smuggled")
        if framing == "content-length":
            framed = b"Content-Length: %d\r\n\r\n%b" % (len(smuggled), smuggled)
        else:
            framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(smuggled), smuggled)

        wire.send(
            b"POST /%b/x HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: x\r\n" % name.encode()
            + framed + request("GET", f"/{name}/after")
        )
        resp = await answer(wire)
        rest = await rest_of(wire)

        assert resp.status == 400, f"{resp.status} {resp.reason}: {resp.body!r}"
        assert b"an upgrade request must not have a body" in resp.body
        assert resp.header("Connection") == "close"
        assert rest == b"", f"answers to bytes after the upgrade head: {rest[:300]!r}"
        assert wire.ended is not None, "the connection stayed open after the refused upgrade request"
        assert await heads_after_a_round_trip(upstream, connect, name) == [f"GET /{name}/probe"]

    @pytest.mark.parametrize("protocol, forwarded", [("websocket", True), ("h2c", False)])
    async def test_upgrade_the_upstream_does_not_accept_is_answered_as_plain_http_then_the_connection_closes(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        protocol: str, forwarded: bool,
    ) -> None:
        """A WebSocket upgrade goes upstream with its Upgrade (the upstream may answer 101: a tunnel); any other
        upgrade is hop-by-hop and dropped (RFC 9110 §7.6.1). An answer other than 101 is plain HTTP, and the
        connection closes: the bytes after the upgrade head are never read as requests."""
        name = f"hard-upgrade-{protocol}"
        upstream = await routed_raw(upstreams, consul, ferryman, name, echo)
        wire = await connect()

        wire.send(
            f"GET /{name}/ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n".encode()
            + request("GET", f"/{name}/after")  # what a client would send after a 101: not HTTP to us
        )
        resp = await answer(wire)
        rest = await rest_of(wire)

        got = seen(resp)
        assert got["target"] == f"/{name}/ws"
        assert values(got["headers"], "Upgrade") == ([protocol] if forwarded else [])
        assert values(got["headers"], "Connection") == (["Upgrade"] if forwarded else [])
        assert resp.status == 200 and resp.header("Connection") == "close"
        assert rest == b"", f"answers to bytes after the upgrade head: {rest[:300]!r}"
        assert wire.ended is not None, "the connection stayed open after the upgrade request"
        assert await heads_after_a_round_trip(upstream, connect, name) == [f"GET /{name}/ws", f"GET /{name}/probe"]


class TestChunkedTrailers:
    """Trailer fields of a chunked request body never become header fields upstream."""

    @pytest.mark.parametrize("kind", ["raw", "aiohttp"])
    async def test_trailer_fields_are_not_forwarded_as_headers(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], backends: list[Backend],
        connect: Connect, kind: str
    ) -> None:
        name = f"hard-trailer-{kind}"
        if kind == "raw":
            await routed_raw(upstreams, consul, ferryman, name, echo)
        else:
            backend = await Backend(f"{name}-1").start()
            backends.append(backend)
            await route_tags(consul, ferryman, name, backend.port, [f"urlprefix-/{name}"], [f"{name}@*any*/{name}"])
        wire = await connect()

        # Head, body and trailer section in one write: all parsed before the request is forwarded.
        wire.send(
            b"POST /%b/x HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\nTrailer: Host, X-Auth-User\r\n"
            b"\r\n5\r\nhello\r\n0\r\nHost: internal.example\r\nX-Auth-User: admin\r\n\r\n" % name.encode()
        )
        got = seen(await answer(wire))

        headers = got["headers"]
        assert values(headers, "Host") == [HOST.decode()]
        assert values(headers, "X-Auth-User") == []
        assert values(headers, "X-Forwarded-Host") == [HOST.decode()]
        body = got["body"] if kind == "raw" else got["body_bytes"]
        assert body == ("hello" if kind == "raw" else 5)


class TestEndlessHeaderLine:
    """A field line that never ends is refused at the header size limit, not read until a timeout."""

    @staticmethod
    async def endless_line(wire: Wire, start: bytes) -> tuple[Response, int]:
        """Send `start`, then 200 KiB of one field value in 16 KiB writes, never its CRLF, until answered."""
        wire.send(start + b"X-Big: ")
        sent = 0
        for _ in range(200 // 16):
            if wire.buffer or wire.ended is not None:
                break  # answered: the rest is not needed
            wire.send(b"a" * 16 * 1024)
            sent += 16 * 1024
            await wire.drain()
            await asyncio.sleep(0.01)
        try:
            return await wire.head(), sent
        except TimeoutError:
            pytest.fail(f"no answer within {WAIT} s to {sent // 1024} KiB of one field line: the proxy kept reading")
        except Truncated as exc:
            pytest.fail(f"no answer: the proxy sent {exc.received[:300]!r} and closed ({exc.ended})")

    async def test_200KiB_header_value_without_its_CRLF_gets_431_and_the_connection_closed(
        self, connect: Connect
    ) -> None:
        wire = await connect()

        resp, _ = await self.endless_line(wire, b"GET /hard-big/x HTTP/1.1\r\nHost: edge.test\r\n")

        assert resp.status == 431, f"{resp.status} {resp.reason}"
        assert resp.header("Connection") == "close"
        await rest_of(wire)
        assert wire.ended is not None, "the connection stayed open after the 431"

    async def test_200KiB_trailer_value_without_its_CRLF_gets_431_and_the_connection_closed(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        # The same endless line in a chunked body's trailer section, past the end of the head.
        await routed_raw(upstreams, consul, ferryman, "hard-big-trailer", echo)
        wire = await connect()

        resp, sent = await self.endless_line(wire, (
            b"POST /hard-big-trailer/x HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n"
        ))

        assert resp.status == 431, (
            f"{resp.status} {resp.reason} after {sent // 1024} KiB of one trailer line were sent unanswered: the "
            "read timeout, not a size limit, ended it"
        )
        assert resp.header("Connection") == "close"
        await rest_of(wire)
        assert wire.ended is not None, "the connection stayed open after the 431"


class TestSlowReader:
    """A client that reads slowly holds back its own answer only: the upstream connection that carried it serves
    the next client once it is back in the pool."""

    async def test_pooled_connection_a_slow_reader_used_serves_another_client(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        # The hazard: the read that completes the big response is also the one whose write to the slow client
        # goes over the write buffer's high-water mark, so the proxy stops reading the upstream connection just
        # as it goes back to the pool. Which read completes the response depends on where the proxy's reads
        # (up to 256 000 bytes each) fall; four sizes 64 KiB apart put that last read over 110 KiB at least
        # once, and a client with a 16 KiB receive buffer reading slowly keeps the socket buffers on the way full.
        base = 6 * 1024 * 1024  # more than the socket buffers on the way hold: the proxy must stop reading
        payload = os.urandom(base + 3 * 64 * 1024)
        served: list[tuple[int, str]] = []

        async def handler(ex: UpstreamExchange) -> bool:
            served.append((ex.connection, ex.request.target))
            size = int(ex.request.target.rsplit("/", 1)[-1])
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            ex.writer.write(payload[:size])
            return True

        await routed_raw(upstreams, consul, ferryman, "hard-slowreader", handler)
        for size in range(base, base + 4 * 64 * 1024, 64 * 1024):
            slow = await connect(receive_buffer=16 * 1024)
            assert slow.transport is not None
            slow.transport.pause_reading()  # reads nothing for a while
            asked = len(served)
            slow.send(request("GET", f"/hard-slowreader/big/{size}"))

            def asked_again(n: int = asked) -> Awaitable[bool]:
                return truthy(len(served) > n)

            await async_wait_until(asked_again, WAIT, "the upstream to be asked")
            await asyncio.sleep(0.2)  # paces the reader: the buffers on the way fill up and the proxy stops reading
            await slow.trickle(size, pace=0.001)  # then reads it all, slower than the proxy writes
            big = await answer(slow)
            assert big.status == 200 and big.body == payload[:size], f"the slow reader's {size} bytes arrived damaged"
            slow.close()

            other = await connect()
            other.send(request("GET", "/hard-slowreader/small/5"))
            resp = await answer(other)
            assert (resp.status, resp.body) == (200, payload[:5]), (
                f"after a {size}-byte answer to a slow reader: {resp.status} {resp.reason}: {resp.body!r}"
            )

        assert {connection for connection, _ in served} == {0}, f"not all on the pooled connection: {served}"


class TestRequestBodyStall:
    """A client that stops sending its body gets 408 after the read timeout, and nothing stays held."""

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    async def test_body_stalled_after_10_bytes_gets_408_and_the_connection_closed(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        framing: str
    ) -> None:
        name = f"hard-stall-{framing}"
        upstream = await routed_raw(upstreams, consul, ferryman, name, echo)
        wire = await connect()

        if framing == "content-length":  # 10 bytes of 1000
            wire.send(request("POST", f"/{name}/x", "Content-Length: 1000") + b"0123456789")
        else:  # 10 bytes of a 1000-byte chunk
            wire.send(request("POST", f"/{name}/x", "Transfer-Encoding: chunked") + b"3e8\r\n0123456789")
        resp = await answer(wire)  # the module's proxy runs with --read-timeout 1; WAIT is 5 s
        await rest_of(wire)

        assert resp.status == 408, f"{resp.status} {resp.reason}: {resp.body!r}"
        assert resp.header("Connection") == "close"
        assert wire.ended is not None, "the connection stayed open after the 408"
        assert upstream.heads[:1] == [f"POST /{name}/x"], "the stall was meant to happen while relaying"
        # The request let go of its upstream connection and its in-flight count: the service serves on.
        other = await connect()
        other.send(request("GET", f"/{name}/next"))
        assert seen(await answer(other))["target"] == f"/{name}/next"


class TestDeepPipelines:
    """Long pipelines are answered in order, without recursion and without unbounded buffering."""

    async def test_600_pipelined_404s_in_one_write_are_all_answered_and_the_connection_serves_on(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await routed_raw(upstreams, consul, ferryman, "hard-after404", echo)
        wire = await connect()

        wire.send(b"".join(request("GET", f"/hard-nowhere/{i}") for i in range(600)))
        statuses = []
        for _ in range(600):
            resp = await answer(wire)
            statuses.append(resp.status)
            assert resp.header("Connection") is None, f"answer {len(statuses)} closes the connection"
        wire.send(request("GET", "/hard-after404/x"))
        after = await answer(wire)

        assert statuses == [404] * 600
        assert seen(after)["target"] == "/hard-after404/x"
        assert wire.ended is None

    @staticmethod
    async def numbered(ex: UpstreamExchange) -> bool:
        if "/slow" in ex.request.target:
            await asyncio.sleep(0.5)  # the module's read timeout is 1 s
        ex.writer.write(ok(ex.request.target.encode()))
        return True

    async def test_5000_small_gets_pipelined_behind_a_slow_request_are_all_answered_in_order(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await routed_raw(upstreams, consul, ferryman, "hard-pipe5k", self.numbered)
        wire = await connect()
        targets = ["/hard-pipe5k/slow"] + [f"/hard-pipe5k/{i}" for i in range(5000)]

        wire.send(request("GET", targets[0]))
        wire.send(b"".join(request("GET", target) for target in targets[1:]))
        bodies: list[str] = []
        for _ in targets:
            resp = await answer(wire)  # each within WAIT: reading paused at the queue bound resumes
            assert resp.status == 200, f"answer {len(bodies)}: {resp.status} {resp.body!r}"
            bodies.append(resp.body.decode())

        assert bodies == targets
        assert wire.ended is None

    async def test_proxy_stops_reading_a_pipeline_while_its_queue_is_full(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await routed_raw(upstreams, consul, ferryman, "hard-pipebound", self.numbered)
        wire = await connect()
        assert wire.transport is not None
        pad = "X-Pad: " + "p" * 16 * 1024
        targets = ["/hard-pipebound/slow"] + [f"/hard-pipebound/{i}" for i in range(1000)]

        # 16 MiB of requests queued behind a slow one: far more than the socket buffers on the way can hold, so
        # unless the proxy reads them all (unbounded memory) most of it is still here when the first answer is.
        wire.send(request("GET", targets[0]))
        wire.send(b"".join(request("GET", target, pad) for target in targets[1:]))
        first = await answer(wire)
        unsent = wire.transport.get_write_buffer_size()
        bodies = [first.body.decode()]
        for _ in targets[1:]:
            resp = await answer(wire)
            assert resp.status == 200, f"answer {len(bodies)}: {resp.status} {resp.body!r}"
            bodies.append(resp.body.decode())

        assert bodies == targets
        assert unsent > 1024 * 1024, (
            f"only {unsent} bytes of 16 MiB of pipelined requests were still unsent when the first answer "
            "came: the proxy read the pipeline without bound"
        )


class TestGracefulShutdown:
    """SIGTERM lets the request in flight finish, tells its client the connection ends, then exits 0."""

    async def test_in_flight_response_completes_with_connection_close_and_the_process_exits_0(
        self, consul: ConsulAgent, backends: list[Backend], workdir: Path
    ) -> None:
        proxy = FerrymanProcess(consul.addr, workdir)
        wire: Wire | None = None
        try:
            await asyncio.to_thread(proxy.start)
            backend = await Backend("hard-drain-1").start()
            backends.append(backend)
            await route_tags(consul, proxy, "hard-drain", backend.port, ["urlprefix-/hard-drain"],
                             ["hard-drain@*any*/hard-drain"])
            wire = await Wire.open(proxy.port)

            wire.send(request("GET", "/hard-drain/slow?delay=1"))
            await async_wait_until(lambda: truthy(backend.hits), WAIT, "the slow request to reach the backend")
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)
            resp = await answer(wire)
            await rest_of(wire)
            code = await asyncio.to_thread(proxy.proc.wait, 15)

            assert (resp.status, resp.body) == (200, b"late\n")
            assert resp.header("Connection") == "close", "a stopping server says so in the answer in flight"
            assert wire.ended == "eof"
            assert code == 0
        finally:
            if wire is not None:
                wire.abort()
            proxy.stop()


class TestThisHop:
    """Headers that describe this hop are written by the proxy, never taken from the client."""

    async def test_client_forwarded_header_is_replaced_by_this_hop(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await routed_raw(upstreams, consul, ferryman, "hard-forwarded", echo)
        wire = await connect()

        wire.send(request("GET", "/hard-forwarded/x", "Forwarded: for=1.2.3.4;proto=https",
                          "Forwarded: for=5.6.7.8;host=evil.example"))
        got = seen(await answer(wire))

        assert values(got["headers"], "Forwarded") == [f'for=127.0.0.1;host="{HOST.decode()}";proto=http']


class TestRequestTargets:
    """Absolute-form targets are routed by their authority; CONNECT is refused."""

    async def test_absolute_form_target_is_routed_by_its_authority_and_sent_in_origin_form(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await RawUpstream(echo).start()
        upstreams.append(upstream)
        await route_tags(consul, ferryman, "hard-abs", upstream.port, ["urlprefix-hard-abs.test/hard-abs"],
                         ["hard-abs@hard-abs.test/hard-abs"])
        wire = await connect()

        wire.send(b"GET /hard-abs/path?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
        control = await answer(wire)
        wire.send(b"GET http://hard-abs.test/hard-abs/path?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
        got = seen(await answer(wire))

        assert control.status == 404, "the route is for host hard-abs.test only"
        assert got["target"] == "/hard-abs/path?q=1"
        assert values(got["headers"], "Host") == ["hard-abs.test"]
        assert values(got["headers"], "X-Forwarded-Host") == ["hard-abs.test"]

    async def test_absolute_form_target_with_another_scheme_is_400(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await routed_raw(upstreams, consul, ferryman, "hard-scheme", echo)
        wire = await connect()

        wire.send(b"GET ftp://edge.test/hard-scheme/x HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        resp = await answer(wire)

        assert resp.status == 400, f"{resp.status} {resp.reason}: {resp.body!r}"
        assert await heads_after_a_round_trip(upstream, connect, "hard-scheme") == ["GET /hard-scheme/probe"]

    async def test_connect_is_405_and_nothing_reaches_an_upstream(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        # An upstream for the CONNECT authority's host, and one for the request smuggled after the CONNECT head.
        upstream = await RawUpstream(echo).start()
        upstreams.append(upstream)
        await route_tags(consul, ferryman, "hard-connect", upstream.port,
                         ["urlprefix-hard-connect.test/", "urlprefix-/hard-connect"],
                         ["hard-connect@hard-connect.test/", "hard-connect@*any*/hard-connect"])
        wire = await connect()

        wire.send(b"CONNECT hard-connect.test:443 HTTP/1.1\r\nHost: hard-connect.test:443\r\n\r\n"
                  + request("GET", "/hard-connect/smuggled"))
        resp = await answer(wire)
        rest = await rest_of(wire)

        assert resp.status == 405, f"{resp.status} {resp.reason}: {resp.body!r}"
        assert rest == b"", f"answers to bytes after the CONNECT head: {rest[:300]!r}"
        assert wire.ended is not None, "the connection stayed open after CONNECT"
        assert await heads_after_a_round_trip(upstream, connect, "hard-connect") == ["GET /hard-connect/probe"]


class TestTransferCodings:
    """A transfer coding the proxy cannot relay faithfully is refused before anything reaches an upstream."""

    @pytest.mark.parametrize("fields", [
        pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", id="one-field-line"),
        # RFC 9110 §5.3: field lines of the same name combine into one list, here "gzip, chunked" again.
        pytest.param(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", id="two-field-lines"),
    ])
    async def test_gzip_then_chunked_is_501_the_connection_closed_and_nothing_forwarded(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        fields: bytes
    ) -> None:
        name = f"hard-gzip-{fields.count(b'Transfer')}"
        upstream = await routed_raw(upstreams, consul, ferryman, name, echo)
        warm = await connect()
        warm.send(request("GET", f"/{name}/warm-up"))  # a pooled connection the refused request could take
        assert (await answer(warm)).status == 200
        wire = await connect()

        wire.send(b"POST /%b/x HTTP/1.1\r\nHost: edge.test\r\n%b\r\n5\r\nhello\r\n0\r\n\r\n" % (name.encode(), fields))
        resp = await answer(wire)
        assert resp.status == 501, f"{resp.status} {resp.reason}: {resp.body!r}"
        await rest_of(wire)

        assert resp.header("Connection") == "close"
        assert wire.ended is not None, "the connection stayed open after the 501"
        assert await heads_after_a_round_trip(upstream, connect, name) == [
            f"GET /{name}/warm-up", f"GET /{name}/probe",
        ]


class TestUpstreamOverrun:
    """Bytes an upstream sends beyond its response's framing are never taken for the next response."""

    @pytest.mark.parametrize("extra", [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled", id="a-whole-response"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsmu", id="a-response-cut-short"),
        pytest.param(b"\x00\x01 not http at all\r\n\r\n", id="garbage"),
    ])
    @pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
    async def test_next_request_gets_its_own_answer_on_a_new_upstream_connection(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        extra: bytes, pipelined: bool
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.request.target.endswith("/first"):
                ex.writer.write(ok(b"first answer") + extra)  # one write: one read at the proxy
            else:
                ex.writer.write(ok(b"answer to " + ex.request.target.encode()))
            return True

        name = f"hard-overrun-{len(extra)}-{'p' if pipelined else 's'}"
        upstream = await routed_raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        if pipelined:
            wire.send(request("GET", f"/{name}/first") + request("GET", f"/{name}/second"))
            first = await answer(wire)
        else:
            wire.send(request("GET", f"/{name}/first"))
            first = await answer(wire)
            wire.send(request("GET", f"/{name}/second"))
        second = await answer(wire)

        assert (first.status, first.body) == (200, b"first answer")
        assert (second.status, second.body) == (200, f"answer to /{name}/second".encode()), (
            f"the second request got {second.status} {second.reason}: {second.body!r}"
        )
        assert wire.buffer == b"" and wire.ended is None
        assert upstream.connections == 2, "the connection that overran its response was reused"
