"""Load-balancing strategies: small objects with `pick`, no I/O, deterministic under test.

A balancer chooses among a pool's endpoints, skipping those in `exclude` (instances already tried for this
request). State such as the round-robin position lives in the balancer, which lives in the long-lived Pool,
so a routing-table swap does not reset it.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol

from discovery.model import Endpoint


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], exclude: Container[str] = ()) -> Endpoint | None: ...


class RoundRobin:
    """Each endpoint in turn. The cursor is an ever-growing counter taken modulo the current size, so a pool
    that grows or shrinks keeps rotating without restarting at the first instance."""

    __slots__ = ("_cursor",)

    def __init__(self, start: int = 0) -> None:
        self._cursor = start

    def pick(self, endpoints: Sequence[Endpoint], exclude: Container[str] = ()) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        for _ in range(n):
            endpoint = endpoints[self._cursor % n]
            self._cursor += 1
            if endpoint.key not in exclude:
                return endpoint
        return None
