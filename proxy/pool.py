"""One long-lived Pool per service: its current endpoints, its balancer, its in-flight counts.

Pools outlive routing tables. `Pools.reconcile(snapshot)` updates the endpoints of existing pools in place,
creates pools for new services and drops pools of services that left, so balancer state (the round-robin
position, smooth-WRR weights) survives every table swap. The algorithm comes from the service's route tags
(`lb=`, default p2c; `hash_key=` for `hash`); when a service's routes disagree the first by host and path
wins and the disagreement is reported. A changed algorithm replaces the balancer.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from typing import NamedTuple

from discovery.model import Endpoint, RouteSpec, Snapshot

from .balancer import DEFAULT_BALANCER, Balancer, make_balancer


class Pool:
    __slots__ = ("algorithm", "balancer", "endpoints", "hash_on", "in_flight", "service")

    def __init__(
        self,
        service: str,
        endpoints: tuple[Endpoint, ...] = (),
        balancer: Balancer | None = None,
        *,
        algorithm: str = "round_robin",
        hash_on: tuple[str, str] | None = None,
    ) -> None:
        self.service = service
        self.endpoints = endpoints
        self.algorithm = algorithm
        self.balancer: Balancer = balancer or make_balancer(algorithm)
        # What the `hash` algorithm hashes: ("ip", ""), ("header", name) or ("cookie", name); None otherwise.
        self.hash_on = hash_on
        self.in_flight: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.endpoints)

    def pick(self, exclude: Container[str] = (), key: str | None = None) -> Endpoint | None:
        return self.balancer.pick(self.endpoints, exclude, in_flight=self.in_flight, key=key)

    def acquire(self, endpoint: Endpoint) -> None:
        self.in_flight[endpoint.key] = self.in_flight.get(endpoint.key, 0) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self.in_flight.get(endpoint.key, 0) - 1
        if left > 0:
            self.in_flight[endpoint.key] = left
        else:
            self.in_flight.pop(endpoint.key, None)


def balancing_of(routes: Iterable[RouteSpec]) -> tuple[str, tuple[str, str] | None]:
    """The algorithm and hash key a service's routes ask for (the first route that says, in table order)."""
    algorithm = DEFAULT_BALANCER
    hash_key = "ip"
    for spec in routes:
        lb = spec.option("lb")
        if lb is not None:
            algorithm = lb
            hash_key = spec.option("hash_key") or "ip"
            break
    if algorithm != "hash":
        return algorithm, None
    kind, _, name = hash_key.partition(":")
    return algorithm, (kind, name.lower() if kind == "header" else name)


class Reconciled(NamedTuple):
    added: list[str]
    removed: list[str]
    changed: list[str]


class Pools:
    def __init__(self) -> None:
        self._pools: dict[str, Pool] = {}

    def get(self, service: str) -> Pool | None:
        return self._pools.get(service)

    def __iter__(self) -> Iterator[Pool]:
        return iter(self._pools.values())

    def __len__(self) -> int:
        return len(self._pools)

    def reconcile(self, snapshot: Snapshot) -> Reconciled:
        added: list[str] = []
        changed: list[str] = []
        seen: set[str] = set()
        for svc in snapshot.services:
            seen.add(svc.name)
            algorithm, hash_on = balancing_of(svc.routes)
            pool = self._pools.get(svc.name)
            if pool is None:
                self._pools[svc.name] = Pool(svc.name, svc.endpoints, algorithm=algorithm, hash_on=hash_on)
                added.append(svc.name)
                continue
            if pool.algorithm != algorithm:
                pool.algorithm = algorithm
                pool.balancer = make_balancer(algorithm)
                changed.append(svc.name)
            pool.hash_on = hash_on
            if pool.endpoints != svc.endpoints:
                pool.endpoints = svc.endpoints
                if not changed or changed[-1] != svc.name:
                    changed.append(svc.name)
        removed = [name for name in self._pools if name not in seen]
        for name in removed:
            del self._pools[name]
        return Reconciled(added, removed, changed)
