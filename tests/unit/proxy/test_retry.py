"""Retry rules of one request: a failure in, SAME_INSTANCE / OTHER_INSTANCE / ANSWER out."""

from __future__ import annotations

import pytest

from proxy.errors import (
    ProxyError,
    RequestTimeout,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamStreamRefused,
    UpstreamTimeout,
)
from proxy.retry import Attempts, Verdict, counts_against_instance


def closed_early() -> ProxyError:
    return UpstreamConnectError("closed", nothing_received=True)


def verdict(
    err: ProxyError, *, method: str = "GET", connected: bool = True, reused: bool = False, body_sent: int = 0,
    tried: int = 1, pool_size: int = 3, budget: bool = True, stale_left: bool = True, client_gone: bool = False,
) -> Verdict:
    attempts = Attempts(3, pool_size, method)
    attempts.tried.update(f"i{n}" for n in range(tried))
    attempts.stale_retry_left = stale_left
    return attempts.after_failure(err, connected=connected, reused=reused, body_sent=body_sent,
                                  client_gone=client_gone, budget=lambda: budget)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"err": UpstreamConnectError("refused"), "connected": False, "method": "POST"}, Verdict.OTHER_INSTANCE),
        ({"err": UpstreamConnectTimeout("slow"), "connected": False}, Verdict.OTHER_INSTANCE),
        ({"err": closed_early(), "reused": True}, Verdict.SAME_INSTANCE),
        ({"err": closed_early(), "reused": True, "stale_left": False}, Verdict.OTHER_INSTANCE),
        ({"err": closed_early()}, Verdict.OTHER_INSTANCE),
        ({"err": closed_early(), "method": "POST"}, Verdict.ANSWER),
        ({"err": closed_early(), "body_sent": 1, "method": "PUT"}, Verdict.ANSWER),
        ({"err": UpstreamConnectError("reset mid-answer")}, Verdict.ANSWER),
        ({"err": UpstreamTimeout("no answer")}, Verdict.ANSWER),
        ({"err": RequestTimeout("client stalled")}, Verdict.ANSWER),
        ({"err": UpstreamProtocolError("garbage")}, Verdict.ANSWER),
        ({"err": UpstreamConnectError("refused"), "connected": False, "tried": 3}, Verdict.ANSWER),
        ({"err": UpstreamConnectError("refused"), "connected": False, "pool_size": 1}, Verdict.ANSWER),
        ({"err": UpstreamConnectError("refused"), "connected": False, "budget": False}, Verdict.ANSWER),
        ({"err": UpstreamConnectError("refused"), "connected": False, "client_gone": True}, Verdict.ANSWER),
        ({"err": UpstreamStreamRefused("REFUSED_STREAM", nothing_received=True), "method": "POST"},
         Verdict.OTHER_INSTANCE),
        ({"err": UpstreamStreamRefused("REFUSED_STREAM", nothing_received=True), "method": "POST", "body_sent": 5},
         Verdict.ANSWER),
        ({"err": UpstreamStreamRefused("REFUSED_STREAM", nothing_received=True), "method": "POST",
          "pool_size": 1}, Verdict.ANSWER),
    ],
    ids=[
        "refused-any-method", "connect-timeout", "stale-keepalive", "stale-retry-used", "closed-early-fresh",
        "closed-early-post", "closed-early-body-sent", "reset-after-bytes", "upstream-timeout", "client-timeout",
        "bad-response", "attempts-used", "single-instance", "budget-spent", "client-gone",
        "stream-refused-any-method", "stream-refused-body-not-kept", "stream-refused-single-instance",
    ],
)
def test_verdict(kwargs: dict[str, object], expected: Verdict) -> None:
    assert verdict(**kwargs) is expected  # type: ignore[arg-type]  # each row's values fit their keywords


def test_a_timeout_stops_every_later_retry() -> None:
    attempts = Attempts(3, 3, "GET")
    attempts.tried.add("i0")
    assert attempts.after_failure(UpstreamTimeout("t"), connected=True, reused=False, body_sent=0,
                                  client_gone=False, budget=lambda: True) is Verdict.ANSWER
    assert attempts.limit == 0 and not attempts.stale_retry_left


@pytest.mark.parametrize(
    ("err", "connected", "reused", "counts"),
    [
        (UpstreamConnectError("refused"), False, False, True),
        (UpstreamConnectTimeout("slow"), False, False, True),
        (UpstreamConnectError("dropped"), True, True, False),
        (UpstreamConnectError("reset"), True, False, True),
        (UpstreamTimeout("hung"), True, False, True),
        (RequestTimeout("client"), True, False, False),
        (UpstreamProtocolError("garbage"), True, False, False),
        (UpstreamStreamRefused("at its stream limit"), True, False, True),
        (UpstreamStreamRefused("going away"), True, True, False),
    ],
    ids=["refused", "connect-timeout", "stale-pooled", "reset-fresh", "hung", "client-timeout", "bad-response",
         "h2-stream-refused-fresh", "h2-stream-refused-reused"],
)
def test_counts_against_instance(err: ProxyError, connected: bool, reused: bool, counts: bool) -> None:
    assert counts_against_instance(err, connected=connected, reused=reused) is counts
