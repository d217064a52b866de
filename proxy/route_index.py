"""Which declaration of a route wins, kept so that one service's change costs work for that service only.

Every route source declares routes (`RoutePart`s: Consul KV, the config file, service tags and meta). Routes
with the same identity (host, path, exact, methods, conditions) compete: the claim with the best rank wins
(source precedence, then service name among tags, then the order within the part) and the others are
conflicts. A `RouteIndex` holds every claim by identity, in rank order. `replace_service` swaps one service's
tag claims and says which identities it touched, so the routing table rebuilds only those slots. Pure: values
in, values out (copy on write; a 10,000-route index copies in well under a millisecond).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from discovery.matchers import Condition
from discovery.model import Problem

if TYPE_CHECKING:
    from .table import Route, RoutePart

# (host, path, exact, methods, conditions): two routes with the same identity cannot both be matched.
Identity = tuple[str, str, bool, frozenset[str], tuple[Condition, ...]]
# (source precedence, service among tags or "" for a declared part, position within the service or part)
Rank = tuple[int, str, int]

# Route sources in order of precedence: when two declare the same host, path and conditions, the first wins
# (an operator's runtime override in Consul KV, then the config file's [[routes]], then service tags and meta).
SOURCES: Final = ("kv", "file", "tags")
TAGS: Final = SOURCES.index("tags")


def identity(route: Route) -> Identity:
    return (route.host, route.path, route.exact, route.methods, route.conditions)


@dataclass(frozen=True, slots=True)
class Claim:
    rank: Rank
    route: Route


def _ranked(claims: Iterable[Claim]) -> tuple[Claim, ...]:
    return tuple(sorted(claims, key=lambda c: c.rank))


@dataclass(frozen=True, slots=True)
class RouteIndex:
    claims: Mapping[Identity, tuple[Claim, ...]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, parts: Iterable[RoutePart]) -> RouteIndex:
        by_identity: dict[Identity, list[Claim]] = {}
        for part in parts:
            source = SOURCES.index(part.source)
            for position, route in enumerate(part.routes):
                service = route.service if source == TAGS else ""
                by_identity.setdefault(identity(route), []).append(Claim((source, service, position), route))
        return cls(MappingProxyType({key: _ranked(claims) for key, claims in by_identity.items()}))

    def winner(self, key: Identity) -> Route | None:
        claims = self.claims.get(key)
        return claims[0].route if claims else None

    def winners(self) -> Iterator[Route]:
        for claims in self.claims.values():
            yield claims[0].route

    def __len__(self) -> int:
        return len(self.claims)

    def conflicts(self, keys: Iterable[Identity] | None = None) -> tuple[Problem, ...]:
        """A `route_conflict` for each claim that lost (of `keys`, or of every identity)."""
        problems = []
        for key in self.claims if keys is None else keys:
            claims = self.claims.get(key, ())
            for lost in claims[1:]:
                winner = claims[0].route
                problems.append(Problem("route_conflict", lost.route.service,
                                        f"{lost.route.host}{lost.route.path} already routed to {winner.service}",
                                        lost.route.id))
        return tuple(problems)

    def replace_service(
        self, service: str, old: Iterable[Identity], new: Iterable[Route],
    ) -> tuple[RouteIndex, set[Identity]]:
        """The index with `service`'s tag claims replaced by `new` (in the service's order), and the identities
        whose claims changed. `old` are the identities the service claimed before."""
        claims = dict(self.claims)
        touched: set[Identity] = set()
        for key in old:
            kept = tuple(c for c in claims.get(key, ()) if not (c.rank[0] == TAGS and c.rank[1] == service))
            touched.add(key)
            if kept:
                claims[key] = kept
            else:
                claims.pop(key, None)
        for position, route in enumerate(new):
            key = identity(route)
            touched.add(key)
            claims[key] = _ranked((*claims.get(key, ()), Claim((TAGS, service, position), route)))
        return RouteIndex(MappingProxyType(claims)), touched
