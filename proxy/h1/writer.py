"""The sending half of an HTTP/1.1 client connection: response framing and how bytes leave.

`ResponseWriter` frames an upstream's answer for this client (chunked when its length is unknown; the head
says keep-alive or close), batches what one upstream read produced into one write, writes the proxy's own
answers (public text only, with a request id and an access line, even for bytes that never became a request),
and cuts or closes the connection. `ClientConnection` is one; it is apart so each half stays small enough to
hold in one's head.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING, Final

from ..accounting import record
from ..errors import ProxyError
from ..headers import client_response_head, error_body_size, error_response
from ..logs import request_log
from ..metrics import NO_ROUTE, NO_SERVICE
from ..table import Route
from .head import Request, settle_request_id
from .upstream import FRAMING_CHUNKED, FRAMING_EOF

if TYPE_CHECKING:
    from ..listener import ProxyContext, ProxyServer

_LAST_CHUNK: Final = b"0\r\n\r\n"
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class ResponseWriter(asyncio.Protocol):
    __slots__ = ("_chunked_out", "_out", "transport")

    server: ProxyServer
    cfg: ProxyContext
    peer_text: str

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._out: list[bytes] = []  # response bytes from the current upstream read, written once by flush()
        self._chunked_out = False

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- Downstream: what an exchange sends and asks ---
    def send_head(
        self, req: Request, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: int,
        extra: tuple[tuple[bytes, bytes], ...], route: Route,
    ) -> None:
        keep_alive = req.keep_alive
        chunked = False
        if framing == FRAMING_EOF or framing == FRAMING_CHUNKED:
            if req.http10:
                keep_alive = False  # HTTP/1.0 has no chunked coding: the end of the body is the end of the connection
            else:
                chunked = True
        if not req.body_done or self.server.draining:
            # The upstream answered before the client finished sending (do not read on), or the server is
            # draining or shutting down: say so in this answer rather than race the client's next request with
            # a close.
            keep_alive = False
        req.keep_alive = keep_alive
        self._chunked_out = chunked
        self._out.append(client_response_head(
            status, reason, headers, chunked=chunked, keep_alive=keep_alive, http10=req.http10, extra=extra,
            request_id=req.request_id, rules=route.response_rules,
        ))

    def send_body(self, data: bytes) -> None:
        if self._chunked_out:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def end(self) -> None:
        out = self._out
        if self._chunked_out:
            out.append(_LAST_CHUNK)
            self._chunked_out = False
        if out:  # (flush, inlined: every answer ends here)
            self.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Never called: only HTTP/2 upstreams (proto=grpc) send trailers, and HTTP/1.1 clients are refused
        those routes (dispatch)."""
        self.end()

    def abort(self) -> None:
        """Cut the connection with a TCP reset (SO_LINGER 0): a plain close sends FIN, which a client reading
        a close-delimited body takes for a complete response."""
        self._out.clear()
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def backlog(self) -> int:
        """Bytes written to the client that it has not taken yet: the transport's buffer plus the kernel's send
        queue (Linux TIOCOUTQ), whose megabytes on a fast link would otherwise hide a slow reader's progress."""
        transport = self.transport
        if transport is None:
            return 0
        size = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return size

    def send_switching(self, req: Request, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """The upstream's 101 to the client's upgrade request, with the protocol it switched to."""
        protocol = next((v for n, v in headers if n.lower() == b"upgrade"), req.upgrade)
        self.write(client_response_head(
            101, reason, headers, chunked=False, keep_alive=True, http10=False,
            extra=((b"Connection", b"Upgrade"), (b"Upgrade", protocol)), request_id=req.request_id,
        ))

    def _write_error(self, req: Request, err: ProxyError) -> int:
        """The proxy's own answer: the public text only (the log line has the detail, instances included);
        returns the body bytes sent, for the access line."""
        head = req.method == "HEAD"
        self.write(error_response(
            err.status, err.public_message, keep_alive=req.keep_alive, http10=req.http10,
            request_id=req.request_id, extra=err.headers, head=head,
        ))
        return 0 if head else error_body_size(err.status, err.public_message)

    def refuse(self, err: ProxyError, req: Request | None = None) -> None:
        """An answer to bytes that never became a request that could be served (a parse error, a limit, a head
        that did not arrive in time, a connection over max_connections): like every answer, it has a request
        id, an access line and its metrics; the connection then closes."""
        started = time.perf_counter()
        if req is None:
            req = Request()
        settle_request_id(req)
        req.keep_alive = False
        request_log(req, "warning", "client_protocol_error", status=err.status, reason=err.reason,
                    error=err.message, client=self.peer_text, method=req.method)
        sent = self._write_error(req, err)
        record(self.cfg, req, NO_SERVICE, NO_ROUTE, err.status, started, "", sent, "", None, self.peer_text)
