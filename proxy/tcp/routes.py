"""Which route a TCP or TLS pass-through connection takes: by the listener's port, or by a server name.

`TcpRoutes.of(table)` indexes a routing table's TCP routes (proto=tcp; in the table's index, in no HTTP slot):
`urlprefix-:PORT proto=tcp` by port, `urlprefix-NAME/ proto=tcp` by name, `*.suffix` by suffix. A name is
matched exactly first, then by its wildcards from the longest suffix down (`*.example.com` takes
`a.example.com` and `a.b.example.com`, not `example.com`), as HTTP hosts are. `RouteCache` rebuilds the index
when the router's table is replaced, once per table. `TcpListening` says which TCP routes no listener of
this configuration can take (a port without a tcp_listen listener, a name without an SNI or pass-through
listener): logged once when such a route appears, and shown on /api/routes. Pure but for that one cached value.
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


@dataclass(frozen=True, slots=True)
class TcpListening:
    """What the configured listeners take: TCP routes by these ports, named ones when `names` (sni_listen or
    tls_passthrough)."""

    ports: frozenset[int] = frozenset()
    names: bool = False

    def missing(self, route: Route) -> str | None:
        """Why no listener takes a TCP route, None when one does (or it is no TCP route)."""
        if route.scheme != "tcp" or route.path:
            return None
        if not route.host:
            return None if route.port in self.ports else f"no TCP listener on port {route.port} (tcp_listen)"
        return None if self.names else "no listener routes by server name (sni_listen, tls_passthrough)"

    def unlistened(self, table: RoutingTable) -> dict[str, str]:
        """The TCP routes of `table` no listener takes, by route id, with why."""
        out = {}
        for route in table.index.winners():
            why = self.missing(route)
            if why is not None:
                out[route.id] = why
        return out


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
