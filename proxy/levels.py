"""One host level of the routing table: its routes by path, and how a request path finds the route it takes.

A level keeps `exact=true` routes by path and prefix routes by path; a lookup tries the exact path, then walks
the request path's own prefixes from the longest down (`/a/b/c`, `/a/b`, `/a`, `/`), so its cost grows with
the path's depth, not with the number of routes. Routes whose path is a pattern (Fabio's `glob` and `iprefix`
matchers) cannot be found by a dictionary: a level holding any is a `PatternLevel`, which tries its routes in
Fabio's order, every path text in reverse lexicographic order (`/foo/bar`, `/foo/*`, `/foo`, `/*`; among
prefixes that is the longest first, so the prefix routes keep their order), a prefix and a pattern with the
same text the prefix first. A level without patterns is a plain `Level`, whose lookup is not touched by them.
At one path, routes are tried in the order the table gives (more conditions first, then priority, then
service name). Pure values, built by the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .table import RequestLike, Route

# What a level's routes at one place are keyed by: "exact", "prefix", "iprefix" or "glob", and the path text.
Place = tuple[str, str]
Routes = tuple["Route", ...]


def path_prefixes(path: str) -> Iterable[str]:
    """`/a/b/c` -> `/a/b/c`, `/a/b`, `/a`, `/` (a trailing slash is not a segment of its own)."""
    p = path.rstrip("/") or "/"
    while True:
        yield p
        if p == "/":
            return
        cut = p.rfind("/")
        p = p[:cut] if cut > 0 else "/"


def _first(routes: Routes, req: RequestLike | None, port: int) -> tuple[Route | None, bool]:
    """The first of `routes` whose conditions hold, and whether a condition took part."""
    conditional = False
    for route in routes:
        conditional = conditional or route.gated
        if route.accepts(req, port):
            return route, conditional
    return None, conditional


@dataclass(frozen=True, slots=True)
class Level:
    """One host level's routes: by exact path and by path prefix."""

    exact: Mapping[str, Routes]
    prefix: Mapping[str, Routes]

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefix)

    def places(self) -> dict[Place, Routes]:
        """Every place of the level and its routes (to build the next level from)."""
        places: dict[Place, Routes] = {("exact", path): routes for path, routes in self.exact.items()}
        places.update((("prefix", path), routes) for path, routes in self.prefix.items())
        return places

    def at(self, place: Place) -> Routes:
        """The routes at one place (none: an empty tuple)."""
        mode, path = place
        return (self.exact if mode == "exact" else self.prefix if mode == "prefix" else {}).get(path, ())

    def match(self, path: str, req: RequestLike | None, port: int) -> tuple[Route | None, bool]:
        """(route, whether a condition took part in the answer)."""
        conditional = False
        candidates = self.exact.get(path) if self.exact else None
        if candidates is not None:
            for route in candidates:
                conditional = conditional or route.gated
                if route.accepts(req, port):
                    return route, conditional
        prefix = self.prefix
        for p in path_prefixes(path):
            candidates = prefix.get(p)
            if candidates is not None:
                for route in candidates:
                    conditional = conditional or route.gated
                    if route.accepts(req, port):
                        return route, conditional
        return None, conditional


@dataclass(frozen=True, slots=True)
class PatternLevel(Level):
    """A level with glob or iprefix routes besides (or instead of) exact and prefix ones."""

    patterns: Mapping[Place, Routes] = field(default_factory=lambda: MappingProxyType({}))
    # The patterns in the order they are tried: path text descending, then by matcher.
    ordered: tuple[tuple[str, Routes], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        order = sorted(self.patterns.items(), key=lambda item: (item[0][1], item[0][0]), reverse=True)
        object.__setattr__(self, "ordered", tuple((place[1], routes) for place, routes in order))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefix or self.patterns)

    def places(self) -> dict[Place, Routes]:
        return {**Level.places(self), **self.patterns}

    def at(self, place: Place) -> Routes:
        return self.patterns.get(place, ()) if place[0] not in ("exact", "prefix") else Level.at(self, place)

    def match(self, path: str, req: RequestLike | None, port: int) -> tuple[Route | None, bool]:
        conditional = False
        candidates = self.exact.get(path)
        if candidates is not None:
            route, conditional = _first(candidates, req, port)
            if route is not None:
                return route, conditional
        prefixes = [p for p in path_prefixes(path) if p in self.prefix]  # longest first: text descending
        taken = 0
        folded = path.lower()
        for text, routes in self.ordered:
            while taken < len(prefixes) and prefixes[taken] >= text:
                route, cond = _first(self.prefix[prefixes[taken]], req, port)
                conditional = conditional or cond
                if route is not None:
                    return route, conditional
                taken += 1
            if routes[0].matches(path, folded):
                route, cond = _first(routes, req, port)
                conditional = conditional or cond
                if route is not None:
                    return route, conditional
        for p in prefixes[taken:]:
            route, cond = _first(self.prefix[p], req, port)
            conditional = conditional or cond
            if route is not None:
                return route, conditional
        return None, conditional


def make_level(places: Mapping[Place, Routes]) -> Level:
    """The level holding these places (empty ones left out): a PatternLevel when any is a pattern."""
    exact = {path: routes for (mode, path), routes in places.items() if mode == "exact" and routes}
    prefix = {path: routes for (mode, path), routes in places.items() if mode == "prefix" and routes}
    patterns = {place: routes for place, routes in places.items() if place[0] not in ("exact", "prefix") and routes}
    if patterns:
        return PatternLevel(MappingProxyType(exact), MappingProxyType(prefix), MappingProxyType(patterns))
    return Level(MappingProxyType(exact), MappingProxyType(prefix))
