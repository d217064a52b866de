"""structlog set-up: JSON lines when stdout is not a terminal (or when asked), colourless console otherwise.

Filtering by level happens in the bound logger itself (make_filtering_bound_logger), so a filtered call costs
a method lookup and returns: no dict built, no string formatted. JSON goes through orjson straight to bytes
(structlog's recommended fast path): the access log is written once per request, and the standard library's
json encoder was a fifth of the proxy's CPU time in profiles.

Info and debug lines (the access log among them) are batched and written every `flush_interval` seconds or
every 64 KiB, like nginx's `access_log ... buffer= flush=`; a write system call per request was the largest
single cost left in the logging path. Warnings and errors flush at once, with everything before them, so
order is kept. structlog has no buffered logger, hence the small one here.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
from typing import Any, BinaryIO, Final, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_MAX_BUFFERED: Final = 64 * 1024


class LineBuffer:
    """Log lines collected in memory and written in batches; `urgent` lines flush the batch at once."""

    __slots__ = ("_file", "_max", "_parts", "_size")

    def __init__(self, file: BinaryIO, max_bytes: int = _MAX_BUFFERED) -> None:
        self._file = file
        self._max = max_bytes
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, line: bytes, urgent: bool) -> None:
        self._parts.append(line)
        self._size += len(line)
        if urgent or self._size >= self._max:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            self._file.write(data)
            self._file.flush()


class BufferedBytesLogger:
    """A structlog logger (the last step after the renderer) writing through a LineBuffer."""

    __slots__ = ("_buffer",)

    def __init__(self, buffer: LineBuffer) -> None:
        self._buffer = buffer

    def msg(self, message: bytes) -> None:
        self._buffer.add(message + b"\n", False)

    def urgent(self, message: bytes) -> None:
        self._buffer.add(message + b"\n", True)

    debug = info = log = msg
    warn = warning = err = error = critical = fatal = exception = urgent


_buffer: LineBuffer | None = None


def configure(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None, *, buffered: bool = False
) -> None:
    global _buffer
    stream = stream or sys.stdout
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any
    factory: Any
    _buffer = None
    if use_json and hasattr(stream, "buffer"):
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if buffered:
            buffer = _buffer = LineBuffer(stream.buffer)
            atexit.register(buffer.flush)
            factory = lambda *_: BufferedBytesLogger(buffer)  # noqa: E731 - structlog wants a callable
        else:
            factory = structlog.BytesLoggerFactory(file=stream.buffer)
    elif use_json:
        renderer = structlog.processors.JSONRenderer()
        factory = structlog.WriteLoggerFactory(file=stream)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library; keep their warnings, on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


def start_flushing(interval: float) -> asyncio.Task[None] | None:
    """Flush buffered log lines every `interval` seconds on the running loop (None when not buffered).
    Cancel the task to stop; call flush() once more at exit."""
    buffer = _buffer
    if buffer is None or interval <= 0:
        return None

    async def flusher() -> None:
        while True:
            await asyncio.sleep(interval)
            buffer.flush()

    return asyncio.get_running_loop().create_task(flusher(), name="log-flusher")


def flush() -> None:
    if _buffer is not None:
        _buffer.flush()
