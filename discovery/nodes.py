"""The whole datacenter in a few reads: health entries assembled from the nodes' catalogs and state/any. Pure.

At start (and whenever most of a datacenter must be read), reading every routed service alone costs one
request per service: 10,000 requests for 10,000 services, which kept a large cluster unrouted for half a
minute. The same entries /v1/health/service/<name> gives can be put together from what the watcher already
holds, state/any (every check), and one /v1/catalog/node/<node> per node (every instance on it, with its tags,
meta, address, port, weights and kind), when the nodes are fewer than the services: an entry is the node, the
instance, and the node's own checks followed by the instance's checks, as Consul builds it.

The node reads come after state/any: an instance (re-)registered since (its ModifyIndex past state/any's
index) may have checks state/any did not show yet, so its service is left to a read of its own, as is a
service the node reads did not find (gone, or registered meanwhile). Checks written later are state/any's
next answer's business, as always.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Entry = dict[str, Any]


def checks_by_instance(
    checks: Sequence[Any],
) -> tuple[dict[str, list[Entry]], dict[tuple[str, str], list[Entry]]]:
    """state/any split into ({node: its own checks}, {(node, service id): the instance's checks})."""
    of_node: dict[str, list[Entry]] = {}
    of_instance: dict[tuple[str, str], list[Entry]] = {}
    for check in checks:
        if not isinstance(check, dict):
            continue
        node, sid = str(check.get("Node", "")), check.get("ServiceID")
        if isinstance(sid, str) and sid:
            of_instance.setdefault((node, sid), []).append(check)
        else:
            of_node.setdefault(node, []).append(check)
    return of_node, of_instance


def entries_from_nodes(
    names: Iterable[str],
    nodes: Iterable[tuple[Mapping[str, Any], Sequence[Any]]],
    checks: Sequence[Any],
    checks_index: int,
) -> tuple[dict[str, list[Entry]], set[str]]:
    """({service: its health entries}, services to read alone) for the services `names`, from each node's
    (Node object, instances) as /v1/catalog/node/<node> lists them and the state/any answer `checks` read at
    `checks_index`. A service none of whose instances was found, or one of whose instances changed after
    `checks_index`, is to be read alone (and has no entries here)."""
    wanted = set(names)
    of_node, of_instance = checks_by_instance(checks)
    entries: dict[str, list[Entry]] = {}
    late: set[str] = set()
    for node, services in nodes:
        node_name = str(node.get("Node", ""))
        own = of_node.get(node_name, [])
        for svc in services:
            if not isinstance(svc, dict):
                continue
            name = svc.get("Service")
            if name not in wanted:
                continue
            modified = svc.get("ModifyIndex")
            if isinstance(modified, int) and modified > checks_index:
                late.add(name)
            sid = svc.get("ID")
            mine = of_instance.get((node_name, sid), []) if isinstance(sid, str) else []
            entries.setdefault(name, []).append({"Node": node, "Service": svc, "Checks": [*own, *mine]})
    late |= wanted - entries.keys()
    for name in late:
        entries.pop(name, None)
    return entries, late
