"""HTTP/2 to clients, frame by frame: what Ferryman's connection sends an h2 client and its upstream, and how it
ends a connection that abuses the protocol (each protection with its setting)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from proxy.h1.upstream import FRAMING_CHUNKED, FRAMING_LENGTH
from proxy.h2.connection import H2ClientConnection
from proxy.h2.head import grpc_error_fields
from proxy.h2.limits import PREFACE, H2Limits
from proxy.listener import ProxyServer

from .wire import FakeLoop, FakeTransport, FakeUpstream, Wire, context, plain_client


def response_of(events: Sequence[object], sid: int) -> dict[bytes, bytes]:
    heads = [e for e in events if isinstance(e, ResponseReceived) and e.stream_id == sid]
    assert heads, events
    return dict(heads[0].headers)


def body_of(events: Sequence[object], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def terminated(events: Sequence[object]) -> ConnectionTerminated:
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert ends, events
    return ends[0]


class TestRequests:
    """Each stream is a request planned and forwarded as an HTTP/1.1 request is, to an HTTP/1.1 upstream."""

    def test_get_is_forwarded_and_answered(self) -> None:
        """:authority is the host, the upstream gets HTTP/1.1 with Host, the client the answer and END_STREAM."""
        wire = Wire()
        sid = wire.request(b"/a?b=1", extra=[(b"user-agent", b"t")])
        wire.send()
        conn = wire.conn
        head = bytes(conn.sent)
        assert head.startswith(b"GET /a?b=1 HTTP/1.1\r\n")
        assert b"host: example.com\r\n" in head and b"user-agent: t\r\n" in head
        conn.sink.on_head(200, b"OK", [(b"Content-Length", b"2"), (b"X-Up", b"1")], FRAMING_LENGTH)
        conn.sink.on_body(b"hi")
        conn.sink.on_complete(True)
        events = wire.receive()
        fields = response_of(events, sid)
        assert fields[b":status"] == b"200" and fields[b"x-up"] == b"1" and b"x-request-id" in fields
        assert body_of(events, sid) == b"hi"
        assert any(isinstance(e, StreamEnded) and e.stream_id == sid for e in events)
        assert not wire.proxy.streams

    def test_cookies_are_joined_and_connection_fields_never_cross(self) -> None:
        """Split cookie fields become one Cookie; te: trailers stays behind; an upstream's hop-by-hop fields too."""
        wire = Wire()
        sid = wire.request(extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers")])
        wire.send()
        conn = wire.conn
        head = bytes(conn.sent).lower()
        assert b"cookie: a=1; b=2\r\n" in head and b"\r\nte:" not in head
        conn.sink.on_head(200, b"OK", [
            (b"Connection", b"keep-alive, X-Secret"), (b"Keep-Alive", b"timeout=5"), (b"X-Secret", b"s"),
            (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"), (b"Proxy-Connection", b"x"),
        ], FRAMING_CHUNKED)
        conn.sink.on_complete(True)
        fields = response_of(wire.receive(), sid)
        for name in (b"connection", b"keep-alive", b"x-secret", b"transfer-encoding", b"upgrade",
                     b"proxy-connection"):
            assert name not in fields

    def test_no_route_is_a_404_on_its_stream(self) -> None:
        wire = Wire()
        sid = wire.request(authority=b"unknown.example")
        events = wire.send()
        assert response_of(events, sid)[b":status"] == b"404"
        assert body_of(events, sid).startswith(b"404 ")

    def test_request_body_goes_up_chunked(self) -> None:
        """A body of unknown length goes to the HTTP/1.1 upstream with chunked coding."""
        wire = Wire()
        sid = wire.request(method=b"POST", end_stream=False)
        wire.client.send_data(sid, b"hello", end_stream=True)
        wire.send()
        sent = bytes(wire.conn.sent)
        assert b"transfer-encoding: chunked" in sent.lower() and sent.endswith(b"5\r\nhello\r\n0\r\n\r\n")


class TestWrites:
    """Answers go out in as few writes as the event loop allows."""

    def test_answers_of_one_turn_of_the_loop_leave_in_one_write(self) -> None:
        wire = Wire()
        sids = [wire.request(), wire.request()]
        wire.send()
        wire.loop.run_tasks()
        wire.loop.soon = []  # calls for the end of the turn wait, as on a real loop
        writes = wire.transport.writes
        for conn in wire.upstream.conns:
            conn.sink.on_head(200, b"OK", [(b"Content-Length", b"2")], FRAMING_LENGTH)
            conn.sink.on_body(b"hi")
            conn.sink.on_complete(True)
        assert wire.transport.writes == writes
        wire.loop.run_soon()
        assert wire.transport.writes == writes + 1
        events = wire.receive()
        assert [body_of(events, sid) for sid in sids] == [b"hi", b"hi"]
        assert sorted(e.stream_id for e in events if isinstance(e, StreamEnded)) == sids

    def test_a_small_answer_ends_on_its_data_frame(self) -> None:
        """Head, body and end from one upstream read: HEADERS, then one DATA frame carrying END_STREAM."""
        wire = Wire()
        sid = wire.request()
        wire.send()
        conn = wire.conn
        wire.transport.take()
        conn.sink.on_head(200, b"OK", [(b"Content-Length", b"2")], FRAMING_LENGTH)
        conn.sink.on_body(b"hi")
        conn.sink.on_complete(True)
        sent = [(type(f).__name__, f.stream_id, sorted(f.flags)) for f in frames(wire.transport.take())]
        assert sent == [("HeadersFrame", sid, ["END_HEADERS"]), ("DataFrame", sid, ["END_STREAM"])]

    def test_an_answer_without_body_ends_on_its_headers_frame(self) -> None:
        wire = Wire()
        sid = wire.request()
        wire.send()
        conn = wire.conn
        wire.transport.take()
        conn.sink.on_head(204, b"No Content", [], FRAMING_LENGTH)
        conn.sink.on_complete(True)
        sent = [(type(f).__name__, f.stream_id, sorted(f.flags)) for f in frames(wire.transport.take())]
        assert sent == [("HeadersFrame", sid, ["END_HEADERS", "END_STREAM"])]


class TestFlowControl:
    """Neither a slow client nor a slow upstream grows memory: windows are honoured and granted as bytes go on."""

    def test_answer_waits_for_the_clients_window_and_pauses_the_upstream(self) -> None:
        wire = Wire(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        sid = wire.request()
        wire.send()
        conn = wire.conn
        conn.sink.on_head(200, b"OK", [(b"Content-Length", b"300000")], FRAMING_LENGTH)
        conn.sink.on_body(b"x" * 300_000)
        conn.sink.flush()  # as the upstream connection does after each read
        events = wire.receive()
        assert len(body_of(events, sid)) == 1000
        assert not conn.reading  # more than the high mark waits: the upstream is no longer read
        wire.client.increment_flow_control_window(400_000, stream_id=sid)
        wire.client.increment_flow_control_window(400_000)
        events = wire.send()
        assert len(body_of(events, sid)) == 299_000 and conn.reading

    def test_request_body_acknowledged_only_as_the_upstream_takes_it(self) -> None:
        wire = Wire()
        sid = wire.request(method=b"POST", end_stream=False)
        wire.send()
        exchange = wire.conn.sink
        exchange.upstream_pause_writing()  # the upstream's socket is full
        for _ in range(3):
            wire.client.send_data(sid, b"~" * 15_000)
        events = wire.send()
        assert not [e for e in events if isinstance(e, WindowUpdated)]
        assert wire.client.outbound_flow_control_window == 65535 - 45_000
        exchange.upstream_resume_writing()
        wire.receive()
        assert wire.client.outbound_flow_control_window == 65535  # the windows reopened
        assert bytes(wire.conn.sent).count(b"~") == 45_000


class TestProtections:
    """Each limit, with its setting: streams, header list, frame size, HPACK table, resets, floods, idle."""

    def test_streams_beyond_the_limit_are_refused(self) -> None:
        wire = Wire(H2Limits(max_concurrent_streams=2))
        settings = [e for e in wire.events if isinstance(e, RemoteSettingsChanged)]
        assert settings[0].changed_settings[SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 2
        # A client that ignores the advertised limit (the library would not let ours open a third stream).
        wire.client.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 10
        wire.client.remote_settings.acknowledge()
        sids = [wire.request() for _ in range(3)]
        events = wire.send()
        resets = [e for e in events if isinstance(e, StreamReset)]
        assert [(r.stream_id, r.error_code) for r in resets] == [(sids[2], ErrorCodes.REFUSED_STREAM)]

    def test_a_connection_over_max_connections_gets_goaway_before_the_close(self) -> None:
        """GOAWAY REFUSED_STREAM is written before the listener closes the transport, not at the end of the turn."""
        loop = FakeLoop()
        loop.soon = []
        ctx = context(loop, FakeUpstream(), max_connections=0)
        transport = FakeTransport()
        H2ClientConnection(ctx, ProxyServer(ctx), H2Limits()).connection_made(transport)
        goaway = [f for f in frames(transport.take()) if isinstance(f, GoAwayFrame)]
        assert [g.error_code for g in goaway] == [ErrorCodes.REFUSED_STREAM]
        assert transport.closed

    def test_header_list_over_the_limit_ends_the_connection(self) -> None:
        wire = Wire(H2Limits(max_header_list_size=2048))
        wire.request(extra=[(b"x-big", b"v" * 4000)])
        assert terminated(wire.send()).error_code in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.ENHANCE_YOUR_CALM)
        assert wire.transport.closed

    def test_frame_over_the_advertised_size_ends_the_connection(self) -> None:
        wire = Wire()
        sid = wire.request(method=b"POST", end_stream=False)
        frame = DataFrame(sid, data=b"x" * 20_000).serialize()
        assert terminated(wire.send(frame)).error_code == ErrorCodes.FRAME_SIZE_ERROR

    def test_hpack_table_larger_than_advertised_ends_the_connection(self) -> None:
        wire = Wire(H2Limits(header_table_size=1024))
        encoder = Encoder()
        encoder.header_table_size = 65536  # a dynamic table size update above what was advertised
        block = encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
                                (b":path", b"/")])
        frame = HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        assert terminated(wire.send(frame)).error_code in (ErrorCodes.COMPRESSION_ERROR, ErrorCodes.PROTOCOL_ERROR)
        assert wire.transport.closed

    def test_continuation_flood_ends_the_connection(self) -> None:
        """CVE-2024-27316: a header block that never ends is cut off (the library's 64 CONTINUATION frames)."""
        wire = Wire()
        flood = HeadersFrame(1, data=b"\x82").serialize() + b"".join(
            ContinuationFrame(1, data=b"\x00" * 16).serialize() for _ in range(100))
        assert terminated(wire.send(flood)).error_code == ErrorCodes.PROTOCOL_ERROR
        assert wire.transport.closed

    def test_rapid_reset_ends_the_connection(self) -> None:
        """CVE-2023-44487: more RST_STREAM than max_resets in a second is GOAWAY ENHANCE_YOUR_CALM."""
        wire = Wire(H2Limits(max_resets=5))
        wire.loop.now += 2  # a fresh one-second window
        for _ in range(10):
            sid = wire.request(end_stream=False)
            wire.client.reset_stream(sid, ErrorCodes.CANCEL)
        assert terminated(wire.send()).error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert wire.transport.closed

    def test_resets_under_the_limit_are_served(self) -> None:
        wire = Wire(H2Limits(max_resets=5))
        wire.loop.now += 2
        for _ in range(3):
            wire.client.reset_stream(wire.request(end_stream=False), ErrorCodes.CANCEL)
        wire.send()
        assert not wire.transport.closed

    def test_ping_flood_ends_the_connection(self) -> None:
        wire = Wire(H2Limits(max_control_frames=10))
        wire.loop.now += 2
        for i in range(30):
            wire.client.ping(b"%08d" % i)
        assert terminated(wire.send()).error_code == ErrorCodes.ENHANCE_YOUR_CALM

    def test_settings_flood_ends_the_connection(self) -> None:
        wire = Wire(H2Limits(max_control_frames=10))
        wire.loop.now += 2
        for i in range(30):
            wire.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535 + i})
        assert terminated(wire.send()).error_code == ErrorCodes.ENHANCE_YOUR_CALM

    def test_idle_connection_is_closed_with_goaway(self) -> None:
        wire = Wire(idle_timeout=5.0)
        sid = wire.request(authority=b"unknown.example")
        wire.send()
        assert not wire.proxy.streams
        wire.proxy.sweep(wire.loop.now + 4)
        assert not wire.transport.closed
        wire.proxy.sweep(wire.loop.now + 6)
        assert wire.transport.closed
        assert terminated(wire.receive()).last_stream_id == sid


class TestDraining:
    """Draining: a graceful GOAWAY naming the last stream taken; the connection ends when its streams are done."""

    def test_goaway_then_close_after_the_open_stream(self) -> None:
        wire = Wire()
        sid = wire.request()
        wire.send()
        conn = wire.conn
        wire.server.drain()
        wire.proxy.sweep(wire.loop.now)
        goaway = [f for f in frames(wire.transport.take()) if isinstance(f, GoAwayFrame)]
        assert [(g.error_code, g.last_stream_id) for g in goaway] == [(ErrorCodes.NO_ERROR, sid)]
        assert not wire.transport.closed
        # A stream the client opens after the GOAWAY is refused (raw: the client library stops after a GOAWAY).
        block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
                                  (b":path", b"/")])
        wire.proxy.data_received(HeadersFrame(sid + 2, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        resets = [f for f in frames(wire.transport.take()) if isinstance(f, RstStreamFrame)]
        assert [(r.stream_id, r.error_code) for r in resets] == [(sid + 2, ErrorCodes.REFUSED_STREAM)]
        conn.sink.on_head(200, b"OK", [(b"Content-Length", b"0")], FRAMING_LENGTH)
        conn.sink.on_complete(True)
        answer = frames(wire.transport.take())
        assert any(isinstance(f, HeadersFrame) and f.stream_id == sid for f in answer)
        assert wire.transport.closed


def frames(data: bytes) -> list[Frame]:
    out = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


class TestNegotiation:
    """Which connections become HTTP/2: ALPN h2 on TLS, the preface on a plain connection; neither when off."""

    def test_preface_on_a_plain_connection_hands_over(self) -> None:
        conn, transport = plain_client()
        conn.data_received(PREFACE)
        assert isinstance(transport.protocol, H2ClientConnection)
        assert transport.out.startswith(b"\x00")  # the server's SETTINGS frame, not an HTTP/1.1 answer

    def test_alpn_h2_hands_over_at_once(self) -> None:
        _conn, transport = plain_client(alpn="h2")
        assert isinstance(transport.protocol, H2ClientConnection)

    def test_alpn_http11_stays(self) -> None:
        _conn, transport = plain_client(alpn="http/1.1")
        assert transport.protocol is None

    def test_http2_off_answers_the_preface_as_http11(self) -> None:
        conn, transport = plain_client(h2=None)
        conn.data_received(PREFACE)
        assert transport.protocol is None and transport.out.startswith(b"HTTP/1.1 4")


class TestGrpcErrors:
    """The proxy's own errors reach a gRPC client as gRPC errors (trailers-only), never as a text body."""

    def test_no_route_is_unimplemented(self) -> None:
        wire = Wire()
        sid = wire.request(b"/pkg.Svc/Call", method=b"POST", authority=b"unknown.example",
                           extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers")])
        events = wire.send()
        fields = response_of(events, sid)
        assert (fields[b":status"], fields[b"content-type"], fields[b"grpc-status"]) == (
            b"200", b"application/grpc", b"12")
        assert body_of(events, sid) == b""
        assert any(isinstance(e, StreamEnded) and e.stream_id == sid for e in events)

    @pytest.mark.parametrize(("status", "code"), [(503, b"14"), (502, b"14"), (504, b"4"), (404, b"12")],
                             ids=["no-instance-unavailable", "refused-unavailable", "timeout-deadline",
                                  "no-route-unimplemented"])
    def test_status_mapping(self, status: int, code: bytes) -> None:
        assert dict(grpc_error_fields(status, "x é", b""))[b"grpc-status"] == code
        assert dict(grpc_error_fields(status, "x é", b""))[b"grpc-message"] == b"x %C3%A9"
