"""A request as the HTTP/1.1 reader hands it on, and the checks its head must pass. Pure: no I/O.

llhttp (through httptools) gathers the request line and the header fields; `check_head` then reads the fields
the proxy acts on (Host, framing, Expect, Upgrade, X-Request-ID) in one pass and decides whether the request
may go anywhere (RFC 9112 §3.2 Host rules, §6 framing, the absolute form of §3.2.2; no `*` but with OPTIONS,
no fragment, no user info). A Content-Length goes on as the canonical decimal it was framed by. A request that fails
is not dropped: it carries its error (`bad`) and is answered in its turn, so pipelined requests before it
still get their answers in order.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Final

from ..errors import BadRequest, MethodNotAllowed, NotImplementedCoding, ProxyError, VersionNotSupported

if TYPE_CHECKING:
    from ..exchange import Exchange

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2

# Bytes a Host value may have: a reg-name, an IPv4 or a bracketed IPv6 literal, an optional port.
_HOST_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+;=:[]"

# A client's X-Request-ID is kept when it is a plain token of sane length; anything else is replaced by a
# fresh id, so a log line cannot be forged through it. Fresh ids are 128 random bits in 32 hex digits, as
# nginx's $request_id: unpredictable, so a client cannot guess the ids of other clients' requests. The kernel's
# randomness is drawn in batches (one os.urandom call per 256 ids) and sliced per request: a call per request
# cost about as much again as the slice.
SANE_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._~:@+/=-]{1,128}\Z").match
_ID_BATCH: Final = 256
_fresh_ids: list[bytes] = []
# A forked child must not hand out the ids its parent still holds.
os.register_at_fork(after_in_child=_fresh_ids.clear)


def new_request_id() -> bytes:
    if not _fresh_ids:
        batch = os.urandom(16 * _ID_BATCH).hex().encode()
        _fresh_ids.extend([batch[i : i + 32] for i in range(0, len(batch), 32)])
    return _fresh_ids.pop()


def settle_request_id(req: Request) -> None:
    """The id this request is known by from here on: the client's when sane, else a fresh one."""
    if not req.request_id or SANE_REQUEST_ID(req.request_id) is None:
        req.request_id = new_request_id()


class Request:
    """One client request: its head, and the state of its body while it is relayed."""

    __slots__ = (
        "absolute",
        "bad",
        "body_done",
        "body_kind",
        "body_sent",
        "buffer",
        "buffered",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "http2",
        "http10",
        "keep_alive",
        "max_body",
        "method",
        "request_id",
        "sink",
        "target",
        "upgrade",
    )

    def __init__(self) -> None:
        self.upgrade = b""  # the protocol a WebSocket upgrade request asks for (b"websocket"), else empty
        self.method = ""
        self.target = b""
        self.host = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http10 = False
        self.http2 = False  # arrived on an HTTP/2 stream (the access log says HTTP/2.0)
        self.keep_alive = True
        self.body_kind = BODY_NONE
        self.expect_continue = False
        self.body_done = False
        self.body_sent = 0
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.sink: Exchange | None = None  # where body bytes go once an upstream takes them
        self.bad: ProxyError | None = None  # a request that parsed but must be refused (answered in order)
        self.request_id = b""
        self.content_length = -1  # the Content-Length header's value, -1 without one
        self.absolute = False  # the target was in absolute form (http://host/path)
        self.max_body = 0  # the body limit of the route it took (0: none)


def check_head(req: Request, method: str, version: str, keep_alive: bool, upgrade_head: bool) -> None:
    """Fill in what the proxy reads from a parsed head and mark the request `bad` when it must be refused.

    `version`, `keep_alive` and `upgrade_head` are llhttp's readings of the request line and Connection."""
    req.method = method
    req.http10 = version == "1.0"
    req.keep_alive = keep_alive
    hosts = 0
    coding = b""
    upgrade = b""
    for name, value in req.headers:
        lower = name.lower()
        if lower == b"host":
            req.host = value
            hosts += 1
        elif lower == b"content-length":
            if value.strip().isdigit():  # llhttp refused anything else, and a second differing value
                req.content_length = int(value)
            if req.body_kind == BODY_NONE and req.content_length != 0:
                req.body_kind = BODY_LENGTH
        elif lower == b"transfer-encoding":
            req.body_kind = BODY_CHUNKED
            # Repeated field lines form one list (RFC 9110 §5.3): `gzip` then `chunked` is `gzip, chunked`.
            coding = coding + b"," + value if coding else value
        elif lower == b"expect" and value.lower() == b"100-continue":
            req.expect_continue = True
        elif lower == b"x-request-id":
            req.request_id = value
        elif lower == b"upgrade":
            upgrade = value
    if req.content_length >= 0:
        _canonical_length(req)
    # The common head (HTTP/1.1, one Host of plain host characters, no transfer coding) needs no refusal call.
    if hosts != 1 or coding or version != "1.1" or req.host.translate(None, _HOST_CHARS):
        req.bad = _refusal(req, version, hosts, coding)
        if req.bad is not None:
            req.keep_alive = False
    if method == "CONNECT":
        req.bad = MethodNotAllowed("CONNECT is not supported: this is a reverse proxy")
    if upgrade_head:
        # llhttp reads no body after an upgrade head, whatever Content-Length says: a head that claims one
        # would have the next bytes read as its body upstream (request smuggling).
        req.keep_alive = False
        if req.body_kind != BODY_NONE and req.bad is None:
            req.bad = BadRequest("an upgrade request must not have a body")
        elif method == "GET" and b"websocket" in upgrade.lower():
            req.upgrade = b"websocket"
    target = req.target
    # 35 is b"#": `int in bytes` is a byte search without the buffer protocol (12 ns against 90 for b"#").
    if (target[:1] != b"/" or 35 in target) and req.bad is None:
        _other_target(req, method)
    if req.body_kind == BODY_NONE:
        req.body_done = True


def _other_target(req: Request, method: str) -> None:
    """A target that is not a plain origin form: the asterisk form, the absolute form, or one with a fragment."""
    target = req.target
    if target == b"*":
        if method != "OPTIONS":  # RFC 9112 §3.2.4: the asterisk form is for a server-wide OPTIONS only
            req.bad = BadRequest("request target '*' is only allowed with OPTIONS")
        return
    if b"#" in target:
        # RFC 9112 §3.2: no request-target form has a fragment; one here is a client (or an attacker) hoping the
        # next hop cuts the target where this one did not.
        req.bad = BadRequest("a fragment (#) is not allowed in a request target")
        return
    absolute_form(req)


def _canonical_length(req: Request) -> None:
    """`074` or ` 74`: the upstream gets the canonical decimal. A backend reading a leading zero as octal would
    frame 60 bytes where this proxy framed 74 (RFC 9110 §8.6: 1*DIGIT, decimal)."""
    canonical = b"%d" % req.content_length
    if any(n.lower() == b"content-length" and v != canonical for n, v in req.headers):
        req.headers = [(n, canonical if n.lower() == b"content-length" else v) for n, v in req.headers]


def _refusal(req: Request, version: str, hosts: int, coding: bytes) -> ProxyError | None:
    """Why a head is refused, or None."""
    if version != "1.1" and version != "1.0":
        return VersionNotSupported(f"HTTP/{version} is not supported: HTTP/1.1 or HTTP/1.0 only")
    if hosts > 1:
        # RFC 9112 §3.2: more than one Host is a 400; routing on one while the upstream reads another is
        # how requests reach hosts they were not routed to.
        return BadRequest("more than one Host header")
    if hosts == 0 and not req.http10:
        return BadRequest("an HTTP/1.1 request must have a Host header")  # RFC 9112 §3.2
    if hosts and req.host.translate(None, _HOST_CHARS):
        # A list, a path, user info, blanks or control bytes: not a host (RFC 9112 §3.2, RFC 3986 §3.2.2).
        return BadRequest("invalid Host header")
    if coding and [c.strip().lower() for c in coding.split(b",")] != [b"chunked"]:
        # llhttp accepted `gzip, chunked`; relaying it would drop the gzip coding without a word (nginx: 501).
        return NotImplementedCoding(f"transfer coding {coding.decode('latin-1')!r} is not supported")
    return None


def absolute_form(req: Request) -> None:
    """RFC 9112 §3.2.2: with an absolute-form target the URI's authority is the host; it replaces Host for
    routing and upstream, and the upstream gets the origin form. Anything else is a 400."""
    scheme, sep, rest = req.target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        req.bad = BadRequest("request target must be a path or an absolute http(s) URI")
        return
    end = next((i for i, c in enumerate(rest) if c in b"/?#"), len(rest))
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:
        # RFC 9110 §4.2.4: the userinfo subcomponent is deprecated, and a recipient SHOULD treat its presence
        # as an error: `http://trusted.example@evil.example/` reads as two hosts to two readers.
        req.bad = BadRequest("user info is not allowed in a request target")
        return
    if not authority:
        req.bad = BadRequest("absolute request target without a host")
        return
    req.target = path if path.startswith(b"/") else b"/" + path
    req.host = authority
    req.absolute = True
    req.headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
    req.headers.append((b"Host", authority))
