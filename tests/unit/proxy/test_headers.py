"""Header rules between client and upstream, on raw header lists: hop-by-hop headers stop at the proxy,
X-Forwarded-* describe the hop, each hop frames its own body, everything else passes through untouched.

Each test parses the bytes a function produced the way the next hop would read them, so assertions speak of
start lines and header fields rather than byte offsets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from proxy.headers import (
    Header,
    client_response_head,
    connection_tokens,
    error_response,
    upstream_request_head,
)

CLIENT_IP = b"192.0.2.7"
DEFAULT_HOST = b"10.0.0.5:8080"


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the next hop reads it: start line, field lines in wire order, body."""

    start_line: bytes
    fields: list[Header]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        """Every value of a header, in wire order (names compare case-insensitively)."""
        return [value for key, value in self.fields if key.lower() == name.lower()]

    def names(self) -> set[bytes]:
        return {key.lower() for key, _ in self.fields}


def parse(message: bytes) -> Message:
    """Split a message on CRLF; fail on anything that is not `name: value` between start line and blank line."""
    head, blank, body = message.partition(b"\r\n\r\n")
    assert blank, f"head not ended by an empty line: {message!r}"
    start_line, *lines = head.split(b"\r\n")
    fields = []
    for line in lines:
        name, sep, value = line.partition(b": ")
        assert sep and name and name == name.strip() and b"\n" not in line, f"malformed field line {line!r}"
        fields.append((name, value))
    return Message(start_line, fields, body)


def to_upstream(
    *headers: Header,
    method: bytes = b"GET",
    target: bytes = b"/",
    client_ip: bytes = CLIENT_IP,
    proto: bytes = b"http",
    port: bytes = b"8080",
    default_host: bytes = DEFAULT_HOST,
    chunked: bool = False,
) -> Message:
    message = parse(upstream_request_head(
        method, target, list(headers), client_ip=client_ip, proto=proto, port=port, default_host=default_host,
        chunked=chunked,
    ))
    assert message.body == b"", "a head carries no body bytes"
    return message


def to_client(
    *headers: Header,
    status: int = 200,
    reason: bytes = b"OK",
    chunked: bool = False,
    keep_alive: bool = True,
    http10: bool = False,
) -> Message:
    message = parse(client_response_head(
        status, reason, list(headers), chunked=chunked, keep_alive=keep_alive, http10=http10,
    ))
    assert message.body == b"", "a head carries no body bytes"
    return message


HOP_BY_HOP = [
    (b"Connection", b"close"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"TE", b"trailers"),
    (b"Trailer", b"Expires"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Upgrade", b"websocket"),
    (b"connection", b"close"),
    (b"TRANSFER-ENCODING", b"chunked"),
]
HOP_IDS = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
           "lower-case-name", "upper-case-name"]


class TestRequestLine:
    """The upstream request line is the client's method and target, always over HTTP/1.1."""

    @pytest.mark.parametrize(
        ("method", "target", "expected"),
        [
            (b"GET", b"/", b"GET / HTTP/1.1"),
            (b"POST", b"/api/v1/orders?id=7&x=%20", b"POST /api/v1/orders?id=7&x=%20 HTTP/1.1"),
            (b"OPTIONS", b"*", b"OPTIONS * HTTP/1.1"),
            (b"DELETE", b"/a%2Fb/", b"DELETE /a%2Fb/ HTTP/1.1"),
        ],
        ids=["get-root", "post-with-query", "options-asterisk", "encoded-path-untouched"],
    )
    def test_request_line(self, method: bytes, target: bytes, expected: bytes) -> None:
        assert to_upstream((b"Host", b"h"), method=method, target=target).start_line == expected


class TestHopByHop:
    """Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions; end-to-end ones pass."""

    @pytest.mark.parametrize("header", HOP_BY_HOP, ids=HOP_IDS)
    def test_dropped_from_request(self, header: Header) -> None:
        out = to_upstream((b"Host", b"a.example.com"), header, (b"Accept", b"text/html"))
        assert header[0].lower() not in out.names()
        assert out.values(b"Accept") == [b"text/html"]

    @pytest.mark.parametrize("header", HOP_BY_HOP, ids=HOP_IDS)
    def test_dropped_from_response(self, header: Header) -> None:
        out = to_client(header, (b"Content-Type", b"text/plain"))
        assert out.fields == [(b"Content-Type", b"text/plain")]

    @pytest.mark.parametrize(
        ("connection", "named"),
        [
            ([b"X-Secret"], [b"X-Secret"]),
            ([b"close, X-Secret ,X-Other"], [b"X-Secret", b"X-Other"]),
            ([b"x-secret"], [b"X-Secret"]),
            ([b"close", b"X-Secret"], [b"X-Secret"]),
        ],
        ids=["one-name", "comma-list-with-blanks", "case-insensitive", "several-connection-lines"],
    )
    def test_headers_named_by_connection_are_dropped(self, connection: list[bytes], named: list[bytes]) -> None:
        pairs = [(b"Connection", c) for c in connection] + [(n, b"v") for n in named] + [(b"X-Kept", b"k")]
        for out in (to_upstream((b"Host", b"h"), *pairs), to_client(*pairs)):
            assert b"connection" not in out.names()
            for name in named:
                assert name.lower() not in out.names()
            assert out.values(b"X-Kept") == [b"k"]

    def test_connection_tokens(self) -> None:
        headers = [(b"Connection", b"Keep-Alive, X-A"), (b"connection", b" ,x-b,"), (b"X-A", b"not a list")]
        assert connection_tokens(headers) == {b"keep-alive", b"x-a", b"x-b"}

    def test_end_to_end_headers_keep_order_repeats_and_case(self) -> None:
        pairs = [(b"Accept", b"a"), (b"Cookie", b"c1"), (b"x-lower", b"l"), (b"Cookie", b"c2"),
                 (b"Authorization", b"Bearer t")]
        out = to_upstream((b"Host", b"h"), *pairs)
        assert out.fields[:len(pairs) + 1] == [(b"Host", b"h"), *pairs]

    def test_input_is_not_modified(self) -> None:
        headers = [(b"Connection", b"close"), (b"X-Forwarded-For", b"1.1.1.1"), (b"Expect", b"100-continue")]
        before = list(headers)
        upstream_request_head(b"GET", b"/", headers, client_ip=CLIENT_IP, proto=b"http", port=b"80",
                              default_host=DEFAULT_HOST, chunked=True)
        client_response_head(200, b"OK", headers, chunked=True, keep_alive=False, http10=True)
        assert headers == before

    def test_any_sequence_accepted(self) -> None:
        """The parser's list is the usual input, but a tuple of pairs reads the same."""
        headers = ((b"Host", b"h"), (b"Upgrade", b"websocket"))
        out = parse(upstream_request_head(b"GET", b"/", headers, client_ip=CLIENT_IP, proto=b"http", port=b"80",
                                          default_host=DEFAULT_HOST, chunked=False))
        assert b"upgrade" not in out.names() and out.values(b"Host") == [b"h"]


INCOMING_TRANSFER_ENCODING = [
    [],
    [(b"Transfer-Encoding", b"chunked")],
    [(b"transfer-encoding", b"gzip, chunked")],
    [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
]
INCOMING_TRANSFER_ENCODING_IDS = ["none", "chunked", "coding-list-lower-case-name", "several-lines"]


class TestFraming:
    """Each hop frames its own body: the `chunked` flag alone decides Transfer-Encoding, length framing passes."""

    @pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "not-chunked"])
    @pytest.mark.parametrize("incoming", INCOMING_TRANSFER_ENCODING, ids=INCOMING_TRANSFER_ENCODING_IDS)
    def test_request_transfer_encoding(self, incoming: list[Header], chunked: bool) -> None:
        out = to_upstream((b"Host", b"h"), *incoming, chunked=chunked)
        assert out.values(b"Transfer-Encoding") == ([b"chunked"] if chunked else [])

    @pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "not-chunked"])
    @pytest.mark.parametrize("incoming", INCOMING_TRANSFER_ENCODING, ids=INCOMING_TRANSFER_ENCODING_IDS)
    def test_response_transfer_encoding(self, incoming: list[Header], chunked: bool) -> None:
        out = to_client(*incoming, chunked=chunked)
        assert out.values(b"Transfer-Encoding") == ([b"chunked"] if chunked else [])

    def test_content_length_passes_both_ways(self) -> None:
        assert to_upstream((b"Host", b"h"), (b"Content-Length", b"5"), method=b"POST").values(
            b"Content-Length") == [b"5"]
        assert to_client((b"Content-Length", b"5")).values(b"Content-Length") == [b"5"]

    def test_request_content_length_survives_connection_naming_it(self) -> None:
        """The proxy relays the body by its length, so the upstream must be told that length; otherwise the
        body bytes are read as the next request on a pooled upstream connection (request smuggling)."""
        out = to_upstream((b"Host", b"h"), (b"Connection", b"content-length"), (b"Content-Length", b"3"),
                          method=b"POST")
        assert out.values(b"Content-Length") == [b"3"]

    def test_response_content_length_survives_connection_naming_it(self) -> None:
        """The proxy relays the body by its length and keeps the connection open, so the client must be told
        that length; otherwise it reads until close and the next response becomes part of this body."""
        out = to_client((b"Connection", b"content-length"), (b"Content-Length", b"3"))
        assert out.values(b"Content-Length") == [b"3"]


class TestHost:
    """Host passes through unchanged; a request without one gets the upstream's authority."""

    @pytest.mark.parametrize(
        "header",
        [(b"Host", b"shop.example.com"), (b"Host", b"Shop.Example.com:8080"), (b"Host", b"[::1]:8080"),
         (b"host", b"shop.example.com")],
        ids=["plain", "case-and-port", "ipv6", "lower-case-name"],
    )
    def test_host_unchanged(self, header: Header) -> None:
        out = to_upstream(header)
        assert [(k, v) for k, v in out.fields if k.lower() == b"host"] == [header]

    def test_missing_host_gets_default(self) -> None:
        """HTTP/1.0 clients may omit Host; HTTP/1.1 requires one (RFC 9112 §3.2)."""
        out = to_upstream((b"Accept", b"*/*"))
        assert out.values(b"Host") == [DEFAULT_HOST]
        assert b"x-forwarded-host" not in out.names()

    def test_empty_host_is_not_doubled(self) -> None:
        """An empty Host is still a Host (RFC 9112 §3.2); a second one makes the upstream answer 400."""
        out = to_upstream((b"Host", b""))
        assert len(out.values(b"Host")) == 1


class TestExpect:
    """Expect is not forwarded: the proxy answers 100-continue itself (RFC 9110 §10.1.1)."""

    @pytest.mark.parametrize(
        "header",
        [(b"Expect", b"100-continue"), (b"expect", b"100-Continue"), (b"EXPECT", b"something-else")],
        ids=["100-continue", "lower-case-name", "other-expectation"],
    )
    def test_not_forwarded(self, header: Header) -> None:
        out = to_upstream((b"Host", b"h"), header, (b"Content-Length", b"5"), method=b"PUT")
        assert b"expect" not in out.names()
        assert out.values(b"Content-Length") == [b"5"]


class TestXForwardedFor:
    """X-Forwarded-For keeps every earlier hop in order and appends the client's address."""

    @pytest.mark.parametrize(
        ("incoming", "expected"),
        [
            ([], CLIENT_IP),
            ([b"203.0.113.1"], b"203.0.113.1, " + CLIENT_IP),
            ([b"203.0.113.1, 198.51.100.2"], b"203.0.113.1, 198.51.100.2, " + CLIENT_IP),
            ([b"203.0.113.1", b"198.51.100.2, 198.51.100.3"],
             b"203.0.113.1, 198.51.100.2, 198.51.100.3, " + CLIENT_IP),
            ([b"", b"  "], CLIENT_IP),
        ],
        ids=["first-hop", "existing-value-kept", "existing-list-kept", "several-lines-merged-in-order",
             "blank-values-dropped"],
    )
    def test_appended(self, incoming: list[bytes], expected: bytes) -> None:
        out = to_upstream((b"Host", b"h"), *[(b"X-Forwarded-For", v) for v in incoming])
        assert out.values(b"X-Forwarded-For") == [expected]

    def test_lower_case_lines_merged(self) -> None:
        out = to_upstream((b"x-forwarded-for", b"203.0.113.1"), (b"X-FORWARDED-FOR", b"203.0.113.2"))
        assert out.values(b"X-Forwarded-For") == [b"203.0.113.1, 203.0.113.2, " + CLIENT_IP]

    def test_unknown_client_address_adds_nothing(self) -> None:
        assert to_upstream((b"X-Forwarded-For", b"203.0.113.1"), client_ip=b"").values(
            b"X-Forwarded-For") == [b"203.0.113.1"]
        assert b"x-forwarded-for" not in to_upstream(client_ip=b"").names()


class TestHopDescription:
    """X-Forwarded-Proto/-Host/-Port and X-Real-IP describe this hop; whatever the client sent is replaced."""

    def test_set_from_the_connection(self) -> None:
        out = to_upstream((b"Host", b"shop.example.com:8080"), proto=b"https", port=b"8443")
        assert out.values(b"X-Forwarded-Proto") == [b"https"]
        assert out.values(b"X-Forwarded-Host") == [b"shop.example.com:8080"]
        assert out.values(b"X-Forwarded-Port") == [b"8443"]
        assert out.values(b"X-Real-IP") == [CLIENT_IP]

    @pytest.mark.parametrize(
        ("name", "forged", "expected"),
        [
            (b"X-Forwarded-Proto", b"https", b"http"),
            (b"X-Forwarded-Host", b"admin.internal", b"shop.example.com"),
            (b"X-Forwarded-Port", b"443", b"8080"),
            (b"X-Real-IP", b"10.0.0.1", CLIENT_IP),
            (b"x-real-ip", b"10.0.0.1", CLIENT_IP),
        ],
        ids=["proto", "host", "port", "real-ip", "lower-case-name"],
    )
    def test_client_value_overwritten(self, name: bytes, forged: bytes, expected: bytes) -> None:
        out = to_upstream((b"Host", b"shop.example.com"), (name, forged), (name, forged), proto=b"http",
                          port=b"8080")
        assert out.values(name) == [expected]

    def test_forged_values_removed_when_unknown(self) -> None:
        """Without a Host header or a client address there is nothing true to say, so nothing forged stays."""
        out = to_upstream((b"X-Forwarded-Host", b"admin.internal"), (b"X-Real-IP", b"10.0.0.1"), client_ip=b"")
        assert b"x-forwarded-host" not in out.names()
        assert b"x-real-ip" not in out.names()

    def test_no_connection_header_to_upstream(self) -> None:
        """Upstream connections are HTTP/1.1 keep-alive by default, whatever the client asked for its own."""
        assert b"connection" not in to_upstream((b"Host", b"h"), (b"Connection", b"close")).names()


class TestForwarded:
    """RFC 7239 Forwarded describes this hop and replaces whatever the client sent (it could claim https)."""

    @pytest.mark.parametrize(
        ("client_ip", "host", "expected"),
        [
            (b"192.0.2.7", b"shop.example.com:8080", b'for=192.0.2.7;host="shop.example.com:8080";proto=http'),
            (b"2001:db8::1", b"shop.example.com", b'for="[2001:db8::1]";host="shop.example.com";proto=http'),
            (b"192.0.2.7", None, b"for=192.0.2.7;proto=http"),
            (b"192.0.2.7", b'a"b', b'for=192.0.2.7;host="a\\"b";proto=http'),
        ],
        ids=["ipv4-with-port", "ipv6-bracketed-and-quoted", "no-host", "quote-escaped"],
    )
    def test_element_for_this_hop(self, client_ip: bytes, host: bytes | None, expected: bytes) -> None:
        headers = [(b"Host", host)] if host is not None else []
        headers.append((b"Forwarded", b"for=1.2.3.4;proto=https"))
        out = to_upstream(*headers, client_ip=client_ip, default_host=b"10.0.0.5:80")
        assert out.values(b"Forwarded") == [expected]


CONNECTION_FOR_CLIENT = [
    (True, False, []),
    (False, False, [b"close"]),
    (True, True, [b"keep-alive"]),
    (False, True, [b"close"]),
]
CONNECTION_FOR_CLIENT_IDS = ["http11-keep-alive", "http11-close", "http10-keep-alive", "http10-close"]


class TestResponseHead:
    """The client gets its own HTTP version, the upstream's status and end-to-end headers, and this hop's framing."""

    @pytest.mark.parametrize(
        ("status", "reason", "http10", "expected"),
        [
            (200, b"OK", False, b"HTTP/1.1 200 OK"),
            (200, b"OK", True, b"HTTP/1.0 200 OK"),
            (404, b"Not Found", False, b"HTTP/1.1 404 Not Found"),
            (503, b"Service Unavailable", True, b"HTTP/1.0 503 Service Unavailable"),
            (299, b"", False, b"HTTP/1.1 299 "),
        ],
        ids=["http11", "http10-client", "reason-with-space", "http10-error", "empty-reason-keeps-separator"],
    )
    def test_status_line(self, status: int, reason: bytes, http10: bool, expected: bytes) -> None:
        assert to_client(status=status, reason=reason, http10=http10).start_line == expected

    @pytest.mark.parametrize(("keep_alive", "http10", "expected"), CONNECTION_FOR_CLIENT,
                             ids=CONNECTION_FOR_CLIENT_IDS)
    def test_connection_says_what_this_hop_does(self, keep_alive: bool, http10: bool, expected: list[bytes]
                                                ) -> None:
        """The upstream's own Connection and Keep-Alive never reach the client."""
        out = to_client((b"Connection", b"close"), (b"Keep-Alive", b"timeout=5"), keep_alive=keep_alive,
                        http10=http10)
        assert out.values(b"Connection") == expected
        assert b"keep-alive" not in out.names()

    def test_multiple_set_cookie_kept(self) -> None:
        out = to_client((b"Set-Cookie", b"a=1; Path=/"), (b"Connection", b"keep-alive"), (b"set-cookie", b"b=2"))
        assert out.values(b"Set-Cookie") == [b"a=1; Path=/", b"b=2"]

    def test_no_forwarding_headers_added(self) -> None:
        out = to_client((b"Content-Length", b"5"), (b"Server", b"backend"))
        assert out.fields == [(b"Content-Length", b"5"), (b"Server", b"backend")]


ERRORS = [
    (400, b"Bad Request", "400"),
    (404, b"Not Found", "404"),
    (413, b"Content Too Large", "413"),
    (414, b"URI Too Long", "414"),
    (431, b"Request Header Fields Too Large", "431"),
    (500, b"Internal Server Error", "500"),
    (502, b"Bad Gateway", "502"),
    (503, b"Service Unavailable", "503"),
    (504, b"Gateway Timeout", "504"),
    (418, b"Error", "unknown-status-generic-reason"),
]


class TestErrorResponse:
    """The proxy's own answers are complete plain-text messages whose Content-Length matches the body."""

    @pytest.mark.parametrize(("status", "reason"), [e[:2] for e in ERRORS], ids=[e[2] for e in ERRORS])
    def test_status_line_and_body(self, status: int, reason: bytes) -> None:
        out = parse(error_response(status, "no route", keep_alive=True))
        assert out.start_line == b"HTTP/1.1 %d %b" % (status, reason)
        assert out.body == b"%d no route\n" % status

    @pytest.mark.parametrize(
        "message",
        ["no route for shop.example.com/", "", "upstream «api» is down — café"],
        ids=["ascii", "empty-message", "non-ascii-counts-bytes"],
    )
    def test_content_length_matches_body(self, message: str) -> None:
        out = parse(error_response(502, message, keep_alive=True))
        assert out.values(b"Content-Length") == [str(len(out.body)).encode()]
        assert out.body.decode("utf-8") == f"502 {message}\n"

    def test_plain_text_not_cached(self) -> None:
        out = parse(error_response(404, "no route", keep_alive=True))
        assert out.values(b"Content-Type") == [b"text/plain; charset=utf-8"]
        assert out.values(b"Cache-Control") == [b"no-store"]
        assert b"transfer-encoding" not in out.names()

    def test_http10_status_line(self) -> None:
        out = parse(error_response(504, "upstream timed out", keep_alive=False, http10=True))
        assert out.start_line == b"HTTP/1.0 504 Gateway Timeout"

    @pytest.mark.parametrize(("keep_alive", "http10", "expected"), CONNECTION_FOR_CLIENT,
                             ids=CONNECTION_FOR_CLIENT_IDS)
    def test_connection(self, keep_alive: bool, http10: bool, expected: list[bytes]) -> None:
        out = parse(error_response(503, "no healthy instance", keep_alive=keep_alive, http10=http10))
        assert out.values(b"Connection") == expected


def test_error_answer_to_head_has_no_body_but_keeps_its_length() -> None:
    from proxy.headers import error_response

    full = error_response(404, "no route", keep_alive=True)
    head = error_response(404, "no route", keep_alive=True, head=True)
    assert full.startswith(head) and head.endswith(b"\r\n\r\n") and full[len(head):] == b"404 no route\n"
    assert b"Content-Length: 13\r\n" in head


class TestTrustedProxies:
    """trusted_proxies: from a trusted peer the forwarding headers are kept and extended; from anyone else they
    are replaced; X-Real-IP is the right-most address that is not a trusted proxy."""

    @staticmethod
    def _head(peer: bytes, trusted: object, *extra: tuple[bytes, bytes]) -> dict[str, list[str]]:
        from proxy.headers import TrustedProxies, upstream_request_head

        proxies = TrustedProxies(map(ipaddress.ip_network, ["10.0.0.0/8", "192.0.2.7"]))
        head = upstream_request_head(
            b"GET", b"/", [(b"Host", b"shop.example"), *extra], client_ip=peer, proto=b"http", port=b"80",
            default_host=b"x", chunked=False, trusted=proxies if trusted else None,
        )
        out: dict[str, list[str]] = {}
        for line in head.decode().split("\r\n")[1:]:
            if line:
                name, _, value = line.partition(": ")
                out.setdefault(name, []).append(value)
        return out

    def test_membership(self) -> None:
        from proxy.headers import TrustedProxies

        proxies = TrustedProxies(map(ipaddress.ip_network, ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]))
        assert b"10.1.2.3" in proxies and b"192.0.2.7" in proxies and b"2001:db8::1" in proxies
        assert b"192.0.2.8" not in proxies and b"not-an-ip" not in proxies and b"" not in proxies

    def test_from_a_trusted_peer_headers_are_kept_and_extended(self) -> None:
        head = self._head(b"10.0.0.2", True, (b"X-Forwarded-For", b"203.0.113.9, 10.0.0.5"),
                          (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"shop.example"),
                          (b"X-Forwarded-Port", b"443"), (b"Forwarded", b"for=203.0.113.9;proto=https"),
                          (b"X-Real-IP", b"6.6.6.6"))
        assert head["X-Forwarded-For"] == ["203.0.113.9, 10.0.0.5, 10.0.0.2"]
        assert head["X-Forwarded-Proto"] == ["https"] and head["X-Forwarded-Port"] == ["443"]
        assert head["Forwarded"] == ['for=203.0.113.9;proto=https, for=10.0.0.2;host="shop.example";proto=http']
        assert head["X-Real-IP"] == ["203.0.113.9"]  # right-most that is not a trusted proxy

    def test_from_anyone_else_they_are_replaced(self) -> None:
        head = self._head(b"198.51.100.4", False, (b"X-Forwarded-For", b"203.0.113.9"),
                          (b"X-Forwarded-Proto", b"https"), (b"Forwarded", b"for=1.2.3.4;proto=https"),
                          (b"X-Real-IP", b"6.6.6.6"))
        assert head["X-Forwarded-For"] == ["203.0.113.9, 198.51.100.4"]  # always appended
        assert head["X-Forwarded-Proto"] == ["http"] and head["X-Real-IP"] == ["198.51.100.4"]
        assert head["Forwarded"] == ['for=198.51.100.4;host="shop.example";proto=http']

    def test_a_chain_of_trusted_proxies_only(self) -> None:
        head = self._head(b"10.0.0.2", True, (b"X-Forwarded-For", b"10.0.0.9"))
        assert head["X-Real-IP"] == ["10.0.0.9"]  # every hop trusted: the left-most


class TestPublicErrorText:
    """Answers about an instance say what happened in general words; the detail, address included, is logged."""

    @pytest.mark.parametrize(
        ("error", "public"),
        [
            ("UpstreamConnectError", "the upstream could not be reached"),
            ("UpstreamConnectTimeout", "the upstream could not be reached in time"),
            ("UpstreamTimeout", "the upstream did not answer in time"),
            ("UpstreamProtocolError", "the upstream sent an invalid response"),
        ],
        ids=["connect-refused", "connect-timeout", "read-timeout", "bad-response"],
    )
    def test_no_address_in_the_answer(self, error: str, public: str) -> None:
        import proxy.errors
        from proxy.headers import error_body_size

        err = getattr(proxy.errors, error)("cannot connect to 10.1.2.3:8080: Connection refused")
        answer = error_response(err.status, err.public_message, keep_alive=True)
        assert b"10.1.2.3" not in answer and answer.endswith(f"{err.status} {public}\n".encode())
        assert "10.1.2.3:8080" in err.message  # what the log line carries
        assert error_body_size(err.status, err.public_message) == len(parse(answer).body)

    def test_other_errors_say_their_message(self) -> None:
        from proxy.errors import NoRoute

        assert NoRoute("no route for shop.example.com/").public_message == "no route for shop.example.com/"
