"""The short way of sending an answer's frames: every call leaves the same bytes, states, windows and errors as the
`h2` library's own methods, and new streams are received as the library receives them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, FrameTooLargeError, ProtocolError, StreamClosedError
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame, WindowUpdateFrame

from proxy.h2.codec import MemoDecoder, PlainEncoder
from proxy.h2.frames import LeanH2Connection

_CONFIG = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                          normalize_inbound_headers=False, validate_outbound_headers=False,
                          normalize_outbound_headers=False)
GET = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a.example")]
POST = [(b":method", b"POST"), (b":path", b"/up"), (b":scheme", b"http"), (b":authority", b"a.example")]
OK = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"5")]
Op = Callable[[H2Connection], Any]


def pair() -> tuple[H2Connection, H2Connection, LeanH2Connection]:
    """A client, and the library's server and ours, each handed the same client bytes (stream 1 a GET that ended,
    stream 3 a POST whose body is still coming)."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, GET, end_stream=True)
    client.send_headers(3, POST)
    hello = client.data_to_send()
    library, lean = H2Connection(config=_CONFIG), LeanH2Connection(config=_CONFIG)
    for server in (library, lean):
        server.encoder, server.decoder = PlainEncoder(), MemoDecoder()
        server.initiate_connection()
        server.receive_data(hello)
        server.data_to_send()
    return client, library, lean


def state(server: H2Connection) -> Any:
    return (server.state_machine.state, server.outbound_flow_control_window,
            {sid: (s.state_machine.state, s.outbound_flow_control_window) for sid, s in server.streams.items()})


def outcome(server: H2Connection, op: Op) -> Any:
    try:
        op(server)
    except Exception as exc:  # the same exception, type and message, from both
        return type(exc), str(exc), server.data_to_send(), state(server)
    return None, server.data_to_send(), state(server)


BIG = [(b":status", b"200"), *((b"x-big-%d" % i, b"v" * 1000) for i in range(40))]


def exactly_two_frames(server: H2Connection) -> None:
    """A head whose block fills two HEADERS-sized frames to the byte (no third, empty CONTINUATION)."""
    for size in range(32000, 33000):
        fields = [(b":status", b"200"), (b"x-fill", b"v" * size)]
        if len(copy.deepcopy(server.encoder).encode(fields)) == 2 * 16384:
            server.send_headers(1, fields, end_stream=True)
            return
    raise AssertionError("no size fills two frames")


class TestSameAsTheLibrary:
    """Each sequence of sends gives the library's bytes, states and windows, or its error."""

    @pytest.mark.parametrize("ops", [
        [lambda s: s.send_headers(1, OK), lambda s: s.send_data(1, b"hello", end_stream=True)],
        [lambda s: s.send_headers(1, OK, end_stream=True)],
        [lambda s: s.send_headers(1, OK), lambda s: s.send_data(1, b"hel"), lambda s: s.send_data(1, b"lo"),
         lambda s: s.end_stream(1)],
        [lambda s: s.send_headers(1, OK), lambda s: s.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)],
        [lambda s: s.send_headers(1, OK), lambda s: s.send_headers(1, [(b"grpc-status", b"0")])],
        [lambda s: s.send_headers(1, [*OK, NeverIndexedHeaderTuple(b"x-request-id", b"abc")]),
         lambda s: s.send_headers(3, [*OK, NeverIndexedHeaderTuple(b"x-request-id", b"abd")])],
        [lambda s: s.send_headers(1, BIG, end_stream=True)],
        [lambda s: s.send_headers(1, BIG), lambda s: s.send_data(1, b"", end_stream=True)],
        [exactly_two_frames],
        [lambda s: s.send_headers(1, [(b":status", b"103"), (b"link", b"</a>")]), lambda s: s.send_headers(1, OK)],
        [lambda s: s.send_headers(1, OK), lambda s: s.send_data(1, b"x" * 16385)],
        [lambda s: s.send_headers(3, OK), lambda s: s.send_data(3, b"x" * 16384),
         lambda s: s.send_data(3, b"x" * 16384), lambda s: s.send_data(3, b"x" * 16384),
         lambda s: s.send_data(3, b"x" * 16383), lambda s: s.send_data(3, b"xx")],
        [lambda s: s.send_headers(1, OK, end_stream=True), lambda s: s.send_data(1, b"more")],
        [lambda s: s.send_headers(1, OK, end_stream=True), lambda s: s.send_headers(1, OK)],
        [lambda s: s.send_headers(1, OK, end_stream=True), lambda s: s.end_stream(1)],
        [lambda s: s.reset_stream(3, ErrorCodes.CANCEL), lambda s: s.send_headers(3, OK)],
        [lambda s: s.send_headers(5, OK)],
        [lambda s: s.send_data(7, b"x")],
        [lambda s: s.send_headers(1, OK), lambda s: s.send_data(1, memoryview(b"hello"), end_stream=True)],
        [lambda s: s.send_headers(1, OK), lambda s: s.send_data(1, b"hello", pad_length=3)],
        [lambda s: s.close_connection(), lambda s: s.send_headers(1, OK)],
    ], ids=["head-then-data-ending", "head-ending", "data-then-empty-end", "trailers", "trailers-without-end",
            "never-indexed-fields", "continuation-frames", "continuation-then-end", "block-of-two-whole-frames",
            "informational-first",
            "frame-too-large", "window-exhausted", "data-after-end", "head-after-end", "end-after-end",
            "head-after-reset", "stream-never-opened", "data-on-unknown-stream", "memoryview-data", "padded-data",
            "connection-closed"])
    def test_bytes_states_and_errors(self, ops: list[Op]) -> None:
        _, library, lean = pair()
        for op in ops:
            assert outcome(lean, op) == outcome(library, op)

    def test_errors_are_the_library_s(self) -> None:
        """The errors the connection catches keep their classes."""
        _, _, lean = pair()
        lean.send_headers(1, OK, end_stream=True)
        with pytest.raises(StreamClosedError):
            lean.send_data(1, b"x")
        lean.send_headers(3, OK)
        with pytest.raises(FrameTooLargeError):
            lean.send_data(3, b"x" * 16385)
        lean.send_data(3, b"x" * 16384)
        lean.send_data(3, b"x" * 16384)
        lean.send_data(3, b"x" * 16384)
        with pytest.raises(FlowControlError):
            lean.send_data(3, b"x" * 16384)
        with pytest.raises(ProtocolError):
            lean.send_headers(3, [(b"grpc-status", b"0")])


def raw_head(client: H2Connection, stream_id: int, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A HEADERS frame the client's state machine would refuse to send."""
    return HeadersFrame(stream_id, client.encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize()


def _library_before(server: H2Connection, before: Op) -> None:
    """`before` on the library's connection: forget_closed as the library's own walk of open streams."""
    server.forget_closed = lambda sid: server.open_inbound_streams  # type: ignore[attr-defined]  # (see docstring)
    before(server)


class TestReceiving:
    """New streams are received as the library receives them, and closed ones forgotten when asked."""

    @pytest.mark.parametrize("send", [
        lambda c: (c.send_headers(5, GET, end_stream=True), c.send_headers(7, POST),
                   c.send_data(7, b"body", end_stream=True)),
        lambda c: c.send_headers(5, [*POST, (b"content-length", b"4")]) or c.send_data(5, b"bod", end_stream=True),
        lambda c: c.send_headers(5, [*POST, (b"content-length", b"x4")]),
        lambda c: c.send_headers(5, [*POST, (b"content-length", b"4"), (b"content-length", b"5")]),
        lambda c: raw_head(c, 5, [(b":status", b"103"), *GET]),
        lambda c: c.send_headers(5, GET, end_stream=True, priority_weight=42),
        lambda c: c.send_headers(5, [*GET, (b"x-big", b"v" * 20000)], end_stream=True),
        lambda c: raw_head(c, 1, GET),
    ], ids=["requests-and-a-body", "body-shorter-than-content-length", "content-length-not-digits",
            "content-length-twice", "informational-request", "priority", "continuation", "stream-id-reused"])
    def test_events_and_errors_are_the_library_s(self, send: Callable[[H2Connection], Any]) -> None:
        client, library, lean = pair()
        client.config.validate_outbound_headers = client.config.normalize_outbound_headers = False
        data = send(client)
        data = data if isinstance(data, bytes) else client.data_to_send()

        def seen(server: H2Connection) -> Any:
            try:
                events = server.receive_data(data)
            except Exception as exc:
                return type(exc), str(exc), server.data_to_send()
            return [(type(e), sorted((k, repr(v)) for k, v in vars(e).items())) for e in events], state(server)

        assert seen(lean) == seen(library)

    @pytest.mark.parametrize(("before", "send"), [
        (lambda s: s.reset_stream(3, ErrorCodes.CANCEL), lambda c: DataFrame(3, b"late").serialize()),
        (lambda s: (s.reset_stream(3, ErrorCodes.CANCEL), s.forget_closed(3)),
         lambda c: DataFrame(3, b"late").serialize()),
        (lambda s: s.send_headers(1, OK, end_stream=True), lambda c: DataFrame(1, b"late").serialize()),
        (lambda s: (s.send_headers(1, OK, end_stream=True), s.forget_closed(1)),
         lambda c: DataFrame(1, b"late").serialize()),
        (lambda s: None, lambda c: raw_head(c, 1, GET)),
        (lambda s: None, lambda c: WindowUpdateFrame(3, 100).serialize()),
        (lambda s: None, lambda c: RstStreamFrame(3, ErrorCodes.CANCEL).serialize()),
    ], ids=["data-on-a-stream-we-reset", "data-on-a-stream-we-reset-and-forgot", "data-after-both-ends",
            "data-after-both-ends-forgotten", "head-on-a-stream-that-ended", "window-update", "reset-by-client"])
    def test_frames_on_closed_streams_as_the_library(self, before: Op, send: Callable[[H2Connection], bytes],
                                                      ) -> None:
        """The library's answers to frames on streams that are over: a RST_STREAM, or the connection's end."""
        client, library, lean = pair()
        data = send(client)

        def seen(server: H2Connection) -> Any:
            if isinstance(server, LeanH2Connection):
                before(server)
            else:
                _library_before(server, before)
            server.data_to_send()
            try:
                events = server.receive_data(data)
            except Exception as exc:
                return type(exc), str(exc), server.data_to_send()
            return ([(type(e), sorted((k, repr(v)) for k, v in vars(e).items())) for e in events],
                    server.data_to_send(), state(server))

        assert seen(lean) == seen(library)

    def test_a_closed_stream_is_forgotten_as_the_library_forgets_it(self) -> None:
        _, library, lean = pair()
        for server in (library, lean):
            server.send_headers(1, OK, end_stream=True)
        lean.forget_closed(1)
        lean.forget_closed(3)  # still open: kept
        library.open_inbound_streams  # noqa: B018  # the library's own walk
        assert sorted(lean.streams) == sorted(library.streams) == [3]
        assert lean._closed_streams == library._closed_streams
