"""The routing table: an immutable index from (host, path) to a Route, built from a Snapshot.

Lookup order, most specific first:
1. exact host (case-insensitive, port ignored), then `*.suffix` wildcards from the longest suffix down
   (`*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`), then routes for any
   host. A host level that has no route for the request falls through to the next level.
2. within a level, an exact path (`exact=true`) first, then the longest path prefix on a segment boundary:
   `/api` matches `/api` and `/api/x`, never `/apix`. Each level is a dict keyed by path, and a lookup walks
   the path's own prefixes from the longest down, so its cost grows with the path's depth, not with the
   number of routes. Glob and iprefix routes (Fabio's matchers) join in Fabio's order: see levels.py.
3. at one path, routes with more conditions (method, header, cookie, query, a listener port) first, then the
   higher `priority`, then by service name; the first whose conditions all hold wins, else the next path.

TCP routes (proto=tcp, path "") are in the index, so /api/routes lists them, but in no slot: HTTP requests
never match them; proxy/tcp/routes.py indexes them by listener port and by TLS server name.

Routes come from three sources, each a whole `RoutePart` of the `RoutedWorld` a table is built from: Consul KV,
the config file's [[routes]], service tags and meta. `merge_routes` (pure) takes them in that order of
precedence; two declarations of the same host, path and conditions by different sources are a conflict: the
first wins and the other is reported. Among tags, services that declare the same route share it, as in Fabio
(blue/green under one tag): the route holds each service's own route as a side (`shares`), and a request draws
a side by instance count or by the sides' `weight=` (dispatch). Pure: built from values, no I/O; swapped into the
router as a whole. Answers that no condition took part in are memoized.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol

from discovery.globs import compile_glob
from discovery.matchers import Condition, holds
from discovery.model import Problem, RouteSpec, ServiceRoutes, Snapshot, SnapshotDelta

from .access import AccessRules
from .headers import HeaderRules
from .levels import Level, Place, make_level
from .route_index import SOURCES, Identity, RouteIndex, identity

if TYPE_CHECKING:
    from .config import ConfigRoute


class RequestLike(Protocol):
    """What conditions read of a request (the server's Request)."""

    method: str
    headers: list[tuple[bytes, bytes]]
    target: bytes


def route_id(service: str, host: str, path: str, exact: bool, methods: frozenset[str],
             conditions: tuple[Condition, ...], port: int = 0, matcher: str = "prefix") -> str:
    """`web@*any*/api`, and for a route with conditions their text: `web@*any*/api[exact,GET,header:x-canary:1]`;
    a listener port after the host: `web@shop.example.com:80/`; a glob or iprefix route says so:
    `web@*any*/api/*[glob]`. Bounded by the routes declared, so usable as a metric label."""
    how = ["exact"] if exact else [] if matcher == "prefix" else [matcher]
    parts = how + (["|".join(sorted(methods))] if methods else []) + [
        f"{c.kind}:{c.text()}" for c in conditions
    ]
    where = f"{host or '*any*'}{f':{port}' if port else ''}{path}"
    return f"{service}@{where}" + (f"[{','.join(parts)}]" if parts else "")


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    service: str
    host: str
    path: str
    strip: str | None = None
    scheme: str = "http"
    tls_skip_verify: bool = False
    max_body: int = 0  # request body limit in bytes (tag option maxbody=); 0: the service's or the global one
    sni: str = ""  # TLS server name for proto=https and grpcs upstreams (tag option sni=); "": the instance's address
    exact: bool = False  # the path must be the whole request path, not a prefix
    methods: frozenset[str] = frozenset()  # empty: any method
    conditions: tuple[Condition, ...] = ()  # header, cookie and query conditions, all of which must hold
    priority: int = 0
    redirect: tuple[int, str] | None = None  # (status, target with $path): answered by the proxy itself
    # [[routes]] of the config file: a weighted split over services (cumulative weights), header rules.
    split: tuple[tuple[str, int], ...] = ()
    request_rules: HeaderRules | None = None
    response_rules: HeaderRules | None = None
    prepend: str = ""  # added in front of the path sent upstream (tag option prepend=, Fabio's)
    upstream_host: str = ""  # the Host sent upstream (tag option host=); "": the client's; "dst": the instance's
    rewrite: tuple[re.Pattern[str], str] | None = None  # the config file's regular-expression rewrite
    # The instances this route may use when only some of the service's instances declare it (routes are per
    # instance, as in Fabio); None: every instance of the service.
    members: frozenset[str] | None = None
    port: int = 0  # the listener port the route is restricted to (`host:80/`); 0: any
    access: AccessRules | None = None  # allow= / deny=: who may use the route
    weight: float = 0.0  # weight=: this service's fixed share of a shared route (0: by instance count)
    shares: tuple[Route, ...] = ()  # a route several services declare: each one's own route (a side)
    matcher: str = "prefix"  # how `path` matches: prefix, iprefix or glob (discovery.tags, Fabio's matchers)
    auth: str | None = None  # auth=: the basic-authentication realm every request must pass (proxy/auth.py)
    gzip: bool | None = None  # gzip=on/off: compress answers whatever gzip_content_type says; None: as it says
    proxy_protocol: int = 0  # a TCP route's pxyproto=: the PROXY header version sent to instances (0: none)
    # Read on every request, so computed once: the Host as bytes, whether the target is rewritten at all,
    # whether the Host is the instance's address, and whether anything beyond host and path decides a match.
    upstream_host_bytes: bytes = field(default=b"", compare=False, repr=False)
    rewrites: bool = field(default=False, compare=False, repr=False)
    host_dst: bool = field(default=False, compare=False, repr=False)
    strip_bytes: bytes = field(default=b"", compare=False, repr=False)  # X-Forwarded-Prefix
    gated: bool = field(default=False, compare=False, repr=False)
    # A glob route's compiled pattern; an iprefix route's path in lower case.
    glob: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    folded: str = field(default="", compare=False, repr=False)
    grpc: bool = field(default=False, compare=False, repr=False)  # proto=grpc(s): HTTP/2 to the instances

    def __post_init__(self) -> None:
        object.__setattr__(self, "grpc", self.scheme == "grpc" or self.scheme == "grpcs")
        if self.matcher == "glob":
            object.__setattr__(self, "glob", compile_glob(self.path))
        elif self.matcher == "iprefix":
            object.__setattr__(self, "folded", self.path.lower())
        dst = self.upstream_host == "dst"
        object.__setattr__(self, "host_dst", dst)
        object.__setattr__(self, "strip_bytes", (self.strip or "").encode("latin-1"))
        object.__setattr__(self, "upstream_host_bytes", b"" if dst else self.upstream_host.encode("ascii"))
        object.__setattr__(self, "rewrites", bool(self.strip or self.prepend or self.rewrite))
        object.__setattr__(self, "gated", bool(self.methods or self.conditions or self.port))

    @classmethod
    def from_spec(cls, service: str, spec: RouteSpec, members: frozenset[str] | None = None) -> Route:
        options = spec.options  # parsed and checked by discovery.tags: read, never parsed again
        return cls(
            id=route_id(service, spec.host, spec.path, options.exact, options.methods, options.conditions, spec.port,
                        options.matcher),
            service=service,
            host=spec.host,
            path=spec.path,
            strip=options.strip,
            scheme=options.proto,
            tls_skip_verify=options.tls_skip_verify,
            max_body=options.max_body,
            sni=options.sni or "",
            exact=options.exact,
            methods=options.methods,
            conditions=options.conditions,
            priority=options.priority,
            redirect=options.redirect,
            prepend=options.prepend or "",
            upstream_host=options.host or "",
            members=members,
            port=spec.port,
            access=AccessRules.from_option(options.access),
            weight=options.weight,
            matcher=options.matcher,
            auth=options.auth,
            gzip=options.gzip,
            proxy_protocol=options.proxy_protocol,
        )

    @classmethod
    def from_config(cls, config: ConfigRoute) -> Route:
        names = [name for name, _ in config.services]
        route = cls.from_spec(names[0], config.spec)
        split: tuple[tuple[str, int], ...] = ()
        if len(config.services) > 1:
            total = 0
            cumulative = []
            for name, weight in config.services:
                total += weight
                cumulative.append((name, total))
            split = tuple(cumulative)
        return replace(
            route, id=route.id if not split else "+".join(names) + route.id[len(names[0]):], split=split,
            request_rules=config.request or None, response_rules=config.response or None, rewrite=config.rewrite,
        )

    def pick_service(self, draw: float) -> str:
        """The service of a split for a draw in [0, 1): weighted by the split's weights."""
        total = self.split[-1][1]
        point = draw * total
        for name, upto in self.split:
            if point < upto:
                return name
        return self.split[-1][0]

    def shared_with(self, other: Route) -> Route:
        """This route shared with another service's declaration of it (Fabio's several targets of one route):
        each side keeps its own options; every side carries the shared id (`a+b@host/path`)."""
        sides = (*(self.shares or (self,)), other)
        services = "+".join(side.service for side in sides)
        shared_id = services + self.id[self.id.index("@"):]
        sides = tuple(replace(side, id=shared_id) for side in sides)
        # Authentication is checked before a side is drawn: one side asking for it guards the whole route, so
        # no share of its traffic is ever served without it.
        auth = next((side.auth for side in sides if side.auth is not None), None)
        return replace(sides[0], shares=sides, auth=auth)

    def location(self, path: str, query: str, host: str) -> bytes:
        """A redirect route's Location, as Fabio builds it: `$path` is the request's path with `strip` removed
        and `prepend` added (a `/` written just before `$path` is dropped: the path brings its own), the query
        is kept unless the target has its own, and `$host` is the request's Host."""
        assert self.redirect is not None
        target = self.redirect[1]
        if "$path" in target:
            if self.strip and path.startswith(self.strip):
                path = path[len(self.strip):]
            if self.prepend:
                path = self.prepend + path
            target = target.replace("/$path", "$path", 1)
            location = target.replace("$path", path, 1)
            if query and "?" not in target:
                location += "?" + query
        else:
            location = target
        if "$host" in location:
            location = location.replace("$host", host, 1)
        location = _with_path(location)
        if location.startswith("//"):
            # `/$path` with a request for `//evil.example/` would be a protocol-relative URL: another site.
            location = "/" + location.lstrip("/")
        return location.encode("latin-1")

    def matches(self, path: str, folded: str) -> bool:
        """Whether a glob or iprefix route's path matches the request's (`folded`: it in lower case). A glob
        matches the whole path; an iprefix matches on a segment boundary, as a prefix route does."""
        if self.glob is not None:
            return self.glob.fullmatch(path) is not None
        mine = self.folded
        return mine == "/" or folded == mine or folded.startswith(mine + "/")

    def accepts(self, req: RequestLike | None, port: int = 0) -> bool:
        """Whether the request meets every condition (always, for a route without any). Without a request to
        look at (an admin query), a route with conditions does not match; a route restricted to a listener
        port matches only requests that arrived on it."""
        if not self.gated:
            return True
        if self.port and self.port != port:
            return False
        if not self.methods and not self.conditions:
            return True
        if req is None:
            return False
        if self.methods and req.method not in self.methods:
            return False
        return all(holds(c, req.headers, req.target) for c in self.conditions)

    @property
    def specificity(self) -> tuple[int, int]:
        return (len(self.conditions) + (1 if self.methods else 0) + (1 if self.port else 0), self.priority)

    def upstream_target(self, target: str) -> str:
        """The request target sent upstream (its path already normalized, see `normalize_path`), with the
        route's rewrites in this order: the `strip` prefix removed, the `prepend` prefix added, the config
        file's `rewrite` (a regular expression on the path, first match) applied."""
        strip = self.strip
        if not strip and not self.prepend and not self.rewrite:
            return target
        path, qmark, query = target.partition("?")
        if strip:
            if path == strip or path.startswith(strip + "/"):
                path = path[len(strip) :] or "/"
        if self.prepend:
            path = self.prepend.rstrip("/") + (path if path != "/" or not self.prepend.endswith("/") else "/")
        if self.rewrite:
            pattern, replacement = self.rewrite
            path = pattern.sub(replacement, path, count=1)
            if not path.startswith("/"):
                path = "/" + path
        return f"{path}{qmark}{query}"


def _host_kind(host: str) -> int:
    """0: an exact host, 1: a `*.suffix` wildcard, 2: any host."""
    return 2 if not host else 1 if host.startswith("*.") else 0


@dataclass(frozen=True, slots=True)
class RoutePart:
    """One route source's whole contribution, tagged with its source (one of SOURCES), in that source's own
    order: as declared for the config file, by key for Consul KV, by service name for tags."""

    source: str
    routes: tuple[Route, ...] = ()

    @classmethod
    def declared(cls, source: str, routes: Iterable[ConfigRoute]) -> RoutePart:
        """The part of a source of route tables (`[[routes]]` of the config file, Consul KV)."""
        return cls(source, tuple(Route.from_config(c) for c in routes))

    @classmethod
    def tags(cls, snapshot: Snapshot) -> RoutePart:
        """The part the services' tags (and meta) declare, whatever order the provider used."""
        return cls("tags", tuple(route for svc in snapshot.services for route in service_routes(svc)))

    @property
    def services(self) -> frozenset[str]:
        """Every service the part's routes send to (each service of a split)."""
        return frozenset(r.service for r in self.routes) | {name for r in self.routes for name, _ in r.split}


def service_routes(svc: ServiceRoutes) -> tuple[Route, ...]:
    """A service's tag (and meta) routes, in its order, each limited to the instances that declare it."""
    return tuple(Route.from_spec(svc.name, spec, svc.members_of(spec) if svc.members else None)
                 for spec in svc.routes)


def merge_routes(parts: Iterable[RoutePart]) -> tuple[tuple[Route, ...], tuple[Problem, ...]]:
    """Every part's routes, parts in order of precedence (SOURCES), each part in its own order. A host, path
    and conditions declared by several services' tags is shared by them (Fabio's several targets of a route);
    otherwise the first declaration wins and each later one is a `route_conflict` (another source's, or the
    same service's with other options). See route_index.py."""
    index = RouteIndex.build(sorted(parts, key=lambda p: SOURCES.index(p.source)))
    return tuple(index.winners()), index.conflicts()


@dataclass(frozen=True, slots=True)
class RoutedWorld:
    """The whole routed world, the one value a table is built from: the snapshot (instances, and the routes
    of tags and meta) and the parts other route sources declare (`kv`, `file`), each replaced as a whole."""

    snapshot: Snapshot = field(default_factory=Snapshot)
    parts: tuple[RoutePart, ...] = ()

    def with_part(self, part: RoutePart) -> RoutedWorld:
        return replace(self, parts=(*(p for p in self.parts if p.source != part.source), part))

    @property
    def named(self) -> frozenset[str]:
        """Services the declared parts send to: followed whether or not their tags route them."""
        return frozenset[str]().union(*(p.services for p in self.parts))

    def merged(self) -> tuple[tuple[Route, ...], tuple[Problem, ...]]:
        return merge_routes((*self.parts, RoutePart.tags(self.snapshot)))

    def index(self) -> RouteIndex:
        return RouteIndex.build(sorted((*self.parts, RoutePart.tags(self.snapshot)),
                                       key=lambda p: SOURCES.index(p.source)))


_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _with_path(url: str) -> str:
    """`https://example.com` -> `https://example.com/`, `?a=1` -> `/?a=1`: a Location always has a path (Fabio
    sets `/` when the built one is empty)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if url[:1] == "/" else "/" + url
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    return url if rest[end:end + 1] == "/" else f"{scheme}://{rest[:end]}/{rest[end:]}"


def normalize_path(path: str, upper: bool = True) -> str:
    """The path routes are matched on and the upstream gets (RFC 3986 §6.2.2): percent-encoded unreserved
    characters decoded (`%7E` -> `~`, `%2e` -> `.`), other escapes kept (`%2F` stays an escape, never a
    separator; with upper-case hex for matching, as sent with `upper=False`), then dot-segments removed
    (§5.2.4), so `/public/../admin` is matched, and forwarded, as `/admin`. Requests without `%` or `/.` (nearly
    all) skip all of this and get `path` itself back."""
    if "%" not in path and "/." not in path:
        return path
    if "%" in path:
        out, i, n = [], 0, len(path)
        while i < n:
            c = path[i]
            if c == "%" and i + 2 < n and _is_hex(path[i + 1 : i + 3]):
                decoded = chr(int(path[i + 1 : i + 3], 16))
                escape = path[i + 1 : i + 3]
                out.append(decoded if decoded in _UNRESERVED else "%" + (escape.upper() if upper else escape))
                i += 3
            else:
                out.append(c)
                i += 1
        path = "".join(out)
    if "/." not in path:
        return path
    segments: list[str] = []
    parts = path.split("/")
    for index, segment in enumerate(parts[1:], 1):
        last = index == len(parts) - 1
        if segment == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif segment == ".":
            if last:
                segments.append("")
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789abcdefABCDEF" for c in text)


def normalize_host(host: str | None) -> str:
    """Host header to table key: lower case, no port, no trailing dot. IPv6 literals keep their brackets."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")


_EMPTY_LEVEL: Final = Level(MappingProxyType({}), MappingProxyType({}))
_MEMO_SIZE: Final = 4096


def _order(routes: list[Route]) -> tuple[Route, ...]:
    return tuple(sorted(routes, key=lambda r: (-r.specificity[0], -r.specificity[1], r.service, r.id)))


# A slot of the table: (host kind, host key, how the path matches, path) -> the routes tried there, in order;
# how: "exact" (exact=true), else the route's matcher ("prefix", "iprefix", "glob").
Slot = tuple[int, str, str, str]


def _slot(route: Route) -> Slot:
    kind = _host_kind(route.host)
    mode = "exact" if route.exact else route.matcher
    return (kind, route.host[1:] if kind == 1 else route.host, mode, route.path)  # wildcards by ".suffix"


def _descending(text: str) -> tuple[int, ...]:
    """A sort key putting texts in reverse lexicographic order (a text before its own prefixes)."""
    return (*(-ord(c) for c in text), 0)


def _rank(route: Route) -> tuple[object, ...]:
    """Match order, for /api/routes: host kind, longer host first, exact paths, then paths as a level tries
    them (reverse lexicographic: longer prefixes first), conditions."""
    return (_host_kind(route.host), -len(route.host), route.host, 0 if route.exact else 1,
            _descending(route.path), route.matcher != "prefix", -route.specificity[0], -route.specificity[1],
            route.service, route.id)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    generation: int = 0
    exact: Mapping[str, Level] = field(default_factory=lambda: MappingProxyType({}))
    wildcard: Mapping[str, Level] = field(default_factory=lambda: MappingProxyType({}))
    any_host: Level = _EMPTY_LEVEL
    # Every declaration of every route, by identity (route_index.py): what an update starts from.
    index: RouteIndex = field(default_factory=RouteIndex, compare=False, repr=False)
    # Memo of lookups no condition took part in (the table never changes, so an answer never goes stale);
    # bounded, cleared when full.
    _memo: dict[tuple[str | None, str], Route | None] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )
    _ordered: list[tuple[Route, ...]] = field(default_factory=list, compare=False, repr=False, hash=False)

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route in match order (what /api/routes shows); sorted when first asked for."""
        if not self._ordered:
            self._ordered.append(tuple(sorted(self.index.winners(), key=_rank)))
        return self._ordered[0]

    @property
    def conflicts(self) -> tuple[Problem, ...]:
        return self.index.conflicts()

    @property
    def route_count(self) -> int:
        return len(self.index)

    @classmethod
    def from_snapshot(cls, world: RoutedWorld | Snapshot, generation: int = 0) -> RoutingTable:
        """The table of a routed world (every route source merged, `merge_routes`); a bare Snapshot is a world
        of tag routes alone."""
        if isinstance(world, Snapshot):
            world = RoutedWorld(world)
        index = world.index()
        slots: dict[Slot, list[Route]] = {}
        for route in index.winners():
            if route.path:  # TCP routes (path "") are listed, never matched by HTTP requests: proxy/tcp/ has them
                slots.setdefault(_slot(route), []).append(route)
        return cls._with_slots(cls(generation=generation, index=index), {k: _order(v) for k, v in slots.items()})

    def updated(self, before: Snapshot, delta: SnapshotDelta, generation: int) -> RoutingTable:
        """This table after `delta` to the tag routes of `before` (the snapshot it was built from): only the
        slots the changed services' routes touch are rebuilt; every other level is shared with this table."""
        index = self.index
        touched: set[Identity] = set()
        for name in (*delta.removed, *(s.name for s in delta.changed)):
            old = before.service(name)
            old_keys = [identity(r) for r in service_routes(old)] if old is not None else []
            new = next((s for s in delta.changed if s.name == name), None)
            index, keys = index.replace_service(name, old_keys, service_routes(new) if new is not None else ())
            touched |= keys
        slots: dict[Slot, tuple[Route, ...]] = {}
        for key in touched:
            host, path, exact, matcher = key[0], key[1], key[3], key[6]
            if not path:
                continue  # a TCP route: in the index (listed), in no HTTP slot
            kind = _host_kind(host)
            slot: Slot = (kind, host[1:] if kind == 1 else host, "exact" if exact else matcher, path)
            if slot in slots:
                continue
            current = self._slot_routes(slot)
            keep = [r for r in current if identity(r) not in touched]
            winners = [w for k in touched if (k[0], k[1], k[3], k[6]) == (host, path, exact, matcher)
                       and (w := index.winner(k)) is not None]
            slots[slot] = _order([*keep, *winners])
        return self._with_slots(RoutingTable(generation=generation, exact=self.exact, wildcard=self.wildcard,
                                             any_host=self.any_host, index=index), slots)

    def _slot_routes(self, slot: Slot) -> tuple[Route, ...]:
        kind, key, mode, path = slot
        level = self.any_host if kind == 2 else (self.exact if kind == 0 else self.wildcard).get(key)
        if level is None:
            return ()
        return level.at((mode, path))

    @staticmethod
    def _with_slots(table: RoutingTable, slots: Mapping[Slot, tuple[Route, ...]]) -> RoutingTable:
        """`table` with these slots set (an empty tuple removes a slot); levels not touched are shared."""
        exact, wildcard, any_host = dict(table.exact), dict(table.wildcard), table.any_host
        levels: dict[tuple[int, str], dict[Place, tuple[Route, ...]]] = {}
        for (kind, key, mode, path), routes in slots.items():
            places = levels.get((kind, key))
            if places is None:
                level = any_host if kind == 2 else (exact if kind == 0 else wildcard).get(key, _EMPTY_LEVEL)
                places = levels[kind, key] = level.places()
            places[mode, path] = routes  # an empty tuple: make_level leaves the place out
        for (kind, key), places in levels.items():
            level = make_level(places)
            if kind == 2:
                any_host = level if level else _EMPTY_LEVEL
                continue
            into = exact if kind == 0 else wildcard
            if level:
                into[key] = level
            else:
                into.pop(key, None)
        return replace(table, exact=MappingProxyType(exact), wildcard=MappingProxyType(wildcard), any_host=any_host,
                       _memo={}, _ordered=[])

    def lookup(self, host: str | None, path: str, req: RequestLike | None = None, port: int = 0) -> Route | None:
        """The route for a request; `host` is the raw Host header, `path` the (normalized) request path
        without query, `req` what routes with conditions look at, `port` the listener port it arrived on."""
        memo = self._memo
        try:
            return memo[host, path]
        except KeyError:
            pass
        route, conditional = self._lookup(host, path, req, port)
        if not conditional:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()  # random hosts and paths cannot grow it without bound
            memo[host, path] = route
        return route

    def _lookup(
        self, host: str | None, path: str, req: RequestLike | None, port: int,
    ) -> tuple[Route | None, bool]:
        conditional = False
        key = normalize_host(host)
        if key:
            level = self.exact.get(key)
            if level is not None:
                route, cond = level.match(path, req, port)
                conditional = conditional or cond
                if route is not None:
                    return route, conditional
            if self.wildcard:
                dot = key.find(".")
                while dot >= 0:
                    level = self.wildcard.get(key[dot:])
                    if level is not None:
                        route, cond = level.match(path, req, port)
                        conditional = conditional or cond
                        if route is not None:
                            return route, conditional
                    dot = key.find(".", dot + 1)
        if self.any_host:
            route, cond = self.any_host.match(path, req, port)
            return route, conditional or cond
        return None, conditional
