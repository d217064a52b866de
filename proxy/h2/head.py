"""An HTTP/2 request head as the engine's `Request`, and an answer's head as HTTP/2 fields. Pure: no I/O.

`request_from_fields` reads a decoded request head in one pass, and is where what RFC 9113 §8.2 and §8.3 call
malformed is found (the `h2` library's own header validation is off: its chain of generators cost more than
the rest of a request's reading; this pass checks the same things): a field name with upper case, controls,
non-ASCII or an inner colon, an empty one; a value with NUL, CR or LF, or starting or ending with whitespace;
connection-specific fields; a TE other than `trailers`; pseudo-header fields that are unknown, repeated,
after a regular field, missing or out of place (`:status`, `:protocol` without CONNECT, `:path` or `:scheme`
with an ordinary CONNECT, an empty `:path`); a Host that differs from `:authority`, two Hosts, or neither.
Any of these raises `Malformed`: the connection answers PROTOCOL_ERROR, as the library did.

What is left is the proxy's own reading, the same as for HTTP/1.1: `:authority` is the host routed on (a `Host`
field only when it is missing, RFC 9113 §8.3.1), a Host that is not a host name is a 400, `CONNECT` a 405, the
target a path (or `*` with OPTIONS); header counts and bytes are bounded by the same limits. The upstream is
HTTP/1.1: the request goes on with a `Host` field, its `cookie` fields joined with "; " (RFC 9113 §8.2.3),
chunked when it has a body of unknown length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from hpack import NeverIndexedHeaderTuple

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


class Malformed(Exception):
    """A header block RFC 9113 §8.1.1 calls malformed: a PROTOCOL_ERROR, the message says which rule."""


# RFC 9113 §8.2.1: a field name holds no 0x00-0x20, no upper case (0x41-0x5a), no 0x7f-0xff and, past a pseudo-
# header's leading colon, no colon. Deleting the bytes allowed leaves the ones that are not.
_NAME_CHARS: Final = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A and c != 0x3A)
_WHITESPACE: Final = (0x20, 0x09)  # SP, HTAB: never at either end of a value (§8.2.1)
# RFC 9113 §8.2.2: these make a request malformed (te is allowed as "trailers" only); the other hop-by-hop
# names in CONNECTION_SPECIFIC are dropped on the way.
_FORBIDDEN: Final = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


def _check_value(name: bytes, value: bytes) -> None:
    """RFC 9113 §8.2.1 (inlined in request_from_fields)."""
    if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE or b"\n" in value or b"\r" in value
                  or b"\0" in value):
        raise Malformed(f"invalid value of {name!r}")


def check_trailers(fields: Iterable[Field]) -> None:
    """Trailers: the same rules for names and values, and no pseudo-header field (§8.1)."""
    for name, value in fields:
        if not name or name.translate(None, _NAME_CHARS):
            raise Malformed(f"invalid field name {name!r} in trailers")
        _check_value(name, value)


def request_from_fields(
    fields: Iterable[Field], limits: ListenerLimits, *, end_stream: bool,
) -> Request:
    """The `Request` of one HTTP/2 request head; `req.bad` says why it must be refused, when it must. Raises
    `Malformed` for a head the protocol forbids."""
    req = Request()
    req.http2 = True
    pseudo: dict[bytes, bytes] = {}
    host = None
    cookies: list[bytes] = []
    size = 0
    headers = req.headers
    regular = False
    bad: ProxyError | None = None
    max_bytes, max_count, underscores = limits.max_header_bytes, limits.max_header_count, limits.underscores_in_headers
    for name, value in fields:
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE or b"\n" in value or b"\r" in value
                      or b"\0" in value):
            raise Malformed(f"invalid value of {name!r}")
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in pseudo:
                raise Malformed(f"pseudo-header field {name!r} out of place or repeated")
            pseudo[name] = value
            continue
        regular = True
        if not name or name.translate(None, _NAME_CHARS):
            raise Malformed(f"invalid field name {name!r}")
        size += len(name) + len(value) + 4
        if size > max_bytes and bad is None:
            bad = HeaderTooLarge(f"request header fields larger than {max_bytes} bytes")
        if name in CONNECTION_SPECIFIC:
            if name in _FORBIDDEN or (name == b"te" and value.lower() != b"trailers"):
                raise Malformed(f"connection-specific field {name!r}")
            continue
        if name == b"host":
            if host is not None:
                raise Malformed("more than one Host field")
            host = value
            continue
        if bad is not None or (95 in name and not underscores):
            continue  # refused already: the rest is only checked; b"_" (95): as for HTTP/1.1 (see h1/reader.py)
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"content-length":
            if value.isdigit():  # (the library refuses any other value)
                req.content_length = int(value)
        elif name == b"x-request-id":
            req.request_id = value
        headers.append((name, value))
        if len(headers) > max_count:
            bad = HeaderTooLarge(f"more than {max_count} request header fields")
    _check_pseudo(pseudo)
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        raise Malformed("neither :authority nor Host")
    if authority is not None and host is not None and authority != host:
        raise Malformed(":authority and Host differ")
    path = pseudo.get(b":path", b"")  # (:scheme says nothing the listener does not know)
    if bad is None and len(path) > limits.max_target:
        bad = UriTooLong(f"request target longer than {limits.max_target} bytes")
    req.bad = bad
    req.method = pseudo[b":method"].decode("ascii", "replace")
    req.target = path
    req.host = authority or host or b""
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


_MEMO_SIZE: Final = 8  # heads kept per connection; emptied when full (a client varying its heads parses as before)
# The largest head kept: at most 32 fields and 4 KiB counted as HPACK counts a header list (RFC 7541 §4.1: 32
# bytes a field on top of its name and value, about what a field costs in Python objects). A connection then holds
# about 33 KiB at most for its memo (8 heads of 32 fields near 4 KiB; tests/unit/proxy/h2/test_head.py keeps it
# under 64 KiB), where heads of many small fields would pin 600 KiB or more. Larger heads are read each time.
_MEMO_HEAD_FIELDS: Final = 32
_MEMO_HEAD_BYTES: Final = 4096


class HeadMemo:
    """The requests of the heads one connection saw before (pure state, one per client connection).

    A client repeating a request sends the same fields (h2load's, an API client's polling, a browser's assets
    less the path): their reading gives the same `Request`, so what `request_from_fields` found is kept, keyed by
    the fields, and copied into a new `Request` instead of reading them again (that reading was a tenth of an
    HTTP/2 request's CPU time). Kept only for a head that passed (a malformed one raises every time, one refused
    gets its own error), that carries no request id (unique to each request: it would only push the others
    out), and that is small (_MEMO_HEAD_FIELDS, _MEMO_HEAD_BYTES: memory per connection stays bounded).
    Another ListenerLimits (a reload) empties it."""

    __slots__ = ("heads", "limits")

    def __init__(self) -> None:
        self.heads: dict[tuple[Any, ...], Request] = {}
        self.limits: ListenerLimits | None = None

    def request(self, fields: Sequence[Field], limits: ListenerLimits, *, end_stream: bool) -> Request:
        heads = self.heads
        if limits is not self.limits:
            heads.clear()
            self.limits = limits
        key = (end_stream, *fields)
        seen = heads.get(key)
        if seen is None:
            req = request_from_fields(fields, limits, end_stream=end_stream)
            if (not req.request_id and req.bad is None and len(fields) <= _MEMO_HEAD_FIELDS
                    and sum(32 + len(name) + len(value) for name, value in fields) <= _MEMO_HEAD_BYTES):
                if len(heads) >= _MEMO_SIZE:
                    heads.clear()
                seen = heads[key] = Request()
                _copy(req, seen)
            return req
        req = Request()
        _copy(seen, req)
        return req


def _copy(source: Request, req: Request) -> None:
    """What request_from_fields sets, onto another request (the fields list copied: it is the exchange's)."""
    req.http2 = True
    req.headers = list(source.headers)
    req.method, req.target, req.host = source.method, source.target, source.host
    req.content_length, req.body_kind, req.body_done = source.content_length, source.body_kind, source.body_done


def _check_pseudo(pseudo: dict[bytes, bytes]) -> None:
    """RFC 9113 §8.3.1 and §8.5, RFC 8441 §4: which pseudo-header fields a request has."""
    method = pseudo.get(b":method")
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise Malformed("CONNECT with :scheme or :path")
        return
    if b":protocol" in pseudo and method != b"CONNECT":
        raise Malformed(":protocol without CONNECT")
    if b":scheme" not in pseudo or not pseudo.get(b":path"):
        raise Malformed("no :scheme or no :path")


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
    out: list[Field] = [(b":status", b"%d" % status)]
    drop = rules.drop if rules is not None else ()
    connection: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower in CONNECTION_SPECIFIC:
            if lower == b"connection":
                connection.append(value)
            continue
        if lower in drop or (request_id and lower == b"x-request-id"):
            continue
        out.append((lower, value))
    if connection:
        # RFC 9110 §7.6.1: the fields Connection names are this hop's too (keep-alive, named by most, is
        # dropped above already).
        named = {token.strip().lower() for value in connection for token in value.split(b",")} - CONNECTION_SPECIFIC
        if named:
            out = [out[0], *(field for field in out[1:] if field[0] not in named)]
    if rules is not None:
        out += [(n.lower(), v) for n, v in (*rules.set, *rules.add)]
    out += [(n.lower(), v) for n, v in extra]
    if request_id:
        # New with every answer: indexed, it would push the fields that repeat out of the client's HPACK table.
        out.append(NeverIndexedHeaderTuple(b"x-request-id", request_id))
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
