"""Request-head checks (RFC 9112): a parsed head in, what the proxy reads of it and whether it is refused."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest, MethodNotAllowed, NotImplementedCoding, ProxyError, VersionNotSupported
from proxy.h1.head import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Request, check_head, settle_request_id

Headers = list[tuple[bytes, bytes]]


def head(
    headers: Headers, *, method: str = "GET", version: str = "1.1", target: bytes = b"/", upgrade: bool = False,
    keep_alive: bool = True,
) -> Request:
    req = Request()
    req.target = target
    req.headers = list(headers)
    check_head(req, method, version, keep_alive, upgrade)
    return req


HOST = (b"Host", b"example.com")


class TestRefused:
    """A head that must not reach any upstream carries its error, and the connection does not go on."""

    @pytest.mark.parametrize(
        ("headers", "kwargs", "error", "message"),
        [
            ([HOST], {"version": "1.2"}, VersionNotSupported, "HTTP/1.2 is not supported"),
            ([HOST], {"version": "0.9"}, VersionNotSupported, "HTTP/0.9 is not supported"),
            ([HOST, (b"host", b"other.com")], {}, BadRequest, "more than one Host header"),
            ([], {}, BadRequest, "an HTTP/1.1 request must have a Host header"),
            ([(b"Host", b"a.com, b.com")], {}, BadRequest, "invalid Host header"),
            ([(b"Host", b"a.com/path")], {}, BadRequest, "invalid Host header"),
            ([(b"Host", b"user@a.com")], {}, BadRequest, "invalid Host header"),
            ([HOST, (b"Transfer-Encoding", b"gzip, chunked")], {}, NotImplementedCoding, "'gzip, chunked'"),
            ([HOST, (b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")], {}, NotImplementedCoding,
             "'gzip,chunked'"),
            ([HOST], {"method": "CONNECT", "target": b"example.com:443"}, MethodNotAllowed, "CONNECT"),
            ([HOST, (b"Content-Length", b"5"), (b"Upgrade", b"websocket")], {"upgrade": True}, BadRequest,
             "an upgrade request must not have a body"),
            ([HOST], {"target": b"ftp://example.com/"}, BadRequest, "absolute http(s) URI"),
            ([HOST], {"target": b"http:///path"}, BadRequest, "absolute request target without a host"),
        ],
        ids=[
            "http-1.2", "http-0.9", "two-hosts", "no-host", "host-list", "host-path", "host-userinfo",
            "gzip-chunked", "gzip-then-chunked-lines", "connect", "upgrade-with-body", "other-scheme",
            "absolute-without-host",
        ],
    )
    def test_refused(
        self, headers: Headers, kwargs: dict[str, object], error: type[ProxyError], message: str,
    ) -> None:
        req = head(headers, **kwargs)  # type: ignore[arg-type]  # each row's values fit their keywords
        assert isinstance(req.bad, error)
        assert message in req.bad.message
        # A head that is not HTTP/1.1 as the proxy can frame it ends the connection; a well-framed request for
        # something refused (CONNECT, an absolute URI of another scheme) leaves it open for the next one.
        assert req.keep_alive is (error is MethodNotAllowed or "absolute" in message)

    def test_http10_without_host_is_fine(self) -> None:
        assert head([], version="1.0").bad is None


class TestTargets:
    """Request targets the grammar does not allow are answered 400 (RFC 9112 §3.2, RFC 9110 §4.2.4)."""

    @pytest.mark.parametrize(
        ("method", "target", "message"),
        [
            ("GET", b"*", "only allowed with OPTIONS"),
            ("POST", b"*", "only allowed with OPTIONS"),
            ("GET", b"/a#frag", "fragment"),
            ("GET", b"/a?q=1#", "fragment"),
            ("GET", b"http://example.com/a#frag", "fragment"),
            ("GET", b"http://evil@example.com/", "user info"),
            ("GET", b"http://user:pw@example.com:8080/x", "user info"),
        ],
        ids=["get-asterisk", "post-asterisk", "fragment", "empty-fragment", "absolute-with-fragment",
             "absolute-user-info", "absolute-user-password"],
    )
    def test_refused(self, method: str, target: bytes, message: str) -> None:
        req = head([HOST], method=method, target=target)
        assert isinstance(req.bad, BadRequest) and req.bad.status == 400
        assert message in req.bad.message

    @pytest.mark.parametrize(
        ("method", "target"),
        [("OPTIONS", b"*"), ("GET", b"/a?b=c@d"), ("GET", b"http://example.com/a@b"), ("GET", b"/%23")],
        ids=["options-asterisk", "at-in-query", "at-in-absolute-path", "encoded-hash"],
    )
    def test_allowed(self, method: str, target: bytes) -> None:
        assert head([HOST], method=method, target=target).bad is None


class TestContentLength:
    """The upstream gets Content-Length as the canonical decimal the proxy framed by (RFC 9110 §8.6)."""

    @pytest.mark.parametrize(
        ("value", "length", "forwarded"),
        [
            (b"74", 74, b"74"), (b"074", 74, b"74"), (b"0000000000074", 74, b"74"), (b"00", 0, b"0"),
            (b"0", 0, b"0"),
        ],
        ids=["plain", "leading-zero", "many-zeros", "zeros-for-zero", "zero"],
    )
    def test_canonical(self, value: bytes, length: int, forwarded: bytes) -> None:
        req = head([HOST, (b"Content-Length", value)], method="POST")
        assert req.bad is None and req.content_length == length
        assert [v for n, v in req.headers if n.lower() == b"content-length"] == [forwarded]
        assert req.body_kind == (BODY_LENGTH if length else BODY_NONE)


class TestRead:
    """What the proxy reads of an acceptable head."""

    @pytest.mark.parametrize(
        ("headers", "kind", "length"),
        [
            ([HOST], BODY_NONE, -1),
            ([HOST, (b"Content-Length", b"0")], BODY_NONE, 0),
            ([HOST, (b"Content-Length", b"12")], BODY_LENGTH, 12),
            ([HOST, (b"Transfer-Encoding", b"chunked")], BODY_CHUNKED, -1),
            ([HOST, (b"transfer-encoding", b"Chunked ")], BODY_CHUNKED, -1),
        ],
        ids=["no-body", "length-0", "length-12", "chunked", "chunked-case-and-blank"],
    )
    def test_framing(self, headers: Headers, kind: int, length: int) -> None:
        req = head(headers)
        assert req.bad is None
        assert (req.body_kind, req.content_length, req.body_done) == (kind, length, kind == BODY_NONE)

    def test_expect_continue_request_id_and_host(self) -> None:
        req = head([HOST, (b"Expect", b"100-continue"), (b"X-Request-ID", b"abc"), (b"Content-Length", b"3")])
        assert (req.expect_continue, req.request_id, req.host) == (True, b"abc", b"example.com")

    def test_websocket_upgrade_is_recognised_only_for_get(self) -> None:
        ws = [HOST, (b"Upgrade", b"WebSocket"), (b"Connection", b"upgrade")]
        assert head(ws, upgrade=True).upgrade == b"websocket"
        assert head(ws, upgrade=True, method="POST").upgrade == b""
        assert head(ws, upgrade=True).keep_alive is False  # the connection ends with the tunnel

    def test_absolute_form_replaces_host_and_target(self) -> None:
        req = head([(b"Host", b"ignored.com")], target=b"http://api.example.com:8080/v1?x=1")
        assert req.bad is None
        assert (req.host, req.target, req.absolute) == (b"api.example.com:8080", b"/v1?x=1", True)
        assert [v for n, v in req.headers if n.lower() == b"host"] == [b"api.example.com:8080"]

    def test_absolute_form_without_path_gets_slash(self) -> None:
        assert head([HOST], target=b"https://example.com").target == b"/"


class TestRequestId:
    """A sane client id is kept; anything else is replaced by a fresh 32-hex-digit id."""

    @pytest.mark.parametrize(
        ("sent", "kept"),
        [(b"abc-123", True), (b"a" * 128, True), (b"a" * 129, False), (b"bad id", False), (b"x\r\ny", False),
         (b"", False)],
        ids=["token", "128-chars", "129-chars", "blank", "crlf", "none"],
    )
    def test_settle(self, sent: bytes, kept: bool) -> None:
        req = Request()
        req.request_id = sent
        settle_request_id(req)
        assert (req.request_id == sent) is kept
        assert len(req.request_id) == 32 or kept
