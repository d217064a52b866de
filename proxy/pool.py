"""One long-lived Pool per service: its current endpoints, its balancer, its in-flight counts.

Pools outlive routing tables. `Pools.reconcile(snapshot)` updates the endpoints of existing pools in place,
creates pools for new services and drops pools of services that left, so balancer state (the round-robin
position, smooth-WRR weights) survives every table swap. The algorithm comes from the service's route tags
(`lb=`, default p2c; `hash_key=` for `hash`); when a service's routes disagree the first by host and path
wins and the disagreement is reported. A changed algorithm replaces the balancer.
"""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

from discovery.model import Endpoint, ServiceSettings, Snapshot

from .balancer import Balancer, make_balancer
from .policy import ServiceDefaults, ServicePolicy, service_policy

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
        self._roll(now)
        self._requests += 1

    def allow(self, now: float) -> bool:
        """Take one retry from the budget if there is one left."""
        self._roll(now)
        if self._retries < self.minimum + self.ratio * self._requests:
            self._retries += 1
            return True
        return False


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """Health and retry settings every pool follows (from the config)."""

    eject_after: int = 3
    eject_base: float = 10.0
    eject_max_share: float = 0.5
    eject_on_5xx: bool = False
    retry_budget: float = 0.2
    slow_start: float = 0.0
    service_max_concurrent: int = 0


class _Excluded:
    """Tried, ejected and actively-checked-down instances as one container for the balancer (no set built
    per request)."""

    __slots__ = ("down", "ejected", "tried")

    def __init__(self, tried: Container[str], ejected: Container[str], down: Container[str]) -> None:
        self.tried, self.ejected, self.down = tried, ejected, down

    def __contains__(self, key: object) -> bool:
        return key in self.tried or key in self.ejected or key in self.down


class Outliers:
    """Passive health: an instance with `after` consecutive failures (connection refused or reset before a
    response) is ejected for `base` seconds, doubling with each ejection in a row (capped at `cap`), then
    re-admitted; a success resets it. Never more than `max_share` of a pool is ejected at once. Pure: the
    time comes in as `now`."""

    __slots__ = ("_count", "_failures", "_until", "after", "base", "cap", "max_share")

    def __init__(self, after: int = 3, base: float = 10.0, cap: float = 300.0, max_share: float = 0.5) -> None:
        self.after, self.base, self.cap, self.max_share = after, base, cap, max_share
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}  # the ejected, until when
        self._count: dict[str, int] = {}  # ejections in a row

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

    def failure(self, key: str, now: float, pool_size: int) -> float | None:
        """Count a failure; returns the ejection time when this one ejects the instance."""
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


class Pool:
    __slots__ = (
        "_sticky_for",
        "_sticky_map",
        "active",
        "algorithm",
        "balancer",
        "budget",
        "check_scheme",
        "check_skip_verify",
        "departed",
        "down",
        "endpoints",
        "errors",
        "hash_on",
        "health_path",
        "in_flight",
        "joined",
        "max_body",
        "max_concurrent",
        "outliers",
        "policy",
        "rng",
        "service",
        "sticky",
        "tunnels",
    )

    def __init__(
        self,
        service: str,
        endpoints: tuple[Endpoint, ...] = (),
        balancer: Balancer | None = None,
        *,
        algorithm: str = "round_robin",
        hash_on: tuple[str, str] | None = None,
        policy: PoolPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.endpoints = endpoints
        self.algorithm = algorithm
        self.balancer: Balancer = balancer or make_balancer(algorithm)
        # What the `hash` algorithm hashes: ("ip", ""), ("header", name) or ("cookie", name); None otherwise.
        self.hash_on = hash_on
        self.in_flight: dict[str, int] = {}
        policy = self.policy = policy or PoolPolicy()
        self.budget = RetryBudget(ratio=policy.retry_budget)
        self.outliers = Outliers(after=policy.eject_after, base=policy.eject_base, max_share=policy.eject_max_share)
        self.down: set[str] = set()  # failing Ferryman's own active checks
        self.health_path: str | None = None  # service meta ferryman-health-path: checked by Ferryman itself
        self.check_scheme = "http"  # how active checks reach the instances: as the service's routes do
        self.check_skip_verify = False
        self.joined: dict[str, float] = {}  # instances still ramping up (slow start), since when
        self.errors = RecentErrors()  # failed attempts per instance, for the status page
        self.active = 0  # requests of this service in progress in this process
        self.tunnels = 0  # WebSocket connections of this service open in this process
        self.max_concurrent = policy.service_max_concurrent  # beyond it: 503 with Retry-After (0: no limit)
        self.max_body = 0  # request body limit in bytes from [services.NAME] max_body_size (0: the global one)
        # Instances that left while requests to them were in flight (draining), until those finish.
        self.departed: dict[str, Endpoint] = {}
        self.rng = rng or random.Random()
        self.sticky: str | None = None  # name of the session cookie pinning a client to an instance
        self._sticky_for: tuple[Endpoint, ...] | None = None
        self._sticky_map: dict[str, Endpoint] = {}

    def __len__(self) -> int:
        return len(self.endpoints)

    def pick(self, exclude: Container[str] = (), key: str | None = None, now: float = 0.0) -> Endpoint | None:
        """An instance that is neither excluded, ejected nor down; when only those are left, any of them
        (Envoy's panic mode: Consul calls the pool healthy, so trying beats answering 503). An instance in
        slow start is passed over with the probability of the share it has not ramped up to yet."""
        ejected, down = self.outliers.ejected, self.down
        if not ejected and not down:
            endpoint = self.balancer.pick(self.endpoints, exclude, in_flight=self.in_flight, key=key)
        else:
            endpoint = self.balancer.pick(
                self.endpoints, _Excluded(exclude, ejected, down), in_flight=self.in_flight, key=key
            )
            if endpoint is None:
                endpoint = self.balancer.pick(self.endpoints, exclude, in_flight=self.in_flight, key=key)
        if endpoint is not None and self.joined and endpoint.key in self.joined:
            ramp = (now - self.joined[endpoint.key]) / self.policy.slow_start
            if ramp >= 1:
                del self.joined[endpoint.key]
            elif self.rng.random() > max(0.1, ramp):
                other = self.balancer.pick(
                    self.endpoints, _Excluded(exclude, ejected, (*down, endpoint.key)),
                    in_flight=self.in_flight, key=key,
                )
                if other is not None:
                    return other
        return endpoint

    def pinned(self, value: str | None, exclude: Container[str] = ()) -> Endpoint | None:
        """The instance a sticky cookie value names, if it is still in the pool, not excluded, not ejected."""
        if not value:
            return None
        if self._sticky_for is not self.endpoints:
            self._sticky_map = {sticky_value(e): e for e in self.endpoints}
            self._sticky_for = self.endpoints
        endpoint = self._sticky_map.get(value)
        if endpoint is None or endpoint.key in exclude or endpoint.key in self.outliers.ejected or (
            endpoint.key in self.down
        ):
            return None
        return endpoint

    def acquire(self, endpoint: Endpoint) -> None:
        self.in_flight[endpoint.key] = self.in_flight.get(endpoint.key, 0) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self.in_flight.get(endpoint.key, 0) - 1
        if left > 0:
            self.in_flight[endpoint.key] = left
        else:
            self.in_flight.pop(endpoint.key, None)


def sticky_value(endpoint: Endpoint) -> str:
    """The sticky cookie's value for an instance: a digest of its identity, so no address leaks to clients."""
    return hashlib.blake2b(endpoint.key.encode(), digest_size=8).hexdigest()


def _apply_policy(pool: Pool, policy: ServicePolicy) -> None:
    """The service's resolved policy onto its pool (the algorithm is the caller's: a change replaces the
    balancer)."""
    pool.sticky = policy.sticky
    pool.max_concurrent = policy.max_concurrent
    pool.max_body = policy.max_body
    pool.health_path = policy.health_path
    if not pool.health_path:
        pool.down.clear()  # no checks run any more: nothing they found may keep an instance out
    pool.check_scheme = policy.check_scheme
    pool.check_skip_verify = policy.check_skip_verify


class Reconciled(NamedTuple):
    added: list[str]
    removed: list[str]
    changed: list[str]


class Pools:
    def __init__(
        self, overrides: Mapping[str, ServiceSettings] | None = None, policy: PoolPolicy | None = None,
    ) -> None:
        self._pools: dict[str, Pool] = {}
        self._overrides = overrides or {}
        self.policy = policy or PoolPolicy()

    def configure(self, overrides: Mapping[str, ServiceSettings], policy: PoolPolicy) -> None:
        """New per-service tables and policy (a reload); the next reconcile() applies the tables. The pools'
        balancers, in-flight counts and ejections stay."""
        self._overrides = overrides
        self.policy = policy
        for pool in self._pools.values():
            pool.policy = policy
            pool.budget.ratio = policy.retry_budget
            outliers = pool.outliers
            outliers.after, outliers.base, outliers.max_share = (
                policy.eject_after, policy.eject_base, policy.eject_max_share)

    def get(self, service: str) -> Pool | None:
        return self._pools.get(service)

    def __iter__(self) -> Iterator[Pool]:
        return iter(self._pools.values())

    def __len__(self) -> int:
        return len(self._pools)

    def reconcile(self, snapshot: Snapshot, now: float = 0.0) -> Reconciled:
        added: list[str] = []
        changed: list[str] = []
        seen: set[str] = set()
        for svc in snapshot.services:
            seen.add(svc.name)
            resolved = service_policy(svc, self._overrides.get(svc.name),
                                      ServiceDefaults(max_concurrent=self.policy.service_max_concurrent))
            algorithm = resolved.algorithm
            pool = self._pools.get(svc.name)
            if pool is None:
                pool = self._pools[svc.name] = Pool(
                    svc.name, svc.endpoints, algorithm=algorithm, hash_on=resolved.hash_on, policy=self.policy,
                )
                _apply_policy(pool, resolved)
                added.append(svc.name)
                continue
            _apply_policy(pool, resolved)
            if pool.algorithm != algorithm:
                pool.algorithm = algorithm
                pool.balancer = make_balancer(algorithm)
                changed.append(svc.name)
            pool.hash_on = resolved.hash_on
            if pool.endpoints != svc.endpoints:
                if self.policy.slow_start > 0:
                    known = {e.key for e in pool.endpoints}
                    for endpoint in svc.endpoints:
                        if endpoint.key not in known:
                            pool.joined[endpoint.key] = now
                keys = {e.key for e in svc.endpoints}
                for endpoint in pool.endpoints:
                    if endpoint.key not in keys and pool.in_flight.get(endpoint.key):
                        pool.departed[endpoint.key] = endpoint
                pool.endpoints = svc.endpoints
                pool.outliers.forget_except(keys)
                pool.errors.forget_except(keys)
                pool.down &= keys
                for gone in [k for k in pool.joined if k not in keys]:
                    del pool.joined[gone]
                if not changed or changed[-1] != svc.name:
                    changed.append(svc.name)
        removed = [name for name in self._pools if name not in seen]
        for name in removed:
            del self._pools[name]
        return Reconciled(added, removed, changed)
