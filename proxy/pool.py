"""One long-lived Pool per service: its current endpoints, its balancer, its in-flight counts.

Pools outlive routing tables. `Pools.reconcile(snapshot)` updates the endpoints of existing pools in place,
creates pools for new services and drops pools of services that left, so balancer state (the round-robin
position) survives every table swap.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import NamedTuple

from discovery.model import Endpoint, Snapshot

from .balancer import Balancer, RoundRobin


class Pool:
    __slots__ = ("balancer", "endpoints", "in_flight", "service")

    def __init__(self, service: str, endpoints: tuple[Endpoint, ...] = (), balancer: Balancer | None = None):
        self.service = service
        self.endpoints = endpoints
        self.balancer: Balancer = balancer or RoundRobin()
        self.in_flight: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.endpoints)

    def pick(self, exclude: Container[str] = ()) -> Endpoint | None:
        return self.balancer.pick(self.endpoints, exclude)

    def acquire(self, endpoint: Endpoint) -> None:
        self.in_flight[endpoint.key] = self.in_flight.get(endpoint.key, 0) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self.in_flight.get(endpoint.key, 0) - 1
        if left > 0:
            self.in_flight[endpoint.key] = left
        else:
            self.in_flight.pop(endpoint.key, None)


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
            pool = self._pools.get(svc.name)
            if pool is None:
                self._pools[svc.name] = Pool(svc.name, svc.endpoints)
                added.append(svc.name)
            elif pool.endpoints != svc.endpoints:
                pool.endpoints = svc.endpoints
                changed.append(svc.name)
        removed = [name for name in self._pools if name not in seen]
        for name in removed:
            del self._pools[name]
        return Reconciled(added, removed, changed)
