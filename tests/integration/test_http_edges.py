"""HTTP/1.1 edge cases through the proxy, seen on the wire from both sides.

The client side is a raw socket (`Wire`) that keeps every byte the proxy sent and tells a clean close (FIN) from a
reset (RST), so framing mistakes cannot hide behind a forgiving HTTP client. The upstream side is either an
aiohttp `Backend` or a `RawUpstream` whose answers are written by hand, byte for byte, to produce what aiohttp
never sends: close-delimited bodies, HTTP/1.0 status lines, interim 1xx answers, bodies cut short, keep-alive
connections dropped between requests. Each test registers its upstream in the real Consul agent under its own
service name and `urlprefix-/<name>` route.

Every wait is bounded by `WAIT`; sleeps only pace a sender, they never stand for an assertion about timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, async_wait_until, pattern_bytes
from .rawhttp import (
    WAIT,
    Connect,
    RawUpstream,
    Response,
    Truncated,
    UpstreamExchange,
    echo,
    ok,
    request,
    reset,
)
from .rawhttp import connect as connect  # pytest fixtures, requested by name
from .rawhttp import routed_backend as _backend
from .rawhttp import routed_raw as _raw
from .rawhttp import upstreams as upstreams

pytestmark = pytest.mark.integration


# --- the specification ----------------------------------------------------------------------------------------


class TestBodilessResponses:
    """Responses that carry no body by definition are relayed without one, and the connection stays usable."""

    async def test_head_keeps_content_length_sends_no_body_and_the_connection_serves_a_get_next(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(ok(b"hello world", b"Content-Type: text/plain\r\n", head=ex.request.method == "HEAD"))
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-head", handler)
        wire = await connect()

        wire.send(request("HEAD", "/edge-head/file"))
        head = await wire.response(method="HEAD")
        assert head.status == 200
        assert head.header("Content-Length") == "11"
        wire.send(request("GET", "/edge-head/file"))
        got = await wire.response()  # a HEAD body leaked onto the wire would be read here as the status line

        assert (got.status, got.body) == (200, b"hello world")
        assert wire.buffer == b"" and wire.ended is None
        assert upstream.connections == 1, "the upstream connection is reused after a HEAD"

    @pytest.mark.parametrize("status_line, fields", [
        pytest.param(b"204 No Content", b"X-Kind: none\r\n", id="204"),
        # A 304 may repeat the Content-Length of the representation it stands for (RFC 9110 §8.6).
        pytest.param(b"304 Not Modified", b'ETag: "v1"\r\nContent-Length: 11\r\n', id="304-with-content-length"),
    ])
    async def test_204_and_304_carry_no_body_and_the_connection_stays_usable(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        status_line: bytes, fields: bytes
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.request.target.endswith("/empty"):
                ex.writer.write(b"HTTP/1.1 " + status_line + b"\r\n" + fields + b"\r\n")
            else:
                ex.writer.write(ok(b"hello world"))
            return True

        name = f"edge-nobody-{status_line[:3].decode()}"
        upstream = await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        for _ in range(2):
            wire.send(request("GET", f"/{name}/empty"))
            empty = await wire.response()
            assert empty.status == int(status_line[:3])
            assert empty.body == b""
            wire.send(request("GET", f"/{name}/full"))
            full = await wire.response()
            assert (full.status, full.body) == (200, b"hello world")

        assert wire.buffer == b"" and wire.ended is None
        assert upstream.connections == 1


class TestBodyFraming:
    """Chunked and close-delimited bodies arrive whole, framed the way the client's HTTP version allows."""

    @staticmethod
    async def chunked(ex: UpstreamExchange) -> bool:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n")
        for piece in (b"hello ", b"chunked ", b"world"):
            ex.writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await ex.writer.drain()
        ex.writer.write(b"0\r\n\r\n")
        return True

    async def test_chunked_response_reaches_an_http11_client_chunked_and_intact(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await _raw(upstreams, consul, ferryman, "edge-chunk11", self.chunked)
        wire = await connect()

        for _ in range(2):  # and the connection carries the next request
            wire.send(request("GET", "/edge-chunk11/text"))
            resp = await wire.response()
            assert resp.status == 200
            assert resp.chunked
            assert resp.header("Content-Length") is None
            assert resp.body == b"hello chunked world"
        assert wire.ended is None

    async def test_chunked_response_reaches_an_http10_client_close_delimited(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await _raw(upstreams, consul, ferryman, "edge-chunk10", self.chunked)
        wire = await connect()

        wire.send(request("GET", "/edge-chunk10/text", version="HTTP/1.0"))
        resp = await wire.response()

        assert resp.status == 200
        assert resp.header("Transfer-Encoding") is None, "HTTP/1.0 has no chunked coding (RFC 9112 §7.1)"
        assert resp.header("Content-Length") is None
        assert resp.body == b"hello chunked world"
        assert wire.ended == "eof", "the end of the body is the end of the connection"

    @pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
    async def test_close_delimited_response_arrives_whole(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        version: str
    ) -> None:
        size = 300 * 1024

        async def handler(ex: UpstreamExchange) -> bool:
            # Neither Content-Length nor chunked: the body ends when the upstream closes (RFC 9112 §6.3 rule 8).
            ex.writer.write(f"{version} 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
            for offset in range(0, size, 50_000):
                ex.writer.write(pattern_bytes(offset, min(50_000, size - offset)))
                await ex.writer.drain()
            return False

        name = f"edge-eof-{version[-1]}"
        upstream = await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        for _ in range(2):  # the client connection outlives the upstream one
            wire.send(request("GET", f"/{name}/blob"))
            resp = await wire.response()
            assert resp.status == 200
            assert len(resp.body) == size
            assert resp.body == pattern_bytes(0, size)
        assert upstream.connections == 2

    async def test_http10_upstream_connection_without_keep_alive_is_not_reused(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            # An HTTP/1.0 answer without keep-alive ends the connection's use, even if the socket stays open.
            ex.writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-up10", handler)
        wire = await connect()

        for _ in range(2):
            wire.send(request("GET", "/edge-up10/x"))
            resp = await wire.response()
            assert (resp.status, resp.body) == (200, b"hello")
        assert upstream.connections == 2


class TestPipelining:
    """Requests sent back to back on one connection are answered in order."""

    async def test_pipelined_requests_in_one_write_get_responses_in_order(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.request.target.endswith("/first"):
                await asyncio.sleep(0.1)  # tempt a proxy that would answer the quicker one first
            return await echo(ex)

        await _raw(upstreams, consul, ferryman, "edge-pipe", handler)
        wire = await connect()

        wire.send(
            request("GET", "/edge-pipe/first")
            + request("POST", "/edge-pipe/second", body=b"payload")
            + request("GET", "/edge-pipe/third")
        )
        answers = [await wire.response() for _ in range(3)]

        assert [r.status for r in answers] == [200, 200, 200]
        seen = [json.loads(r.body) for r in answers]
        assert [(s["method"], s["target"], s["body"]) for s in seen] == [
            ("GET", "/edge-pipe/first", ""), ("POST", "/edge-pipe/second", "payload"), ("GET", "/edge-pipe/third", ""),
        ]
        assert wire.ended is None

    async def test_a_malformed_request_pipelined_after_a_valid_one_does_not_cost_the_valid_one_its_answer(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        await _raw(upstreams, consul, ferryman, "edge-pipebad", echo)
        wire = await connect()

        wire.send(request("GET", "/edge-pipebad/valid") + b"this is not http\r\n\r\n")

        try:
            first = await wire.response()
        except Truncated as exc:
            pytest.fail(f"the valid request got no answer; the proxy sent {exc.received!r} and closed ({exc.ended})")
        assert first.status == 200
        assert json.loads(first.body)["target"] == "/edge-pipebad/valid"
        second = await wire.response()
        assert second.status == 400
        await wire.until_closed()


class TestExpectContinue:
    """`Expect: 100-continue` is answered by the proxy once it knows where the body goes, and only then."""

    async def test_client_gets_100_continue_before_sending_the_body_then_the_final_answer(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await _raw(upstreams, consul, ferryman, "edge-expect", echo)
        wire = await connect()

        wire.send(request("PUT", "/edge-expect/doc", "Expect: 100-continue", "Content-Length: 11"))
        interim = await wire.head()  # the body is not sent yet: without a 100 this wait would time out
        assert (interim.version, interim.status) == ("HTTP/1.1", 100)
        wire.send(b"hello world")
        final = await wire.response()

        assert final.status == 200
        seen = json.loads(final.body)
        assert seen["body"] == "hello world"
        assert "expect" not in {name.lower() for name, _ in seen["headers"]}
        assert len(upstream.requests) == 1
        wire.send(request("GET", "/edge-expect/next"))
        assert (await wire.response()).status == 200

    async def test_no_route_answers_404_without_100_continue(self, ferryman: FerrymanProcess, connect: Connect) -> None:
        wire = await connect()

        wire.send(request("PUT", "/edge-nowhere/doc", "Expect: 100-continue", "Content-Length: 11"))
        resp = await wire.response()

        assert resp.status == 404, f"expected the 404 first, got {resp.status} {resp.reason}"
        # The body was never sent, so the connection cannot be read on: the proxy closes it.
        assert resp.header("Connection") == "close"
        assert await wire.until_closed() == b""

    async def test_http10_client_gets_no_100_continue(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await _raw(upstreams, consul, ferryman, "edge-expect10", echo)
        wire = await connect()

        wire.send(request("PUT", "/edge-expect10/doc", "Expect: 100-continue", "Content-Length: 11",
                          version="HTTP/1.0"))
        await asyncio.wait_for(upstream.head_seen.wait(), WAIT)  # the proxy has chosen where the body goes
        wire.send(b"hello world")
        resp = await wire.response()

        # RFC 9110 §10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request;
        # §15.2: a server MUST NOT send a 1xx response to an HTTP/1.0 client.
        assert resp.status == 200, f"an HTTP/1.0 client got {resp.version} {resp.status} {resp.reason}"
        assert json.loads(resp.body)["body"] == "hello world"


class TestInterimResponses:
    """Interim 1xx answers from the upstream do not disturb the final answer the client reads."""

    @pytest.mark.parametrize("interim", [
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="100-continue"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n", id="103-early-hints"),
    ])
    async def test_final_response_after_an_interim_one_arrives_intact(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
        interim: bytes
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(interim)
            await ex.writer.drain()
            await asyncio.sleep(0.05)  # a separate read for the proxy, not one buffer with the final answer
            ex.writer.write(ok(b"final answer", b"X-Final: yes\r\n"))
            return True

        name = f"edge-interim-{interim[9:12].decode()}"
        await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        for _ in range(2):
            wire.send(request("POST", f"/{name}/x", body=b"data"))
            resp = await wire.head()
            if interim.startswith(b"HTTP/1.1 100"):
                # The proxy stripped the client's Expect (it answers that itself), so the upstream's 100 is the
                # proxy's to swallow (RFC 9110 §15.2).
                assert resp.status == 200, f"the client got {resp.status} {resp.reason} before the final answer"
            while resp.status < 200:  # a forwarded 103 is allowed; it must be well formed and then end
                resp = await wire.head()
            resp = await wire.body(resp)
            assert (resp.status, resp.header("X-Final"), resp.body) == (200, "yes", b"final answer")
        assert wire.buffer == b"" and wire.ended is None


class TestClientProtocolErrors:
    """A request the proxy cannot read gets the status that says why, and the connection is closed."""

    @pytest.mark.parametrize("raw, status", [
        pytest.param(b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                     400, id="content-length-and-chunked"),
        pytest.param(b"this is not http\r\n\r\n", 400, id="garbage-request-line"),
        # RFC 9112 §6.3: chunked not last in a request's Transfer-Encoding -> MUST answer 400 and close.
        pytest.param(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
                     id="transfer-encoding-not-chunked"),
        pytest.param(b"GET /" + b"a" * 9 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="9KiB-target"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Fill-%d: %b\r\n" % (i, b"v" * 1000)
                                                             for i in range(70)) + b"\r\n",
                     431, id="70KiB-headers"),
    ])
    async def test_malformed_request_gets_its_status_and_the_connection_closed(
        self, connect: Connect, raw: bytes, status: int
    ) -> None:
        wire = await connect()

        wire.send(raw)
        try:
            resp = await wire.response()
        except Truncated as exc:
            pytest.fail(f"expected {status}; the proxy sent {exc.received!r} and closed the connection ({exc.ended})")

        assert resp.status == status, resp.body
        assert resp.header("Connection") == "close"
        await wire.until_closed()  # closed (FIN, or RST where part of the request stayed unread)


    async def test_request_refused_as_malformed_never_reaches_the_upstream(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        upstream = await _raw(upstreams, consul, ferryman, "edge-te", echo)
        warm = await connect()
        warm.send(request("GET", "/edge-te/warm-up"))  # leaves a pooled connection the next request could take
        assert (await warm.response()).status == 200
        wire = await connect()

        wire.send(b"POST /edge-te/x HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: gzip\r\n\r\n")
        try:
            resp = await wire.response()
        except Truncated as exc:
            resp = Response("", 0, f"nothing: {exc.received!r}, connection ended ({exc.ended})", [])
        warm.send(request("GET", "/edge-te/after"))  # a round trip, so the upstream has read what it was sent
        assert (await warm.response()).status == 200

        assert resp.status == 400, f"expected 400, got {resp.status} {resp.reason}"
        assert upstream.heads == ["GET /edge-te/warm-up", "GET /edge-te/after"]


class TestUpstreamCutsTheBody:
    """An upstream that stops mid-body never yields a complete-looking short response at the client."""

    @pytest.mark.parametrize("name, answer, ending, client_version", [
        pytest.param("edge-cut-length", b"Content-Length: 100000\r\n\r\n" + b"x" * 1000, "fin", "HTTP/1.1",
                     id="content-length"),
        pytest.param("edge-cut-chunked", b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
                     "fin", "HTTP/1.1", id="chunked"),
        # To an HTTP/1.0 client the body is close-delimited: only a reset can say it is incomplete.
        pytest.param("edge-cut-chunked10", b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
                     "fin", "HTTP/1.0", id="chunked-to-http10-client"),
        # A close-delimited body ends cleanly only with a FIN; a reset means the upstream failed mid-body.
        pytest.param("edge-cut-eof-reset", b"\r\n" + b"x" * 1000, "reset", "HTTP/1.1", id="close-delimited-reset"),
    ])
    async def test_client_sees_a_truncated_body(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect, name: str,
        answer: bytes, ending: str, client_version: str
    ) -> None:
        cut = asyncio.Event()

        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + answer)
            await ex.writer.drain()
            await asyncio.wait_for(cut.wait(), WAIT)  # until the client saw the head: the failure is mid-body
            if ending == "reset":
                reset(ex.writer)
            return False

        await _raw(upstreams, consul, ferryman, name, handler)
        wire = await connect()

        wire.send(request("GET", f"/{name}/blob", version=client_version))
        resp = await wire.head()
        assert resp.status == 200
        cut.set()
        with pytest.raises(Truncated) as truncated:
            resp = await wire.body(resp)
            pytest.fail(f"the client read a complete {len(resp.body)}-byte body; the connection ended with "
                        f"{wire.ended}")
        assert truncated.value.received.count(b"x") <= 1000


class TestStaleUpstreamConnections:
    """Keep-alive connections the upstream dropped are retried on a new connection for idempotent requests."""

    async def test_upstream_closing_after_every_keep_alive_response_costs_no_request(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            ex.writer.write(ok(b"n=%d" % ex.connection))  # announces keep-alive, then closes anyway
            return False

        upstream = await _raw(upstreams, consul, ferryman, "edge-drop", handler)
        wire = await connect()

        for _ in range(8):
            wire.send(request("GET", "/edge-drop/x"))
            resp = await wire.response()
            assert resp.status == 200, resp.body
        assert upstream.connections == 8

    async def test_upstream_dropping_a_pooled_connection_as_the_next_request_arrives_costs_no_request(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        async def handler(ex: UpstreamExchange) -> bool:
            if ex.index > 0:
                return False  # the keep-alive race: the upstream gave up on the connection just as it was reused
            ex.writer.write(ok(head=ex.request.method == "HEAD"))
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-stale", handler)
        wire = await connect()

        for method in ("GET", "GET", "HEAD", "DELETE", "GET"):
            wire.send(request(method, "/edge-stale/x"))
            resp = await wire.response(method=method)
            assert resp.status == 200, f"{method}: {resp.status} {resp.body!r}"
        assert upstream.connections == 5

    async def test_several_dropped_pooled_connections_cost_no_request(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        both_in = asyncio.Event()
        in_flight = 0

        async def handler(ex: UpstreamExchange) -> bool:
            nonlocal in_flight
            if ex.index > 0:
                return False  # every pooled connection went stale at once (an upstream keep-alive timeout)
            in_flight += 1
            if in_flight >= 2:
                both_in.set()
            await asyncio.wait_for(both_in.wait(), WAIT)  # two requests at once: two pooled connections after
            ex.writer.write(ok())
            return True

        upstream = await _raw(upstreams, consul, ferryman, "edge-stale2", handler)
        first, second = await connect(), await connect()
        first.send(request("GET", "/edge-stale2/a"))
        second.send(request("GET", "/edge-stale2/b"))
        assert [(await w.response()).status for w in (first, second)] == [200, 200]
        assert upstream.connections == 2

        first.send(request("GET", "/edge-stale2/c"))
        resp = await first.response()

        assert resp.status == 200, f"{resp.status} {resp.body!r} after {upstream.connections} upstream connections"


class TestClientGoesAway:
    """A client that hangs up mid-response is logged as 499 and costs nobody else anything."""

    async def test_client_disconnect_mid_stream_is_499_and_the_proxy_keeps_serving(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect
    ) -> None:
        hung_up = asyncio.Event()

        async def handler(ex: UpstreamExchange) -> bool:
            if not ex.request.target.endswith("/stream"):
                ex.writer.write(ok(b"still here"))
                return True
            ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            await ex.writer.drain()
            try:  # the rest never comes: wait for the proxy to let go of this connection
                await asyncio.wait_for(ex.reader.read(), WAIT)
            except ConnectionError:
                pass
            hung_up.set()
            return False

        await _raw(upstreams, consul, ferryman, "edge-gone", handler)
        wire = await connect()
        wire.send(request("GET", "/edge-gone/stream"))
        assert (await wire.head()).status == 200
        await wire.take_until(b"first\n")
        wire.close()

        await asyncio.wait_for(hung_up.wait(), WAIT)  # the proxy dropped the upstream side too
        for _ in range(3):
            other = await connect()
            other.send(request("GET", "/edge-gone/other"))
            resp = await other.response()
            assert (resp.status, resp.body) == (200, b"still here")

        async def logged() -> list[int]:
            return [e["status"] for e in ferryman.log_events()
                    if e.get("event") == "access" and e.get("path") == "/edge-gone/stream"]

        assert await async_wait_until(logged, WAIT, "the access log line of the abandoned request") == [499]


class TestRequestBodies:
    """Request bodies bigger than the proxy's buffer arrive intact, however slowly they are sent."""

    async def test_body_over_256KiB_queued_behind_a_slow_request_arrives_intact(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], connect: Connect
    ) -> None:
        await _backend(backends, consul, ferryman, "edge-buffered")
        size = 640 * 1024
        payload = os.urandom(size)
        wire = await connect()

        # The upload is pipelined behind a slow request, so the proxy must buffer it, then stop reading at its
        # bound, then resume once the upload's turn comes.
        wire.send(request("GET", "/edge-buffered/slow?delay=0.3"))
        wire.send(request("POST", "/edge-buffered/upload", f"Content-Length: {size}"))
        for offset in range(0, size, 32 * 1024):
            wire.send(payload[offset : offset + 32 * 1024])
            await wire.drain()
            await asyncio.sleep(0.005)
        slow = await wire.response()
        upload = await wire.response()

        assert (slow.status, slow.body) == (200, b"late\n")
        assert upload.status == 200, upload.body
        assert json.loads(upload.body) == {"sha256": hashlib.sha256(payload).hexdigest(), "size": size,
                                           "chunked": False}

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    async def test_upload_slower_than_the_read_timeout_arrives_intact(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], connect: Connect, framing: str
    ) -> None:
        # The upstream is silent while the body is still coming: that is not an upstream timeout (README:
        # read_timeout is "the longest silence of an upstream"; here the client is the one still talking).
        await _backend(backends, consul, ferryman, f"edge-slowup-{framing}")
        size, piece = 320 * 1024, 16 * 1024
        payload = os.urandom(size)
        wire = await connect()

        framing_header = f"Content-Length: {size}" if framing == "content-length" else "Transfer-Encoding: chunked"
        wire.send(request("POST", f"/edge-slowup-{framing}/upload", framing_header))
        for offset in range(0, size, piece):  # 20 pieces, 75 ms apart: 1.5 s, the fixture's read timeout is 1 s
            data = payload[offset : offset + piece]
            wire.send(data if framing == "content-length" else b"%x\r\n%b\r\n" % (len(data), data))
            await wire.drain()
            await asyncio.sleep(0.075)
            if wire.ended is not None or wire.buffer:
                break  # the proxy answered early: the assertion below says with what
        if framing == "chunked" and wire.ended is None and not wire.buffer:
            wire.send(b"0\r\n\r\n")
        resp = await wire.response()

        assert resp.status == 200, f"{resp.status} {resp.body!r}"
        assert json.loads(resp.body)["sha256"] == hashlib.sha256(payload).hexdigest()

