"""Which services changed, read off the two answers Consul can block on for a whole datacenter. Pure.

`/v1/catalog/services` (names and every instance's tags) says which services exist and which carry route
tags; `/v1/health/state/any` (every check: node, service instance, status, the instance's tags) says whose
health changed. Neither grows the work with the catalog while nothing changes: one blocking query each. When
one answers, these functions name the services whose instances must be read again
(/v1/health/service/<name>), so the work per change follows what changed.

A node's own checks (serfHealth, maintenance) belong to every instance on that node: a change there names the
services known to run on it. What neither answer names is the service of an instance registered without any
check of its own (the catalog's index moves, its content and state/any do not): the watcher then reads every
routed service again (`Watcher._explain`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def catalog_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], wanted: set[str],
) -> tuple[set[str], set[str]]:
    """(services to read again: new, or whose tags changed; services no longer wanted or gone)."""
    read = {name for name in wanted if name not in before or before[name] != after.get(name)}
    return read, {name for name in before if name not in wanted}
