"""Build a Snapshot from Consul's JSON: the catalog's service list and each routed service's health entries.

The catalog (/v1/catalog/services) says which services exist and which carry route tags. Each service is built
from its /v1/health/service/<name> entries (`build_service`): routes per instance, from each instance's own
tags, so a route stays declared while all its instances are failing (the proxy then answers 503 rather than
404) and an instance that does not declare a route takes none of its traffic; endpoints are the instances that
pass every check. A malformed tag or entry becomes a Problem and is skipped; the rest still applies. Pure:
JSON in, values out.

Several datacenters (`build_dc_snapshot`, names in order of preference): a service's routes are the union of
its route tags in every datacenter's catalog, and its endpoints are the healthy instances of the first
datacenter that has at least one (failover), each Endpoint carrying that datacenter's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from .health import is_passing
from .model import Endpoint, Problem, RouteSpec, ServiceRoutes, ServiceSettings, Snapshot
from .tags import DEFAULT_PREFIX, TagError, is_route_tag, parse_route_tag, with_service_setting


def routes_from_tags(
    service: str, tags: Sequence[str], prefix: str = DEFAULT_PREFIX, *, matcher: str = "prefix",
    env: Mapping[str, str] | None = None,
) -> tuple[tuple[RouteSpec, ...], list[Problem]]:
    """The valid routes a service's tags declare, deduplicated and sorted, and a Problem per bad tag. `matcher`:
    the global path_matcher; `env`: the declaring instance's variables (`$DC`)."""
    routes: set[RouteSpec] = set()
    problems: list[Problem] = []
    for tag in tags:
        if not isinstance(tag, str) or not is_route_tag(tag, prefix):
            continue
        if tag.strip() == prefix:
            continue  # the bare prefix: "my routes are in service meta" (ferryman-route); it makes no route
        try:
            spec = parse_route_tag(tag, prefix, matcher=matcher, env=env)
        except TagError as exc:
            problems.append(Problem("route_tag_invalid", service, str(exc), tag))
            continue
        routes.add(spec)
    return tuple(sorted(routes, key=RouteSpec.order_key)), problems


def _address_and_id(svc: Mapping[str, Any], node: Mapping[str, Any]) -> tuple[Any, str]:
    """An instance's address and ID as its Endpoint has them. An instance registered without an address is
    reachable at its node's (Consul's own rule; an IPv6 literal may come bracketed); one without an ID is known
    by address:port."""
    address = svc.get("Address") or node.get("Address")
    if isinstance(address, str):
        address = address.strip("[]")
    return address, str(svc.get("ID") or f"{address}:{svc.get('Port')}")


def endpoint_from_entry(service: str, entry: Mapping[str, Any], dc: str = "") -> Endpoint:
    """One health entry to an Endpoint; ValueError when it lacks what is needed to connect."""
    svc = entry.get("Service")
    node = entry.get("Node")
    if not isinstance(svc, Mapping) or not isinstance(node, Mapping):
        raise ValueError("entry has no Service or Node object")
    address, instance_id = _address_and_id(svc, node)
    port = svc.get("Port")
    if not isinstance(address, str) or not address:
        raise ValueError("instance has no address and neither has its node")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"instance port {port!r} is not a TCP port")
    weights = svc.get("Weights")
    weight = 1
    if isinstance(weights, Mapping):
        passing = weights.get("Passing")
        if isinstance(passing, int) and not isinstance(passing, bool) and passing > 0:
            weight = passing
    return Endpoint(
        service=service,
        instance_id=instance_id,
        address=address,
        port=port,
        node=str(node.get("Node", "")),
        weight=weight,
        dc=dc,
    )


def healthy_endpoints(
    service: str, entries: Sequence[Mapping[str, Any]], dc: str = ""
) -> tuple[tuple[Endpoint, ...], list[Problem]]:
    endpoints: list[Endpoint] = []
    problems: list[Problem] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            problems.append(Problem("instance_invalid", service, "entry is not an object"))
            continue
        if not is_passing(entry):
            continue
        try:
            endpoint = endpoint_from_entry(service, entry, dc)
        except ValueError as exc:
            sid = entry.get("Service", {}).get("ID", "") if isinstance(entry.get("Service"), Mapping) else ""
            problems.append(Problem("instance_invalid", service, str(exc), str(sid)))
            continue
        weight = _meta(entry).get(META_WEIGHT)
        if weight is not None:
            if isinstance(weight, str) and weight.isascii() and weight.isdigit() and 0 < int(weight) <= 10_000:
                endpoint = replace(endpoint, weight=int(weight))
            else:
                problems.append(Problem("service_meta_invalid", service,
                                        f"{META_WEIGHT}={weight!r} must be a whole number from 1 to 10000",
                                        endpoint.instance_id))
        endpoints.append(endpoint)
    endpoints.sort(key=lambda e: (e.node, e.instance_id, e.address, e.port))
    return tuple(endpoints), problems


# Service meta keys Ferryman reads (Consul meta keys allow letters, digits, '-' and '_').
META_WEIGHT: Final = "ferryman-weight"
META_SETTINGS: Final = {
    "ferryman-lb": "lb", "ferryman-hash-key": "hash_key", "ferryman-sticky": "sticky",
    "ferryman-health-path": "health_path", "ferryman-read-timeout": "read_timeout",
    "ferryman-connect-timeout": "connect_timeout",
}


def _meta(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    svc = entry.get("Service")
    meta = svc.get("Meta") if isinstance(svc, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def meta_settings(service: str, entries: Sequence[Mapping[str, Any]]) -> tuple[ServiceSettings, list[Problem]]:
    """Balancing settings from the instances' meta (all instances, healthy or not, in ID order; the first that
    sets a key wins). An invalid value is reported and ignored."""
    settings = ServiceSettings()
    found: set[str] = set()
    problems: list[Problem] = []
    ordered = sorted((e for e in entries if isinstance(e, Mapping)), key=lambda e: str(_meta_id(e)))
    for entry in ordered:
        for meta_key, setting in META_SETTINGS.items():
            value = _meta(entry).get(meta_key)
            if setting in found or not isinstance(value, str) or not value:
                continue
            try:
                settings = with_service_setting(settings, setting, value)
            except TagError as exc:
                problems.append(Problem("service_meta_invalid", service, str(exc), f"{meta_key}={value}"))
                continue
            found.add(setting)
    return settings, problems


_META_ROUTE = re.compile(r"^ferryman-route(-\d{1,3})?$")


def meta_routes(
    service: str, entries: Sequence[Mapping[str, Any]], prefix: str = DEFAULT_PREFIX, *, matcher: str = "prefix",
    dc: str = "",
) -> tuple[set[RouteSpec], list[Problem]]:
    """Routes from the instances' service meta (`ferryman-route`, `ferryman-route-1`, ... in tag syntax without
    the prefix), for services whose routes do not fit in tags; a bad one is reported with its key and skipped."""
    routes: set[RouteSpec] = set()
    problems: list[Problem] = []
    for entry in sorted((e for e in entries if isinstance(e, Mapping)), key=lambda e: str(_meta_id(e))):
        for key, value in sorted(_meta(entry).items()):
            if not isinstance(key, str) or not _META_ROUTE.match(key) or not isinstance(value, str):
                continue
            try:
                spec = parse_route_tag(prefix + value.strip(), prefix, matcher=matcher, env=variables(entry, dc))
            except TagError as exc:
                problems.append(Problem("service_meta_invalid", service, str(exc), f"{key}={value}"))
                continue
            routes.add(spec)
    return routes, problems


def _meta_id(entry: Mapping[str, Any]) -> object:
    svc = entry.get("Service")
    return svc.get("ID", "") if isinstance(svc, Mapping) else ""


def build_snapshot(
    catalog: Mapping[str, Sequence[str]],
    health: Mapping[str, Sequence[Mapping[str, Any]]],
    prefix: str = DEFAULT_PREFIX,
    *,
    matcher: str = "prefix",
) -> Snapshot:
    """The routed services of `catalog` whose health is known in `health`, as one Snapshot.

    A service with route tags but no entry in `health` yet is left out until its health is known, so a new
    service never flashes through a 503 state with zero instances.
    """
    return build_dc_snapshot(("",), {"": catalog}, {name: {"": entries} for name, entries in health.items()},
                             prefix, matcher=matcher)


def build_dc_snapshot(
    datacenters: Sequence[str],
    catalogs: Mapping[str, Mapping[str, Sequence[str]]],
    health: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    prefix: str = DEFAULT_PREFIX,
    also: frozenset[str] = frozenset(),
    *,
    matcher: str = "prefix",
) -> Snapshot:
    """One Snapshot from several datacenters: `catalogs[dc]` and `health[service][dc]` as far as they are known,
    `datacenters` in order of preference. Services in `also` (routed from elsewhere than tags: the config
    file's [[routes]]) are kept even without route tags. Each service as `build_service` makes it."""
    catalog = merge_catalogs([catalogs[dc] for dc in datacenters if dc in catalogs])
    services: list[ServiceRoutes] = []
    problems: list[Problem] = []
    for name in sorted(catalog):
        svc, bad = build_service(name, datacenters, health.get(name, {}), prefix, name in also, catalog[name],
                                 matcher=matcher)
        problems.extend(bad)
        if svc is not None:
            services.append(svc)
    return Snapshot(services=tuple(services), problems=tuple(problems))


# Instances of these kinds are Consul Connect's proxies and gateways, not the service: a sidecar copies its
# parent's tags, so routing by them would send part of the traffic to the sidecar (fabio #795).
CONNECT_KINDS: Final = frozenset({"connect-proxy", "mesh-gateway", "ingress-gateway", "terminating-gateway"})


def _is_connect(entry: Mapping[str, Any]) -> bool:
    svc = entry.get("Service")
    return isinstance(svc, Mapping) and svc.get("Kind") in CONNECT_KINDS


def build_service(
    name: str,
    datacenters: Sequence[str],
    known: Mapping[str, Sequence[Mapping[str, Any]]],
    prefix: str = DEFAULT_PREFIX,
    also: bool = False,
    catalog_tags: Sequence[str] = (),
    *,
    matcher: str = "prefix",
) -> tuple[ServiceRoutes | None, list[Problem]]:
    """One service from its health entries in each datacenter where they are known (`known[dc]`).

    Routes are per instance, as Fabio builds them: each instance declares routes by its own tags (and its
    `ferryman-route*` meta); the service's routes are the union over its instances, healthy or not (a route
    whose instances all fail answers 503, not 404), and a route only some healthy instances declare is
    limited to them (`members`). Connect proxies and gateways are not instances. The endpoints are the
    healthy instances of the first datacenter, in order, that has at least one (failover); none when no
    datacenter has one. With more than one datacenter each Endpoint carries its datacenter's name. Settings
    come from the instances' meta, the preferred datacenter's first. None when the service declares no route
    (and is not named by another route source) or its health is known in no datacenter yet.
    """
    if not any(dc in known for dc in datacenters):
        return None, []
    label = len(datacenters) > 1
    problems: list[Problem] = []
    declared: dict[RouteSpec, set[str]] = {}  # route -> the healthy instances declaring it
    tagged = False  # some entry carries its own tags
    endpoints: tuple[Endpoint, ...] = ()
    found = ServiceSettings()
    for dc in datacenters:
        if dc not in known:
            continue
        # An entry that carries Tags says what its instance declares, even a sidecar's (which is then no route).
        tagged = tagged or any(isinstance(e, Mapping) and isinstance(e.get("Service"), Mapping)
                               and isinstance(e["Service"].get("Tags"), list) for e in known[dc])
        entries = [e for e in known[dc] if not (isinstance(e, Mapping) and _is_connect(e))]
        healthy, bad = healthy_endpoints(name, entries, dc if label else "")
        problems.extend(bad)
        serving = bool(healthy) and not endpoints
        if serving:
            endpoints = healthy
        keys = {(e.node, e.instance_id): e.key for e in healthy} if serving else {}
        for entry, routes in _instance_routes(name, entries, prefix, problems, matcher, dc):
            key = keys.get(_entry_identity(entry))
            for spec in routes:
                members = declared.setdefault(spec, set())
                if key is not None:
                    members.add(key)
        settings, bad = meta_settings(name, entries)
        problems.extend(bad)
        found = found.over(settings)  # the preferred datacenter's first
    everyone = {e.key for e in endpoints}
    if not tagged:
        read_in = next((d for d in datacenters if d in known), "")
        first = next((e for e in known.get(read_in, ()) if isinstance(e, Mapping)), {})
        routes_of_all, bad = routes_from_tags(name, catalog_tags, prefix, matcher=matcher,
                                              env=variables(first, read_in))
        problems.extend(bad)
        for spec in routes_of_all:
            declared.setdefault(spec, set()).update(everyone)
    if not declared and not also:
        return None, problems
    routes = tuple(sorted(declared, key=RouteSpec.order_key))
    partial = tuple((spec, frozenset(declared[spec])) for spec in routes if declared[spec] != everyone)
    return ServiceRoutes(name=name, routes=routes, endpoints=endpoints, settings=found, members=partial), problems


def _entry_identity(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(node, instance id) of a health entry, as its Endpoint has them."""
    svc, node = entry.get("Service"), entry.get("Node")
    if not isinstance(svc, Mapping) or not isinstance(node, Mapping):
        return ("", "")
    return (str(node.get("Node", "")), _address_and_id(svc, node)[1])


def _instance_routes(
    name: str, entries: Sequence[Mapping[str, Any]], prefix: str, problems: list[Problem], matcher: str, dc: str,
) -> list[tuple[Mapping[str, Any], tuple[RouteSpec, ...]]]:
    """Each instance's routes: its tags' and its meta's. A bad tag is reported once per service."""
    out: list[tuple[Mapping[str, Any], tuple[RouteSpec, ...]]] = []
    reported: set[Problem] = set()
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        svc = entry.get("Service")
        if not isinstance(svc, Mapping):
            continue
        tags = svc.get("Tags")
        routes, bad = routes_from_tags(name, tags if isinstance(tags, list) else [], prefix, matcher=matcher,
                                       env=variables(entry, dc))
        from_meta, bad_meta = meta_routes(name, [entry], prefix, matcher=matcher, dc=dc)
        for problem in (*bad, *bad_meta):
            if problem not in reported:
                reported.add(problem)
                problems.append(problem)
        out.append((entry, tuple(set(routes) | from_meta)))
    return out


def variables(entry: Mapping[str, Any], dc: str = "") -> dict[str, str] | None:
    """What Fabio expands in the routes an instance declares: `$DC`, the instance's datacenter (its node's, as
    Consul reports it; else the one it was read from). None when it is not known."""
    node = entry.get("Node")
    named = node.get("Datacenter") if isinstance(node, Mapping) else None
    datacenter = named if isinstance(named, str) and named else dc
    return {"DC": datacenter} if datacenter else None


def merge_catalogs(catalogs: Sequence[Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
    """One catalog from several datacenters' /v1/catalog/services answers: every service of any of them, with
    the union of its tags (first seen first). A service whose tags are not a list contributes none."""
    merged: dict[str, list[str]] = {}
    for catalog in catalogs:
        for name, tags in catalog.items():
            into = merged.setdefault(name, [])
            if isinstance(tags, list):
                into.extend(t for t in tags if t not in into)
    return merged


def serving_datacenters(services: Iterable[ServiceRoutes]) -> dict[str, str]:
    """{service: the datacenter its endpoints come from} for the services that have endpoints from a named
    datacenter (none with a single datacenter)."""
    return {s.name: s.endpoints[0].dc for s in services if s.endpoints and s.endpoints[0].dc}


def datacenter_switches(before: Mapping[str, str], after: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(service, from, to) for each service now served from another datacenter than the one it was last
    served from. `before` holds the last datacenter that served each service (kept while none serves it);
    a service served for the first time is not a switch."""
    return [(name, before[name], dc) for name, dc in sorted(after.items()) if name in before and before[name] != dc]
