"""A routed world for dispatch tests: tags and instance counts in, the table and pools a request is planned on;
and the fake loop exchanges run on in process."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.access import AccessRules
from proxy.auth import Realms
from proxy.headers import TrustedProxies
from proxy.pool import Pools
from proxy.table import RoutingTable
from proxy.tls import HttpsRedirect


@dataclass(frozen=True)
class Limits:
    """What plan() reads of a listener's limits."""

    redirect: HttpsRedirect | None = None
    max_body: int = 0
    trusted: TrustedProxies | None = None
    access: AccessRules | None = None
    realms: Realms | None = None


def ep(service: str, i: int) -> Endpoint:
    return Endpoint(service, f"{service}-{i}", "127.0.0.1", 9000 + i)


def world(**services: tuple[list[str], int]) -> tuple[RoutingTable, Pools]:
    """{service: ([route tags], healthy instances)} -> the table and the pools of that world."""
    snapshot = Snapshot(tuple(
        ServiceRoutes(name, tuple(parse_route_tag(t) for t in tags), tuple(ep(name, i) for i in range(n)))
        for name, (tags, n) in sorted(services.items())
    ))
    pools = Pools()
    pools.reconcile(snapshot)
    return RoutingTable.from_snapshot(snapshot), pools


class FakeLoop:
    """The two things an exchange asks of its loop: the time, and a task to open a connection (run by the test)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.tasks: list[Coroutine[Any, Any, None]] = []

    def time(self) -> float:
        return self.now

    def create_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(coro)

    def run_tasks(self) -> None:
        while self.tasks:
            coro = self.tasks.pop(0)
            with pytest.raises(StopIteration):
                coro.send(None)
