"""Which services changed, read off the two answers Consul can block on for a whole datacenter. Pure.

`/v1/catalog/services` (names and every instance's tags) says which services exist and which carry route
tags; `/v1/health/state/any` (every check: node, service instance, status, the instance's tags) says whose
health changed. Neither grows the work with the catalog while nothing changes: one blocking query each. When
one answers, these functions name the services whose instances must be read again
(/v1/health/service/<name>), so the work per change follows what changed.

state/any is megabytes at scale (30,000 checks: 12.7 MB from a dev agent, which indents its JSON), and one change
rewrites one or two checks of it. `StateAny` keeps the answer as Consul sent it and `changed_checks` compares two
answers check by check on the raw text (a split on the boundary between checks, then set lookups: about 20 ms
at 30,000 checks where decoding and comparing every check took about 150 ms); only the checks that differ are
decoded. A layout it does not know (another encoder) is decoded whole, as before.

A node's own checks (serfHealth, maintenance) belong to every instance on that node: a change there names the
services known to run on it. What neither answer names is the service of an instance registered without any
check of its own (the catalog's index moves, its content and state/any do not): the watcher then reads every
routed service again (`Watcher._explain`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, overload

import orjson

from .tags import DEFAULT_PREFIX, is_route_tag

# One check row as far as change detection cares: whose it is, what it says, and when it was last written
# (ModifyIndex: a re-registration that changes the instance's port rewrites its checks too). A check whose
# output changes is written again, and its service read again: work that follows what changed.
CheckView = tuple[str, str, str, str, tuple[str, ...], int]  # node, service id, check, status, tags, index


@dataclass(frozen=True, slots=True)
class Checks:
    """state/any, as signatures: per service the set of its instances' checks, per node its own checks."""

    services: Mapping[str, frozenset[CheckView]] = field(default_factory=dict)
    nodes: Mapping[str, frozenset[CheckView]] = field(default_factory=dict)

    @staticmethod
    def of_service(name: str, entries: Sequence[Any]) -> frozenset[CheckView]:
        """What a service's /v1/health/service entries show of its own checks, as state/any would list them."""
        return Checks.read([c for e in entries if isinstance(e, Mapping) and isinstance(e.get("Checks"), list)
                            for c in e["Checks"]]).services.get(name, frozenset())

    @classmethod
    def read(cls, checks: Sequence[Any]) -> Checks:
        services: dict[str, set[CheckView]] = {}
        nodes: dict[str, set[CheckView]] = {}
        for check in checks:
            if not isinstance(check, Mapping):
                continue
            tags = check.get("ServiceTags")
            view: CheckView = (
                str(check.get("Node", "")), str(check.get("ServiceID", "")), str(check.get("CheckID", "")),
                str(check.get("Status", "")), tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list)
                else (), _int(check.get("ModifyIndex")),
            )
            name = check.get("ServiceName")
            if isinstance(name, str) and name:
                services.setdefault(name, set()).add(view)
            else:
                nodes.setdefault(view[0], set()).add(view)
        return cls({k: frozenset(v) for k, v in services.items()}, {k: frozenset(v) for k, v in nodes.items()})


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def health_changes(before: Checks, after: Checks, on_node: Mapping[str, Iterable[str]]) -> set[str]:
    """Services whose instances' checks changed, and the services on nodes whose own checks changed.
    `on_node` says which services run on each node (as last read)."""
    changed = {
        name for name in before.services.keys() | after.services.keys()
        if before.services.get(name) != after.services.get(name)
    }
    for node in before.nodes.keys() | after.nodes.keys():
        if before.nodes.get(node) != after.nodes.get(node):
            changed.update(on_node.get(node, ()))
    return changed


def routed(catalog: Mapping[str, Any], prefix: str = DEFAULT_PREFIX, also: Iterable[str] = ()) -> set[str]:
    """Services with at least one route tag (valid or not: validity is reported when they are built), and
    those other route sources name."""
    names = {
        name for name, tags in catalog.items()
        if isinstance(tags, list) and any(isinstance(t, str) and is_route_tag(t, prefix) for t in tags)
    }
    return names | (set(also) & catalog.keys())


def place_on_nodes(on_node: dict[str, set[str]], name: str, before: Iterable[Any], after: Iterable[Any]) -> None:
    """Keep `on_node` (node -> services with instances there) true after a service's health entries went from
    `before` to `after`: it leaves the nodes it no longer runs on, and a node with no service left is dropped
    (otherwise the map only grows as instances move and nodes come and go, and a node's check wakes reads of
    services long gone from it)."""
    old, new = _entry_nodes(before), _entry_nodes(after)
    for node in old - new:
        names = on_node.get(node)
        if names is not None:
            names.discard(name)
            if not names:
                del on_node[node]
    for node in new:
        on_node.setdefault(node, set()).add(name)


def _entry_nodes(entries: Iterable[Any]) -> set[str]:
    """The nodes of /v1/health/service entries (each entry's Node.Node)."""
    nodes = set()
    for entry in entries:
        node = entry.get("Node") if isinstance(entry, dict) else None
        if isinstance(node, dict) and isinstance(node.get("Node"), str):
            nodes.add(node["Node"])
    return nodes


def catalog_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], wanted: set[str],
) -> tuple[set[str], set[str]]:
    """(services to read again: new, or whose tags changed; services no longer wanted or gone)."""
    read = {name for name in wanted if name not in before or before[name] != after.get(name)}
    return read, {name for name in before if name not in wanted}


# How Consul writes a list of checks (Go's encoder: compact, or indented by 4 spaces as a dev agent and ?pretty
# do), each check's first key being "Node": (opening, boundary between two checks, closing).
_LAYOUTS: Final = (
    (b'[{"Node":', b'},{"Node":', b"}]"),
    (b'[\n    {\n        "Node": ', b'\n    },\n    {\n        "Node": ', b"\n    }\n]"),
)


class StateAny(Sequence[dict[str, Any]]):
    """A /v1/health/state/any answer as Consul sent it, decoded only when read as a list."""

    __slots__ = ("_checks", "_parts", "_set", "body")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._checks: list[dict[str, Any]] | None = None
        self._parts: list[bytes] | None = None
        self._set: set[bytes] | None = None

    def checks(self) -> list[dict[str, Any]]:
        """Every check, decoded (once); ValueError when the answer is not a list."""
        if self._checks is None:
            decoded = orjson.loads(self.body)
            if not isinstance(decoded, list):
                raise ValueError("health/state/any did not return a list")
            self._checks = decoded
        return self._checks

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self.checks()[index]

    def __len__(self) -> int:
        return len(self.checks())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.checks())

    def parts(self) -> list[bytes] | None:
        """Each check's raw text after its `"Node":` key, or None for a layout this does not know."""
        if self._parts is None:
            body, end = self.body, len(self.body)
            while end and body[end - 1] in b" \t\r\n":  # (Consul ends with a newline; no copy to strip it)
                end -= 1
            if end < 16 and body[:end].strip() == b"[]":
                self._parts = []
            for opening, boundary, closing in _LAYOUTS:
                if self._parts is None and body.startswith(opening) and body.endswith(closing, 0, end):
                    self._parts = body[len(opening):end - len(closing)].split(boundary)
        return self._parts

    def part_set(self) -> set[bytes]:
        if self._set is None:
            self._set = set(self.parts() or ())
        return self._set


@dataclass(frozen=True, slots=True)
class CheckChanges:
    """What differs between two state/any answers: services whose instances' checks changed, nodes whose own
    checks changed, and the indexes the new or rewritten checks were written at."""

    services: frozenset[str]
    nodes: frozenset[str]
    written: frozenset[int]


def changed_checks(before: StateAny, after: StateAny) -> CheckChanges | None:
    """The checks that differ between two answers (added, removed or rewritten), from their raw text; None when
    either answer's layout is unknown or a differing check does not decode (the caller decodes whole)."""
    if before.parts() is None or after.parts() is None:
        return None
    old, new = before.part_set(), after.part_set()
    added = [p for p in after.parts() or () if p not in old]
    removed = [p for p in before.parts() or () if p not in new]
    services: set[str] = set()
    nodes: set[str] = set()
    written: set[int] = set()
    for part, is_new in [*((p, True) for p in added), *((p, False) for p in removed)]:
        try:
            check = orjson.loads(b'{"Node":' + part + b"}")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(check, dict):
            return None
        name = check.get("ServiceName")
        if isinstance(name, str) and name:
            services.add(name)
        else:
            nodes.add(str(check.get("Node", "")))
        if is_new:
            written.add(_int(check.get("ModifyIndex")))
    return CheckChanges(frozenset(services), frozenset(nodes), frozenset(written))
