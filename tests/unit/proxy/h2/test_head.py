"""HTTP/2 heads, pure: an upstream's HTTP/1.1 answer head as HTTP/2 fields, and a request head as a `Request`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.errors import HeaderTooLarge
from proxy.h2.head import Malformed, request_from_fields, response_fields
from proxy.listener import ListenerLimits

Fields = list[tuple[bytes, bytes]]
GET: Fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/")]


class TestResponseFields:
    """Lower-case names, :status first, nothing of this hop, the request id once and last."""

    @pytest.mark.parametrize(("upstream", "expected"), [
        ([(b"Content-Type", b"text/plain")], [(b"content-type", b"text/plain")]),
        ([(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"),
          (b"X-A", b"1")], [(b"x-a", b"1")]),
        ([(b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"X-End", b"2")], [(b"x-end", b"2")]),
        ([(b"Connection", b":status")], []),
        ([(b"X-Request-ID", b"upstream's")], []),
    ], ids=["lower-case", "connection-specific", "named-by-connection", "status-stays", "request-id-replaced"])
    def test_fields(self, upstream: Fields, expected: Fields) -> None:
        fields = response_fields(200, upstream, (), b"rid", None)
        assert fields == [(b":status", b"200"), *expected, (b"x-request-id", b"rid")]


class TestRequestFromFields:
    """What the proxy reads of a well-formed head."""

    def test_authority_is_the_host_and_cookies_are_joined(self) -> None:
        req = request_from_fields([*GET, (b"cookie", b"a=1"), (b"x-a", b"1"), (b"cookie", b"b=2")],
                                  ListenerLimits(), end_stream=True)
        assert (req.method, req.target, req.host, req.bad) == ("GET", b"/", b"example.com", None)
        assert req.headers == [(b"x-a", b"1"), (b"cookie", b"a=1; b=2"), (b"host", b"example.com")]

    def test_too_many_bytes_is_a_431_and_the_rest_is_still_checked(self) -> None:
        limits = replace(ListenerLimits(), max_header_bytes=64)
        req = request_from_fields([*GET, (b"x-big", b"v" * 100), (b"x-a", b"1")], limits, end_stream=True)
        assert isinstance(req.bad, HeaderTooLarge)
        with pytest.raises(Malformed):
            request_from_fields([*GET, (b"x-big", b"v" * 100), (b"X-A", b"1")], limits, end_stream=True)
