"""HTTP/2 heads, pure: an upstream's HTTP/1.1 answer head as HTTP/2 fields, and a request head as a `Request`."""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import replace

import pytest

from proxy.errors import HeaderTooLarge
from proxy.h1.head import Request
from proxy.h2.head import HeadMemo, Malformed, request_from_fields, response_fields
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


def slots(req: Request) -> dict[str, object]:
    """Every slot; an error by its class and message."""
    # A compiled Request (proxy/compiled.py) has no __slots__: mypyc lists its attributes in __mypyc_attrs__.
    names: tuple[str, ...] = getattr(Request, "__slots__", ()) or getattr(Request, "__mypyc_attrs__", ())
    values = {name: getattr(req, name) for name in names}
    values["bad"] = (type(req.bad), str(req.bad))
    return values


class TestHeadMemo:
    """A head seen before on the connection gives the Request its reading gives, as a Request of its own."""

    @pytest.mark.parametrize(("fields", "end_stream"), [
        (GET, True),
        ([*GET, (b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2")], True),
        ([(b":method", b"POST"), *GET[1:], (b"content-length", b"12")], False),
        ([(b":method", b"POST"), *GET[1:]], False),
        ([*GET[:3], (b":path", b"noslash")], True),
        ([*GET, *((b"x-%d" % i, b"1") for i in range(200))], True),
        ([(b":method", b"CONNECT"), (b":authority", b"example.com:443")], True),
    ], ids=["get", "cookies-joined", "body-with-length", "body-chunked", "bad-target", "too-many-fields",
            "connect"])
    def test_same_request_as_reading_it(self, fields: Fields, end_stream: bool) -> None:
        memo, limits = HeadMemo(), ListenerLimits()
        expected = slots(request_from_fields(fields, limits, end_stream=end_stream))
        for _ in range(3):
            assert slots(memo.request(fields, limits, end_stream=end_stream)) == expected

    def test_end_stream_is_part_of_the_head(self) -> None:
        memo, limits = HeadMemo(), ListenerLimits()
        post = [(b":method", b"POST"), *GET[1:]]
        assert memo.request(post, limits, end_stream=True).body_done
        assert not memo.request(post, limits, end_stream=False).body_done

    def test_each_request_is_its_own(self) -> None:
        """What an exchange does to one request's fields or id is not seen by the next."""
        memo, limits = HeadMemo(), ListenerLimits()
        first = memo.request(GET, limits, end_stream=True)
        second = memo.request(GET, limits, end_stream=True)
        second.headers.append((b"x-added", b"1"))
        second.request_id = b"given"
        third = memo.request(GET, limits, end_stream=True)
        assert third.headers == first.headers == [(b"host", b"example.com")]
        assert third.request_id == b""

    def test_a_client_s_request_id_is_never_given_to_another_request(self) -> None:
        memo, limits = HeadMemo(), ListenerLimits()
        ids = [memo.request([*GET, (b"x-request-id", b"id-%d" % i)], limits, end_stream=True).request_id
               for i in range(3)]
        assert ids == [b"id-0", b"id-1", b"id-2"]
        assert memo.request(GET, limits, end_stream=True).request_id == b""

    @pytest.mark.parametrize("extra", [
        [(b"cookie", b"%c" % (97 + i % 26)) for i in range(570)],
        [(b"x-f%02d" % i, b"v" * 80) for i in range(28)],
        [(b"x-f%02d" % i, b"v" * 400) for i in range(6)],
    ], ids=["570-one-byte-cookies", "32-fields-near-4-KiB", "few-long-fields"])
    def test_what_a_connection_holds_stays_bounded(self, extra: Fields) -> None:
        """Forty distinct heads of the given shape leave at most 64 KiB held by one connection's memo."""
        memo, limits = HeadMemo(), ListenerLimits()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(40):
                head = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
                        (b":path", b"/%d" % i), *((bytes(n), bytes(v)) for n, v in extra)]
                memo.request(head, limits, end_stream=True)
                del head
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held <= 64 * 1024

    def test_new_limits_read_the_head_again(self) -> None:
        """After a reload lowers a limit, a head taken before is refused."""
        memo = HeadMemo()
        fields = [*GET, (b"x-a", b"1"), (b"x-b", b"2")]
        assert memo.request(fields, ListenerLimits(), end_stream=True).bad is None
        assert isinstance(memo.request(fields, replace(ListenerLimits(), max_header_count=1), end_stream=True).bad,
                          HeaderTooLarge)

    @pytest.mark.parametrize(("extra", "kept"), [(b"v" * 3000, 1), (b"v" * 5000, 0)], ids=["small", "large"])
    def test_only_small_heads_are_kept(self, extra: bytes, kept: int) -> None:
        """Memory per connection stays bounded: a head over 4 KiB is read each time instead."""
        memo, limits = HeadMemo(), ListenerLimits()
        fields = [*GET, (b"cookie", extra)]
        for _ in range(2):
            assert memo.request(fields, limits, end_stream=True).headers[0] == (b"cookie", extra)
        assert len(memo.heads) == kept

    def test_at_most_16_heads_are_kept(self) -> None:
        memo, limits = HeadMemo(), ListenerLimits()
        for i in range(40):
            memo.request([*GET[:3], (b":path", b"/%d" % i)], limits, end_stream=True)
            assert len(memo.heads) <= 16

    def test_a_malformed_head_is_refused_every_time(self) -> None:
        memo, limits = HeadMemo(), ListenerLimits()
        for _ in range(2):
            with pytest.raises(Malformed):
                memo.request([*GET, (b"X-Up", b"1")], limits, end_stream=True)
