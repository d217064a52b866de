"""Request framing on the raw wire: every way of saying where a request ends that the proxy must not guess at.

A request whose framing is ambiguous or malformed is the raw material of request smuggling: a proxy and the
upstream behind it that disagree on where a request ends see different requests. So each such request is
answered 400 (or the status named), with `Connection: close`, the connection then closes, and nothing of it
reaches the upstream. The upstream is a `RawUpstream` routed in the real Consul agent with a pooled keep-alive
connection already open (the warm-up request), so a refused request had every chance to slip through; what
reached it is read after a probe on a new connection has made a round trip.

Some requests are well formed, or forgivable, and are relayed: chunk extensions, `Chunked` in another case; for
those the upstream must see them re-framed by the proxy, never passed on raw.

Each request goes out in one write, so the proxy parses it whole before starting it (see
`ClientConnection.data_received`); the one exception is a bad chunk sent after the head already went upstream,
where the upstream must be left with an incomplete request. Every wait is bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .harness import ConsulAgent, FerrymanProcess, _http_json
from .rawhttp import WAIT, Connect, RawUpstream, Response, Truncated, Wire, echo, request, routed_raw
from .rawhttp import connect as connect  # pytest fixtures, requested by name
from .rawhttp import upstreams as upstreams

pytestmark = pytest.mark.integration

_services = itertools.count(1)  # a service name per test: two ids may read alike once lower-cased


# --- helpers --------------------------------------------------------------------------------------------------


def _agent_instances(consul: ConsulAgent) -> set[str]:
    return set(_http_json("GET", f"{consul.url}/v1/agent/services") or {})


@pytest.fixture(autouse=True)
async def consul_left_as_found(consul: ConsulAgent) -> AsyncIterator[None]:
    """Deregister what a test registered: each routed service holds a blocking query (a connection) open from
    every Ferryman watching the shared agent, and Consul allows 200 per client address (see test_hardening)."""
    before = await asyncio.to_thread(_agent_instances, consul)
    yield
    for instance in await asyncio.to_thread(_agent_instances, consul) - before:
        await asyncio.to_thread(consul.deregister, instance)


async def answer(wire: Wire) -> Response:
    """The next response; a connection that ended (or stayed silent) instead fails the test with what it carried."""
    try:
        return await wire.response()
    except Truncated as exc:
        pytest.fail(f"no complete response: the proxy sent {exc.received[:300]!r} and closed ({exc.ended})")
    except TimeoutError:
        pytest.fail(f"no complete response within {WAIT} s; received {bytes(wire.buffer[:300])!r}")


async def closed(wire: Wire) -> bytes:
    """Whatever else arrives until the connection ends (FIN, or RST where part of the request stayed unread)."""
    try:
        return await wire.until_closed()
    except TimeoutError:
        pytest.fail(f"the connection stayed open {WAIT} s after the answer; then received {bytes(wire.buffer)!r}")


def values(headers: list[list[str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


def seen(resp: Response) -> dict[str, Any]:
    """The account an `echo` upstream gave of the request it received."""
    assert resp.status == 200, f"{resp.status} {resp.reason}: {resp.body[:300]!r}"
    account: dict[str, Any] = json.loads(resp.body)
    return account


class Routed:
    """A routed `echo` upstream with one pooled keep-alive connection to it already open."""

    def __init__(self, name: str, upstream: RawUpstream, connect: Connect) -> None:
        self.name = name
        self.upstream = upstream
        self.connect = connect
        self.target = f"/{name}/x".encode()

    def raw(self, template: bytes) -> bytes:
        return template.replace(b"{T}", self.target)

    async def heads_after_a_round_trip(self) -> list[str]:
        """Every request head the upstream received, once a probe on a new connection came back."""
        probe = await self.connect()
        probe.send(request("GET", f"/{self.name}/probe"))
        assert (await answer(probe)).status == 200
        return self.upstream.heads

    async def nothing_reached_the_upstream(self) -> None:
        assert await self.heads_after_a_round_trip() == [f"GET /{self.name}/warm-up", f"GET /{self.name}/probe"]


@pytest.fixture
async def routed(
    consul: ConsulAgent, ferryman: FerrymanProcess, upstreams: list[RawUpstream], connect: Connect,
    request: pytest.FixtureRequest,
) -> Routed:
    """An `echo` upstream behind `urlprefix-/frame-<n>-<test id>`, warmed up: a pooled connection is waiting."""
    case = request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
    name = f"frame-{next(_services)}-" + "".join(c if c.isalnum() else "-" for c in case.lower())[:32].strip("-")
    upstream = await routed_raw(upstreams, consul, ferryman, name, echo)
    warm = await connect()
    warm.send(b"GET /%b/warm-up HTTP/1.1\r\nHost: edge.test\r\n\r\n" % name.encode())
    assert (await answer(warm)).status == 200
    return Routed(name, upstream, connect)


async def refused(routed: Routed, raw: bytes, statuses: tuple[int, ...] = (400,)) -> Response:
    """Send `raw` in one write on a new connection; the answer is one of `statuses`, says `Connection: close`,
    the connection then closes, and nothing reached the upstream."""
    wire = await routed.connect()
    wire.send(routed.raw(raw))
    resp = await answer(wire)

    assert resp.status in statuses, f"expected {statuses}, got {resp.status} {resp.reason}: {resp.body[:300]!r}"
    assert resp.header("Connection") == "close", resp.headers
    rest = await closed(wire)
    assert rest == b"", f"more after the refusal: {rest[:300]!r}"
    assert wire.ended is not None
    await routed.nothing_reached_the_upstream()
    return resp


# --- the specification ----------------------------------------------------------------------------------------

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
HEAD = b"POST {T} HTTP/1.1\r\nHost: edge.test\r\n"


class TestAmbiguousLength:
    """Two ways of saying where the body ends, or two answers from one way: 400 (RFC 9112 §6.1, §6.3)."""

    @pytest.mark.parametrize("raw", [
        # RFC 9112 §6.1: a request with both MAY be refused (and then the connection MUST close); a proxy that
        # relays it instead must drop Content-Length. Refusing is what nginx and Envoy do.
        pytest.param(HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
                     id="content-length-then-chunked"),
        pytest.param(HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + CHUNKED_HELLO,
                     id="chunked-then-content-length"),
        # RFC 9112 §6.3 rule 5: differing lengths, or a list of them, are unrecoverable: 400 and close.
        pytest.param(HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", id="two-content-lengths"),
        pytest.param(HEAD + b"Content-Length: 5, 6\r\n\r\nhello!", id="content-length-list"),
    ])
    async def test_refused_and_nothing_forwarded(self, routed: Routed, raw: bytes) -> None:
        await refused(routed, raw)

    async def test_the_same_content_length_twice_is_refused_or_forwarded_with_one(self, routed: Routed) -> None:
        # RFC 9110 §8.6: a recipient MAY take `5` and `5` for one valid Content-Length; what it must never do is
        # pass both on. Either answer is acceptable (llhttp refuses any duplicate).
        wire = await routed.connect()
        wire.send(routed.raw(HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"))
        resp = await answer(wire)

        if resp.status == 400:
            assert resp.header("Connection") == "close"
            await closed(wire)
            await routed.nothing_reached_the_upstream()
        else:
            got = seen(resp)
            assert values(got["headers"], "Content-Length") == ["5"], got["headers"]
            assert got["body"] == "hello"


class TestTransferCodings:
    """A request's Transfer-Encoding is exactly `chunked`, or the request is refused (RFC 9112 §6.3 rule 4)."""

    @pytest.mark.parametrize("fields", [
        # chunked not the final coding: the length cannot be determined, MUST be 400 and close.
        pytest.param(b"Transfer-Encoding: chunked, gzip\r\n", id="chunked-then-gzip"),
        # RFC 9112 §7: chunked MUST NOT be applied twice; the two field lines combine to `chunked, chunked`.
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", id="chunked-on-two-lines"),
        pytest.param(b"Transfer-Encoding: chunked, chunked\r\n", id="chunked-twice-in-one-line"),
        # `identity` was removed from the registry (RFC 7230); it is not chunked, so the length is unknown.
        pytest.param(b"Transfer-Encoding: identity\r\n", id="identity"),
    ])
    async def test_not_exactly_chunked_is_refused_and_nothing_forwarded(self, routed: Routed, fields: bytes) -> None:
        await refused(routed, HEAD + fields + b"\r\n" + CHUNKED_HELLO)

    @pytest.mark.parametrize("coding", [
        pytest.param(b"Chunked", id="Chunked"),
        pytest.param(b"CHUNKED", id="CHUNKED"),
        pytest.param(b"  chunked  ", id="blank-padded"),
        pytest.param(b"\tcHuNkEd", id="tab-and-mixed-case"),
    ])
    async def test_chunked_in_another_case_is_framed_as_chunked_not_passed_raw(
        self, routed: Routed, coding: bytes
    ) -> None:
        # Transfer coding names are case-insensitive (RFC 9112 §7): the body is decoded as chunked and framed
        # anew by the proxy, with its own `Transfer-Encoding: chunked`.
        wire = await routed.connect()
        wire.send(routed.raw(HEAD + b"Transfer-Encoding: " + coding + b"\r\n\r\n" + CHUNKED_HELLO))
        got = seen(await answer(wire))

        assert values(got["headers"], "Transfer-Encoding") == ["chunked"], got["headers"]
        assert values(got["headers"], "Content-Length") == []
        assert got["body"] == "hello"
        assert wire.ended is None, "a well-formed request keeps the connection"


class TestChunkSizes:
    """A chunk size line is hex digits, then optional extensions, then CRLF; anything else is a 400."""

    @pytest.mark.parametrize("body", [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="not-hex"),
        pytest.param(b"-1\r\nhello\r\n0\r\n\r\n", id="negative"),
        pytest.param(b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n", id="20-hex-digits-overflow"),
        # After a chunk's data comes CRLF; here the next chunk size follows at once.
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no-crlf-after-chunk-data"),
        pytest.param(b"5\r\nhello0\r\n\r\n", id="next-chunk-size-where-the-crlf-belongs"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n", id="chunk-longer-than-its-size"),
    ])
    async def test_invalid_chunk_framing_is_refused_and_nothing_forwarded(self, routed: Routed, body: bytes) -> None:
        await refused(routed, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body)

    @pytest.mark.parametrize("bad", [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="not-hex"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no-crlf-after-chunk-data"),
    ])
    async def test_invalid_chunk_after_the_head_went_upstream_never_completes_the_request_there(
        self, routed: Routed, bad: bytes
    ) -> None:
        # Bodies stream: once the head and a first chunk are upstream, a bad chunk can no longer keep the request
        # from the upstream. It must still never see a complete request: no last chunk, its connection closed.
        wire = await routed.connect()
        routed.upstream.head_seen.clear()  # set by the warm-up's head
        wire.send(routed.raw(HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"))
        await asyncio.wait_for(routed.upstream.head_seen.wait(), WAIT)
        wire.send(bad)
        resp = await answer(wire)

        assert resp.status == 400, f"{resp.status} {resp.reason}: {resp.body[:300]!r}"
        assert resp.header("Connection") == "close"
        assert await closed(wire) == b""
        assert await routed.heads_after_a_round_trip() == [
            f"GET /{routed.name}/warm-up", f"POST /{routed.name}/x", f"GET /{routed.name}/probe",
        ]
        assert [r.target for r in routed.upstream.requests] == [f"/{routed.name}/warm-up", f"/{routed.name}/probe"], (
            "the upstream read a complete request out of a body the client broke off"
        )

    @pytest.mark.parametrize("size_line", [
        pytest.param(b"5;ext", id="bare-extension"),
        pytest.param(b"5;name=value", id="extension-with-value"),
        pytest.param(b'5;a=1;b="quoted"', id="two-extensions-one-quoted"),
    ])
    async def test_chunk_extensions_are_accepted_and_the_body_arrives(self, routed: Routed, size_line: bytes) -> None:
        # RFC 9112 §7.1.1: a recipient MUST ignore chunk extensions it does not understand.
        wire = await routed.connect()
        wire.send(routed.raw(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nhello\r\n0\r\n\r\n"))
        got = seen(await answer(wire))

        assert got["body"] == "hello"
        assert values(got["headers"], "Transfer-Encoding") == ["chunked"]
        assert wire.ended is None


class TestFieldLines:
    """Field lines that parsers disagree on are refused rather than read one way here and another upstream."""

    GET = b"GET {T} HTTP/1.1\r\n"

    @pytest.mark.parametrize("raw", [
        # RFC 9112 §5.2: obs-fold outside message/http MUST be rejected with 400 (or replaced by SP).
        pytest.param(GET + b"Host: edge.test\r\nX-Folded: a\r\n b\r\n\r\n", id="obs-fold-space"),
        pytest.param(GET + b"Host: edge.test\r\nX-Folded: a\r\n\tb\r\n\r\n", id="obs-fold-tab"),
        # A folded Host: one reader sees `edge.test`, another `edge.test other.example`.
        pytest.param(GET + b"Host: edge.test\r\n other.example\r\n\r\n", id="obs-fold-of-host"),
        # RFC 9112 §2.2: a bare CR anywhere outside content MUST be rejected or replaced by SP.
        pytest.param(GET + b"Host: edge.test\r\nX-A: a\rX-B: b\r\n\r\n", id="bare-cr-in-value"),
        # RFC 9110 §5.5: NUL in a field value MUST be rejected or replaced by SP.
        pytest.param(GET + b"Host: edge.test\r\nX-A: a\x00b\r\n\r\n", id="nul-in-value"),
        pytest.param(b"GET {T}\x00y HTTP/1.1\r\nHost: edge.test\r\n\r\n", id="nul-in-target"),
        # RFC 9112 §5.1: whitespace between field name and colon MUST be answered 400.
        pytest.param(GET + b"Host : edge.test\r\n\r\n", id="space-before-colon"),
        pytest.param(GET + b"Host: edge.test\r\nX-A\t: b\r\n\r\n", id="tab-before-colon"),
        pytest.param(GET + b"Host: edge.test\r\nX A: b\r\n\r\n", id="space-in-name"),
        # RFC 9112 §3.2: an HTTP/1.1 request without Host MUST be answered 400.
        pytest.param(GET + b"X-A: b\r\n\r\n", id="host-missing"),
        # ... and so MUST one whose Host has an invalid value: a list (which host is it?), or a blank inside.
        pytest.param(GET + b"Host: edge.test, other.example\r\n\r\n", id="host-list"),
        pytest.param(GET + b"Host: edge.test other.example\r\n\r\n", id="host-with-a-blank"),
    ])
    async def test_refused_and_nothing_forwarded(self, routed: Routed, raw: bytes) -> None:
        await refused(routed, raw)


class TestRequestLine:
    """The request line: whitespace and versions."""

    @pytest.mark.parametrize("line", [
        pytest.param(b"GET {T} HTTP/0.9", id="HTTP/0.9"),  # HTTP/0.9 had no version in its request line
        pytest.param(b"GET {T} HTTP/1.2", id="HTTP/1.2"),
        pytest.param(b"GET {T} HTTP/2.0", id="HTTP/2.0"),
        pytest.param(b"GET {T} HTTP/3.0", id="HTTP/3.0"),
        # Not covered: llhttp's request parser also takes RTSP/1.0 and Icecast's ICE/1.0 request lines and reports
        # them as version 1.0; httptools does not say which protocol it read. The upstream still gets a well-formed
        # HTTP/1.1 request line written by the proxy, never the foreign one.
    ])
    async def test_unsupported_version_is_505_or_400_and_nothing_forwarded(self, routed: Routed, line: bytes) -> None:
        # RFC 9110 §15.6.6: 505 says the major version is not supported; a 400 for a version the parser does not
        # know is the other reasonable answer. Forwarding it upstream as HTTP/1.1 is neither.
        await refused(routed, line + b"\r\nHost: edge.test\r\n\r\n", (400, 505))

    @pytest.mark.parametrize("line", [
        pytest.param(b"GET  {T} HTTP/1.1", id="two-spaces-before-target"),
        pytest.param(b"GET {T}  HTTP/1.1", id="two-spaces-after-target"),
    ])
    async def test_two_spaces_are_refused_or_read_on_word_boundaries(self, routed: Routed, line: bytes) -> None:
        # RFC 9112 §3: a recipient MAY parse on whitespace-delimited word boundaries. Either a 400 that closes,
        # or the request as if single-spaced: never a target with a blank in it upstream.
        wire = await routed.connect()
        wire.send(routed.raw(line + b"\r\nHost: edge.test\r\n\r\n"))
        resp = await answer(wire)

        if resp.status == 400:
            assert resp.header("Connection") == "close"
            await closed(wire)
            await routed.nothing_reached_the_upstream()
        else:
            got = seen(resp)
            assert (got["method"], got["target"]) == ("GET", routed.target.decode())


class TestHeaderCount:
    """Many small header fields, well under the 64 KiB size limit."""

    @staticmethod
    def many(count: int) -> bytes:
        return (b"GET {T} HTTP/1.1\r\nHost: edge.test\r\n"
                + b"".join(b"X-A%d: 1\r\n" % i for i in range(1, count + 1)) + b"\r\n")

    async def test_200_fields_are_forwarded_whole_or_refused_whole(self, routed: Routed) -> None:
        # Forwarded whole when the count limit (max_header_count) is 200 or more or there is none; otherwise 431
        # and nothing forwarded. Never some of the fields forwarded and the rest dropped.
        wire = await routed.connect()
        wire.send(routed.raw(self.many(200)))
        resp = await answer(wire)

        if resp.status == 431:
            assert resp.header("Connection") == "close"
            await closed(wire)
            await routed.nothing_reached_the_upstream()
        else:
            got = seen(resp)
            assert [(k, v) for k, v in got["headers"] if k.startswith("X-A")] == [
                (f"X-A{i}", "1") for i in range(1, 201)
            ]

    async def test_1000_fields_are_431_and_nothing_forwarded(self, routed: Routed) -> None:
        raw = self.many(1000)
        assert len(raw) < 16 * 1024, "the size limit is not what refuses it"
        await refused(routed, raw, (431,))
