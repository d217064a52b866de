"""When a failed attempt is tried again: the retry rules of one request, pure.

An `Attempts` value lives as long as its request and is asked once per failure before any response byte
reached the client; it answers with a `Verdict`. It does no I/O and reads no clock (the retry budget's answer
comes in as a callable), so each rule is a unit test with plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Final

from .errors import (
    ProxyError,
    RequestTimeout,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamStreamRefused,
    UpstreamTimeout,
)

# RFC 9110 §9.2.2: methods whose repetition has the same effect; only these are retried after a reused
# connection dropped. Any method is retried when the connection was never established.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Verdict(Enum):
    SAME_INSTANCE = "same"  # again on a new connection to the same instance (a stale keep-alive connection)
    OTHER_INSTANCE = "other"  # another instance of the pool
    ANSWER = "answer"  # no retry: answer the client with the error


def counts_against_instance(err: ProxyError, *, connected: bool, reused: bool) -> bool:
    """Whether a failure is the instance's fault (toward ejection). A refusal, reset or connect timeout is;
    a pooled connection the upstream had already dropped is not; an instance that accepts but does not answer
    is (Envoy's consecutive gateway failures: otherwise a hung backend keeps 1/N of requests waiting). So is an
    HTTP/2 stream the instance refused: ejection needs `eject_after` failures in a row, which an instance refusing
    now and then at its stream limit never reaches, and one refusing every stream would otherwise keep taking its
    share of calls, each retried on the pool's budget."""
    if isinstance(err, UpstreamConnectError | UpstreamConnectTimeout):
        return not (connected and reused)
    return isinstance(err, UpstreamTimeout) and not isinstance(err, RequestTimeout) and connected


class Attempts:
    """The instances one request has been tried on, and what it may still try.

    - The connection was never made (refused, connect timeout): nothing reached the upstream, so any method
      goes to another instance. So does a stream an HTTP/2 instance refused (never processed, RFC 9113 §8.7)
      whose body, if any, can be sent again (body_sent is back to 0).
    - The upstream closed the connection before any byte of its response and the request is idempotent with
      no body byte sent (RFC 9110 §9.2.2): a reused keep-alive connection the upstream had already dropped is
      retried once on a new connection to the same instance, and otherwise another instance is tried.
    - Timeouts are never retried: the upstream may be working on it, and a retry doubles the load.
    Other instances are tried at most `limit` times in all, and only while the pool's retry budget allows.
    """

    __slots__ = ("limit", "method", "stale_retry_left", "tried")

    def __init__(self, max_attempts: int, pool_size: int, method: str, tried: set[str] | None = None) -> None:
        self.tried: set[str] = tried if tried is not None else set()
        self.limit = min(max_attempts, pool_size)
        self.method = method
        self.stale_retry_left = True

    def after_failure(
        self, err: ProxyError, *, connected: bool, reused: bool, body_sent: int, client_gone: bool,
        budget: Callable[[], bool],
    ) -> Verdict:
        if isinstance(err, UpstreamTimeout | RequestTimeout) and connected:
            self.stale_retry_left = False
            self.limit = 0
        may_retry = not connected
        if connected:
            closed_early = (
                err.nothing_received and isinstance(err, UpstreamConnectError)
                and self.method in IDEMPOTENT and body_sent == 0
            )
            if closed_early and reused and self.stale_retry_left:
                self.stale_retry_left = False
                return Verdict.SAME_INSTANCE
            may_retry = closed_early or (isinstance(err, UpstreamStreamRefused) and body_sent == 0)
        if may_retry and len(self.tried) < self.limit and not client_gone and budget():
            return Verdict.OTHER_INSTANCE
        return Verdict.ANSWER
