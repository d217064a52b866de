"""structlog set-up: JSON lines when stdout is not a terminal (or when asked), colourless console otherwise.

Filtering by level happens in the bound logger itself (make_filtering_bound_logger), so a filtered call costs
a method lookup and returns: no dict built, no string formatted. JSON goes through orjson straight to bytes
(structlog's recommended fast path): the access log is written once per request, and the standard library's
json encoder was a fifth of the proxy's CPU time in profiles.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any
    factory: Any
    if use_json and hasattr(stream, "buffer"):
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
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
