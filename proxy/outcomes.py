"""Passive health bookkeeping of one pool: recent errors, the retry budget and outlier ejection.

Pure state: the time comes in as `now`, nothing here sleeps or reads a clock, so each rule is unit-tested with
plain numbers. `Pool` owns one of each and is the only code that changes them (through its outcome interface).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Final

ERROR_WINDOW_S: Final = 60.0


class RecentErrors:
    """Failed attempts per instance over the last `window` seconds (timestamps, pruned when read).
    Errors are rare next to requests, so a deque per failing instance is cheap; each is capped."""

    __slots__ = ("_times", "window")

    def __init__(self, window: float = ERROR_WINDOW_S, cap: int = 10_000) -> None:
        self.window = window
        self._times: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=cap)
        )

    def add(self, key: str, now: float) -> None:
        self._times[key].append(now)

    def count(self, key: str, now: float) -> int:
        times = self._times.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._times[key]
            return 0
        return len(times)

    def forget_except(self, keys: set[str]) -> None:
        for key in [k for k in self._times if k not in keys]:
            del self._times[key]

    def any(self) -> bool:
        return bool(self._times)


class RetryBudget:
    """Retries may be at most `ratio` of the requests of the current `window` (seconds), plus `minimum` per
    window so a quiet service can still retry. Counted in fixed windows: coarse, O(1), and enough to stop a
    failing pool from doubling its own load (Envoy's and Finagle's retry budgets, simplified)."""

    __slots__ = ("_requests", "_retries", "_window_start", "minimum", "ratio", "window")

    def __init__(self, ratio: float = 0.2, window: float = 10.0, minimum: int = 3) -> None:
        self.ratio, self.window, self.minimum = ratio, window, minimum
        self._window_start = float("-inf")
        self._requests = 0
        self._retries = 0

    def _roll(self, now: float) -> None:
        if now - self._window_start >= self.window:
            self._window_start = now
            self._requests = 0
            self._retries = 0

    def record_request(self, now: float) -> None:
        if now - self._window_start >= self.window:  # (_roll inlined: every request comes here)
            self._window_start = now
            self._requests = 0
            self._retries = 0
        self._requests += 1

    def allow(self, now: float) -> bool:
        """Take one retry from the budget if there is one left."""
        self._roll(now)
        if self._retries < self.minimum + self.ratio * self._requests:
            self._retries += 1
            return True
        return False


class Outliers:
    """Passive health: an instance with `after` consecutive failures (connection refused or reset before a
    response) is ejected for `base` seconds, doubling with each ejection in a row (capped at `cap`), then
    re-admitted; a success resets it. Never more than `max_share` of a pool is ejected at once. Pure: the
    time comes in as `now`."""

    __slots__ = ("_count", "_failures", "_until", "after", "base", "cap", "counting", "max_share")

    def __init__(self, after: int = 3, base: float = 10.0, cap: float = 300.0, max_share: float = 0.5) -> None:
        self.after, self.base, self.cap, self.max_share = after, base, cap, max_share
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}  # the ejected, until when
        self._count: dict[str, int] = {}  # ejections in a row
        self.counting = False  # some instance has a failure or an ejection counted (a success has work to do)

    @property
    def ejected(self) -> Mapping[str, float]:
        return self._until

    def readmit_expired(self, now: float) -> list[str]:
        back = [key for key, until in self._until.items() if now >= until]
        for key in back:
            del self._until[key]
            self._failures.pop(key, None)
        return back

    def success(self, key: str) -> None:
        # Both counts go: failures in a row, and ejections in a row (so a later ejection starts at `base`).
        if key in self._failures or key in self._count:
            self._failures.pop(key, None)
            self._count.pop(key, None)
            self.counting = bool(self._failures or self._count)

    def failure(self, key: str, now: float, pool_size: int) -> float | None:
        """Count a failure; returns the ejection time when this one ejects the instance."""
        self.counting = True
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if failures < self.after or key in self._until:
            return None
        if len(self._until) + 1 > self.max_share * pool_size:
            return None  # keep most of the pool: Consul calls these healthy
        count = self._count[key] = self._count.get(key, 0) + 1
        duration = min(self.cap, self.base * 2.0 ** (count - 1))
        self._until[key] = now + duration
        self._failures[key] = 0
        return duration

    def forget_except(self, keys: set[str]) -> None:
        for table in (self._failures, self._until, self._count):
            for key in [k for k in table if k not in keys]:
                del table[key]
