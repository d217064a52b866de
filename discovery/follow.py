"""THE blocking-query loop: every Consul follower (catalog, per-service health, KV prefixes) runs `follow`.

A loop asks with the index of the last answer, so Consul holds the query until something changes (or its wait
ends) and a change arrives as soon as Consul answers. Each answer goes to the caller's `on_answer`; the next
index follows Consul's rules (`next_index`). A failed query backs off (exponential, full jitter), and the next
query is non-blocking (index 0), so a restarted Consul whose index went backwards, or jumped, is read afresh.

Every query first takes a token from a small token bucket (`RateLimit`): a key or a service that flaps (each
answer a change) cannot turn a loop into a busy loop against Consul. The bucket is pure (the clock comes in as
an argument), so its arithmetic is unit-tested without sleeping.

Outages are bookkept by an `Outage` that several loops share: the first failing query of an outage is logged
once, and the outage ends (logged once, with its length) when every loop that failed has answered again or
was stopped. The last answers handed over stay in force meanwhile: a follower never empties its state on a
failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar

import structlog

from .consul import ConsulError

log = structlog.get_logger("ferryman.discovery")

T = TypeVar("T")


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's variant): sleep U(0, min(cap, base*2^n))."""

    __slots__ = ("_attempt", "base", "cap", "rng")

    def __init__(self, base: float = 0.05, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * (2**self._attempt)))
        self._attempt = min(self._attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self._attempt = 0


def next_index(previous: int, returned: int) -> int:
    """Consul's rules for blocking-query indexes: an index that went backwards means the state was reset
    (a restarted agent, a snapshot restore), so read afresh with 0; an index of 0 or less is clamped to 1 so
    the next query still blocks instead of spinning."""
    if returned <= 0:
        return 1
    if returned < previous:
        return 0
    return returned


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `per_second` queries a second per loop on average, `burst` of them back to back. The default
    lets a loop answer a few changes in a row at once (a deploy) and caps a flapping key at a few queries a
    second; `RateLimit.unlimited()` turns it off (tests that drive many answers)."""

    per_second: float = 5.0
    burst: int = 3

    @classmethod
    def unlimited(cls) -> RateLimit:
        return cls(per_second=float("inf"), burst=1)

    def bucket(self, now: float) -> TokenBucket:
        return TokenBucket(self, now)


DEFAULT_LIMIT: Final = RateLimit()


class TokenBucket:
    """A `RateLimit`'s running state for one loop: starts full; `take(now)` spends a token and says how long to
    wait before the query it pays for (0 when a token was at hand). Pure: the clock is an argument."""

    __slots__ = ("_at", "_tokens", "limit")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._at = now

    def take(self, now: float) -> float:
        limit = self.limit
        if limit.per_second == float("inf"):
            return 0.0
        # Refill for the time gone by, never above the burst; a clock that went backwards refills nothing.
        self._tokens = min(float(limit.burst), self._tokens + max(0.0, now - self._at) * limit.per_second)
        self._at = now
        self._tokens -= 1.0
        if self._tokens >= 0.0:
            return 0.0
        # In debt: wait until the token spent now has been refilled. The debt stays on the books, so the next
        # take (after that wait) finds the bucket at zero, not full.
        return -self._tokens / limit.per_second


class Outage:
    """Outage bookkeeping shared by the loops of one follower: `unreachable` is logged at the first failing
    query of an outage, `recovered` (with the outage's length) when every query that failed has answered again
    or was stopped. A per-query view would log one outage several times: a restarting agent answers some
    queries before it has a leader. `fields` go into both log lines (a KV prefix, for instance)."""

    def __init__(self, unreachable: str = "consul_unreachable", recovered: str = "consul_recovered",
                 **fields: Any) -> None:
        self.unreachable, self.recovered, self.fields = unreachable, recovered, fields
        self._failing: set[str] = set()
        self._answered: asyncio.Event | None = None  # set (and replaced) whenever a query answers
        self._since = 0.0
        self.last_success: float | None = None  # Unix time of the last answer of any loop

    @property
    def failing(self) -> bool:
        return bool(self._failing)

    def failed(self, query: str, exc: ConsulError) -> None:
        if not self._failing:
            self._since = time.monotonic()
            log.warning(self.unreachable, reason=exc.reason, query=query, error=exc.detail, **self.fields)
        self._failing.add(query)

    def succeeded(self, query: str) -> None:
        self.last_success = time.time()
        answered, self._answered = self._answered, None
        if answered is not None:
            answered.set()
        self.forget(query)

    async def pause(self, delay: float) -> None:
        """Back off for `delay`, or less: until another query answers (Consul is back: every loop tries
        again at once instead of each finishing its own backoff)."""
        if self._answered is None:
            self._answered = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._answered.wait(), delay)

    def forget(self, query: str) -> None:
        """The query answered, or its loop was stopped: it no longer keeps the outage going."""
        if query in self._failing:
            self._failing.discard(query)
            if not self._failing:
                log.info(self.recovered, outage_s=round(time.monotonic() - self._since, 3), **self.fields)


async def follow(
    fetch: Callable[[int], Awaitable[tuple[int, T]]],
    on_answer: Callable[[T], None],
    *,
    query: str,
    outage: Outage,
    limit: RateLimit = DEFAULT_LIMIT,
    backoff: Backoff | None = None,
    on_failure: Callable[[ConsulError], None] = lambda exc: None,
) -> NoReturn:
    """Run one blocking-query loop until cancelled: `fetch(index)` -> (index, value), each value handed to
    `on_answer` (also an unchanged one: the caller compares). `on_failure` hears every failed query (metrics,
    a first answer that is not coming); `query` names the loop in the outage log."""
    backoff = backoff or Backoff()
    loop = asyncio.get_running_loop()
    bucket = limit.bucket(loop.time())
    index = 0
    while True:
        wait = bucket.take(loop.time())
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            returned, value = await fetch(index)
        except ConsulError as exc:
            outage.failed(query, exc)
            on_failure(exc)
            index = 0
            await outage.pause(backoff.next_delay())
            continue
        backoff.reset()
        outage.succeeded(query)
        index = next_index(index, returned)
        on_answer(value)
