"""The routing decision: a request head, a table and pools in; a Plan (where to, or what to answer) out."""

from __future__ import annotations

import random

import pytest

from proxy.dispatch import Plan, hash_key, plan
from proxy.errors import (
    BadRequest,
    NoHealthyEndpoint,
    NoRoute,
    PayloadTooLarge,
    Redirect,
    ServiceOverloaded,
    ToHttps,
)
from proxy.h1.head import Request, check_head
from proxy.pool import Pools
from proxy.table import RoutingTable
from proxy.tls import HttpsRedirect

from .worlds import Limits, world


def request(target: bytes = b"/", host: bytes = b"example.com", method: str = "GET",
            extra: tuple[tuple[bytes, bytes], ...] = ()) -> Request:
    req = Request()
    req.target = target
    req.headers = [(b"Host", host), *extra]
    check_head(req, method, "1.1", True, False)
    return req


TABLE, POOLS = world(
    api=(["urlprefix-example.com/api strip=/api"], 2),
    web=(["urlprefix-/"], 1),
    empty=(["urlprefix-/empty"], 0),
    old=(["urlprefix-/old redirect=301,https://new.example.com$path"], 0),
    small=(["urlprefix-/upload maxbody=10"], 1),
)


def decide(req: Request, limits: Limits | None = None, table: RoutingTable = TABLE, pools: Pools = POOLS) -> Plan:
    return plan(req, table, pools, limits or Limits(), random.Random(1))


class TestForward:
    """A routed request: the route, its pool and the target the upstream gets."""

    def test_strip_rewrites_the_target(self) -> None:
        result = decide(request(b"/api/users?id=1"))
        assert result.error is None and result.route is not None and result.pool is not None
        assert (result.service, result.target, result.path) == ("api", b"/users?id=1", "/api/users")
        assert result.pool.service == "api"

    def test_target_unchanged_without_rewrite(self) -> None:
        assert decide(request(b"/b/c?q")).target is not None
        assert decide(request(b"/b/c?q")).target == b"/b/c?q"

    @pytest.mark.parametrize(
        ("sent", "forwarded"),
        [
            (b"/a/../b?q", b"/b?q"),
            (b"/api/%2e%2e/b", b"/b"),
            (b"/b/%7euser", b"/b/~user"),
            (b"/b/a%2fb?x=%2F", b"/b/a%2fb?x=%2F"),
            (b"/b/./c/", b"/b/c/"),
        ],
        ids=["dot-dot", "escaped-dot-dot", "unreserved-decoded", "reserved-escape-kept-as-sent", "dot"],
    )
    def test_the_path_forwarded_is_the_path_routed(self, sent: bytes, forwarded: bytes) -> None:
        """Defect 5 of issue 15: an instance sees the path the route was chosen on, never the raw dot-segments."""
        assert decide(request(sent)).target == forwarded

    def test_body_limit_of_the_route_is_set_on_the_request(self) -> None:
        req = request(b"/upload", method="POST", extra=((b"Transfer-Encoding", b"chunked"),))
        assert decide(req).error is None
        assert req.max_body == 10


class TestAnswered:
    """Decisions that are answered by the proxy itself, with what they are counted under."""

    @pytest.mark.parametrize(
        ("req", "limits", "error", "service"),
        [
            (request(b"/x", host=b"bad host"), None, BadRequest, "none"),
            (request(b"/empty"), None, NoHealthyEndpoint, "empty"),
            (request(b"/old/page"), None, Redirect, "old"),
            (request(b"/upload", method="POST", extra=((b"Content-Length", b"11"),)), None, PayloadTooLarge, "small"),
            (request(b"/", method="POST", extra=((b"Content-Length", b"101"),)), Limits(max_body=100),
             PayloadTooLarge, "web"),
            (request(b"/x"), Limits(redirect=HttpsRedirect(("example.com",), 8443)), ToHttps, "none"),
        ],
        ids=["bad-head", "no-healthy-instance", "route-redirect", "route-maxbody", "global-maxbody", "to-https"],
    )
    def test_answered(self, req: Request, limits: Limits | None, error: type, service: str) -> None:
        result = decide(req, limits)
        assert isinstance(result.error, error)
        assert result.service == service

    def test_route_redirect_location_keeps_the_path(self) -> None:
        result = decide(request(b"/old/page?x=1"))
        assert isinstance(result.error, Redirect)
        assert result.error.status == 301
        assert dict(result.error.headers)[b"Location"] == b"https://new.example.com/old/page?x=1"

    def test_no_route(self) -> None:
        table, pools = world(api=(["urlprefix-api.example.com/"], 1))
        result = decide(request(b"/"), table=table, pools=pools)
        assert isinstance(result.error, NoRoute) and result.error.status == 404

    def test_absolute_uri_for_a_host_not_routed_is_refused(self) -> None:
        table, pools = world(api=(["urlprefix-api.example.com/"], 1))
        req = request(b"http://elsewhere.com/")
        result = decide(req, table=table, pools=pools)
        assert isinstance(result.error, BadRequest) and "does not route" in result.error.message

    def test_concurrency_limit(self) -> None:
        table, pools = world(web=(["urlprefix-/"], 1))
        pool = pools.get("web")
        assert pool is not None
        pool.max_concurrent = 1
        pool.begin(0.0)
        result = decide(request(), table=table, pools=pools)
        assert isinstance(result.error, ServiceOverloaded)
        assert result.error.headers == ((b"Retry-After", b"1"),)


class TestHashKey:
    """What lb=hash and sticky cookies key on."""

    @pytest.mark.parametrize(
        ("hash_on", "headers", "expected"),
        [
            (("ip", ""), (), "10.0.0.1"),
            (("header", "x-user"), ((b"X-User", b"u1"),), "u1"),
            (("header", "x-user"), (), None),
            (("cookie", "sid"), ((b"Cookie", b"a=1; sid=s2"),), "s2"),
        ],
        ids=["ip", "header", "header-missing", "cookie"],
    )
    def test_hash_key(self, hash_on: tuple[str, str], headers: tuple[tuple[bytes, bytes], ...],
                      expected: str | None) -> None:
        assert hash_key(request(extra=headers), "10.0.0.1", hash_on) == expected


class TestGrpcRoutes:
    """A route whose instances speak HTTP/2 (proto=grpc) takes HTTP/2 streams only."""

    GRPC_TABLE, GRPC_POOLS = world(svc=(["urlprefix-/pkg.Service proto=grpc"], 1))

    @pytest.mark.parametrize("http2", [False, True], ids=["http1-refused-505", "http2-forwarded"])
    def test_only_http2_reaches_the_instances(self, http2: bool) -> None:
        req = request(b"/pkg.Service/Call", method="POST", extra=((b"Content-Type", b"application/grpc"),))
        req.http2 = http2
        result = decide(req, table=self.GRPC_TABLE, pools=self.GRPC_POOLS)
        if http2:
            assert result.error is None and result.route is not None and result.route.grpc
        else:
            assert result.error is not None and result.error.status == 505
            assert "HTTP/2" in result.error.message
