"""Which route a TCP or TLS pass-through connection takes: by the listener's port, or by a server name.

`TcpRoutes.of(table)` indexes a routing table's TCP routes (proto=tcp; in the table's index, in no HTTP slot):
`urlprefix-:PORT proto=tcp` by port, `urlprefix-NAME/ proto=tcp` by name, `*.suffix` by suffix. A name is
matched exactly first, then by its wildcards from the longest suffix down (`*.example.com` takes
`a.example.com` and `a.b.example.com`, not `example.com`), as HTTP hosts are. `RouteCache` rebuilds the index
when the router's table is replaced, once per table. Pure but for that one cached value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..table import Route, RoutingTable


@dataclass(frozen=True, slots=True)
class TcpRoutes:
    by_port: Mapping[int, Route] = field(default_factory=lambda: MappingProxyType({}))
    by_name: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))
    by_suffix: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))  # ".example.com"

    @classmethod
    def of(cls, table: RoutingTable) -> TcpRoutes:
        by_port: dict[int, Route] = {}
        by_name: dict[str, Route] = {}
        by_suffix: dict[str, Route] = {}
        for route in table.index.winners():
            if route.path or route.scheme != "tcp":
                continue
            if not route.host:
                by_port[route.port] = route
            elif route.host.startswith("*."):
                by_suffix[route.host[1:]] = route
            else:
                by_name[route.host] = route
        return cls(MappingProxyType(by_port), MappingProxyType(by_name), MappingProxyType(by_suffix))

    def for_port(self, port: int) -> Route | None:
        return self.by_port.get(port)

    def for_name(self, name: str) -> Route | None:
        """The route of a server name: exact, then `*.` wildcards from the longest suffix down."""
        route = self.by_name.get(name)
        if route is not None or not self.by_suffix:
            return route
        dot = name.find(".")
        while dot >= 0:
            route = self.by_suffix.get(name[dot:])
            if route is not None:
                return route
            dot = name.find(".", dot + 1)
        return None


class RouteCache:
    """The TcpRoutes of the router's current table, rebuilt when the table is replaced."""

    __slots__ = ("_for", "_routes")

    def __init__(self) -> None:
        self._for: RoutingTable | None = None
        self._routes = TcpRoutes()

    def of(self, table: RoutingTable) -> TcpRoutes:
        if table is not self._for:
            self._routes, self._for = TcpRoutes.of(table), table
        return self._routes
