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
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO, Final, Protocol, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_MAX_BUFFERED: Final = 64 * 1024


class LineBuffer:
    """Log lines collected in memory and written in batches; `urgent` lines flush the batch at once."""

    __slots__ = ("_file", "_max", "_parts", "_size", "wake")

    def __init__(self, file: BinaryIO, max_bytes: int = _MAX_BUFFERED) -> None:
        self._file = file
        self._max = max_bytes
        self._parts: list[bytes] = []
        self._size = 0
        # Called when a line arrives in an empty buffer (the flusher's alarm): an idle process wakes for nothing.
        self.wake: Callable[[], None] | None = None

    def add(self, line: bytes, urgent: bool) -> None:
        if not self._parts and self.wake is not None:
            self.wake()
        self._parts.append(line)
        self._size += len(line)
        if urgent or self._size >= self._max:  # max_bytes 0: every line is written at once
            self.flush()

    @property
    def waiting(self) -> bool:
        """Lines are waiting to be written."""
        return bool(self._parts)

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            try:
                self._file.write(data)
                self._file.flush()
            except (OSError, ValueError):
                # stdout gone (EPIPE, closed): losing log lines must not break the request that logged them.
                pass


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
_json_out: LineBuffer | None = None  # where JSON lines go (buffered or not), for the access log's fast path
_extra_buffers: list[LineBuffer] = []  # access log files


def configure(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None, *, buffered: bool = False
) -> None:
    global _buffer
    stream = stream or sys.stdout
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any
    factory: Any
    global _json_out
    _buffer = None
    _json_out = None
    if use_json and hasattr(stream, "buffer"):
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        # Unbuffered is a buffer flushed on every line.
        buffer = _json_out = LineBuffer(stream.buffer, max_bytes=_MAX_BUFFERED if buffered else 0)
        if buffered:
            _buffer = buffer
            atexit.register(buffer.flush)
        factory = lambda *_: BufferedBytesLogger(buffer)  # noqa: E731 - structlog wants a callable
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
    """Flush buffered log lines at most `interval` seconds after the first one of a batch arrived, on the running
    loop (None when not buffered); while nothing is logged the task sleeps without waking. Cancel the task to
    stop; call flush() once more at exit."""
    buffer = _buffer
    if buffer is None or interval <= 0:
        return None
    pending = asyncio.Event()
    for each in (buffer, *_extra_buffers):
        each.wake = pending.set
        if each.waiting:
            pending.set()  # lines logged before the flusher ran (start-up): they would not call wake again

    async def flusher() -> None:
        while True:
            await pending.wait()
            await asyncio.sleep(interval)
            pending.clear()
            buffer.flush()
            for extra in _extra_buffers:
                extra.flush()

    return asyncio.get_running_loop().create_task(flusher(), name="log-flusher")


class AccessRequest(Protocol):
    """What the access log reads of a request (the server's Request)."""

    method: str
    host: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http10: bool
    http2: bool
    request_id: bytes


# (request, path, status, service, upstream, duration in ms, response body bytes, client address)
AccessWriter = Callable[[AccessRequest, str, int, str, str, float, int, str], None]
ACCESS_FORMATS: Final = ("json", "common", "combined")


def access_writer(access_format: str = "json", path: str = "") -> AccessWriter:
    """The function that writes one access line per request, in `access_format`, to `path` (appended to) or,
    when empty, where the other log lines go.

    json: in JSON mode this is written by hand instead of going through structlog: the same line structlog
    would render (event, level, timestamp, bound context such as the worker number, then the fields), built
    as one dict and encoded once. Measured under load, structlog's general path (lazy proxy, bound logger,
    processor chain) cost about 40 µs a request in place, a fifth of the proxy's whole budget; this costs a
    few. In console mode the JSON-format access line goes through structlog's console renderer.
    common and combined: the NCSA formats nginx and Apache write (`combined` adds Referer and User-Agent),
    for the tools that read them; the request id is in the JSON format and in X-Request-ID.
    """
    out = _json_out
    if path:
        out = LineBuffer(open(path, "ab"), max_bytes=_MAX_BUFFERED if _buffer is not None else 0)
        if _buffer is not None:
            out.wake = _buffer.wake  # the flusher's alarm, when it runs already (else start_flushing sets it)
        _extra_buffers.append(out)
    elif access_format != "json" and out is None:
        out = LineBuffer(sys.stdout.buffer, max_bytes=0)
    if access_format in ("common", "combined"):
        assert out is not None
        return _ncsa_writer(out, combined=access_format == "combined")
    if out is None:
        logger = structlog.get_logger("ferryman.access")

        def via_structlog(req: AccessRequest, path: str, status: int, service: str, upstream: str,
                          duration_ms: float, sent: int, client: str) -> None:
            logger.info("access", method=req.method, protocol=_protocol(req), host=req.host.decode("latin-1"),
                        path=path, status=status,
                        service=service, upstream=upstream, duration_ms=duration_ms, bytes=sent, client=client,
                        request_id=req.request_id.decode("latin-1"))

        return via_structlog

    context = dict(structlog.contextvars.get_contextvars())
    dumps = orjson.dumps
    add = out.add
    clock = time.time
    stamp = _IsoStamp()

    def fast(req: AccessRequest, path: str, status: int, service: str, upstream: str,
             duration_ms: float, sent: int, client: str) -> None:
        line = {
            **context, "method": req.method, "protocol": "HTTP/2.0" if req.http2 else "HTTP/1.0" if req.http10
            else "HTTP/1.1", "host": req.host.decode("latin-1"), "path": path, "status": status,
            "service": service, "upstream": upstream, "duration_ms": duration_ms, "bytes": sent, "client": client,
            "request_id": req.request_id.decode("latin-1"), "event": "access", "level": "info",
            "timestamp": stamp(clock()),
        }
        add(dumps(line) + b"\n", False)

    return fast


def _protocol(req: AccessRequest) -> str:
    return "HTTP/2.0" if req.http2 else "HTTP/1.0" if req.http10 else "HTTP/1.1"


def _ncsa_escape(value: bytes) -> bytes:
    """Quotes, backslashes and control bytes as \\xHH, as nginx escapes them, so a field cannot end early."""
    if all(0x20 <= c < 0x7F and c not in (0x22, 0x5C) for c in value):
        return value
    return b"".join(bytes([c]) if 0x20 <= c < 0x7F and c not in (0x22, 0x5C) else b"\\x%02X" % c for c in value)


def _ncsa_writer(out: LineBuffer, *, combined: bool) -> AccessWriter:
    clock = time.time
    stamp = _ClfStamp()
    add = out.add

    def write(req: AccessRequest, path: str, status: int, service: str, upstream: str,
              duration_ms: float, sent: int, client: str) -> None:
        version = b"HTTP/2.0" if req.http2 else b"HTTP/1.0" if req.http10 else b"HTTP/1.1"
        line = b'%b - - [%b] "%b %b %b" %d %b' % (
            client.encode() or b"-", stamp(clock()), req.method.encode(), _ncsa_escape(req.target), version,
            status, str(sent).encode() if sent else b"-",
        )
        if combined:
            referer = agent = b"-"
            for name, value in req.headers:
                lower = name.lower()
                if lower == b"referer":
                    referer = _ncsa_escape(value)
                elif lower == b"user-agent":
                    agent = _ncsa_escape(value)
            line += b' "%b" "%b"' % (referer, agent)
        add(line + b"\n", False)

    return write


class _ClfStamp:
    """`27/Nov/2026:11:14:25 +0000`, formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def __call__(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = datetime.fromtimestamp(second, tz=UTC).strftime("%d/%b/%Y:%H:%M:%S +0000").encode()
        return self._text


class _IsoStamp:
    """UTC ISO-8601 timestamps with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes
    them; the date and time part is formatted once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"


def flush() -> None:
    if _buffer is not None:
        _buffer.flush()
    for extra in _extra_buffers:
        extra.flush()


_proxy_log = structlog.get_logger("ferryman.proxy")


def request_log(req: AccessRequest, level: str, event: str, **fields: object) -> None:
    """A log line about one request, with its request id bound through structlog's context variables for
    the line (the engine runs requests as callbacks, with no task of their own to hold a context)."""
    with structlog.contextvars.bound_contextvars(request_id=req.request_id.decode("latin-1")):
        getattr(_proxy_log, level)(event, **fields)
