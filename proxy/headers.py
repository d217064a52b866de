"""Header rules between client and upstream, on raw header lists. Pure: bytes in, bytes out.

Headers arrive from the HTTP/1.1 parser as a list of (name, value) byte pairs in wire order, and leave as the
bytes of the next hop's message head, so a request costs one pass over its headers and one join.

Hop-by-hop headers belong to one connection and never cross the proxy, in either direction (RFC 9110
§7.6.1): Connection and every header it names, Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding, Upgrade. Each hop frames bodies itself, so Transfer-Encoding is set anew by the proxy
when it chunks. Host passes through unchanged, so virtual hosts upstream see what the client asked for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Describe this hop, so an incoming value is replaced: a client cannot claim https or another host.
X_FORWARDED_FOR: Final = b"x-forwarded-for"
_THIS_HOP: Final = frozenset({
    b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-prefix", b"x-real-ip",
    b"forwarded", b"x-request-id",
})
# From a trusted proxy these are kept (and Forwarded extended) instead of replaced.
_KEPT_FROM_TRUSTED: Final = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-forwarded-prefix", b"forwarded"}
)
# The request id the proxy settled on (the client's, when sane, else a new one) goes both ways, once.
X_REQUEST_ID: Final = b"x-request-id"
# The proxy answers `Expect: 100-continue` itself once it has an upstream for the request (RFC 9110 §10.1.1).
_EXPECT: Final = b"expect"
_CRLF: Final = b"\r\n"
_SEP: Final = b": "

STATUS_REASONS: Final = {
    301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


# Framing and routing headers stay whatever Connection names: dropping Content-Length or Host because a
# message listed them would let the next hop read the body as another request (request smuggling).
_NEVER_NAMED: Final = frozenset({b"content-length", b"host"})


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Lower-cased header names listed in Connection (RFC 9110 §7.6.1: they are hop-by-hop too), except the
    framing and routing headers, which are never dropped that way."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in _NEVER_NAMED:
                    names.add(token)
    return frozenset(names)


# Connection options that name no end-to-end header (keep-alive names the hop-by-hop Keep-Alive header).
_NAMES_NOTHING_KEPT: Final = HOP_BY_HOP | {b"close"}
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _drop_named(pairs: list[Header], connection_values: list[bytes]) -> list[Header]:
    if len(connection_values) == 1 and connection_values[0] in _PLAIN_CONNECTION:
        return pairs  # the usual `Connection: keep-alive`: nothing to drop, nothing to parse
    named = connection_tokens((b"connection", v) for v in connection_values) - _NAMES_NOTHING_KEPT
    return [(n, v) for n, v in pairs if n.lower() not in named] if named else pairs


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    *,
    client_ip: bytes,
    proto: bytes,
    port: bytes,
    default_host: bytes,
    chunked: bool,
    request_id: bytes = b"",
    upgrade: bytes = b"",
    trusted: TrustedProxies | None = None,
    rules: HeaderRules | None = None,
    upstream_host: bytes = b"",
    prefix: bytes = b"",
) -> bytes:
    """The HTTP/1.1 request head for the upstream. `upstream_host` (route option host=) replaces the Host the
    upstream sees; X-Forwarded-Host and Forwarded keep the client's. `prefix` is the path prefix the route
    stripped (strip=), sent as X-Forwarded-Prefix as Fabio does, so the application can build its own URLs.

    X-Forwarded-For is appended to (every incoming value kept, the client's address last), so the chain stays
    auditable; X-Forwarded-Proto/-Host/-Port and X-Real-IP are replaced, and Forwarded is this hop's element.
    From a trusted proxy (`trusted` is given only when the peer is one), its X-Forwarded-Proto/-Host/-Port are
    kept, its Forwarded is extended with this hop's element, and X-Real-IP is the right-most address of the
    chain that is not a trusted proxy. A request without a Host header (HTTP/1.0) gets `default_host`, since
    HTTP/1.1 requires one. `chunked` frames the body with chunked coding. One pass over the headers; a second
    only when a Connection header names others (rare).
    """
    kept: list[Header] = []
    connection: list[bytes] = []
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    incoming: dict[bytes, bytes] = {}
    forwarded_in: list[bytes] = []
    for pair in headers:
        lower = pair[0].lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                connection.append(pair[1])
        elif lower in _THIS_HOP or lower == _EXPECT:
            if trusted is not None and lower in _KEPT_FROM_TRUSTED:
                if lower == b"forwarded":
                    forwarded_in.append(pair[1].strip())
                else:
                    incoming[lower] = pair[1].strip()
            continue
        elif lower == X_FORWARDED_FOR:
            value = pair[1].strip()
            if value:
                forwarded_for.append(value)
        else:
            if lower == b"host":
                host = pair[1]
            kept.append(pair)
    if connection:
        kept = _drop_named(kept, connection)
    if rules is not None:
        kept = [pair for pair in kept if pair[0].lower() not in rules.drop or pair[0].lower() == b"host"]
        kept += rules.set + rules.add
    if upstream_host:
        kept = [(name, upstream_host) if name.lower() == b"host" else (name, v) for name, v in kept]
    out = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in kept:
        out += (name, _SEP, value, _CRLF)
    if host is None:
        out += (b"Host: ", upstream_host or default_host, _CRLF)
    real_ip = client_ip
    if trusted is not None and forwarded_for:
        real_ip = trusted.real_ip(forwarded_for, client_ip)
    if client_ip:
        forwarded_for.append(client_ip)
    if forwarded_for:
        out += (b"X-Forwarded-For: ", b", ".join(forwarded_for), _CRLF)
    out += (b"X-Forwarded-Proto: ", incoming.get(b"x-forwarded-proto") or proto, _CRLF)
    forwarded_host = incoming.get(b"x-forwarded-host") or host
    if forwarded_host:
        out += (b"X-Forwarded-Host: ", forwarded_host, _CRLF)
    out += (b"X-Forwarded-Port: ", incoming.get(b"x-forwarded-port") or port, _CRLF)
    forwarded_prefix = prefix or incoming.get(b"x-forwarded-prefix")
    if forwarded_prefix:
        out += (b"X-Forwarded-Prefix: ", forwarded_prefix, _CRLF)
    if real_ip:
        out += (b"X-Real-IP: ", real_ip, _CRLF)
    element = forwarded_element(client_ip, host, proto)
    if forwarded_in:
        element = b", ".join((*(v for v in forwarded_in if v), element))
    out += (b"Forwarded: ", element, _CRLF)
    if request_id:
        out += (b"X-Request-ID: ", request_id, _CRLF)
    if upgrade:
        # Upgrade and Connection are hop-by-hop: this hop asks the next one for the same switch (WebSocket).
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF)
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(_CRLF)
    return b"".join(out)


class HeaderRules:
    """A route's header rules for one direction: fields removed (case-insensitive), fields set (replacing any
    of that name), fields added (beside any of that name). Hop-by-hop and framing fields are refused when the
    rules are parsed (config.py), so rules never change how a message is delimited."""

    __slots__ = ("add", "drop", "set")

    def __init__(self, set_: Sequence[Header] = (), add: Sequence[Header] = (), remove: Iterable[bytes] = ()) -> None:
        self.set = tuple(set_)
        self.add = tuple(add)
        # Set replaces: the upstream's (or client's) fields of those names go too.
        self.drop = frozenset(n.lower() for n in remove) | frozenset(n.lower() for n, _ in self.set)

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.drop)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderRules) and (self.set, self.add, self.drop) == (other.set, other.add, other.drop)

    def __hash__(self) -> int:
        return hash((self.set, self.add, self.drop))


class TrustedProxies:
    """The `trusted_proxies` networks (CIDRs or addresses): peers whose forwarding headers are believed."""

    __slots__ = ("_known", "networks")

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)  # parsed once, from the `trusted_proxies` setting
        self._known: dict[bytes, bool] = {}

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, bytes):
            return False
        known = self._known.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address.decode("latin-1").strip().strip("[]"))
            except ValueError:
                known = False
            else:
                known = any(ip in network for network in self.networks)
            if len(self._known) < 10_000:  # a bounded memo: client addresses are many
                self._known[address] = known
        return known

    def real_ip(self, forwarded_for: list[bytes], peer: bytes) -> bytes:
        """The client as far as trusted proxies vouch: the right-most address of the chain (X-Forwarded-For
        entries, then the peer) that is not a trusted proxy; the left-most when every one is."""
        chain = [a.strip() for value in forwarded_for for a in value.split(b",") if a.strip()]
        for address in reversed((*chain, peer)):
            if address not in self:
                return address
        return chain[0] if chain else peer


def forwarded_element(client_ip: bytes, host: bytes | None, proto: bytes) -> bytes:
    """This hop as one RFC 7239 element. An incoming Forwarded header is replaced, not extended: frameworks
    read its first element, which a client could otherwise write (`proto=https`); trusted proxies that may
    extend it come with the trusted_proxies setting."""
    parts = []
    if client_ip:
        # §6: an IPv6 address is bracketed and, containing ':', quoted.
        parts.append(b'for="[' + client_ip + b']"' if b":" in client_ip else b"for=" + client_ip)
    if host:
        if b'"' in host or b"\\" in host:
            host = host.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        parts.append(b'host="' + host + b'"')
    parts.append(b"proto=" + proto)
    return b";".join(parts)


def client_response_head(
    status: int, reason: bytes, headers: Headers, *, chunked: bool, keep_alive: bool, http10: bool,
    extra: Headers = (), request_id: bytes = b"", rules: HeaderRules | None = None,
) -> bytes:
    """The response head for the client: the upstream's end-to-end headers (repeated ones such as Set-Cookie
    kept apart, in order), then this hop's framing and connection headers. With a `request_id`, the
    upstream's own X-Request-ID gives way to it, so the client sees the id the proxy logged."""
    kept: list[Header] = []
    connection: list[bytes] = []
    for pair in headers:
        lower = pair[0].lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                connection.append(pair[1])
        elif lower != X_REQUEST_ID or not request_id:
            kept.append(pair)
    if connection:
        kept = _drop_named(kept, connection)
    if rules is not None:
        kept = [pair for pair in kept if pair[0].lower() not in rules.drop]
        kept += rules.set + rules.add
    out = [b"HTTP/1.0 " if http10 else b"HTTP/1.1 ", b"%d " % status, reason, _CRLF]
    for name, value in kept:
        out += (name, _SEP, value, _CRLF)
    for name, value in extra:  # headers this hop adds (a sticky-session cookie)
        out += (name, _SEP, value, _CRLF)
    if request_id:
        out += (b"X-Request-ID: ", request_id, _CRLF)
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif http10:
        out.append(b"Connection: keep-alive\r\n")
    out.append(_CRLF)
    return b"".join(out)


def _error_body(status: int, message: str) -> bytes:
    return f"{status} {message}\n".encode()


def error_body_size(status: int, message: str) -> int:
    """Bytes of the body `error_response` writes for this status and message (for the access line)."""
    return len(_error_body(status, message))


def error_response(
    status: int, message: str, *, keep_alive: bool, http10: bool = False, request_id: bytes = b"",
    extra: Headers = (), head: bool = False,
) -> bytes:
    """A complete short plain-text answer the proxy gives itself (404, 502, ...); to a HEAD request, without
    its body (RFC 9110 §9.3.2), so the next response on the connection is not taken for one."""
    body = _error_body(status, message)
    lines = [
        b"HTTP/1.0 " if http10 else b"HTTP/1.1 ", str(status).encode(), b" ",
        STATUS_REASONS.get(status, b"Error"), _CRLF,
        b"Content-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n",
        b"Content-Length: ", str(len(body)).encode(), _CRLF,
        *(b"X-Request-ID: " + request_id + _CRLF for _ in (1,) if request_id),
        *(name + _SEP + value + _CRLF for name, value in extra),
        b"Connection: keep-alive\r\n" if keep_alive and http10 else b"" if keep_alive else b"Connection: close\r\n",
        _CRLF,
    ]
    out = b"".join(lines)
    return out if head else out + body
