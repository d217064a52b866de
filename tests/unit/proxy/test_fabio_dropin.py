"""Fabio's tags planned as Fabio answers them (issue 15): redirects, listener ports, access rules, shared
routes and weight=, host=dst, X-Forwarded-Prefix. Pure: tags and request heads in, decisions out."""

from __future__ import annotations

import ipaddress
import random

import pytest

from discovery.tags import parse_route_tag
from proxy.access import AccessRules, client_address
from proxy.dispatch import Client, Plan, plan
from proxy.errors import BadRequest, Forbidden, Redirect
from proxy.h1.head import Request, check_head
from proxy.headers import TrustedProxies, upstream_request_head
from proxy.table import Route

from .worlds import Limits, world


def request(target: bytes, host: bytes = b"foo.com", xff: bytes = b"") -> Request:
    req = Request()
    req.target = target
    req.headers = [(b"Host", host), *([(b"X-Forwarded-For", xff)] if xff else [])]
    check_head(req, "GET", "1.1", True, False)
    return req


def decide(tag: str, target: bytes, *, host: bytes = b"foo.com", port: int = 8080, client: Client | None = None,
           limits: Limits | None = None, xff: bytes = b"") -> Plan:
    table, pools = world(svc=([tag], 1))
    return plan(request(target, host, xff), table, pools, limits or Limits(), random.Random(1), port,
                client or Client(b"127.0.0.1"))


class TestRedirects:
    """Fabio's BuildRedirectURL table: `$path` after strip and prepend, no doubled slash, the query kept unless
    the target has one, `$host` from the request."""

    @pytest.mark.parametrize(
        ("tag", "target", "location"),
        [
            ("urlprefix-/ redirect=301,http://bar.com/", b"/a/b?x=1", "http://bar.com/"),
            ("urlprefix-/ redirect=301,http://bar.com/a/b/c?foo=bar", b"/x?y=1", "http://bar.com/a/b/c?foo=bar"),
            ("urlprefix-/ redirect=301,http://bar.com/$path", b"/", "http://bar.com/"),
            ("urlprefix-/ redirect=301,http://bar.com/$path", b"/abc", "http://bar.com/abc"),
            ("urlprefix-/ redirect=301,http://bar.com/$path", b"/abc/?aaa=1", "http://bar.com/abc/?aaa=1"),
            ("urlprefix-/ redirect=301,http://bar.com$path", b"/a/b/c", "http://bar.com/a/b/c"),
            ("urlprefix-/ redirect=301,http://bar.com/bbb/$path", b"/", "http://bar.com/bbb/"),
            ("urlprefix-/ redirect=301,http://bar.com/$path", b"/a%2fbc", "http://bar.com/a%2fbc"),
            ("urlprefix-/s redirect=301,http://bar.com/$path strip=/s", b"/s/abc", "http://bar.com/abc"),
            ("urlprefix-/s redirect=301,https://bar.com/bbb$path strip=/s", b"/s", "https://bar.com/bbb"),
            ("urlprefix-/s redirect=301,http://bar.com/$path strip=/s", b"/s?q=1", "http://bar.com/?q=1"),
            ("urlprefix-/ redirect=301,http://bar.com/$path prepend=/prefix", b"/abc", "http://bar.com/prefix/abc"),
            ("urlprefix-/s redirect=301,http://bar.com/$path strip=/s prepend=/p", b"/s/a", "http://bar.com/p/a"),
            ("urlprefix-*:8080/ redirect=301,https://$host$path", b"/abc?aaa=1", "https://foo.com/abc?aaa=1"),
            ("urlprefix-*:8080/ redirect=301,https://$host/", b"/abc", "https://foo.com/"),
            ("urlprefix-/ redirect=301,/$path", b"//evil.example/x", "/evil.example/x"),
            ("urlprefix-/ redirect=301,http://bar.com/$path", b"/a/../b", "http://bar.com/b"),
        ],
        ids=["fixed", "fixed-with-query", "path-root", "path-no-double-slash", "path-query", "no-slash-before",
             "subdir-root", "reserved-escape-kept", "strip", "strip-to-nothing", "strip-query", "prepend",
             "strip-and-prepend", "host-and-path", "host-static", "never-protocol-relative", "normalized-path"],
    )
    def test_location(self, tag: str, target: bytes, location: str) -> None:
        result = decide(tag, target)
        assert isinstance(result.error, Redirect)
        assert dict(result.error.headers)[b"Location"] == location.encode()

    @pytest.mark.parametrize("host", [b"evil.com/x", b"a b", b'x"y'], ids=["slash", "blank", "quote"])
    def test_a_host_that_cannot_be_written_is_refused(self, host: bytes) -> None:
        result = decide("urlprefix-/ redirect=301,https://$host$path", b"/", host=host)
        assert isinstance(result.error, BadRequest)


class TestListenerPort:
    """A port in a route's host restricts it to requests that arrived on that listener port (Fabio's
    `host:80/` HTTP-to-HTTPS pattern), beside a plain route for the same host."""

    TABLE, POOLS = world(to_https=(["urlprefix-foo.com:80/ redirect=301,https://foo.com$path"], 0),
                         web=(["urlprefix-foo.com/"], 1), anyhost=(["urlprefix-*:80/x"], 1))

    @pytest.mark.parametrize(
        ("port", "target", "service", "redirected"),
        [(80, b"/a", "to_https", True), (443, b"/a", "web", False), (8080, b"/x", "web", False),
         (80, b"/x", "to_https", True)],
        ids=["on-80-redirects", "on-443-plain", "any-host-port-route-elsewhere", "host-route-before-any-host"],
    )
    def test_port(self, port: int, target: bytes, service: str, redirected: bool) -> None:
        result = plan(request(target), self.TABLE, self.POOLS, Limits(), random.Random(1), port, Client())
        assert result.service == service and isinstance(result.error, Redirect) == redirected

    def test_memo_never_answers_for_another_port(self) -> None:
        for port, expected in ((80, "to_https"), (443, "web"), (80, "to_https")):
            route = self.TABLE.lookup("foo.com", "/a", None, port)
            assert route is not None and route.service == expected


class TestAccess:
    """Fabio's allow=/deny= judged on the peer, or on the right-most untrusted X-Forwarded-For entry when the
    peer is a trusted proxy; a spoofed header from anyone else changes nothing."""

    TRUSTED = Limits(trusted=TrustedProxies([ipaddress.ip_network("127.0.0.0/8")]))

    @pytest.mark.parametrize(
        ("option", "peer", "trusted", "xff", "allowed"),
        [
            ("allow=ip:10.0.0.0/8", b"10.1.2.3", False, b"", True),
            ("allow=ip:10.0.0.0/8", b"127.0.0.1", False, b"", False),
            ("allow=ip:10.0.0.0/8", b"127.0.0.1", False, b"10.1.2.3", False),
            ("allow=ip:10.0.0.0/8", b"127.0.0.1", True, b"10.1.2.3", True),
            ("allow=ip:10.0.0.0/8", b"127.0.0.1", True, b"10.1.2.3, 8.8.8.8", False),
            ("allow=ip:10.0.0.0/8", b"127.0.0.1", True, b"8.8.8.8, 10.1.2.3", True),
            ("allow=ip:fe80::/10", b"fe80::1", False, b"", True),
            ("allow=ip:10.0.0.0/8", b"::ffff:10.0.0.1", False, b"", True),
            ("deny=ip:1.2.3.4", b"1.2.3.4", False, b"", False),
            ("deny=ip:1.2.3.4", b"1.2.3.5", False, b"", True),
            ("deny=ip:1.2.3.4", b"1.2.3.5", False, b"1.2.3.4", True),
            ("deny=ip:1.2.3.4", b"1.2.3.4", False, b"8.8.8.8", False),
            ("deny=ip:1.2.3.4", b"127.0.0.1", True, b"1.2.3.4", False),
            ("deny=ip:fe80::1234", b"fe80::1234", False, b"", False),
            ("allow=ip:10.0.0.0/8", b"not-an-address", False, b"", False),
        ],
        ids=["allow-in", "allow-out", "allow-spoofed-untrusted", "allow-via-trusted", "right-most-untrusted",
             "right-most-allowed", "allow-ipv6", "ipv4-mapped", "deny-in", "deny-out", "deny-spoofed-ignored",
             "deny-spoofed-cannot-escape", "deny-via-trusted", "deny-ipv6-host", "unreadable-not-allowed"],
    )
    def test_route_rules(self, option: str, peer: bytes, trusted: bool, xff: bytes, allowed: bool) -> None:
        result = decide(f"urlprefix-/ {option}", b"/", client=Client(peer, trusted), limits=self.TRUSTED, xff=xff)
        assert (result.error is None) == allowed
        assert allowed or isinstance(result.error, Forbidden)

    def test_global_rules_refuse_before_routing(self) -> None:
        limits = Limits(access=AccessRules(deny=[ipaddress.ip_network("127.0.0.0/8")]))
        result = decide("urlprefix-/", b"/nowhere-routed", limits=limits, xff=b"8.8.8.8")
        assert isinstance(result.error, Forbidden) and result.error.status == 403

    def test_client_address_reads_the_header_only_from_a_trusted_peer(self) -> None:
        headers = [(b"x-forwarded-for", b"10.1.2.3")]
        assert client_address(b"127.0.0.1", None, headers) == b"127.0.0.1"
        assert client_address(b"127.0.0.1", self.TRUSTED.trusted, headers) == b"10.1.2.3"


class TestSharing:
    """A route several services declare is shared as Fabio shares a route's targets: one share per instance, or
    a service's fixed `weight=`, scaled when the fixed shares pass 1 or leave nobody else."""

    @pytest.mark.parametrize(
        ("services", "expected"),
        [
            ({"blue": ("", 1), "green": ("", 3)}, {"blue": 0.25, "green": 0.75}),
            ({"blue": ("", 2), "green": (" weight=0.5", 1)}, {"blue": 0.5, "green": 0.5}),
            ({"blue": ("", 2), "green": (" weight=0.1", 5)}, {"blue": 0.9, "green": 0.1}),
            ({"blue": (" weight=0.2", 1), "green": (" weight=0.2", 1)}, {"blue": 0.5, "green": 0.5}),
            ({"blue": (" weight=1", 1), "green": ("", 4)}, {"blue": 1.0, "green": 0.0}),
            ({"blue": ("", 0), "green": ("", 2)}, {"blue": 0.0, "green": 1.0}),
        ],
        ids=["by-instances", "fixed-half", "fixed-tenth", "all-fixed-scaled-up", "fixed-takes-all",
             "side-without-instances"],
    )
    def test_shares(self, services: dict[str, tuple[str, int]], expected: dict[str, float]) -> None:
        table, pools = world(**{name: ([f"urlprefix-/s{opts}"], n) for name, (opts, n) in services.items()})
        rng = random.Random(7)
        counts = dict.fromkeys(services, 0)
        for _ in range(4000):
            result = plan(request(b"/s"), table, pools, Limits(), rng, 80, Client())
            counts[result.service] += 1
            assert result.route_id == "blue+green@*any*/s"
        for name, share in expected.items():
            assert abs(counts[name] / 4000 - share) < 0.03, counts

    def test_each_side_keeps_its_own_options(self) -> None:
        table, pools = world(blue=(["urlprefix-/s strip=/s"], 1), green=(["urlprefix-/s weight=1"], 1))
        assert table.conflicts == ()
        result = plan(request(b"/s/x"), table, pools, Limits(), random.Random(1), 80, Client())
        assert (result.service, result.target) == ("green", b"/s/x")


class TestUpstreamHead:
    """host=dst is the instance's address (Fabio's); a stripped prefix goes up as X-Forwarded-Prefix."""

    def test_host_dst_is_the_instance(self) -> None:
        route = Route.from_spec("svc", parse_route_tag("urlprefix-/ host=dst"))
        assert route.host_dst and route.upstream_host_bytes == b""

    @pytest.mark.parametrize(
        ("prefix", "incoming", "trusted", "expected"),
        [(b"/api", b"", False, b"/api"), (b"", b"/evil", False, None), (b"", b"/lb", True, b"/lb"),
         (b"/api", b"/lb", True, b"/api")],
        ids=["stripped", "client-value-dropped", "trusted-proxy-kept", "strip-wins"],
    )
    def test_forwarded_prefix(self, prefix: bytes, incoming: bytes, trusted: bool, expected: bytes | None) -> None:
        headers = [(b"Host", b"h"), *([(b"X-Forwarded-Prefix", incoming)] if incoming else [])]
        head = upstream_request_head(
            b"GET", b"/", headers, client_ip=b"127.0.0.1", proto=b"http", port=b"80", default_host=b"h",
            chunked=False, trusted=TrustedProxies([]) if trusted else None, prefix=prefix)
        lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-forwarded-prefix:")]
        assert lines == ([b"X-Forwarded-Prefix: " + expected] if expected else [])
