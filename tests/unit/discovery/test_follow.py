"""The one blocking-query loop: Consul's index rules, backoff, the token-bucket rate limit, outage bookkeeping,
and the loop itself driven by a scripted fetch."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest
from structlog.testing import capture_logs

from discovery.consul import ConsulError
from discovery.follow import Backoff, Outage, RateLimit, TokenBucket, follow, next_index


class TestNextIndex:
    """Consul's blocking-query index rules decide the index of the next query."""

    @pytest.mark.parametrize(
        ("previous", "returned", "expected"),
        [
            (0, 42, 42),
            (42, 42, 42),
            (42, 50, 50),
            (50, 42, 0),
            (2, 1, 0),
            (42, 0, 1),
            (0, 0, 1),
            (42, -5, 1),
        ],
        ids=["first-answer", "unchanged", "moved-on", "went-backwards-reads-afresh", "backwards-by-one",
             "zero-clamped-to-one", "zero-at-start-clamped", "negative-clamped-to-one"],
    )
    def test_next_index(self, previous: int, returned: int, expected: int) -> None:
        assert next_index(previous, returned) == expected


class _Highest(random.Random):
    """Always the upper bound, so the backoff ceiling itself is visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


class TestBackoff:
    """Retry delays grow exponentially up to a cap, are jittered below that ceiling, and reset on success."""

    def test_ceiling_doubles_up_to_cap(self) -> None:
        backoff = Backoff(base=1.0, cap=10.0, rng=_Highest())
        assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    def test_reset_starts_over(self) -> None:
        backoff = Backoff(base=1.0, cap=10.0, rng=_Highest())
        backoff.next_delay()
        backoff.next_delay()
        backoff.reset()
        assert backoff.next_delay() == 1.0

    def test_jitter_stays_below_ceiling(self) -> None:
        backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(7))
        ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
        delays = [backoff.next_delay() for _ in ceilings]
        assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
        assert len(set(delays)) == len(delays)


class TestTokenBucket:
    """A loop's queries are paid for with tokens: a full bucket lets a burst through, then one per 1/rate."""

    @pytest.mark.parametrize(
        ("limit", "takes", "expected"),
        [
            (RateLimit(per_second=5.0, burst=3), [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
            (RateLimit(per_second=5.0, burst=3), [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.2]),
            (RateLimit(per_second=5.0, burst=3), [0.0, 0.0, 0.0, 0.0, 0.2], [0.0, 0.0, 0.0, 0.2, 0.2]),
            (RateLimit(per_second=5.0, burst=3), [0.0, 0.0, 0.0, 0.0, 0.2, 0.4], [0.0, 0.0, 0.0, 0.2, 0.2, 0.2]),
            (RateLimit(per_second=2.0, burst=1), [0.0, 0.5, 1.0], [0.0, 0.0, 0.0]),
            (RateLimit(per_second=2.0, burst=1), [0.0, 0.25], [0.0, 0.25]),
            (RateLimit(per_second=5.0, burst=3), [0.0, 0.0, 0.0, 100.0, 100.0, 100.0, 100.0],
             [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2]),
            (RateLimit(per_second=5.0, burst=1), [10.0, 5.0], [0.0, 0.2]),
            (RateLimit.unlimited(), [0.0] * 50, [0.0] * 50),
        ],
        ids=["burst-passes", "beyond-burst-waits-one-interval", "debt-carries-to-the-next-take",
             "steady-flapping-paced-at-the-rate", "slow-enough-never-waits", "partly-refilled-waits-the-rest",
             "idle-refills-only-up-to-the-burst", "clock-going-back-refills-nothing", "unlimited-never-waits"],
    )
    def test_waits(self, limit: RateLimit, takes: list[float], expected: list[float]) -> None:
        bucket = TokenBucket(limit, takes[0])
        assert [round(bucket.take(now), 6) for now in takes] == expected

    def test_flapping_is_capped_at_the_rate(self) -> None:
        """A loop that queries again as soon as it may makes at most burst + rate * seconds queries."""
        limit = RateLimit(per_second=4.0, burst=2)
        bucket, now, queries = limit.bucket(0.0), 0.0, 0
        while now < 10.0:
            now += bucket.take(now)  # sleep what it says, then query
            queries += 1
        assert queries <= 2 + 4 * 10 + 1


class TestOutage:
    """One outage, however many loops fail in it, is logged once when it starts and once when it ends."""

    def test_logged_once_and_ends_when_every_failing_query_answered(self) -> None:
        outage = Outage()
        with capture_logs() as logs:
            outage.failed("catalog", ConsulError("timeout", "no answer"))
            outage.failed("health:web", ConsulError("timeout", "no answer"))
            outage.failed("catalog", ConsulError("timeout", "no answer"))
            outage.succeeded("catalog")
            assert outage.failing
            outage.succeeded("health:web")
        assert [e["event"] for e in logs] == ["consul_unreachable", "consul_recovered"]
        assert logs[0]["query"] == "catalog" and logs[0]["reason"] == "timeout"
        assert not outage.failing and outage.last_success is not None

    def test_a_stopped_loop_ends_its_part_of_the_outage(self) -> None:
        outage = Outage("routes_kv_unreadable", "routes_kv_recovered", prefix="ferryman/routes/")
        with capture_logs() as logs:
            outage.failed("kv:ferryman/routes/", ConsulError("forbidden", "ACL"))
            outage.forget("kv:ferryman/routes/")
        assert [(e["event"], e["prefix"]) for e in logs] == [
            ("routes_kv_unreadable", "ferryman/routes/"), ("routes_kv_recovered", "ferryman/routes/")]
        assert outage.last_success is None

    def test_success_without_outage_logs_nothing(self) -> None:
        outage = Outage()
        with capture_logs() as logs:
            outage.succeeded("catalog")
        assert logs == []


class _Done(Exception):
    """Ends a scripted loop once its script is played."""


class _Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


Fetch = Callable[[int], Awaitable[tuple[int, str]]]


def scripted(answers: list[tuple[int, str] | ConsulError]) -> tuple[Fetch, list[int]]:
    """A fetch that plays `answers` in turn (raising the errors) and records the index of each query."""
    asked: list[int] = []

    async def fetch(index: int) -> tuple[int, str]:
        asked.append(index)
        if not answers:
            raise _Done
        answer = answers.pop(0)
        if isinstance(answer, ConsulError):
            raise answer
        return answer

    return fetch, asked


class TestFollow:
    """The loop asks with the last answer's index, reads afresh after a failure, and hands every answer over."""

    @pytest.mark.parametrize(
        ("answers", "indexes"),
        [
            ([(10, "a"), (12, "b"), (12, "b")], [0, 10, 12, 12]),
            ([(10, "a"), ConsulError("timeout", "x"), (11, "b")], [0, 10, 0, 11]),
            ([(10, "a"), (4, "b"), (5, "c")], [0, 10, 0, 5]),
            ([(0, "a"), (7, "b")], [0, 1, 7]),
        ],
        ids=["blocks-on-the-last-index", "failure-reads-afresh", "index-backwards-reads-afresh",
             "zero-index-clamped-to-one"],
    )
    async def test_indexes(self, answers: list[tuple[int, str] | ConsulError], indexes: list[int]) -> None:
        fetch, asked = scripted(list(answers))
        handed: list[str] = []
        failures: list[str] = []
        with pytest.raises(_Done):
            await follow(fetch, handed.append, query="catalog", outage=Outage(), limit=RateLimit.unlimited(),
                         backoff=Backoff(rng=_Lowest()), on_failure=lambda exc: failures.append(exc.reason))
        assert asked == indexes
        assert handed == [a[1] for a in answers if not isinstance(a, ConsulError)]
        assert failures == [a.reason for a in answers if isinstance(a, ConsulError)]

    async def test_failures_log_once_and_recovery_is_logged(self) -> None:
        fetch, _ = scripted([ConsulError("timeout", "x"), ConsulError("timeout", "x"), (3, "a")])
        with capture_logs() as logs, pytest.raises(_Done):
            await follow(fetch, lambda value: None, query="catalog", outage=Outage(),
                         limit=RateLimit.unlimited(), backoff=Backoff(rng=_Lowest()))
        assert [e["event"] for e in logs] == ["consul_unreachable", "consul_recovered"]
