"""The buffered log's flusher: lines reach the stream within the flush interval of the first line of a batch,
those logged before the flusher started included; it sleeps on an event while nothing is logged."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import pytest
import structlog

from proxy import logs


class Stream(io.StringIO):
    """A text stream with a binary buffer, as stdout is (JSON lines go to the buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = io.BytesIO()

    @property
    def buffer(self) -> io.BytesIO:  # stdout's binary side, readable here
        return self.bytes

    def isatty(self) -> bool:
        return False


@pytest.fixture
def stream() -> Iterator[Stream]:
    out = Stream()
    logs.configure("json", "info", out, buffered=True)
    yield out
    structlog.reset_defaults()


async def _written_within(stream: Stream, text: bytes, seconds: float) -> bool:
    for _ in range(int(seconds / 0.01)):
        if text in stream.bytes.getvalue():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_line_logged_before_the_flusher_started_is_written(stream: Stream) -> None:
    """Start-up lines wait in the buffer; the flusher writes them once it runs."""
    structlog.get_logger("t").info("before_flusher")
    assert b"before_flusher" not in stream.bytes.getvalue()
    flusher = logs.start_flushing(0.05)
    assert flusher is not None
    try:
        assert await _written_within(stream, b"before_flusher", 5)
    finally:
        flusher.cancel()


async def test_each_batch_is_written_after_an_idle_spell(stream: Stream) -> None:
    """A line after the buffer was emptied wakes the flusher again."""
    flusher = logs.start_flushing(0.05)
    assert flusher is not None
    try:
        structlog.get_logger("t").info("first_batch")
        assert await _written_within(stream, b"first_batch", 5)
        await asyncio.sleep(0.2)  # idle: the flusher waits on its event
        structlog.get_logger("t").info("second_batch")
        assert await _written_within(stream, b"second_batch", 5)
    finally:
        flusher.cancel()
