"""Errors that carry their HTTP status. Raised by the core and the forwarder, answered once by the server.

aiohttp's client exceptions are translated here, in one place, with `raise ... from exc` so the cause stays in
tracebacks. `retryable` says whether another instance may be tried: only when nothing reached the upstream
(the connection was never made) or the method is idempotent (RFC 9110 §9.2.2) and the connection dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import aiohttp


class ProxyError(Exception):
    status: ClassVar[int] = 502
    reason: ClassVar[str] = "proxy_error"
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"


class NoRoute(ProxyError):
    status = 404
    reason = "no_route"


class NoHealthyEndpoint(ProxyError):
    status = 503
    reason = "no_healthy_instance"


class UpstreamConnectError(ProxyError):
    status = 502
    reason = "upstream_connect_failed"


class UpstreamProtocolError(ProxyError):
    status = 502
    reason = "upstream_bad_response"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    reason = "upstream_connect_timeout"


@contextmanager
def map_client_errors(authority: str) -> Iterator[None]:
    """Translate aiohttp client failures while sending a request and reading the response head."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except ProxyError:
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamConnectTimeout(f"connecting to {authority} timed out", retryable=True) from exc
    except aiohttp.ClientConnectorError as exc:
        # The TCP (or TLS) connection was never established: nothing was sent, any method may go elsewhere.
        raise UpstreamConnectError(f"cannot connect to {authority}: {exc.os_error}", retryable=True) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(f"{authority} did not answer in time") from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise UpstreamConnectError(f"{authority} closed the connection before answering") from exc
    except aiohttp.ClientPayloadError as exc:
        raise UpstreamProtocolError(f"{authority}: {exc}") from exc
    except aiohttp.ClientResponseError as exc:
        raise UpstreamProtocolError(f"{authority} sent an invalid response: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamConnectError(f"{authority}: {type(exc).__name__}: {exc}") from exc
