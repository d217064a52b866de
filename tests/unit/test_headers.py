"""Header rules between client and upstream: hop-by-hop headers stop at the proxy, X-Forwarded-* describe the
hop, everything else passes through untouched."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import client_response_headers, connection_tokens, upstream_request_headers

CLIENT_IP = "192.0.2.7"


def upstream(*pairs: tuple[str, str], client_ip: str = CLIENT_IP, proto: str = "http", port: int = 8080
             ) -> CIMultiDict[str]:
    return upstream_request_headers(CIMultiDict(pairs), client_ip=client_ip, proto=proto, port=port)


HOP_BY_HOP = [
    ("Connection", "close"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "Expires"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
    ("connection", "close"),
    ("TRANSFER-ENCODING", "chunked"),
]
HOP_IDS = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
           "lower-case-name", "upper-case-name"]


class TestHopByHop:
    """Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions; end-to-end ones pass."""

    @pytest.mark.parametrize("header", HOP_BY_HOP, ids=HOP_IDS)
    def test_dropped_from_request(self, header: tuple[str, str]) -> None:
        out = upstream(("Host", "a.example.com"), header, ("Accept", "text/html"))
        assert header[0] not in out
        assert out["Accept"] == "text/html"

    @pytest.mark.parametrize("header", HOP_BY_HOP, ids=HOP_IDS)
    def test_dropped_from_response(self, header: tuple[str, str]) -> None:
        out = client_response_headers(CIMultiDict([header, ("Content-Type", "text/plain")]))
        assert list(out.items()) == [("Content-Type", "text/plain")]

    @pytest.mark.parametrize(
        ("connection", "named"),
        [
            (["X-Secret"], ["X-Secret"]),
            (["close, X-Secret ,X-Other"], ["X-Secret", "X-Other"]),
            (["x-secret"], ["X-Secret"]),
            (["close", "X-Secret"], ["X-Secret"]),
        ],
        ids=["one-name", "comma-list-with-blanks", "case-insensitive", "several-connection-lines"],
    )
    def test_headers_named_by_connection_are_dropped(self, connection: list[str], named: list[str]) -> None:
        pairs = [("Connection", c) for c in connection] + [(n, "v") for n in named] + [("X-Kept", "k")]
        request = upstream(("Host", "h"), *pairs)
        response = client_response_headers(CIMultiDict(pairs))
        for out in (request, response):
            assert "Connection" not in out
            for name in named:
                assert name not in out
            assert out["X-Kept"] == "k"

    def test_connection_tokens(self) -> None:
        headers = CIMultiDict([("Connection", "Keep-Alive, X-A"), ("connection", " ,x-b,")])
        assert connection_tokens(headers) == {"keep-alive", "x-a", "x-b"}

    def test_end_to_end_headers_keep_order_and_repeats(self) -> None:
        pairs = [("Accept", "a"), ("Cookie", "c1"), ("Cookie", "c2"), ("Authorization", "Bearer t")]
        out = upstream(*pairs)
        assert out.getall("Cookie") == ["c1", "c2"]
        assert out["Accept"] == "a" and out["Authorization"] == "Bearer t"

    def test_input_is_not_modified(self) -> None:
        headers = CIMultiDict([("Connection", "close"), ("X-Forwarded-For", "1.1.1.1")])
        before = list(headers.items())
        upstream_request_headers(headers, client_ip=CLIENT_IP, proto="http", port=80)
        client_response_headers(headers)
        assert list(headers.items()) == before

    def test_read_only_proxy_accepted(self) -> None:
        """aiohttp hands over its headers as a read-only CIMultiDictProxy."""
        headers = CIMultiDictProxy(CIMultiDict([("Host", "h"), ("Upgrade", "websocket")]))
        out = upstream_request_headers(headers, client_ip=CLIENT_IP, proto="http", port=80)
        assert "Upgrade" not in out and out["Host"] == "h"


class TestXForwardedFor:
    """X-Forwarded-For keeps every earlier hop in order and appends the client's address."""

    @pytest.mark.parametrize(
        ("incoming", "expected"),
        [
            ([], CLIENT_IP),
            (["203.0.113.1"], f"203.0.113.1, {CLIENT_IP}"),
            (["203.0.113.1, 198.51.100.2"], f"203.0.113.1, 198.51.100.2, {CLIENT_IP}"),
            (["203.0.113.1", "198.51.100.2, 198.51.100.3"],
             f"203.0.113.1, 198.51.100.2, 198.51.100.3, {CLIENT_IP}"),
            (["", "  "], CLIENT_IP),
        ],
        ids=["first-hop", "existing-value-kept", "existing-list-kept", "several-lines-merged-in-order",
             "blank-values-dropped"],
    )
    def test_appended(self, incoming: list[str], expected: str) -> None:
        out = upstream(("Host", "h"), *[("X-Forwarded-For", v) for v in incoming])
        assert out.getall("X-Forwarded-For") == [expected]

    def test_lower_case_lines_merged(self) -> None:
        out = upstream(("x-forwarded-for", "203.0.113.1"), ("X-FORWARDED-FOR", "203.0.113.2"))
        assert out.getall("X-Forwarded-For") == [f"203.0.113.1, 203.0.113.2, {CLIENT_IP}"]

    def test_unknown_client_address_adds_nothing(self) -> None:
        assert upstream(("X-Forwarded-For", "203.0.113.1"), client_ip="")["X-Forwarded-For"] == "203.0.113.1"
        assert "X-Forwarded-For" not in upstream(client_ip="")


class TestHopDescription:
    """X-Forwarded-Proto/-Host/-Port and X-Real-IP describe this hop; whatever the client sent is replaced."""

    def test_set_from_the_connection(self) -> None:
        out = upstream(("Host", "shop.example.com:8080"), proto="https", port=8443)
        assert out.getall("X-Forwarded-Proto") == ["https"]
        assert out.getall("X-Forwarded-Host") == ["shop.example.com:8080"]
        assert out.getall("X-Forwarded-Port") == ["8443"]
        assert out.getall("X-Real-IP") == [CLIENT_IP]

    @pytest.mark.parametrize(
        ("name", "forged", "expected"),
        [
            ("X-Forwarded-Proto", "https", "http"),
            ("X-Forwarded-Host", "admin.internal", "shop.example.com"),
            ("X-Forwarded-Port", "443", "8080"),
            ("X-Real-IP", "10.0.0.1", CLIENT_IP),
            ("x-real-ip", "10.0.0.1", CLIENT_IP),
        ],
        ids=["proto", "host", "port", "real-ip", "lower-case-name"],
    )
    def test_client_value_overwritten(self, name: str, forged: str, expected: str) -> None:
        out = upstream(("Host", "shop.example.com"), (name, forged), (name, forged), proto="http", port=8080)
        assert out.getall(name) == [expected]

    def test_forged_values_removed_when_unknown(self) -> None:
        """Without a Host header or a client address there is nothing true to say, so nothing forged stays."""
        out = upstream(("X-Forwarded-Host", "admin.internal"), ("X-Real-IP", "10.0.0.1"), client_ip="")
        assert "X-Forwarded-Host" not in out
        assert "X-Real-IP" not in out

    @pytest.mark.parametrize(
        "host",
        ["shop.example.com", "Shop.Example.com:8080", "[::1]:8080"],
        ids=["plain", "case-and-port", "ipv6"],
    )
    def test_host_unchanged(self, host: str) -> None:
        assert upstream(("Host", host)).getall("Host") == [host]


class TestResponseHeaders:
    """Response headers reach the client as the upstream sent them, repeated ones kept apart."""

    def test_multiple_set_cookie_kept(self) -> None:
        out = client_response_headers(
            CIMultiDict([("Set-Cookie", "a=1; Path=/"), ("Connection", "keep-alive"), ("set-cookie", "b=2")])
        )
        assert out.getall("Set-Cookie") == ["a=1; Path=/", "b=2"]

    def test_no_forwarding_headers_added(self) -> None:
        out = client_response_headers(CIMultiDict([("Content-Length", "5"), ("Server", "backend")]))
        assert list(out.items()) == [("Content-Length", "5"), ("Server", "backend")]
