"""The routing table: an immutable index from (host, path) to a Route, built from a Snapshot.

Lookup order, most specific first:
1. exact host (case-insensitive, port ignored), then `*.suffix` wildcards from the longest suffix down
   (`*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`), then routes for any
   host. A host level that has no route for the path falls through to the next level.
2. within a level, the longest path prefix on a segment boundary: `/api` matches `/api` and `/api/x`, never
   `/apix`. Each level is a dict keyed by prefix, and a lookup walks the path's own prefixes from the longest
   down, so its cost grows with the path's depth, not with the number of routes.

Two services declaring the same host and path is a conflict: the first by service name wins and the other
is reported. Pure: built from values, no I/O; swapped into the router as a whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from discovery.model import Problem, RouteSpec, Snapshot
from discovery.tags import parse_size


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
    sni: str = ""  # TLS server name for proto=https upstreams (tag option sni=); "": the instance's address

    @classmethod
    def from_spec(cls, service: str, spec: RouteSpec) -> Route:
        return cls(
            id=f"{service}@{spec.host or '*any*'}{spec.path}",
            service=service,
            host=spec.host,
            path=spec.path,
            strip=spec.strip,
            scheme=spec.option("proto") or "http",
            tls_skip_verify=spec.option("tlsskipverify") == "true",
            max_body=parse_size(spec.option("maxbody") or "0"),
            sni=spec.option("sni") or "",
        )

    def upstream_target(self, raw_target: str, matched_path: str | None = None) -> str:
        """The request target sent upstream: the client's bytes, minus the `strip` prefix when set. When the
        route matched on the normalized path and the raw one does not start with the prefix (`/x/../api/v`
        matched `/api`), the prefix is stripped from the normalized path, which then goes upstream."""
        strip = self.strip
        if not strip:
            return raw_target
        path, qmark, query = raw_target.partition("?")
        if matched_path is not None and matched_path != path and not (path == strip or path.startswith(strip + "/")):
            path = matched_path
        if path == strip or path.startswith(strip + "/"):
            path = path[len(strip) :] or "/"
        return f"{path}{qmark}{query}"


_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(path: str) -> str:
    """The path routes are matched on (RFC 3986 §6.2.2): percent-encoded unreserved characters decoded (`%7E`
    -> `~`, `%2e` -> `.`), other escapes kept with upper-case hex (`%2F` stays an escape, never a separator),
    then dot-segments removed (§5.2.4), so `/public/../admin` is matched as `/admin`, as the upstream will read
    it. Requests without `%` or `/.` (nearly all) skip all of this."""
    if "%" not in path and "/." not in path:
        return path
    if "%" in path:
        out, i, n = [], 0, len(path)
        while i < n:
            c = path[i]
            if c == "%" and i + 2 < n and _is_hex(path[i + 1 : i + 3]):
                decoded = chr(int(path[i + 1 : i + 3], 16))
                out.append(decoded if decoded in _UNRESERVED else "%" + path[i + 1 : i + 3].upper())
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


def _path_prefixes(path: str) -> Iterable[str]:
    """`/a/b/c` -> `/a/b/c`, `/a/b`, `/a`, `/` (a trailing slash is not a segment of its own)."""
    p = path.rstrip("/") or "/"
    while True:
        yield p
        if p == "/":
            return
        cut = p.rfind("/")
        p = p[:cut] if cut > 0 else "/"


PathIndex = Mapping[str, Route]
_MEMO_SIZE: Final = 4096


@dataclass(frozen=True, slots=True)
class RoutingTable:
    generation: int = 0
    routes: tuple[Route, ...] = ()
    exact: Mapping[str, PathIndex] = field(default_factory=lambda: MappingProxyType({}))
    wildcard: Mapping[str, PathIndex] = field(default_factory=lambda: MappingProxyType({}))
    any_host: PathIndex = field(default_factory=lambda: MappingProxyType({}))
    conflicts: tuple[Problem, ...] = ()
    # Memo of lookups (the table never changes, so an answer never goes stale); bounded, cleared when full.
    _memo: dict[tuple[str | None, str], Route | None] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, generation: int = 0) -> RoutingTable:
        exact: dict[str, dict[str, Route]] = {}
        wildcard: dict[str, dict[str, Route]] = {}
        any_host: dict[str, Route] = {}
        routes: list[Route] = []
        conflicts: list[Problem] = []
        # By service name, whatever order the provider used: the first declaration wins, deterministically.
        for svc in sorted(snapshot.services, key=lambda s: s.name):
            for spec in svc.routes:
                route = Route.from_spec(svc.name, spec)
                if not spec.host:
                    index = any_host
                elif spec.host.startswith("*."):
                    index = wildcard.setdefault(spec.host[1:], {})  # key ".example.com"
                else:
                    index = exact.setdefault(spec.host, {})
                winner = index.get(spec.path)
                if winner is not None:
                    conflicts.append(
                        Problem("route_conflict", svc.name, f"{spec.host}{spec.path} already routed to "
                                f"{winner.service}", route.id)
                    )
                    continue
                index[spec.path] = route
                routes.append(route)
        freeze = MappingProxyType
        return cls(
            generation=generation,
            routes=tuple(routes),
            exact=freeze({h: freeze(p) for h, p in exact.items()}),
            wildcard=freeze({h: freeze(p) for h, p in wildcard.items()}),
            any_host=freeze(any_host),
            conflicts=tuple(conflicts),
        )

    def lookup(self, host: str | None, path: str) -> Route | None:
        """The route for a request; `host` is the raw Host header, `path` the request path without query."""
        memo = self._memo
        try:
            return memo[host, path]
        except KeyError:
            pass
        if len(memo) >= _MEMO_SIZE:
            memo.clear()  # random hosts and paths cannot grow it without bound
        route = memo[host, path] = self._lookup(host, path)
        return route

    def _lookup(self, host: str | None, path: str) -> Route | None:
        key = normalize_host(host)
        if key:
            index = self.exact.get(key)
            if index is not None:
                route = _match(index, path)
                if route is not None:
                    return route
            if self.wildcard:
                dot = key.find(".")
                while dot >= 0:
                    index = self.wildcard.get(key[dot:])
                    if index is not None:
                        route = _match(index, path)
                        if route is not None:
                            return route
                    dot = key.find(".", dot + 1)
        return _match(self.any_host, path) if self.any_host else None


def _match(index: PathIndex, path: str) -> Route | None:
    for prefix in _path_prefixes(path):
        route = index.get(prefix)
        if route is not None:
            return route
    return None
