"""The proxy listener: lookup -> pick -> forward -> stream back -> record.

Runs on aiohttp's low-level `web.Server` (no Application router: every request goes to one handler). A
request reads `router.current` once, so a table swapped in mid-request never mixes two tables. ProxyErrors
are answered here, once, as short plain-text bodies with the status they carry, and every one is logged with
its reason. Once the response head has gone to the client an error can no longer be reported in-band: the
connection is aborted so the client sees a truncated response, never a silently short one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from discovery.model import Endpoint

from .errors import NoHealthyEndpoint, NoRoute, ProxyError, UpstreamProtocolError, UpstreamTimeout
from .forwarder import Forwarder, RequestBody
from .headers import client_response_headers, upstream_request_headers
from .metrics import NO_SERVICE, Metrics
from .pool import Pools
from .table import RoutingTable

log = structlog.get_logger("ferryman.proxy")
access_log = structlog.get_logger("ferryman.access")

# RFC 9110 §9.2.2: methods whose repetition has the same effect; only these are retried after a dropped
# connection. Any method is retried when the connection was never established.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODYLESS_STATUS: Final = frozenset({204, 304})


class Router:
    """Holds the current table; replaced whole by one assignment (atomic on the event loop)."""

    __slots__ = ("current",)

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.current = table or RoutingTable()


class ProxyHandler:
    def __init__(
        self,
        router: Router,
        pools: Pools,
        forwarder: Forwarder,
        metrics: Metrics,
        *,
        max_attempts: int,
        listen_port: int,
        proto: str = "http",
        access_log_enabled: bool = True,
    ) -> None:
        self.router = router
        self.pools = pools
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_attempts = max(1, max_attempts)
        self.listen_port = listen_port
        self.proto = proto
        self.access_log_enabled = access_log_enabled

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        service = NO_SERVICE
        upstream = ""
        status = 0
        sent = 0
        raw_target = request.raw_path
        path = raw_target.partition("?")[0]
        try:
            route = self.router.current.lookup(request.headers.get("Host"), path)
            if route is None:
                raise NoRoute("no route for this host and path")
            service = route.service
            pool = self.pools.get(service)
            if pool is None or not pool.endpoints:
                raise NoHealthyEndpoint(f"no healthy instance of service {service!r}")
            headers = upstream_request_headers(
                request.headers, client_ip=request.remote or "", proto=self.proto, port=self.listen_port
            )
            body = RequestBody(request) if request.body_exists else None
            target = route.upstream_target(raw_target)
            tried: set[str] = set()
            attempts = min(self.max_attempts, len(pool.endpoints))
            while True:
                endpoint = pool.pick(tried)
                if endpoint is None:
                    raise NoHealthyEndpoint(f"no healthy instance of service {service!r}")
                tried.add(endpoint.key)
                upstream = endpoint.authority
                pool.acquire(endpoint)
                try:
                    upstream_resp = await self.forwarder.send(
                        request.method, route.scheme, endpoint.authority, target, headers, body,
                        tls_skip_verify=route.tls_skip_verify,
                    )
                except ProxyError as err:
                    pool.release(endpoint)
                    may_retry = err.retryable or request.method in IDEMPOTENT
                    if may_retry and len(tried) < attempts and not (body is not None and body.started):
                        log.info("upstream_retry", service=service, upstream=upstream, reason=err.reason,
                                 error=err.message, attempt=len(tried))
                        continue
                    raise
                break
            try:
                status = upstream_resp.status
                response, sent = await self._relay(request, upstream_resp, service, endpoint)
            finally:
                pool.release(endpoint)
                upstream_resp.release()
            return response
        except ProxyError as err:
            status = err.status
            log.warning("proxy_error", status=err.status, reason=err.reason, error=err.message,
                        service=service, upstream=upstream, method=request.method, path=path)
            return _error_response(err)
        except (asyncio.CancelledError, ConnectionError):
            status = 499  # nginx's code for a client that went away before the answer
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe_request(service, request.method, status, elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "access", method=request.method, host=request.headers.get("Host", ""), path=path,
                    status=status, service=service, upstream=upstream,
                    duration_ms=round(elapsed * 1000, 3), bytes=sent, client=request.remote,
                )

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, service: str, endpoint: Endpoint
    ) -> tuple[web.StreamResponse, int]:
        """Stream the upstream response to the client; returns it with the body bytes sent."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(client_response_headers(upstream.headers))
        await response.prepare(request)
        sent = 0
        if request.method == "HEAD" or upstream.status in _BODYLESS_STATUS:
            return response, 0
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                sent += len(chunk)
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # The head is out: the only honest signal left is to cut the connection.
            err: ProxyError
            if isinstance(exc, asyncio.TimeoutError):
                err = UpstreamTimeout(f"{endpoint.authority} stalled while sending the body")
            else:
                err = UpstreamProtocolError(f"{endpoint.authority} broke off the body: {exc}")
            log.warning("upstream_body_aborted", service=service, upstream=endpoint.authority,
                        reason=err.reason, error=err.message, bytes=sent)
            upstream.close()
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            # The client went away: stop reading the upstream; the connection is not reusable.
            upstream.close()
        return response, sent


def _error_response(err: ProxyError) -> web.Response:
    return web.Response(
        status=err.status,
        text=f"{err.status} {err.message}\n",
        content_type="text/plain",
        headers={"Cache-Control": "no-store"},
    )
