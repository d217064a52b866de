"""Header rules between client and upstream. Pure: headers in, headers out.

Hop-by-hop headers belong to one connection and never cross the proxy, in either direction (RFC 9110
§7.6.1): Connection and every header it names, Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding, Upgrade. The framing of each hop is the proxy's own business (the server and client
re-frame bodies). Host passes through unchanged, so virtual hosts upstream see what the client asked for.
"""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)

X_FORWARDED_FOR: Final = "X-Forwarded-For"
X_FORWARDED_PROTO: Final = "X-Forwarded-Proto"
X_FORWARDED_HOST: Final = "X-Forwarded-Host"
X_FORWARDED_PORT: Final = "X-Forwarded-Port"
X_REAL_IP: Final = "X-Real-IP"

HeadersIn = CIMultiDict[str] | CIMultiDictProxy[str]


def connection_tokens(headers: HeadersIn) -> set[str]:
    """Lower-cased header names listed in Connection (RFC 9110 §7.6.1: they are hop-by-hop too)."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


def _end_to_end(headers: HeadersIn) -> CIMultiDict[str]:
    named = connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        out.add(name, value)
    return out


def upstream_request_headers(
    headers: HeadersIn, *, client_ip: str, proto: str, port: int
) -> CIMultiDict[str]:
    """Headers for the upstream request.

    X-Forwarded-For is appended to (every incoming value kept, the client's address last), so the chain
    stays auditable. X-Forwarded-Proto/-Host/-Port and X-Real-IP describe this hop and are replaced: a
    client cannot claim https or another host through them.
    """
    out = _end_to_end(headers)
    prior = [v.strip() for v in out.popall(X_FORWARDED_FOR, ()) if v.strip()]
    out[X_FORWARDED_FOR] = ", ".join([*prior, client_ip]) if client_ip else ", ".join(prior)
    if not out[X_FORWARDED_FOR]:
        del out[X_FORWARDED_FOR]
    out[X_FORWARDED_PROTO] = proto
    host = headers.get("Host")
    if host:
        out[X_FORWARDED_HOST] = host
    else:
        out.popall(X_FORWARDED_HOST, None)
    out[X_FORWARDED_PORT] = str(port)
    if client_ip:
        out[X_REAL_IP] = client_ip
    else:
        out.popall(X_REAL_IP, None)
    return out


def client_response_headers(headers: HeadersIn) -> CIMultiDict[str]:
    """Headers for the client: the upstream's end-to-end headers, repeated ones (Set-Cookie) kept apart."""
    return _end_to_end(headers)
