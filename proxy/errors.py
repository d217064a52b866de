"""Errors that carry their HTTP status. Raised by the dispatch, the upstream connections and the parser
callbacks, answered once by the client connection (proxy/h1/client.py).

The client gets `public_message`: the message itself, except for errors about an instance, whose message names
its address (`cannot connect to 10.0.0.5:8080`): their answers say what happened in general words, and the log
line, with the request id the client also got, keeps the detail. Clients must not learn internal addresses.

`nothing_received` marks a connection that closed before any byte of a response, which on a reused keep-alive
connection means the upstream had already dropped it (proxy/retry.py decides what may be tried again).
"""

from __future__ import annotations

from typing import ClassVar


class ProxyError(Exception):
    status: ClassVar[int] = 502
    reason: ClassVar[str] = "proxy_error"
    public: ClassVar[str | None] = None  # what the client reads instead of `message`, when that names an instance

    def __init__(
        self, message: str, *, nothing_received: bool = False, headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.nothing_received = nothing_received
        self.upstream = ""
        self.headers = headers  # extra response headers for the answer (Retry-After on a 503)

    @property
    def public_message(self) -> str:
        """The text of the answer's body."""
        return self.public or self.message


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"


class UriTooLong(ProxyError):
    status = 414
    reason = "uri_too_long"


class HeaderTooLarge(ProxyError):
    status = 431
    reason = "header_too_large"


class Forbidden(ProxyError):
    """The client's address is not allowed (a route's allow=/deny=, or the global allow/deny settings)."""

    status = 403
    reason = "forbidden"


class Unauthorized(ProxyError):
    """A route with `auth=` and no valid credentials (headers: the realm's WWW-Authenticate challenge)."""

    status = 401
    reason = "unauthorized"


class AuthRealmUnknown(ProxyError):
    """A route's `auth=` names a realm the configuration does not declare: never served without it."""

    status = 503
    reason = "auth_realm_unknown"


class NoRoute(ProxyError):
    status = 404
    reason = "no_route"


class NoHealthyEndpoint(ProxyError):
    status = 503
    reason = "no_healthy_instance"


class UpstreamConnectError(ProxyError):
    status = 502
    reason = "upstream_connect_failed"
    public = "the upstream could not be reached"


class UpstreamStreamRefused(UpstreamConnectError):
    """An HTTP/2 instance refused the stream (RST_STREAM REFUSED_STREAM, or above the last stream its GOAWAY
    took): RFC 9113 §8.7 says it was never processed, so any method may be tried on another instance."""

    reason = "upstream_stream_refused"


class UpstreamProtocolError(ProxyError):
    status = 502
    reason = "upstream_bad_response"
    public = "the upstream sent an invalid response"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream_timeout"
    public = "the upstream did not answer in time"


class UpstreamConnectTimeout(UpstreamTimeout):
    reason = "upstream_connect_timeout"
    public = "the upstream could not be reached in time"


class ProxyInternalError(ProxyError):
    status = 500
    reason = "internal_error"


class RequestTimeout(ProxyError):
    status = 408
    reason = "client_body_timeout"


class MethodNotAllowed(ProxyError):
    status = 405
    reason = "method_not_allowed"


class NotImplementedCoding(ProxyError):
    status = 501
    reason = "transfer_coding_not_implemented"


class PayloadTooLarge(ProxyError):
    status = 413
    reason = "body_too_large"


class ServiceOverloaded(ProxyError):
    """The service has as many requests in flight through this worker as its limit allows."""

    status = 503
    reason = "service_overloaded"


class HeaderTimeout(ProxyError):
    status = 408
    reason = "client_header_timeout"


class TooManyConnections(ProxyError):
    status = 503
    reason = "too_many_connections"


class VersionNotSupported(ProxyError):
    status = 505
    reason = "http_version_not_supported"


class Redirect(ProxyError):
    """Not an error: a route that answers with a redirect (tag option redirect=CODE,URL)."""

    status = 301
    reason = "redirect"

    def __init__(self, status: int, location: bytes) -> None:
        super().__init__(f"moved to {location.decode('latin-1')}", headers=((b"Location", location),))
        self.status = status  # type: ignore[misc]


class ToHttps(ProxyError):
    """Not an error: plain HTTP for a host served over HTTPS. 301 for GET and HEAD, 308 (method and body kept)
    for the rest."""

    status = 301
    reason = "https_redirect"

    def __init__(self, location: bytes, method: str) -> None:
        super().__init__(f"moved to {location.decode('latin-1')}", headers=((b"Location", location),))
        if method not in ("GET", "HEAD"):
            self.status = 308  # type: ignore[misc]
