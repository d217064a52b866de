"""What to do with a request whose head is in: the routing decision, pure.

`plan(req, table, pools, limits, rng, port, client)` looks the request up in the routing table and settles
everything that is known before any upstream is involved: an HTTPS redirect, the global and the route's
allow/deny rules, a route's own redirect, the side of a canary split or of a route several services share, a
service without healthy instances, its concurrency limit, the body limit, the target the upstream gets (its
path normalized as it was matched, then rewritten). It reads values and returns a `Plan`; it never writes to a
socket, so every rule is unit-tested with plain values, and an HTTP/2 stream is planned by the same function
as an HTTP/1.1 request.
"""

from __future__ import annotations

import random
import re
from typing import Final, Protocol

from discovery.matchers import cookie_values, header_values

from .access import AccessRules, client_address
from .auth import AUTHORIZATION, Realms
from .errors import (
    AuthRealmUnknown,
    BadRequest,
    Forbidden,
    NoHealthyEndpoint,
    NoRoute,
    PayloadTooLarge,
    ProxyError,
    Redirect,
    ServiceOverloaded,
    ToHttps,
    Unauthorized,
    VersionNotSupported,
)
from .h1.head import BODY_NONE, Request
from .headers import TrustedProxies
from .metrics import NO_ROUTE, NO_SERVICE
from .pool import Pool, Pools
from .table import Route, RoutingTable, normalize_host, normalize_path
from .tls import HttpsRedirect

RETRY_AFTER: Final = ((b"Retry-After", b"1"),)
# What a Host may hold to be written into a redirect's Location (`$host`): a name or address and a port.
_HOST_TEXT: Final = re.compile(r"^[A-Za-z0-9._-]*(\[[0-9A-Fa-f:.]+\])?(:[0-9]{1,5})?$")


class Limits(Protocol):
    """What planning needs of the listener's settings."""

    @property
    def redirect(self) -> HttpsRedirect | None: ...
    @property
    def max_body(self) -> int: ...
    @property
    def trusted(self) -> TrustedProxies | None: ...
    @property
    def access(self) -> AccessRules | None: ...
    @property
    def realms(self) -> Realms | None: ...


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


class Client:
    """Who sent the request, as far as access rules care: the TCP peer's address, and whether the peer is a
    trusted proxy (its X-Forwarded-For then names the client)."""

    __slots__ = ("peer", "trusted")

    def __init__(self, peer: bytes = b"", trusted: bool = False) -> None:
        self.peer = peer
        self.trusted = trusted


_ANYONE: Final = Client()


def plan(
    req: Request, table: RoutingTable, pools: Pools, limits: Limits, rng: random.Random, port: int = 0,
    client: Client = _ANYONE,
) -> Plan:
    """`port`: the listener port the request arrived on (routes such as `host:80/` match only there)."""
    path = req.target.partition(b"?")[0].decode("latin-1")
    result = Plan(path)
    try:
        if req.bad is not None:
            raise req.bad
        redirect = limits.redirect
        if redirect is not None:
            location = redirect.location(normalize_host(req.host.decode("latin-1")), req.target)
            if location is not None:
                raise ToHttps(location, req.method)
        if limits.access is not None:
            _check_access(limits.access, req, limits, client, "the proxy's")
        matched = normalize_path(path)  # dot-segments and unreserved escapes resolved; `path` itself if none
        route = table.lookup(req.host.decode("latin-1"), matched, req, port)
        if route is None:
            if req.absolute:
                # Never an open proxy: an absolute URI naming a host this proxy does not route is refused.
                raise BadRequest("absolute request target for a host this proxy does not route")
            raise NoRoute("no route for this host and path")
        result.route_id = route.id
        if route.auth is not None:
            _check_auth(route.auth, req, limits.realms)
        if route.shares:
            route = _shared_side(route, pools, rng.random())
        result.service = service = route.service
        if route.grpc and not req.http2:
            # The instances speak HTTP/2 only (gRPC's framing and trailers have no HTTP/1.1 form here).
            raise VersionNotSupported("this route speaks gRPC (HTTP/2 only): connect with HTTP/2 (h2c prior "
                                      "knowledge, or ALPN h2 over TLS)")
        if route.access is not None:
            _check_access(route.access, req, limits, client, "the route's")
        # The path as routed is the path forwarded (Fabio, nginx and Envoy do the same): a backend that does not
        # normalize must not see `/api/../admin` for a request routed as `/admin`. Reserved escapes stay as sent.
        forwarded = path if matched is path else normalize_path(path, upper=False)
        if route.redirect is not None:
            raise Redirect(route.redirect[0], _location(route, req, forwarded))
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
        if forwarded is path and not route.rewrites:
            result.target = req.target
        else:
            query = req.target[len(path):].decode("latin-1")  # "" or "?..."
            result.target = route.upstream_target(forwarded + query).encode("latin-1")
    except ProxyError as err:
        result.error = err
    return result


def _check_access(rules: AccessRules, req: Request, limits: Limits, client: Client, whose: str) -> None:
    address = client_address(client.peer, limits.trusted if client.trusted else None, req.headers)
    if not rules.permits(address):
        raise Forbidden(f"{whose} allow/deny rules refuse {address.decode('latin-1')}")


def _check_auth(name: str, req: Request, realms: Realms | None) -> None:
    """The route's realm must accept the request's credentials (one Authorization field; two are refused as
    ambiguous); unless the realm forwards them, they stop here."""
    realm = realms.get(name) if realms is not None else None
    if realm is None:
        raise AuthRealmUnknown(f"the route's authentication realm {name!r} is not configured ([auth.{name}])")
    values = [value for field, value in req.headers if field.lower() == AUTHORIZATION]
    if not realm.permits(values[0] if len(values) == 1 else None):
        raise Unauthorized("authentication required" if not values else "invalid credentials",
                           headers=realm.challenge)
    if not realm.forward:
        req.headers = [pair for pair in req.headers if pair[0].lower() != AUTHORIZATION]


def _location(route: Route, req: Request, path: str) -> bytes:
    assert route.redirect is not None
    host = req.host.decode("latin-1")
    if "$host" in route.redirect[1] and not (host and _HOST_TEXT.match(host)):
        raise BadRequest("a Host that cannot be written into a redirect")
    query = req.target.partition(b"?")[2].decode("latin-1")
    return route.location(path, query, host)


def _shared_side(route: Route, pools: Pools, draw: float) -> Route:
    """The side of a route several services declare that this draw falls on (`side_shares`); when no side has
    a healthy instance, the first side (its 503)."""
    weighted = side_shares(route, pools)
    if not weighted:
        return route.shares[0]
    point = draw * sum(w for _, w in weighted)
    for side, share in weighted:
        if point < share:
            return side
        point -= share
    return next((side for side, share in reversed(weighted) if share > 0), weighted[-1][0])


def side_shares(route: Route, pools: Pools) -> list[tuple[Route, float]]:
    """The sides of a route several services declare, each with its share of the traffic now, weighted as
    Fabio weighs a route's targets: a side with `weight=` gets that share (shares summing over 1 are scaled
    down, and scaled up when every side has one), the rest is split among the other sides' instances, one
    share per instance. Sides without a healthy instance take no share and are left out."""
    fixed: list[tuple[Route, float]] = []
    counted: list[tuple[Route, int]] = []
    for side in route.shares:
        pool = pools.get(side.service)
        instances = len(pool.endpoints) if pool is not None else 0
        if instances:
            if side.weight > 0:
                fixed.append((side, side.weight))
            else:
                counted.append((side, instances))
    total_fixed = sum(w for _, w in fixed)
    scale = 1 / total_fixed if total_fixed > 1 or (fixed and not counted) else 1.0
    instances = sum(n for _, n in counted)
    per_instance = max(0.0, 1 - total_fixed) / instances if instances else 0.0
    return [(side, w * scale) for side, w in fixed] + [(side, n * per_instance) for side, n in counted]


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
