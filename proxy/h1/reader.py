"""Requests off a client's byte stream: llhttp's callbacks, and the limits a head and a body phase must keep.

One `RequestReader` per client connection. llhttp (through httptools) parses; the callbacks here gather each
request's head into a `Request` (header fields named with `_` dropped unless `underscores_in_headers`), run
`check_head` on it when it is complete, queue it on the connection, and
pass body bytes to the request's sink (its exchange) or buffer them until an upstream takes them. Limits that
llhttp does not know are enforced as bytes arrive: the target, the header fields, the head as a whole (one
endless line never completes a field), and the non-body bytes of a body phase (chunk framing, trailers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import httptools

from ..errors import BadRequest, HeaderTooLarge, ProxyError, UriTooLong
from .head import BODY_NONE, Request, check_head

if TYPE_CHECKING:
    from .client import ClientConnection

MAX_BUFFERED_BODY: Final = 256 * 1024  # body bytes held for a request no upstream has taken yet
MAX_PIPELINED: Final = 32  # queued requests on one connection before reading pauses


class InternalParseError(Exception):
    """A bug in a parser callback (not the client's fault): answered 500 and logged as internal_error."""


class RequestReader:
    __slots__ = ("_body_fed", "_head_bytes", "_header_bytes", "_limits", "_nonbody_run", "conn", "in_head", "parser",
                 "req")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self._limits = conn.cfg.limits  # as of the current read (a reload swaps the listener's value)
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # the request being read
        self.in_head = False  # between a request's first byte and the end of its head
        self._header_bytes = 0
        self._head_bytes = 0
        self._body_fed = 0  # body bytes llhttp delivered during the current read
        self._nonbody_run = 0  # bytes of the body phase since the last body byte

    def feed(self, data: bytes) -> ProxyError | None:
        """Parse one read. Returns the error that ends the stream, if any; an upgrade head hands the bytes
        after it to the connection (they are never parsed as requests)."""
        limits = self._limits = self.conn.cfg.limits
        if self.in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.conn.upgraded(data[offset:])
            return None
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ProxyError):
                return cause
            raise InternalParseError("a request parser callback failed") from cause
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            return cause if isinstance(cause, ProxyError) else BadRequest(f"malformed request: {exc}")
        if self.in_head and self._head_bytes > limits.max_head:
            return HeaderTooLarge(f"request head larger than {limits.max_head} bytes")
        if self.req is not None and not self.in_head:
            # Bytes of a request's body phase that were not body: chunk framing and, at the end, trailer
            # fields, which llhttp gathers whole however long. A run of them with no body byte is bounded
            # like a head.
            nonbody = len(data) - self._body_fed
            self._nonbody_run = nonbody if self._body_fed else self._nonbody_run + nonbody
            if self._nonbody_run > limits.max_head:
                return HeaderTooLarge(f"request trailer section larger than {limits.max_head} bytes")
        self._body_fed = 0
        return None

    def take_broken(self) -> Request | None:
        """The request being read when the stream broke (no longer read)."""
        req, self.req = self.req, None
        return req

    # --- llhttp callbacks ---
    def on_message_begin(self) -> None:
        self.req = Request()
        self._header_bytes = 0
        self._head_bytes = 0
        self._nonbody_run = 0
        self.in_head = True
        conn = self.conn
        conn.idle_since = conn.cfg.loop.time()  # from the first byte, the head must arrive in client_header_timeout

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.target += url
        max_target = self._limits.max_target
        if len(req.target) > max_target:
            raise UriTooLong(f"request target longer than {max_target} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        if not self.in_head:
            # A chunked body's trailer fields (RFC 9110 §6.5): never merged into the head, where they could add
            # a second Host or forge headers after the checks ran. They are not forwarded.
            return
        limits = self._limits
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > limits.max_header_bytes:
            raise HeaderTooLarge(f"request header fields larger than {limits.max_header_bytes} bytes")
        if 95 in name and not limits.underscores_in_headers:  # 95 is b"_" (an int: the cheap byte search)
            # `Transfer_Encoding`, `Content_Length`: backends on the CGI/WSGI convention read `_` and `-` alike
            # (HTTP_TRANSFER_ENCODING) and would frame by a field this proxy does not. Dropped, neither routed
            # on nor forwarded, as nginx does (underscores_in_headers off).
            return
        req.headers.append((name, value))
        if len(req.headers) > limits.max_header_count:
            raise HeaderTooLarge(f"more than {limits.max_header_count} request header fields")

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        self.in_head = False
        check_head(
            req, parser.get_method().decode("ascii", "replace"), parser.get_http_version(),
            parser.should_keep_alive(), parser.should_upgrade(),
        )
        # Queued on the connection (inline: this runs for every request). The head arrived in time: the request
        # now runs under upstream timeouts; reading pauses when too many wait (resumed once they drain).
        conn = self.conn
        conn.idle_since = None
        conn.fresh = False
        queue = conn.queue
        queue.append(req)
        if len(queue) >= MAX_PIPELINED:
            conn.pause_reading()

    def on_body(self, data: bytes) -> None:
        req = self.req
        assert req is not None
        self._body_fed += len(data)
        if req.sink is not None:
            req.sink.send_body(data)
            return
        req.buffer.append(data)
        req.buffered += len(data)
        if req.buffered > MAX_BUFFERED_BODY:
            self.conn.pause_reading()

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        if req.body_kind != BODY_NONE:
            req.body_done = True
            if req.sink is not None:
                req.sink.end_body()


