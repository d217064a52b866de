"""The pure parts of gRPC upstreams: grpc-timeout read as a deadline, an upstream request head as HTTP/2 fields,
the statuses counted by name."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy.h2.grpc import grpc_status, grpc_timeout, request_fields, timeout_value, with_timeout
from proxy.headers import upstream_request_head
from proxy.metrics import Metrics


class TestGrpcTimeout:
    """grpc-timeout: at most 8 digits and a unit (H, M, S, m, u, n), as gRPC's PROTOCOL-HTTP2.md says."""

    @pytest.mark.parametrize(("value", "seconds"), [
        (b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25), (b"1500u", 0.0015), (b"99999999n", 0.099999999),
    ], ids=["hours", "minutes", "seconds", "milliseconds", "microseconds", "nanoseconds-8-digits"])
    def test_units(self, value: bytes, seconds: float) -> None:
        assert grpc_timeout([(b"grpc-timeout", value)]) == pytest.approx(seconds)

    @pytest.mark.parametrize("value", [b"", b"5", b"S", b"5s", b"123456789S", b"-1S", b"1.5S"],
                             ids=["empty", "no-unit", "no-digits", "unknown-unit", "nine-digits", "negative",
                                  "fraction"])
    def test_a_malformed_value_is_no_deadline(self, value: bytes) -> None:
        assert grpc_timeout([(b"grpc-timeout", value)]) is None

    def test_absent_is_no_deadline(self) -> None:
        assert grpc_timeout([(b"content-type", b"application/grpc")]) is None


class TestTimeoutLeft:
    """What is left of a deadline, written back as grpc-timeout: the finest unit its 8 digits allow, rounded up."""

    @pytest.mark.parametrize(("seconds", "value"), [
        (0.05, b"50000000n"), (0.25, b"250000u"), (3.2, b"3200000u"), (150.0, b"150000m"), (1e6, b"1000000S"),
        (1e9, b"16666667M"), (1e12, b"99999999H"), (0.0, b"1n"), (-1.0, b"1n"),
    ], ids=["nanoseconds", "microseconds", "seconds-in-microseconds", "minutes-in-milliseconds", "days-in-seconds",
            "years-in-minutes", "beyond-every-unit", "nothing-left", "past"])
    def test_values(self, seconds: float, value: bytes) -> None:
        assert timeout_value(seconds) == value

    @pytest.mark.parametrize("seconds", [0.001, 0.0999, 1.5, 99.0, 7200.0])
    def test_read_back_it_is_the_time_left_or_a_unit_more(self, seconds: float) -> None:
        read = grpc_timeout([(b"grpc-timeout", timeout_value(seconds))])
        assert read is not None and seconds <= read <= seconds * 1.000001 + 1e-9

    def test_only_grpc_timeout_changes(self) -> None:
        fields = [(b":path", b"/a"), (b"grpc-timeout", b"5S"), (b"x-a", b"1")]
        assert with_timeout(fields, 3.0) == [(b":path", b"/a"), (b"grpc-timeout", b"3000000u"), (b"x-a", b"1")]


class TestRequestFields:
    """The head an HTTP/1.1 upstream would get, as HTTP/2 fields for a gRPC instance."""

    def fields(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        head = upstream_request_head(b"POST", b"/pkg.Service/Call", headers, client_ip=b"10.0.0.9", proto=b"http",
                                     port=b"80", default_host=b"10.1.1.1:50051", chunked=False)
        return request_fields(head, b"http")

    def test_pseudo_headers_first_then_lower_case_fields_and_te_trailers(self) -> None:
        out = self.fields([(b"host", b"api.example.com"), (b"Content-Type", b"application/grpc"),
                           (b"grpc-timeout", b"5S"), (b"x-token-bin", b"AAEC")])
        assert out[:4] == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"api.example.com"),
                           (b":path", b"/pkg.Service/Call")]
        rest = dict(out[4:])
        assert rest[b"content-type"] == b"application/grpc"
        assert rest[b"grpc-timeout"] == b"5S"  # passed on
        assert rest[b"x-token-bin"] == b"AAEC"
        assert rest[b"x-forwarded-for"] == b"10.0.0.9"
        assert out[-1] == (b"te", b"trailers")
        assert all(name == name.lower() for name, _ in out)
        assert b"host" not in rest

    @pytest.mark.parametrize("name", [b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te"],
                             ids=lambda n: n.decode())
    def test_no_connection_specific_field(self, name: bytes) -> None:
        out = self.fields([(b"host", b"h"), (name, b"x")])
        assert (name, b"x") not in out

    def test_without_host_the_instance_is_the_authority(self) -> None:
        assert (b":authority", b"10.1.1.1:50051") in self.fields([])


class TestStatusCounting:
    """grpc-status values are counted by their names; anything else is UNKNOWN (the label set stays bounded)."""

    @pytest.mark.parametrize(("sent", "name"), [
        (b"0", "OK"), (b"4", "DEADLINE_EXCEEDED"), (b"14", "UNAVAILABLE"), (b"16", "UNAUTHENTICATED"),
        (b"17", "UNKNOWN"), (b"abc", "UNKNOWN"),
    ], ids=["ok", "deadline", "unavailable", "last-code", "out-of-range", "not-a-number"])
    def test_names(self, sent: bytes, name: str) -> None:
        registry = CollectorRegistry()
        metrics = Metrics(registry=registry)
        metrics.observe_grpc("svc", sent)
        metrics.observe_grpc("svc", sent)
        assert registry.get_sample_value("ferryman_grpc_responses_total", {"service": "svc", "code": name}) == 2

    def test_grpc_status_is_found_among_fields(self) -> None:
        assert grpc_status([(b"grpc-message", b"x"), (b"grpc-status", b"5")]) == b"5"
        assert grpc_status([(b"content-type", b"application/grpc")]) is None
