"""An HTTP/2 request head as the engine's `Request`, and an answer's head as HTTP/2 fields. Pure: no I/O.

The `h2` library has already refused what RFC 9113 §8.2 calls malformed (upper-case names, connection-specific
fields, a TE other than `trailers`, pseudo-header rules) before a head reaches `request_from_fields`. What is
left is the proxy's own reading, the same as for HTTP/1.1: `:authority` is the host routed on (a `Host` field
only when it is missing, RFC 9113 §8.3.1), a Host that is not a host name is a 400, `CONNECT` a 405, the target
a path (or `*` with OPTIONS); header counts and bytes are bounded by the same limits. The upstream is HTTP/1.1:
the request goes on with a `Host` field, its `cookie` fields joined with "; " (RFC 9113 §8.2.3), chunked when it
has a body of unknown length. Connection-specific fields are dropped here as well, whatever the library let by.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from ..errors import BadRequest, HeaderTooLarge, MethodNotAllowed, ProxyError, UriTooLong
from ..h1.head import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Request
from ..headers import HOP_BY_HOP, HeaderRules

if TYPE_CHECKING:
    from ..listener import ListenerLimits

Field = tuple[bytes, bytes]

_HOST_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+;=:[]"
# Never between the two protocols (RFC 9113 §8.2.2), in either direction; `te: trailers` is the one TE allowed
# in HTTP/2, and it means nothing to an HTTP/1.1 upstream: dropped too.
CONNECTION_SPECIFIC: Final = HOP_BY_HOP | {b"http2-settings"}


def request_from_fields(
    fields: Iterable[Field], limits: ListenerLimits, *, end_stream: bool,
) -> Request:
    """The `Request` of one HTTP/2 request head; `req.bad` says why it must be refused, when it must."""
    req = Request()
    req.http2 = True
    method = b""
    authority = b""
    host = b""
    path = b""
    cookies: list[bytes] = []
    size = 0
    headers = req.headers
    try:
        for name, value in fields:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue  # :scheme says nothing the listener does not know
            size += len(name) + len(value) + 4
            if size > limits.max_header_bytes:
                raise HeaderTooLarge(f"request header fields larger than {limits.max_header_bytes} bytes")
            if name in CONNECTION_SPECIFIC or (95 in name and not limits.underscores_in_headers):
                continue  # b"_" (95): as for HTTP/1.1 (see h1/reader.py)
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"host":
                host = value
                continue
            if name == b"content-length":
                if value.isdigit():
                    req.content_length = int(value)
            elif name == b"x-request-id":
                req.request_id = value
            headers.append((name, value))
            if len(headers) > limits.max_header_count:
                raise HeaderTooLarge(f"more than {limits.max_header_count} request header fields")
        if len(path) > limits.max_target:
            raise UriTooLong(f"request target longer than {limits.max_target} bytes")
    except ProxyError as err:
        req.bad = err
    req.method = method.decode("ascii", "replace")
    req.target = path
    req.host = authority or host
    if cookies:
        # RFC 9113 §8.2.3: a client may split Cookie into one field per pair; HTTP/1.1 allows one Cookie line.
        headers.append((b"cookie", b"; ".join(cookies)))
    headers.append((b"host", req.host))
    if not end_stream:
        req.body_kind = BODY_LENGTH if req.content_length > 0 else BODY_NONE if req.content_length == 0 \
            else BODY_CHUNKED
    req.body_done = req.body_kind == BODY_NONE
    if req.bad is None:
        req.bad = _refusal(req)
    return req


def _refusal(req: Request) -> ProxyError | None:
    if req.method == "CONNECT":
        return MethodNotAllowed("CONNECT is not supported: this is a reverse proxy")
    if not req.host or req.host.translate(None, _HOST_CHARS):
        return BadRequest("invalid or missing :authority")
    target = req.target
    if target == b"*":
        return None if req.method == "OPTIONS" else BadRequest("request target '*' is only allowed with OPTIONS")
    if target[:1] != b"/":
        return BadRequest("request target must be a path")
    if b"#" in target:
        return BadRequest("a fragment (#) is not allowed in a request target")
    return None


def response_fields(
    status: int, headers: Sequence[Field], extra: Sequence[Field], request_id: bytes, rules: HeaderRules | None,
) -> list[Field]:
    """The HTTP/2 response head for an upstream's HTTP/1.1 answer: `:status`, then its end-to-end fields in
    lower case (HTTP/2 requires it), without connection-specific ones and those its Connection names."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    out: list[Field] = [(b":status", b"%d" % status)]
    for name, value in headers:
        lower = name.lower()
        if lower in CONNECTION_SPECIFIC or lower in named or (request_id and lower == b"x-request-id"):
            continue
        if rules is not None and lower in rules.drop:
            continue
        out.append((lower, value))
    if rules is not None:
        out += [(n.lower(), v) for n, v in (*rules.set, *rules.add)]
    out += [(n.lower(), v) for n, v in extra]
    if request_id:
        out.append((b"x-request-id", request_id))
    return out


# gRPC status codes (grpc/doc/statuscodes.md) for the answers the proxy gives itself; the HTTP statuses as gRPC's
# own HTTP-to-gRPC mapping reads them (doc/http-grpc-status-mapping.md), with a timeout as DEADLINE_EXCEEDED.
GRPC_UNAVAILABLE: Final = 14
_GRPC_STATUS: Final = {
    400: 13, 401: 16, 403: 7, 404: 12, 408: 4, 413: 8, 429: 14, 431: 8, 500: 13, 502: 14, 503: 14, 504: 4,
}


def is_grpc(req: Request) -> bool:
    """A gRPC call (content-type application/grpc, +proto and the like)."""
    return any(name == b"content-type" and value.startswith(b"application/grpc") for name, value in req.headers)


def grpc_error_fields(status: int, message: str, request_id: bytes) -> list[Field]:
    """A trailers-only gRPC answer (one HEADERS frame with END_STREAM): what a gRPC client reads as an error,
    where a text body would be a protocol error to it. grpc-message is percent-encoded (PROTOCOL-HTTP2.md)."""
    code = _GRPC_STATUS.get(status, 2)  # 2: UNKNOWN
    text = "".join(c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
                   for c in message)
    fields: list[Field] = [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code),
        (b"grpc-message", text.encode()),
    ]
    if request_id:
        fields.append((b"x-request-id", request_id))
    return fields
