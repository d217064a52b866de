"""One long-lived Pool per service: its current endpoints, its balancer, its in-flight counts.

Pools outlive routing tables. `Pools.reconcile(snapshot)` updates the endpoints of existing pools in place,
creates pools for new services and drops pools of services that left, so balancer state (the round-robin
position, smooth-WRR weights, in-flight counts, ejections) survives every table swap. Each pool's settings
come from one resolved `ServicePolicy` (proxy/policy.py: config file > service meta > route tags > default)
and the global `HealthPolicy`; a changed algorithm replaces the balancer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import NamedTuple

from discovery.model import Endpoint, ServiceSettings, Snapshot, SnapshotDelta

from .balancer import Balancer, make_balancer
from .config import DEFAULTS
from .outcomes import Outliers, RecentErrors, RetryBudget
from .policy import ServiceDefaults, ServicePolicy, service_policy
from .settings import HealthPolicy

_NONE: tuple[str, ...] = ()


class _Excluded:
    """Tried, ejected and actively-checked-down instances as one container for the balancer (no set built
    per request)."""

    __slots__ = ("down", "ejected", "tried")

    def __init__(self, tried: Container[str], ejected: Container[str], down: Container[str]) -> None:
        self.tried, self.ejected, self.down = tried, ejected, down

    def __contains__(self, key: object) -> bool:
        return key in self.tried or key in self.ejected or key in self.down


class Pool:
    """A service's instances and this process's runtime state about them.

    Configuration comes in as values replaced by one assignment (`policy`, the health and retry settings; the
    per-service balancing and limits set by `Pools.reconcile`); the runtime counters are private and change only
    through the outcome interface: `begin`/`end` a request, `acquire`/`release` an instance, and report what an
    attempt gave (`failed`, `answered`, `upgraded`). Ejection, the retry budget, recent errors and slow start
    are decided here, so the exchange that forwards a request never reaches into them.
    """

    __slots__ = (
        "_budget",
        "_down",
        "_errors",
        "_joined",
        "_outliers",
        "_policy",
        "_sticky_for",
        "_sticky_map",
        "_touched",
        "active",
        "algorithm",
        "balancer",
        "check_scheme",
        "check_skip_verify",
        "connect_timeout",
        "departed",
        "ejected",
        "endpoints",
        "hash_on",
        "health_path",
        "in_flight",
        "max_body",
        "max_concurrent",
        "read_timeout",
        "rng",
        "service",
        "sticky",
        "tcp_open",
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
        policy: HealthPolicy | None = None,
        rng: random.Random | None = None,
        touched: set[str] | None = None,
    ) -> None:
        self.service = service
        # Names of the pools with something to report (requests, errors, ejections): the state report reads
        # these, not 10,000 idle pools a second.
        self._touched = touched if touched is not None else set()
        self.endpoints = endpoints
        self.algorithm = algorithm
        self.balancer: Balancer = balancer or make_balancer(algorithm)
        # What the `hash` algorithm hashes: ("ip", ""), ("header", name) or ("cookie", name); None otherwise.
        self.hash_on = hash_on
        self.in_flight: dict[str, int] = {}
        policy = policy or DEFAULTS.health
        self._budget = RetryBudget(ratio=policy.retry_budget)
        self._outliers = Outliers(after=policy.eject_after, base=policy.eject_base, max_share=policy.eject_max_share)
        # The ejected instances, until when (the event loop's clock): the outlier record's own dict, changed in
        # place, read-only here; an attribute, not a property, since every request reads it.
        self.ejected: Mapping[str, float] = self._outliers.ejected
        self._policy = policy
        self._down: set[str] = set()  # failing Ferryman's own active checks
        self.health_path: str | None = None  # service meta ferryman-health-path: checked by Ferryman itself
        self.check_scheme = "http"  # how active checks reach the instances: as the service's routes do
        self.check_skip_verify = False
        self._joined: dict[str, float] = {}  # instances still ramping up (slow start), since when
        self._errors = RecentErrors()  # failed attempts per instance, for the status page
        self.active = 0  # requests of this service in progress in this process (read-only outside)
        self.tunnels = 0  # WebSocket connections of this service open in this process (read-only outside)
        self.tcp_open = 0  # TCP and TLS pass-through connections of this service open in this process (same)
        self.max_concurrent = policy.service_max_concurrent  # beyond it: 503 with Retry-After (0: no limit)
        self.max_body = 0  # request body limit in bytes from [services.NAME] max_body_size (0: the global one)
        self.read_timeout = 0.0  # the service's own read timeout in seconds (0: the global one)
        self.connect_timeout = 0.0  # the service's own connect timeout in seconds (0: the global one)
        # Instances that left while requests to them were in flight (draining), until those finish.
        self.departed: dict[str, Endpoint] = {}
        self.rng = rng or random.Random()
        self.sticky: str | None = None  # name of the session cookie pinning a client to an instance
        self._sticky_for: tuple[Endpoint, ...] | None = None
        self._sticky_map: dict[str, Endpoint] = {}

    def __len__(self) -> int:
        return len(self.endpoints)

    # --- configuration, replaced whole ---
    @property
    def policy(self) -> HealthPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: HealthPolicy) -> None:
        """A reload's new health and retry settings; ejections and counts in progress are kept."""
        self._policy = policy
        self._budget.ratio = policy.retry_budget
        outliers = self._outliers
        outliers.after, outliers.base = policy.eject_after, policy.eject_base
        outliers.max_share = policy.eject_max_share
        if policy.slow_start <= 0:
            self._joined.clear()  # slow start switched off: instances ramping up get their full share at once

    # --- choosing an instance ---
    def pick(self, exclude: Container[str] = (), key: str | None = None, now: float = 0.0) -> Endpoint | None:
        """An instance that is neither excluded, ejected nor down; when only those are left, any of them
        (Envoy's panic mode: Consul calls the pool healthy, so trying beats answering 503). An instance in
        slow start is passed over with the probability of the share it has not ramped up to yet."""
        ejected, down = self._outliers.ejected, self._down
        if not ejected and not down:
            endpoint = self.balancer.pick(self.endpoints, exclude, in_flight=self.in_flight, key=key)
        else:
            endpoint = self.balancer.pick(
                self.endpoints, _Excluded(exclude, ejected, down), in_flight=self.in_flight, key=key
            )
            if endpoint is None:
                endpoint = self.balancer.pick(self.endpoints, exclude, in_flight=self.in_flight, key=key)
        if endpoint is not None and self._joined and endpoint.key in self._joined:
            return self._ramped(endpoint, exclude, key, now)
        return endpoint

    def _ramped(self, endpoint: Endpoint, exclude: Container[str], key: str | None, now: float) -> Endpoint:
        slow_start = self._policy.slow_start
        ramp = (now - self._joined[endpoint.key]) / slow_start if slow_start > 0 else 1.0
        if ramp >= 1:
            del self._joined[endpoint.key]
        elif self.rng.random() > max(0.1, ramp):
            other = self.balancer.pick(
                self.endpoints, _Excluded(exclude, self._outliers.ejected, (*self._down, endpoint.key)),
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
        if endpoint is None or endpoint.key in exclude or endpoint.key in self._outliers.ejected or (
            endpoint.key in self._down
        ):
            return None
        return endpoint

    # --- the outcome interface: what requests report ---
    def begin(self, now: float) -> None:
        """A request of this service starts (counted for the concurrency limit and the retry budget)."""
        self.active += 1
        self._budget.record_request(now)
        self._touched.add(self.service)

    def end(self, released: Endpoint | None = None) -> None:
        """A request of this service is over; `released`: the instance it held (as `release`, in the same call:
        every request ends, most of them holding one)."""
        self.active -= 1
        if released is not None:
            left = self.in_flight.get(released.key, 0) - 1
            if left > 0:
                self.in_flight[released.key] = left
            else:
                self.in_flight.pop(released.key, None)

    def acquire(self, endpoint: Endpoint) -> None:
        self.in_flight[endpoint.key] = self.in_flight.get(endpoint.key, 0) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self.in_flight.get(endpoint.key, 0) - 1
        if left > 0:
            self.in_flight[endpoint.key] = left
        else:
            self.in_flight.pop(endpoint.key, None)

    def retry_allowed(self, now: float) -> bool:
        """Take one retry from the budget if there is one left."""
        return self._budget.allow(now)

    def readmit(self, now: float) -> Sequence[str]:
        """Instances whose ejection ran out, now back in rotation (keys; usually none)."""
        return self._outliers.readmit_expired(now) if self._outliers.ejected else _NONE

    def failed(self, endpoint: Endpoint, now: float) -> float | None:
        """An attempt on the instance failed (refused, reset, no answer in time): counted against it. Returns
        how long it is ejected for when this failure ejects it."""
        self._errors.add(endpoint.key, now)
        self._touched.add(self.service)
        return self._outliers.failure(endpoint.key, now, len(self.endpoints))

    def answered(self, endpoint: Endpoint, status: int, now: float) -> float | None:
        """The instance answered with `status`. A 5xx counts as a failure when `eject_on_5xx` says so (and
        returns the ejection time if it ejects), else it is only recorded; any other answer is a success."""
        if status >= 500:
            if self._policy.eject_on_5xx:
                return self.failed(endpoint, now)
            self._errors.add(endpoint.key, now)
        self._outliers.success(endpoint.key)
        return None

    def succeeded(self, endpoint: Endpoint) -> None:
        """The instance answered below 500."""
        outliers = self._outliers
        if outliers.counting:  # (most answers: no instance has a failure counted, nothing to reset)
            outliers.success(endpoint.key)

    def upgraded(self, endpoint: Endpoint) -> None:
        """The instance accepted a protocol upgrade (101): a success, and a tunnel now open."""
        self._outliers.success(endpoint.key)
        self.tunnels += 1

    def tunnel_closed(self) -> None:
        self.tunnels -= 1

    def tcp_opened(self, endpoint: Endpoint) -> None:
        """A TCP connection to the instance is open: a success, counted in flight (p2c and least_conn balance
        open connections) until `tcp_closed`."""
        self._outliers.success(endpoint.key)
        self.acquire(endpoint)
        self.tcp_open += 1
        self._touched.add(self.service)

    def tcp_closed(self, endpoint: Endpoint) -> None:
        self.release(endpoint)
        self.tcp_open -= 1

    # --- Ferryman's own active checks ---
    def mark_down(self, key: str, down: bool) -> bool:
        """Take an instance out of rotation (an active check failed) or back in; True when that changed."""
        if down == (key in self._down):
            return False
        if down:
            self._down.add(key)
            self._touched.add(self.service)
        else:
            self._down.discard(key)
        return True

    def clear_down(self) -> None:
        self._down.clear()

    # --- read-only views, for the status page and the state report ---
    def is_down(self, key: str) -> bool:
        return key in self._down

    def recent_errors(self, key: str, now: float) -> int:
        return self._errors.count(key, now)

    @property
    def idle(self) -> bool:
        """Nothing to report beyond its instances: no request, error, ejection, check failure or drain."""
        return not (self.active or self.tunnels or self.tcp_open or self.in_flight or self._outliers.ejected
                    or self._down or self._errors.any() or self.departed)

    def ramping(self, key: str) -> bool:
        """The instance is still in slow start."""
        return key in self._joined

    def draining(self) -> list[Endpoint]:
        """Instances that left the pool while requests to them were in flight, until those finish."""
        current = {e.key for e in self.endpoints}
        for key in [k for k in self.departed if k in current or not self.in_flight.get(k)]:
            del self.departed[key]  # back in the pool, or its last request finished
        return list(self.departed.values())

    def replace_endpoints(self, endpoints: tuple[Endpoint, ...], now: float) -> None:
        """A new set of healthy instances (a reconcile). New ones start their slow start; ones that left with
        requests in flight drain; what is known about the ones that left is forgotten."""
        if self._policy.slow_start > 0:
            known = {e.key for e in self.endpoints}
            for endpoint in endpoints:
                if endpoint.key not in known:
                    self._joined[endpoint.key] = now
        keys = {e.key for e in endpoints}
        for endpoint in self.endpoints:
            if endpoint.key not in keys and self.in_flight.get(endpoint.key):
                self.departed[endpoint.key] = endpoint
        self.endpoints = endpoints
        self._outliers.forget_except(keys)
        self._errors.forget_except(keys)
        self._down &= keys
        for gone in [k for k in self._joined if k not in keys]:
            del self._joined[gone]


def sticky_value(endpoint: Endpoint) -> str:
    """The sticky cookie's value for an instance: a digest of its identity, so no address leaks to clients."""
    return hashlib.blake2b(endpoint.key.encode(), digest_size=8).hexdigest()


def sticky_cookie(
    name: str | None, endpoint: Endpoint | None, pin: str | None, path: str,
) -> tuple[tuple[bytes, bytes], ...]:
    """The Set-Cookie that pins a client to the instance that answered, unless its cookie (`pin`) already does.
    Scoped to the route's path, so two services under one host keep their own pins."""
    if name is None or endpoint is None:
        return ()
    value = sticky_value(endpoint)
    if pin == value:
        return ()
    return ((b"Set-Cookie", f"{name}={value}; Path={path}; HttpOnly; SameSite=Lax".encode()),)


def _apply_policy(pool: Pool, policy: ServicePolicy) -> None:
    """The service's resolved policy onto its pool (the algorithm is the caller's: a change replaces the
    balancer)."""
    pool.sticky = policy.sticky
    pool.max_concurrent = policy.max_concurrent
    pool.max_body = policy.max_body
    pool.read_timeout = policy.read_timeout
    pool.connect_timeout = policy.connect_timeout
    pool.health_path = policy.health_path
    if not pool.health_path:
        pool.clear_down()  # no checks run any more: nothing they found may keep an instance out
    pool.check_scheme = policy.check_scheme
    pool.check_skip_verify = policy.check_skip_verify


class Reconciled(NamedTuple):
    added: list[str]
    removed: list[str]
    changed: list[str]


class Pools:
    def __init__(
        self, overrides: Mapping[str, ServiceSettings] | None = None, policy: HealthPolicy | None = None,
    ) -> None:
        self._pools: dict[str, Pool] = {}
        self._live: dict[tuple[str, int], int] = {}  # (address, port) -> instances of every pool at it
        self._touched: set[str] = set()  # pools that had something to report since they were last idle
        self._gone: set[tuple[str, int]] = set()
        self._overrides = overrides or {}
        self.policy = policy or DEFAULTS.health
        # One generator for every pool and balancer made here: seeding one from the OS costs more than the
        # rest of a pool (10,000 services: a sixth of a second at each worker's start).
        self._rng = random.Random()

    def configure(self, overrides: Mapping[str, ServiceSettings], policy: HealthPolicy) -> None:
        """New per-service tables and policy (a reload); the next reconcile() applies the tables. The pools'
        balancers, in-flight counts and ejections stay."""
        self._overrides = overrides
        self.policy = policy
        for pool in self._pools.values():
            pool.policy = policy

    def get(self, service: str) -> Pool | None:
        return self._pools.get(service)

    def __iter__(self) -> Iterator[Pool]:
        return iter(self._pools.values())

    def __len__(self) -> int:
        return len(self._pools)

    def reconcile(self, snapshot: Snapshot, now: float = 0.0) -> Reconciled:
        """Every service of `snapshot`: pools made, updated, and dropped for services no longer in it."""
        seen = set(snapshot.names)
        return self.update(SnapshotDelta(snapshot.services, tuple(n for n in self._pools if n not in seen)), now)

    def update(self, delta: SnapshotDelta, now: float = 0.0) -> Reconciled:
        """Only the services `delta` names: its cost follows the change, not the number of services."""
        added: list[str] = []
        changed: list[str] = []
        defaults = ServiceDefaults(max_concurrent=self.policy.service_max_concurrent)
        for svc in delta.changed:
            resolved = service_policy(svc, self._overrides.get(svc.name), defaults)
            algorithm = resolved.algorithm
            pool = self._pools.get(svc.name)
            if pool is None:
                pool = self._pools[svc.name] = Pool(
                    svc.name, svc.endpoints, make_balancer(algorithm, self._rng), algorithm=algorithm,
                    hash_on=resolved.hash_on, policy=self.policy, rng=self._rng, touched=self._touched,
                )
                _apply_policy(pool, resolved)
                self._count(svc.endpoints, 1)
                added.append(svc.name)
                continue
            _apply_policy(pool, resolved)
            if pool.algorithm != algorithm:
                pool.algorithm = algorithm
                pool.balancer = make_balancer(algorithm, self._rng)
                changed.append(svc.name)
            pool.hash_on = resolved.hash_on
            if pool.endpoints != svc.endpoints:
                self._count(pool.endpoints, -1)
                self._count(svc.endpoints, 1)
                pool.replace_endpoints(svc.endpoints, now)
                if not changed or changed[-1] != svc.name:
                    changed.append(svc.name)
        removed = [name for name in delta.removed if name in self._pools]
        for name in removed:
            self._count(self._pools.pop(name).endpoints, -1)
        return Reconciled(added, removed, changed)

    def touched(self) -> list[Pool]:
        """The pools with something to report (requests, errors, ejections, draining); those that became idle
        again are forgotten after this call reports them once more."""
        pools = [p for name in sorted(self._touched) if (p := self._pools.get(name)) is not None]
        self._touched.intersection_update(p.service for p in pools if not p.idle)
        return pools

    def _count(self, endpoints: tuple[Endpoint, ...], step: int) -> None:
        live = self._live
        for e in endpoints:
            address = (e.address, e.port)
            left = live.get(address, 0) + step
            if left > 0:
                live[address] = left
            else:
                live.pop(address, None)
                self._gone.add(address)

    @property
    def live(self) -> Container[tuple[str, int]]:
        """(address, port) of every instance some pool holds (updated in place)."""
        return self._live.keys()

    def take_gone(self) -> set[tuple[str, int]]:
        """Addresses no pool sends to any more since the last call (their idle connections can close)."""
        gone, self._gone = {a for a in self._gone if a not in self._live}, set()
        return gone
