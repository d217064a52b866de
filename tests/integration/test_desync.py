"""Request desync, table-driven: the audit's classes of request smuggling against a backend that keeps every byte.

Each case sends one raw request (and, pipelined behind it in the same write, a victim request) to Ferryman,
then a second victim on a new connection, which takes the pooled upstream connection the attack went over. The
upstream is a `RecordingUpstream`: it frames requests as carelessly as CGI/WSGI backends do (`_` read as `-`,
a leading zero as octal, anything saying `chunked` as chunked), so a request relayed ambiguously would show
there as a request nobody sent, a victim answered with another request's answer, or bytes it cannot read.

For every case the specification is the same: the client gets the answers listed (a refusal closes the
connection, so a pipelined victim behind it gets none); the upstream received exactly the requests listed,
then the second victim, and nothing it could not frame; none of the listed byte strings reached it.

The classes: CL.TE and TE.CL (both framings at once), TE.TE obfuscations (a Transfer-Encoding one reader
ignores), look-alike names (`Transfer_Encoding`), Content-Length tricks (leading zeros, signs, lists), chunk-size
tricks (prefixes, overflow, short and long chunks, bare LF), and pipelined victims.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from .harness import ConsulAgent, FerrymanProcess
from .rawhttp import RecordingUpstream, Truncated, Wire, route

pytestmark = pytest.mark.integration

_names = itertools.count(1)


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes  # {T} is the service's path prefix
    answers: tuple[int, ...]  # statuses the client gets on the attacking connection, in order
    upstream: tuple[str, ...] = ()  # "METHOD target" the upstream must receive ({T} substituted)
    absent: tuple[bytes, ...] = field(default=())  # bytes that must not reach the upstream
    bodies: tuple[bytes, ...] = ()  # the bodies of the requests the upstream received, when they matter


H = b"Host: edge.test\r\n"
POST = b"POST {T}/a HTTP/1.1\r\n" + H
VICTIM = b"GET {T}/victim HTTP/1.1\r\n" + H + b"\r\n"
# A request hidden in another's body: a path no route has, so through Ferryman it could only be answered 404;
# seen by the upstream, it was smuggled.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"

CASES = [
    # --- CL.TE and TE.CL: two framings in one request (RFC 9112 §6.1: may be refused, then the connection closes)
    Case("cl-te", POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX" + VICTIM, (400,),
         absent=(b"/smuggled",)),
    Case("te-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
         b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n" + VICTIM, (400,), absent=(b"/smuggled",)),
    Case("cl-0-get-with-a-request-in-its-body", b"GET {T}/a HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n"
         % len(SMUGGLED) + SMUGGLED + VICTIM, (200, 200), ("GET {T}/a", "GET {T}/victim"), bodies=(SMUGGLED, b"")),
    # --- TE.TE: a Transfer-Encoding that one reader might ignore and another honour
    Case("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + VICTIM, (400,)),
    Case("te-chunked-then-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + VICTIM,
         (400,)),
    Case("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + VICTIM, (400,)),
    Case("te-obs-fold", POST + b"Content-Length: 5\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\nhello" + VICTIM,
         (400,)),
    Case("te-vertical-tab", POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + VICTIM, (400,)),
    Case("te-twice-second-bogus", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"
         b"0\r\n\r\n" + VICTIM, (400,)),
    Case("te-bare-lf-before-it", POST + b"X: y\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + VICTIM, (400,)),
    Case("te-tab-is-whitespace-and-relayed", POST + b"Transfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
         + VICTIM, (200, 200), ("POST {T}/a", "GET {T}/victim"), bodies=(b"hello", b"")),
    # --- look-alike names: `_` where `-` belongs, which CGI/WSGI backends read as the real field
    Case("transfer_encoding-look-alike", POST + b"Content-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\nhello"
         + VICTIM, (200, 200), ("POST {T}/a", "GET {T}/victim"), absent=(b"Transfer_Encoding",),
         bodies=(b"hello", b"")),
    Case("content_length-look-alike", b"GET {T}/a HTTP/1.1\r\n" + H + b"Content_Length: %d\r\n\r\n"
         % len(SMUGGLED) + SMUGGLED, (200, 404), ("GET {T}/a",), absent=(b"Content_Length", b"/smuggled")),
    Case("lower-case-look-alike", POST + b"Content-Length: 5\r\ntransfer_encoding: chunked\r\n\r\nhello" + VICTIM,
         (200, 200), ("POST {T}/a", "GET {T}/victim"), absent=(b"transfer_encoding",)),
    # --- Content-Length tricks
    Case("content-length-leading-zero", POST + b"Content-Length: 010\r\n\r\n0123456789" + VICTIM, (200, 200),
         ("POST {T}/a", "GET {T}/victim"), absent=(b"Content-Length: 010",), bodies=(b"0123456789", b"")),
    Case("content-length-many-zeros", POST + b"Content-Length: 0000000000010\r\n\r\n0123456789" + VICTIM,
         (200, 200), ("POST {T}/a", "GET {T}/victim"), absent=(b"Content-Length: 00",), bodies=(b"0123456789", b"")),
    Case("content-length-plus", POST + b"Content-Length: +5\r\n\r\nhello" + VICTIM, (400,)),
    Case("content-length-minus", POST + b"Content-Length: -1\r\n\r\n" + VICTIM, (400,)),
    Case("content-length-hex", POST + b"Content-Length: 0x5\r\n\r\nhello" + VICTIM, (400,)),
    Case("content-length-list", POST + b"Content-Length: 5, 5\r\n\r\nhello" + VICTIM, (400,)),
    Case("content-length-twice", POST + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!" + VICTIM, (400,)),
    Case("content-length-space-inside", POST + b"Content-Length: 1 0\r\n\r\n0123456789" + VICTIM, (400,)),
    # --- chunk-size tricks
    Case("chunk-size-0x-prefix", POST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n" + VICTIM,
         (400,)),
    Case("chunk-size-overflow", POST + b"Transfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"
         + VICTIM, (400,)),
    Case("chunk-size-negative", POST + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n" + VICTIM,
         (400,)),
    Case("chunk-longer-than-its-size", POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n" + VICTIM,
         (400,)),
    Case("chunk-size-bare-lf", POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n" + VICTIM, (400,)),
    Case("chunk-size-leading-zeros-relayed", POST + b"Transfer-Encoding: chunked\r\n\r\n005\r\nhello\r\n0\r\n\r\n"
         + VICTIM, (200, 200), ("POST {T}/a", "GET {T}/victim"), absent=(b"005\r\n",), bodies=(b"hello", b"")),
    Case("chunk-extension-relayed-without-it", POST + b"Transfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n"
         b"0\r\n\r\n" + VICTIM, (200, 200), ("POST {T}/a", "GET {T}/victim"), absent=(b";a=b",),
         bodies=(b"hello", b"")),
    # A framing field in the trailer section: llhttp refuses it; never merged into the head either way.
    Case("chunked-trailer-with-content-length", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
         b"Content-Length: 99\r\n\r\n" + VICTIM, (400,), absent=(b"Content-Length: 99",)),
    Case("chunked-trailer-relayed-without-it", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
         b"X-Trailer: 1\r\n\r\n" + VICTIM, (200, 200), ("POST {T}/a", "GET {T}/victim"),
         absent=(b"X-Trailer",), bodies=(b"hello", b"")),
    # --- pipelined victims behind requests the grammar does not allow
    Case("asterisk-get-then-victim", b"GET * HTTP/1.1\r\n" + H + b"\r\n" + VICTIM, (400, 200), ("GET {T}/victim",)),
    Case("fragment-then-victim", b"GET {T}/a#x HTTP/1.1\r\n" + H + b"\r\n" + VICTIM, (400, 200),
         ("GET {T}/victim",)),
    Case("user-info-then-victim", b"GET http://evil@edge.test{T}/a HTTP/1.1\r\n" + H + b"\r\n" + VICTIM, (400, 200),
         ("GET {T}/victim",)),
    Case("upgrade-with-body-then-victim", b"GET {T}/a HTTP/1.1\r\n" + H + b"Connection: upgrade\r\n"
         b"Upgrade: websocket\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED, (400,),
         absent=(b"/smuggled",)),
]


@pytest.fixture
async def recording(consul: ConsulAgent, ferryman: FerrymanProcess) -> AsyncIterator[tuple[RecordingUpstream, str]]:
    upstream = await RecordingUpstream().start()
    name = f"desync-{next(_names)}"
    await route(consul, ferryman, name, upstream.port)
    yield upstream, name
    await upstream.stop()
    await asyncio.to_thread(consul.deregister, f"{name}-1")


async def _answers(wire: Wire, count: int) -> list[int]:
    """The statuses of the responses on `wire` until it closes or `count` came."""
    statuses: list[int] = []
    try:
        while len(statuses) < count:
            resp = await wire.response()
            statuses.append(resp.status)
            if resp.header("Connection") == "close":
                break
    except Truncated as exc:
        assert exc.received == b"", f"a partial response: {exc.received[:300]!r}"
    return statuses


class TestDesync:
    """Whatever the framing trick, the upstream sees exactly the requests the client meant, and nothing else."""

    @pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
    async def test_no_desync(self, case: Case, recording: tuple[RecordingUpstream, str],
                             ferryman: FerrymanProcess) -> None:
        upstream, name = recording
        prefix = f"/{name}".encode()
        warm = await Wire.open(ferryman.port)  # a pooled upstream connection for the attack to go over
        warm.send(b"GET %b/warm HTTP/1.1\r\nHost: edge.test\r\n\r\n" % prefix)
        assert (await warm.response()).status == 200
        warm.abort()

        attack = await Wire.open(ferryman.port)
        attack.send(case.raw.replace(b"{T}", prefix))
        statuses = await _answers(attack, len(case.answers))
        await asyncio.sleep(0.2)
        extra = bytes(attack.buffer)  # nothing more: no answer to a request the client did not send
        attack.abort()
        victim = await Wire.open(ferryman.port)
        victim.send(b"GET %b/victim2 HTTP/1.1\r\nHost: edge.test\r\n\r\n" % prefix)
        answer = await victim.response()
        victim.abort()

        assert statuses == list(case.answers)
        assert extra == b""
        assert (answer.status, answer.body) == (200, b"GET /%b/victim2" % name.encode())
        expected = [f"GET /{name}/warm", *(r.replace("{T}", f"/{name}") for r in case.upstream),
                    f"GET /{name}/victim2"]
        assert upstream.seen == expected
        assert upstream.unframeable == []
        received = b"".join(upstream.raw)
        for absent in case.absent:
            assert absent.replace(b"{T}", prefix) not in received
        if case.bodies:
            assert [r.body for r in upstream.requests[1:-1]] == [b.replace(b"{T}", prefix) for b in case.bodies]

