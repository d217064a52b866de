"""What to do with a request whose head is in: the routing decision, pure.

`plan(req, table, pools, limits, rng)` looks the request up in the routing table and settles everything that
is known before any upstream is involved: an HTTPS redirect, a route's own redirect, the side of a canary
split, a service without healthy instances, its concurrency limit, the body limit, the target the upstream
gets. It reads values and returns a `Plan`; it never writes to a socket, so every rule is unit-tested with
plain values, and an HTTP/2 stream is planned by the same function as an HTTP/1.1 request.
"""

from __future__ import annotations

import random
from typing import Final, Protocol

from discovery.matchers import cookie_values, header_values

from .errors import (
    BadRequest,
    NoHealthyEndpoint,
    NoRoute,
    PayloadTooLarge,
    ProxyError,
    Redirect,
    ServiceOverloaded,
    ToHttps,
)
from .h1.head import BODY_NONE, Request
from .metrics import NO_ROUTE, NO_SERVICE
from .pool import Pool, Pools
from .table import Route, RoutingTable, normalize_host, normalize_path
from .tls import HttpsRedirect

RETRY_AFTER: Final = ((b"Retry-After", b"1"),)


class Limits(Protocol):
    """What planning needs of the listener's settings."""

    @property
    def redirect(self) -> HttpsRedirect | None: ...
    @property
    def max_body(self) -> int: ...


class Plan:
    """The decision: either `error` to answer, or the route, pool and target to forward to. `service` and
    `route_id` name what the request is counted under either way (`none` until a route matched)."""

    __slots__ = ("error", "path", "pool", "route", "route_id", "service", "target")

    def __init__(self, path: str) -> None:
        self.path = path  # the target's path as sent, for logs
        self.error: ProxyError | None = None
        self.route: Route | None = None
        self.pool: Pool | None = None
        self.service = NO_SERVICE
        self.route_id = NO_ROUTE
        self.target = b""


def plan(req: Request, table: RoutingTable, pools: Pools, limits: Limits, rng: random.Random) -> Plan:
    path = req.target.partition(b"?")[0].decode("latin-1")
    result = Plan(path)
    try:
        _decide(result, req, path, table, pools, limits, rng)
    except ProxyError as err:
        result.error = err
    return result


def _decide(
    result: Plan, req: Request, path: str, table: RoutingTable, pools: Pools, limits: Limits, rng: random.Random,
) -> None:
    if req.bad is not None:
        raise req.bad
    redirect = limits.redirect
    if redirect is not None:
        location = redirect.location(normalize_host(req.host.decode("latin-1")), req.target)
        if location is not None:
            raise ToHttps(location, req.method)
    matched = normalize_path(path)  # dot-segments and unreserved escapes resolved; `path` itself if none
    route = table.lookup(req.host.decode("latin-1"), matched, req)
    if route is None:
        if req.absolute:
            # Never an open proxy: an absolute URI naming a host this proxy does not route is refused.
            raise BadRequest("absolute request target for a host this proxy does not route")
        raise NoRoute("no route for this host and path")
    result.service = service = route.service
    result.route_id = route.id
    if route.redirect is not None:
        raise Redirect(route.redirect[0], route.location(req.target))
    if route.split:
        result.service = service = _split_side(route, pools, rng.random())
    pool = pools.get(service)
    if pool is None or not pool.endpoints:
        raise NoHealthyEndpoint(f"no healthy instance of service {service!r}")
    if pool.max_concurrent and pool.active >= pool.max_concurrent:
        raise ServiceOverloaded(
            f"service {service!r} has {pool.max_concurrent} requests in progress, its limit", headers=RETRY_AFTER,
        )
    max_body = route.max_body or pool.max_body or limits.max_body
    if max_body and req.body_kind != BODY_NONE:
        if req.content_length > max_body:
            raise PayloadTooLarge(f"request body of {req.content_length} bytes; the limit is {max_body}")
        req.max_body = max_body
    result.route = route
    result.pool = pool
    result.target = req.target if not route.rewrites else (
        route.upstream_target(req.target.decode("latin-1"), matched).encode("latin-1")
    )


def _split_side(route: Route, pools: Pools, draw: float) -> str:
    """A canary split: the side this draw falls on, or, when that side has no healthy instance, another side
    of the split that has one."""
    service = route.pick_service(draw)
    drawn = pools.get(service)
    if drawn is None or not drawn.endpoints:
        service = next((name for name, _ in route.split if (p := pools.get(name)) and p.endpoints), service)
    return service


def hash_key(req: Request, client_ip: str, hash_on: tuple[str, str]) -> str | None:
    """What `lb=hash` (or a sticky cookie) keys on for this request: the client address, a header's value or
    a cookie's value (None when the request lacks it: the balancer then picks at random)."""
    kind, name = hash_on
    if kind == "ip":
        return client_ip
    values = cookie_values(req.headers, name) if kind == "cookie" else header_values(req.headers, name)
    return next(values, None)
