"""Value types that cross from discovery into the proxy.

Everything here is frozen and slotted: a Snapshot is built once, compared with the previous one (equal
snapshots are dropped) and then only read. Tuples, never lists or dicts, so equality and hashing are cheap
and nothing downstream can mutate what the watcher handed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One healthy instance of a service: where to send requests."""

    service: str
    instance_id: str
    address: str
    port: int
    node: str = ""
    weight: int = 1
    # The datacenter it was read from when several are followed (`consul_dc = "dc1,dc2"`); "" with one.
    dc: str = ""
    # Derived once, read on every request: the identity across snapshots (Consul service IDs are unique per
    # node, node names per datacenter: dc/node/id with several, node/id with one) and host:port for the wire,
    # IPv6 literals in brackets (RFC 3986 §3.2.2).
    key: str = field(init=False, compare=False, repr=False)
    authority: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = f"{self.node}/{self.instance_id}"
        object.__setattr__(self, "key", f"{self.dc}/{key}" if self.dc else key)
        host = f"[{self.address}]" if ":" in self.address else self.address
        object.__setattr__(self, "authority", f"{host}:{self.port}")


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What one route tag declares: host (lower case, no port; "" = any host), path prefix, options."""

    host: str
    path: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None

    @property
    def strip(self) -> str | None:
        return self.option("strip")


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    """A routed service: the routes its tags declare and its instances that pass every check."""

    name: str
    routes: tuple[RouteSpec, ...]
    endpoints: tuple[Endpoint, ...]
    # Balancing settings from the instances' service meta (`ferryman-lb` -> ("lb", ...)), already validated.
    settings: tuple[tuple[str, str], ...] = ()

    def setting(self, name: str) -> str | None:
        for key, value in self.settings:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Problem:
    """A bad item that was skipped while building a snapshot (logged, never fatal)."""

    kind: str
    service: str
    detail: str
    item: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole routed world at one moment, sorted by service name so equal worlds compare equal."""

    services: tuple[ServiceRoutes, ...] = ()
    problems: tuple[Problem, ...] = field(default=(), compare=False)

    def service(self, name: str) -> ServiceRoutes | None:
        for svc in self.services:
            if svc.name == name:
                return svc
        return None
