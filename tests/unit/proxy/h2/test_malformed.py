"""Malformed HTTP/2 request heads (RFC 9113 §8.2, §8.3): each ends the connection with GOAWAY PROTOCOL_ERROR
before anything reaches an upstream, whoever checks it (the `h2` library's validation or Ferryman's own)."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, ResponseReceived
from hpack import Decoder
from hyperframe.frame import HeadersFrame

from proxy.h1.upstream import FRAMING_LENGTH

from .test_connection import frames
from .wire import Wire

Fields = list[tuple[bytes, bytes]]
GET: Fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/")]


def raw_head(wire: Wire, fields: Fields, *, end_stream: bool = True, sid: int | None = None) -> bytes:
    """A HEADERS frame the client library would refuse to send, encoded with its HPACK context."""
    if sid is None:
        sid = wire.client.get_next_available_stream_id()
    flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
    return HeadersFrame(sid, data=wire.client.encoder.encode(fields), flags=flags).serialize()


MALFORMED: dict[str, Fields] = {
    "upper-case-name": [*GET, (b"X-Up", b"1")],
    "space-in-name": [*GET, (b"x up", b"1")],
    "cr-lf-in-name": [*GET, (b"x-a\r\nx-b", b"1")],
    "nul-in-name": [*GET, (b"x-\x00", b"1")],
    "del-in-name": [*GET, (b"x-\x7f", b"1")],
    "non-ascii-name": [*GET, (b"x-\xc3\xa9", b"1")],
    "colon-inside-name": [*GET, (b"x:y", b"1")],
    "empty-name": [*GET, (b"", b"1")],
    "cr-lf-in-value": [*GET, (b"x-a", b"1\r\nx-injected: 1")],
    "lf-in-value": [*GET, (b"x-a", b"1\nx-injected: 1")],
    "nul-in-value": [*GET, (b"x-a", b"1\x00")],
    "leading-space-in-value": [*GET, (b"x-a", b" 1")],
    "trailing-tab-in-value": [*GET, (b"x-a", b"1\t")],
    "te-not-trailers": [*GET, (b"te", b"gzip")],
    "connection": [*GET, (b"connection", b"close")],
    "keep-alive": [*GET, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [*GET, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [*GET, (b"transfer-encoding", b"chunked")],
    "upgrade": [*GET, (b"upgrade", b"websocket")],
    "duplicate-path": [*GET, (b":path", b"/other")],
    "pseudo-after-regular": [*GET[:3], (b"accept", b"*/*"), GET[3]],
    "unknown-pseudo": [*GET, (b":foo", b"bar")],
    "status-in-request": [*GET, (b":status", b"200")],
    "protocol-without-connect": [*GET, (b":protocol", b"websocket")],
    "no-method": GET[1:],
    "no-scheme": [GET[0], *GET[2:]],
    "no-path": GET[:3],
    "empty-path": [*GET[:3], (b":path", b"")],
    "no-authority-no-host": [GET[0], GET[1], GET[3]],
    "authority-and-host-differ": [*GET, (b"host", b"other.example")],
    "two-hosts": [GET[0], GET[1], GET[3], (b"host", b"example.com"), (b"host", b"example.com")],
    "connect-with-path": [(b":method", b"CONNECT"), (b":authority", b"example.com:443"), (b":path", b"/")],
    "non-digit-content-length": [*GET, (b"content-length", b"1x")],
}


class TestMalformedHeads:
    """What RFC 9113 calls malformed never reaches an upstream: the connection ends with PROTOCOL_ERROR."""

    @pytest.mark.parametrize("fields", list(MALFORMED.values()), ids=list(MALFORMED))
    def test_malformed_head_ends_the_connection(self, fields: Fields) -> None:
        wire = Wire()
        events = wire.send(raw_head(wire, fields))
        ends = [e for e in events if isinstance(e, ConnectionTerminated)]
        assert [e.error_code for e in ends] == [ErrorCodes.PROTOCOL_ERROR]
        assert wire.transport.closed
        wire.loop.run_tasks()
        assert not wire.upstream.conns

    def test_requests_before_a_malformed_one_in_the_same_read_are_not_answered_after_it(self) -> None:
        """The connection is over at the malformed head: nothing is written after the GOAWAY."""
        wire = Wire()
        good = raw_head(wire, GET)
        bad = raw_head(wire, [*GET, (b"x-a", b"1\r\n")], sid=3)
        events = wire.send(good + bad)
        assert [e.error_code for e in events if isinstance(e, ConnectionTerminated)] == [ErrorCodes.PROTOCOL_ERROR]
        assert wire.transport.closed

    @pytest.mark.parametrize("fields", [MALFORMED["upper-case-name"], MALFORMED["cr-lf-in-value"],
                                        MALFORMED["duplicate-path"]], ids=["upper-case-name", "cr-lf-in-value",
                                                                           "duplicate-path"])
    def test_malformed_head_after_well_formed_ones_remembered_ends_the_connection(self, fields: Fields) -> None:
        """Heads seen before are not read again (head.py's HeadMemo): a malformed variant of them still is."""
        wire = Wire()
        for sid in (1, 3, 5):
            wire.send(raw_head(wire, GET, sid=sid))
        assert not wire.transport.closed
        events = wire.send(raw_head(wire, fields, sid=7))
        assert [e.error_code for e in events if isinstance(e, ConnectionTerminated)] == [ErrorCodes.PROTOCOL_ERROR]
        assert wire.transport.closed

    @pytest.mark.parametrize("trailers", [
        [(b":path", b"/x")], [(b"x-a", b"1\r\nx-b: 2")], [(b"X-A", b"1")],
    ], ids=["pseudo-header", "cr-lf-in-value", "upper-case-name"])
    def test_malformed_trailers_end_the_connection(self, trailers: Fields) -> None:
        wire = Wire()
        sid = wire.request(method=b"POST", end_stream=False)
        wire.send()
        events = wire.send(raw_head(wire, trailers, sid=sid))
        assert [e.error_code for e in events if isinstance(e, ConnectionTerminated)] == [ErrorCodes.PROTOCOL_ERROR]


class TestWellFormedHeads:
    """What the checks let through: the forms RFC 9113 allows, answered as usual."""

    @pytest.mark.parametrize("fields", [
        [*GET, (b"te", b"trailers")],
        [*GET, (b"te", b"Trailers")],
        [*GET, (b"host", b"example.com")],
        [GET[0], GET[1], GET[3], (b"host", b"example.com")],
        [*GET, (b"x-empty", b"")],
        [*GET, (b"x-inner", b"a b\tc")],
        [*GET, (b"x-punct", b"!#$%&'*+-.^_`|~")],
        [*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2")],
        [*GET, (b"x-utf8", "é".encode())],
    ], ids=["te-trailers", "te-trailers-any-case", "host-equal-to-authority", "host-only", "empty-value",
            "inner-whitespace", "token-characters", "split-cookies", "non-ascii-value"])
    def test_well_formed_head_is_forwarded(self, fields: Fields) -> None:
        wire = Wire()
        wire.send(raw_head(wire, fields))
        assert not wire.transport.closed
        head = bytes(wire.conn.sent)
        assert head.startswith(b"GET / HTTP/1.1\r\n") and b"host: example.com\r\n" in head

    def test_connect_is_refused_with_405_not_a_protocol_error(self) -> None:
        """An ordinary CONNECT is well formed (RFC 9113 §8.5) and refused by the proxy as over HTTP/1.1."""
        wire = Wire()
        wire.transport.take()
        # Raw, and read raw: the client library knows no stream it did not open itself.
        wire.proxy.data_received(raw_head(wire, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]))
        assert not wire.transport.closed
        heads = [f for f in frames(wire.transport.take()) if isinstance(f, HeadersFrame)]
        assert dict(Decoder().decode(heads[0].data, raw=True))[b":status"] == b"405"

    def test_trailers_are_accepted_and_the_request_completes(self) -> None:
        wire = Wire()
        sid = wire.request(method=b"POST", end_stream=False)
        wire.send()
        wire.send(raw_head(wire, [(b"x-checksum", b"abc")], sid=sid))
        conn = wire.conn
        assert not wire.transport.closed
        conn.sink.on_head(200, b"OK", [(b"Content-Length", b"0")], FRAMING_LENGTH)
        conn.sink.on_complete(True)
        events = wire.receive()
        assert dict(next(e for e in events if isinstance(e, ResponseReceived)).headers)[b":status"] == b"200"
