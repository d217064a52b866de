"""The limits an HTTP/2 client connection enforces, as one frozen value a reload replaces whole; and the one rule
both directions follow for what the peer's flow-control windows let out, and when a reopened window lets them
out. Pure."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from h2.connection import H2Connection

# RFC 9113 §3.4: every HTTP/2 connection opens with these 24 bytes (then a SETTINGS frame).
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one HTTP/2 client connection may do (the http2_* settings)."""

    max_concurrent_streams: int = 100  # advertised in SETTINGS; streams beyond are refused (REFUSED_STREAM)
    max_header_list_size: int = 65536  # decoded header list (RFC 9113 §6.5.2 accounting), advertised
    max_frame_size: int = 16384  # the largest frame the client may send, advertised
    header_table_size: int = 4096  # the HPACK dynamic table the client may make us keep
    max_resets: int = 200  # RST_STREAM frames per second from the client (rapid reset, CVE-2023-44487)
    max_control_frames: int = 100  # SETTINGS, PING and PRIORITY frames per second from the client


class Rate:
    """Events counted per one-second window: `over(now)` counts one and says whether the limit is passed."""

    __slots__ = ("count", "limit", "since")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.since = float("-inf")

    def over(self, now: float) -> bool:
        if now - self.since >= 1.0:
            self.since, self.count = now, 0
        self.count += 1
        return self.count > self.limit


def window_chunk(h2: H2Connection, stream_id: int, pending: collections.deque[bytes]) -> bytes | None:
    """The next bytes of `pending` the stream's and the connection's windows (and the frame size) allow, taken
    off `pending`; None while a window is closed (the rest waits for WINDOW_UPDATE). The client streams and the
    upstream (gRPC) streams send their DATA through it."""
    window = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
    if window <= 0:
        return None
    chunk = pending[0]
    if len(chunk) <= window:
        pending.popleft()
        return chunk
    pending[0] = chunk[window:]
    return chunk[:window]


class Held(Protocol):
    """A stream whose DATA the windows may hold back (client streams and upstream gRPC streams)."""

    pending: collections.deque[bytes]

    def pump(self) -> None: ...


def window_reopened(streams: Mapping[int, Held], stream_id: int) -> None:
    """A WINDOW_UPDATE arrived for `stream_id` (0: the connection's window): the streams it held back send what
    they now can."""
    if stream_id:
        stream = streams.get(stream_id)
        if stream is not None and stream.pending:
            stream.pump()
        return
    for stream in list(streams.values()):
        if stream.pending:
            stream.pump()
