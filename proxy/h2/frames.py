"""The `h2` state machine for client connections, with an answer's HEADERS and DATA frames packed here. Pure.

`LeanH2Connection` is the library's `H2Connection` with `send_headers` and `send_data` (and `end_stream`) taking a
shorter way for what a server sends on a stream the client opened: the same transitions of the library's
connection and stream state machines, in the same order (so every state, error and event stays the library's),
the same HPACK encoder, the same flow-control accounting; only the frames are packed with one `struct` call each
instead of through hyperframe's frame objects, and the library's per-call debug logging, header re-encoding
(`utf8_encode_headers`: our fields are bytes already) and validation-flag building (validation is off, see
connection.py) are skipped. The bytes out are the library's byte for byte (tests/unit/proxy/h2/test_frames.py).
Anything else (an informational head, a stream the library does not hold, padding, priority) goes to the
library's own method. Profiled, the library's way cost a third of an HTTP/2 request's CPU time.

Receiving, `_receive_frame` is the library's without its trace logging (see there), and
`_receive_headers_frame` skips the count of open streams before a new one: the limit the library
checks there is 2**31-1 (connection.py refuses streams beyond ours itself, REFUSED_STREAM), and the count walked
every stream per request. That walk was also where the library forgot closed streams; `forget_closed` does it
for one stream when the connection is done with it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Final, cast

from h2.connection import AllowedStreamIDs, ConnectionInputs, H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.events import Event, RequestReceived
from h2.exceptions import (
    FlowControlError,
    FrameTooLargeError,
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
)
from h2.stream import StreamInputs
from h2.utilities import is_informational_response
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

# RFC 9113 §4.1: length (24 bits, as 16 + 8 here), type, flags, stream id (31 bits).
_FRAME_HEADER: Final = struct.Struct(">HBBBL")
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4

_SEND_HEADERS: Final = ConnectionInputs.SEND_HEADERS
_SEND_DATA: Final = ConnectionInputs.SEND_DATA
_RECV_HEADERS: Final = ConnectionInputs.RECV_HEADERS
_STREAM_SEND_HEADERS: Final = StreamInputs.SEND_HEADERS
_STREAM_SEND_DATA: Final = StreamInputs.SEND_DATA
_STREAM_SEND_END: Final = StreamInputs.SEND_END_STREAM
_STREAM_RECV_HEADERS: Final = StreamInputs.RECV_HEADERS
_STREAM_RECV_END: Final = StreamInputs.RECV_END_STREAM


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id & 0x7FFFFFFF)


class LeanH2Connection(H2Connection):
    """The library's connection, server side, sending an answer's frames the short way (see the module's doc)."""

    def send_headers(self, stream_id: int, headers: Iterable[Any], end_stream: bool = False,
                     priority_weight: int | None = None, priority_depends_on: int | None = None,
                     priority_exclusive: bool | None = None) -> None:
        stream = self.streams.get(stream_id)
        if (stream is None or priority_weight is not None or priority_depends_on is not None
                or priority_exclusive is not None or not isinstance(headers, list)
                or is_informational_response(headers)):
            super().send_headers(stream_id, headers, end_stream, priority_weight, priority_depends_on,
                                 priority_exclusive)
            return
        # The library's order: the connection's state machine, the stream's, then the encoding (which changes the
        # HPACK context for good, so it comes after every check that may refuse).
        self.state_machine.process_input(_SEND_HEADERS)
        machine = stream.state_machine
        machine.process_input(_STREAM_SEND_HEADERS)
        block = self.encoder.encode(headers)
        if end_stream:
            machine.process_input(_STREAM_SEND_END)
        elif machine.trailers_sent:
            raise ProtocolError("Trailers must have END_STREAM set.")
        flags = _END_STREAM if end_stream else 0
        size = self.max_outbound_frame_size
        if len(block) <= size:
            self._data_to_send += frame_header(len(block), _HEADERS, flags | _END_HEADERS, stream_id) + block
            return
        # RFC 9113 §6.10: the rest of the block in CONTINUATION frames, END_HEADERS on the last.
        out = self._data_to_send
        for start in range(0, len(block), size):
            part = block[start:start + size]
            last = start + size >= len(block)
            kind = _HEADERS if start == 0 else _CONTINUATION
            out += frame_header(len(part), kind, (flags if start == 0 else 0) | (_END_HEADERS if last else 0),
                                stream_id) + part

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False,
                  pad_length: Any = None) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or pad_length is not None or not isinstance(data, bytes):
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        size = len(data)
        if size > 0 and size > min(self.outbound_flow_control_window, stream.outbound_flow_control_window):
            raise FlowControlError(f"Cannot send {size} bytes, flow control window is "
                                   f"{self.local_flow_control_window(stream_id)}")
        if size > self.max_outbound_frame_size:
            raise FrameTooLargeError(f"Cannot send frame size {size}, max frame size is "
                                     f"{self.max_outbound_frame_size}")
        self.state_machine.process_input(_SEND_DATA)
        machine = stream.state_machine
        machine.process_input(_STREAM_SEND_DATA)
        if end_stream:
            machine.process_input(_STREAM_SEND_END)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += frame_header(size, _DATA, _END_STREAM if end_stream else 0, stream_id) + data

    def end_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            super().end_stream(stream_id)
            return
        self.state_machine.process_input(_SEND_DATA)
        stream.state_machine.process_input(_STREAM_SEND_END)
        self._data_to_send += frame_header(0, _DATA, _END_STREAM, stream_id)

    def _receive_frame(self, frame: Frame) -> list[Event]:
        """The library's, less its trace logging, whose repr(frame) was built for every frame (a microsecond)
        even with logging off."""
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # As the library: a stream we reset gets RST_STREAM; any other closed stream is a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                reset = RstStreamFrame(e.stream_id)
                reset.error_code = e.error_code
                self._prepare_for_sending([reset])
                return e._events
            raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                reset = RstStreamFrame(e.stream_id)
                reset.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                return []
            if self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            raise
        self._prepare_for_sending(frames)
        return events  # type: ignore[no-any-return]  # (untyped in the library)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        config = self.config
        if (frame.stream_id in self.streams or config.client_side or "PRIORITY" in frame.flags
                or config.header_encoding or config.validate_inbound_headers or config.normalize_inbound_headers):
            return super()._receive_headers_frame(frame)
        # A new stream: as the library, without counting the open ones (see the module's doc).
        headers = _decode_headers(self.decoder, frame.data)
        events: list[Event] = self.state_machine.process_input(_RECV_HEADERS)
        stream = self._begin_new_stream(frame.stream_id, AllowedStreamIDs.ODD)  # a client's stream
        end_stream = "END_STREAM" in frame.flags
        if is_informational_response(headers):  # (refused by the stream's state machine: the library says how)
            frames, stream_events = stream.receive_headers(headers, end_stream, None)
            return frames, events + stream_events
        # The stream's receive_headers, less what validation (off) and header_encoding (None) would do.
        machine = stream.state_machine
        stream_events = machine.process_input(_STREAM_RECV_HEADERS)
        request = cast(RequestReceived, stream_events[0])  # a new stream's first head, from a client
        if end_stream:
            ended = machine.process_input(_STREAM_RECV_END)
            request.stream_ended = ended[0]  # type: ignore[assignment]  # (StreamEnded: the library's list is of Event)
            stream_events += ended
        stream._initialize_content_length(headers)
        request.headers = headers  # type: ignore[assignment]  # (the decoder's list: the library copies it)
        return [], events + stream_events

    def forget_closed(self, stream_id: int) -> None:
        """The library's own cleanup of one closed stream (it did it while counting open streams)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by
