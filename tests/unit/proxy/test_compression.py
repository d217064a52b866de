"""Response compression, in process: which answers are compressed for which requests (a pure decision), the
head the client then gets, and the encoder that streams the body (each upstream read decodable at once)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

import brotli
import pytest

from proxy.app import listener_limits
from proxy.compression import (
    DEFAULT_CONTENT_TYPES,
    Compression,
    Decision,
    Encoder,
    choose,
    encoded_head,
    preferred_encoding,
    with_vary,
)
from proxy.config import load
from proxy.metrics import Metrics

Headers = list[tuple[bytes, bytes]]
POLICY = Compression(re.compile(DEFAULT_CONTENT_TYPES), level=1, min_length=1024, brotli=True)
GZIP = [(b"Accept-Encoding", b"gzip, deflate")]
TEXT = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Length", b"65536")]
GZIPPED, BR, VARY_ONLY, NOTHING = Decision("gzip", True), Decision("br", True), Decision(None, True), Decision(
    None, False)

# (method, request headers, status, response headers, policy, decision, id)
DECISIONS: list[tuple[str, Headers, int, Headers, Compression, Decision, str]] = [
    ("GET", GZIP, 200, TEXT, POLICY, GZIPPED, "text-to-a-gzip-client"),
    ("GET", [], 200, TEXT, POLICY, VARY_ONLY, "no-accept-encoding-never-compressed"),
    ("GET", [(b"Accept-Encoding", b"")], 200, TEXT, POLICY, VARY_ONLY, "empty-accept-encoding"),
    ("GET", [(b"Accept-Encoding", b"identity")], 200, TEXT, POLICY, VARY_ONLY, "identity-only"),
    ("GET", [(b"Accept-Encoding", b"gzip;q=0")], 200, TEXT, POLICY, VARY_ONLY, "gzip-refused-with-q-0"),
    ("GET", [(b"Accept-Encoding", b"deflate")], 200, TEXT, POLICY, VARY_ONLY, "only-deflate"),
    ("GET", [(b"accept-encoding", b"GZIP")], 200, TEXT, POLICY, GZIPPED, "names-case-insensitive"),
    ("GET", [(b"Accept-Encoding", b"*")], 200, TEXT, POLICY, GZIPPED, "star-accepts-gzip"),
    ("GET", [(b"Accept-Encoding", b"br;q=1, gzip;q=0.5")], 200, TEXT, POLICY, BR, "br-preferred"),
    ("GET", [(b"Accept-Encoding", b"gzip, deflate, br")], 200, TEXT, POLICY, GZIPPED, "br-tie-gives-gzip"),
    ("GET", [(b"Accept-Encoding", b"br;q=1, gzip;q=0.5")], 200, TEXT,
     Compression(re.compile("^text/"), brotli=False), GZIPPED, "br-preferred-without-the-library"),
    ("HEAD", GZIP, 200, TEXT, POLICY, NOTHING, "head"),
    ("GET", GZIP, 204, [(b"Content-Type", b"text/plain")], POLICY, NOTHING, "204"),
    ("GET", GZIP, 304, TEXT, POLICY, NOTHING, "304"),
    ("GET", GZIP, 103, TEXT, POLICY, NOTHING, "1xx"),
    ("GET", GZIP, 206, [*TEXT, (b"Content-Range", b"bytes 0-65535/100000")], POLICY, NOTHING, "206"),
    ("GET", [*GZIP, (b"Range", b"bytes=0-99")], 200, TEXT, POLICY, VARY_ONLY, "200-to-a-range-request"),
    ("GET", GZIP, 200, [*TEXT, (b"Content-Encoding", b"gzip")], POLICY, NOTHING, "already-gzip"),
    ("GET", GZIP, 200, [*TEXT, (b"Content-Encoding", b"identity")], POLICY, NOTHING, "content-encoding-identity"),
    ("GET", GZIP, 200, [*TEXT, (b"Cache-Control", b"public, No-Transform")], POLICY, NOTHING,
     "response-no-transform"),
    ("GET", [*GZIP, (b"Cache-Control", b"no-transform")], 200, TEXT, POLICY, VARY_ONLY, "request-no-transform"),
    ("GET", GZIP, 200, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"1023")], POLICY, NOTHING,
     "below-min-length"),
    ("GET", GZIP, 200, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"1024")], POLICY, GZIPPED,
     "at-min-length"),
    ("GET", GZIP, 200, [(b"Content-Type", b"text/event-stream")], POLICY, GZIPPED, "sse-no-length"),
    ("GET", GZIP, 200, [(b"Content-Type", b"image/png"), (b"Content-Length", b"65536")], POLICY, NOTHING,
     "type-not-matched"),
    ("GET", GZIP, 200, [(b"Content-Length", b"65536")], POLICY, NOTHING, "no-content-type"),
    ("GET", GZIP, 200, [(b"Content-Type", b"application/vnd.api+json"), (b"Content-Length", b"4096")], POLICY,
     GZIPPED, "fabio-example-suffix-json"),
    ("GET", GZIP, 404, TEXT, POLICY, GZIPPED, "an-error-page-too"),
    ("POST", GZIP, 200, TEXT, Compression(re.compile("html")), GZIPPED, "pattern-searched-not-anchored"),
]


class TestDecision:
    """choose(): request + response head + policy -> the encoding (or None) and whether Vary names
    Accept-Encoding."""

    @pytest.mark.parametrize(("method", "asked", "status", "response", "policy", "expected"),
                             [c[:6] for c in DECISIONS], ids=[c[6] for c in DECISIONS])
    def test_decision(self, method: str, asked: Headers, status: int, response: Headers, policy: Compression,
                      expected: Decision) -> None:
        assert choose(method, asked, status, response, policy) == expected

    def test_header_lines_of_accept_encoding_form_one_list(self) -> None:
        """Two Accept-Encoding lines are one list (RFC 9110 §5.3): br rated above gzip across them."""
        request = [(b"Accept-Encoding", b"gzip;q=0.2"), (b"Accept-Encoding", b"br")]
        assert choose("GET", request, 200, TEXT, POLICY) == BR


class TestAcceptEncoding:
    """preferred_encoding(): RFC 9110 §12.5.3 q-values; a client that did not ask gets nothing."""

    @pytest.mark.parametrize(
        ("value", "brotli_ok", "expected"),
        [
            (None, True, None),
            (b"gzip", True, "gzip"),
            (b"x-gzip", True, "gzip"),
            (b"br", True, "br"),
            (b"br", False, None),
            (b"br;q=0.9, gzip;q=0.8", True, "br"),
            (b"br;q=0.8, gzip;q=0.9", True, "gzip"),
            (b"gzip;q=0.001", True, "gzip"),
            (b"gzip;q=0.000", True, None),
            (b"gzip; Q=0", True, None),
            (b"gzip;q=2", True, None),
            (b"gzip;q=abc", True, None),
            (b"*;q=0", True, None),
            (b"*;q=0, gzip", True, "gzip"),
            (b"gzip;q=0, *", True, "br"),
            (b"gzip, gzip;q=0", True, "gzip"),
            (b" , ,gzip ,", True, "gzip"),
        ],
        ids=["absent", "gzip", "x-gzip", "br-alone", "br-alone-without-library", "br-rated-higher",
             "gzip-rated-higher", "smallest-q", "q-zero-with-decimals", "q-name-case", "q-above-one-malformed",
             "q-not-a-number", "star-refuses", "star-refuses-others", "star-accepts-others-not-gzip",
             "first-rating-counts", "empty-items"],
    )
    def test_preferred(self, value: bytes | None, brotli_ok: bool, expected: str | None) -> None:
        assert preferred_encoding(value, brotli=brotli_ok) == expected


class TestHead:
    """What the client's head says about an encoded body: coding, no length, Vary, weak ETag, no ranges."""

    def test_encoded_head(self) -> None:
        headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5000"), (b"ETag", b'"v1"'),
                   (b"Accept-Ranges", b"bytes"), (b"Vary", b"Origin")]
        assert encoded_head(headers, "gzip") == [
            (b"Content-Type", b"text/plain"), (b"ETag", b'W/"v1"'), (b"Vary", b"Origin, Accept-Encoding"),
            (b"Content-Encoding", b"gzip"),
        ]

    def test_weak_etag_stays_as_it_is(self) -> None:
        assert (b"ETag", b'W/"v1"') in encoded_head([(b"ETag", b'W/"v1"')], "br")

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ([], [(b"Vary", b"Accept-Encoding")]),
            ([(b"Vary", b"Origin")], [(b"Vary", b"Origin, Accept-Encoding")]),
            ([(b"vary", b"accept-encoding")], [(b"vary", b"accept-encoding")]),
            ([(b"Vary", b"*")], [(b"Vary", b"*")]),
            ([(b"Vary", b"Origin"), (b"Vary", b"Cookie")],
             [(b"Vary", b"Origin"), (b"Vary", b"Cookie, Accept-Encoding")]),
            ([(b"Vary", b"")], [(b"Vary", b"Accept-Encoding")]),
        ],
        ids=["added", "merged", "already-named", "star", "last-of-two-lines", "empty-value"],
    )
    def test_vary(self, headers: Headers, expected: Headers) -> None:
        assert with_vary(headers) == expected


class FakeDownstream:
    """The client side as an Encoder sees it: body pieces, flushes and the end."""

    def __init__(self) -> None:
        self.body = b""
        self.flushed: list[bytes] = []  # what had been sent at each flush
        self.ended = False

    def send_body(self, data: bytes) -> None:
        self.body += data

    def flush(self) -> None:
        self.flushed.append(self.body)

    def end(self) -> None:
        self.ended = True


class FakeExchange:
    bytes_out = 0


class TestEncoder:
    """The body streamed: every upstream read decodable as soon as it is flushed, the whole at the end."""

    @pytest.mark.parametrize("encoding", ["gzip", "br"])
    def test_each_read_is_decodable_at_its_flush(self, encoding: str) -> None:
        """An SSE stream's events reach the client with the read that brought them, not later."""
        down, exchange, metrics = FakeDownstream(), FakeExchange(), Metrics()
        encoder = Encoder(down, encoding, 1, exchange, metrics)
        decode: Callable[[bytes], bytes] = (
            zlib.decompressobj(zlib.MAX_WBITS | 16).decompress if encoding == "gzip" else brotli.Decompressor().process
        )
        seen, sent = b"", b""
        for number in range(5):
            event = b"data: event %d\n\n" % number
            encoder.send_body(event)
            encoder.flush()
            seen += decode(down.body[len(sent):])
            sent = down.body
            assert seen.endswith(event)
        encoder.end()
        assert down.ended
        seen += decode(down.body[len(sent):])
        assert seen == b"".join(b"data: event %d\n\n" % n for n in range(5))

    def test_a_flush_without_new_bytes_sends_nothing(self) -> None:
        """A read that held only the head (or the end) adds no empty block."""
        down = FakeDownstream()
        encoder = Encoder(down, "gzip", 1, FakeExchange(), Metrics())
        encoder.send_body(b"x" * 100)
        encoder.flush()
        size = len(down.body)
        encoder.flush()
        assert len(down.body) == size
        assert len(down.flushed) == 2  # the client side is still flushed each time

    def test_end_counts_bytes_for_the_access_line_and_metrics(self) -> None:
        down, exchange, metrics = FakeDownstream(), FakeExchange(), Metrics()
        encoder = Encoder(down, "gzip", 6, exchange, metrics)
        body = b"hello compression " * 4000
        for start in range(0, len(body), 10_000):
            encoder.send_body(body[start:start + 10_000])
            encoder.flush()
        encoder.end()
        assert zlib.decompress(down.body, zlib.MAX_WBITS | 16) == body
        assert exchange.bytes_out == len(down.body) < len(body) // 10
        registry = metrics.registry
        assert registry.get_sample_value("ferryman_compressed_responses_total", {"encoding": "gzip"}) == 1
        assert registry.get_sample_value("ferryman_compression_input_bytes_total", {"encoding": "gzip"}) == len(body)
        assert registry.get_sample_value(
            "ferryman_compression_output_bytes_total", {"encoding": "gzip"}) == len(down.body)


class TestSettings:
    """gzip_content_type, gzip_level and gzip_min_length become the listeners' policies."""

    def test_off_by_default_and_gzip_on_routes_follow_fabio_s_example(self) -> None:
        limits = listener_limits(load(config_file=None, environ={}, flags={}), "http")
        assert limits.gzip is None
        assert limits.gzip_route.content_types.pattern == DEFAULT_CONTENT_TYPES

    def test_set_from_the_environment(self) -> None:
        environ = {"FERRYMAN_GZIP_CONTENT_TYPE": "^text/", "FERRYMAN_GZIP_LEVEL": "6",
                   "FERRYMAN_GZIP_MIN_LENGTH": "0"}
        limits = listener_limits(load(config_file=None, environ=environ, flags={}), "http")
        assert limits.gzip is not None
        assert (limits.gzip.content_types.pattern, limits.gzip.level, limits.gzip.min_length) == ("^text/", 6, 0)
        assert limits.gzip_route is limits.gzip
