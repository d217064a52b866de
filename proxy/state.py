"""What the proxy is doing now, as one value: a Report of every service's instances (state, in-flight requests,
recent errors), open connections, discovery freshness and the table's size. Built at scrape time for the
state gauges, `/ready` and the status page; never on the request path.

With several workers each worker writes its Report to a file about once a second (`write_report`) and the
supervisor, which serves the admin port, merges them (`merge`) with the membership its own Consul watcher
sees. A worker's report is sparse: only the services with something to say (requests in flight, errors,
ejections, draining instances), so 10,000 idle services cost nothing a second. Pure except for the two
file functions at the end.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import orjson

from discovery.model import Endpoint

from .pool import Pool

# States of ferryman_upstream_instances. An instance failing Ferryman's own active checks is "down" on the
# status page and counts as "ejected" in the metric (out of rotation either way).
INSTANCE_STATES: Final = ("healthy", "ejected", "draining")
_STATE_RANK: Final = {"healthy": 0, "draining": 1, "down": 2, "ejected": 3}


@dataclass(frozen=True, slots=True)
class InstanceState:
    key: str  # node/id, the identity across snapshots
    id: str
    node: str
    address: str
    port: int
    weight: int
    state: str  # healthy, ejected, down or draining
    in_flight: int = 0
    errors_recent: int = 0
    label: str = ""  # the metric's `instance` label: the id, or node/id where ids repeat within the service
    dc: str = ""  # its datacenter when several are followed (consul_dc = "dc1,dc2"); "" with one


@dataclass(frozen=True, slots=True)
class ServiceState:
    name: str
    algorithm: str
    instances: tuple[InstanceState, ...]
    websockets: int = 0  # WebSocket connections open
    tcp_connections: int = 0  # TCP and TLS pass-through connections open


@dataclass(frozen=True, slots=True)
class Report:
    services: tuple[ServiceState, ...] = ()
    connections: int = 0
    synced: bool = False  # a first routing table came from discovery
    reachable: bool = False  # no Consul query is failing
    last_success: float | None = None  # when Consul last answered (Unix time)
    generation: int = 0
    routes: int = 0
    draining: bool = False  # shutting down: finishing requests in flight, taking no new ones for long
    workers: int = 1
    at: float = 0.0  # when the report was made (Unix time)
    pid: int = 0
    pools: int = 0  # services with a pool
    # With several workers: each worker's own figures (what /api/status shows under "worker_reports").
    worker_reports: tuple[WorkerSummary, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerSummary:
    pid: int
    generation: int
    routes: int
    services: int
    synced: bool
    reachable: bool


def _instance(endpoint: Endpoint, state: str, pool: Pool, now: float, label: str) -> InstanceState:
    return InstanceState(
        key=endpoint.key, id=endpoint.instance_id, node=endpoint.node, address=endpoint.address,
        port=endpoint.port, weight=endpoint.weight, state=state, in_flight=pool.in_flight.get(endpoint.key, 0),
        errors_recent=pool.recent_errors(endpoint.key, now), label=label, dc=endpoint.dc,
    )


def _labels(endpoints: Iterable[Endpoint]) -> dict[str, str]:
    endpoints = list(endpoints)
    seen = collections.Counter(e.instance_id for e in endpoints)
    return {e.key: e.instance_id if seen[e.instance_id] == 1 else e.key for e in endpoints}


def pool_state(pool: Pool, now: float) -> ServiceState:
    """One pool's instances. `now` is the event loop's clock (ejections and error windows run on it)."""
    ejected = pool.ejected
    labels = _labels(pool.endpoints)
    instances = []
    for endpoint in pool.endpoints:
        key = endpoint.key
        if key in ejected and ejected[key] > now:
            state = "ejected"
        elif pool.is_down(key):
            state = "down"
        else:
            state = "healthy"
        instances.append(_instance(endpoint, state, pool, now, labels[key]))
    for endpoint in pool.draining():
        instances.append(_instance(endpoint, "draining", pool, now, endpoint.key))
    return ServiceState(pool.service, pool.algorithm, tuple(instances), pool.tunnels, pool.tcp_open)


def pools_state(pools: Iterable[Pool], now: float) -> tuple[ServiceState, ...]:
    return tuple(sorted((pool_state(p, now) for p in pools), key=lambda s: s.name))


def merge(base: Report, workers: Sequence[Report], expected: int) -> Report:
    """The supervisor's view: membership from its own watcher (`base`), everything the workers count added
    up. An instance is shown ejected (or down) when any worker has it so; draining instances come from the
    workers. Ready-relevant fields take the worst worker: not synced until every expected worker reported a
    synced table, the oldest last success, the lowest generation."""
    by_service: dict[str, dict[str, list[InstanceState]]] = collections.defaultdict(dict)
    for report in workers:
        for service in report.services:
            for inst in service.instances:
                by_service[service.name].setdefault(inst.key, []).append(inst)
    services = []
    for service in base.services:
        seen = by_service.get(service.name, {})
        instances = []
        for inst in service.instances:
            views = seen.pop(inst.key, [])
            state = max((v.state for v in views if v.state != "draining"), key=_STATE_RANK.__getitem__,
                        default=inst.state)
            instances.append(replace(
                inst, state=state, in_flight=sum(v.in_flight for v in views),
                errors_recent=sum(v.errors_recent for v in views),
            ))
        for key, views in seen.items():
            if any(v.in_flight for v in views):  # left Consul (as the supervisor sees it), still busy
                first = views[0]
                instances.append(replace(
                    first, key=key, state="draining", in_flight=sum(v.in_flight for v in views),
                    errors_recent=sum(v.errors_recent for v in views), label=key,
                ))
        websockets = sum(s.websockets for w in workers for s in w.services if s.name == service.name)
        tcp = sum(s.tcp_connections for w in workers for s in w.services if s.name == service.name)
        services.append(replace(service, instances=tuple(instances), websockets=websockets, tcp_connections=tcp))
    complete = len(workers) >= expected
    successes = [w.last_success for w in workers]
    return replace(
        base,
        services=tuple(services),
        connections=sum(w.connections for w in workers),
        synced=complete and all(w.synced for w in workers),
        reachable=complete and all(w.reachable for w in workers),
        last_success=min(s for s in successes if s is not None) if successes and None not in successes else None,
        generation=min((w.generation for w in workers), default=0),
        workers=expected,
        worker_reports=tuple(WorkerSummary(w.pid, w.generation, w.routes, w.pools, w.synced, w.reachable)
                             for w in sorted(workers, key=lambda w: w.pid)),
    )


# --- the workers' report files ---

def write_report(directory: str, report: Report) -> None:
    """Replace this process's report file atomically (readers never see half a file)."""
    path = Path(directory) / f"state-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(report))
    os.replace(tmp, path)


def read_reports(directory: str, pids: Iterable[int], now: float, max_age: float) -> list[Report]:
    """The reports of these worker processes that are at most `max_age` seconds old (a worker that stopped
    writing is as good as absent)."""
    reports = []
    for pid in pids:
        try:
            data: dict[str, Any] = orjson.loads((Path(directory) / f"state-{pid}.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        report = _from_json(data)
        if now - report.at <= max_age:
            reports.append(report)
    return reports


def remove_report(directory: str, pid: int) -> None:
    with contextlib.suppress(OSError):
        (Path(directory) / f"state-{pid}.json").unlink()


def _from_json(data: dict[str, Any]) -> Report:
    services = tuple(
        ServiceState(s["name"], s["algorithm"], tuple(InstanceState(**i) for i in s["instances"]),
                     s.get("websockets", 0), s.get("tcp_connections", 0))
        for s in data.pop("services")
    )
    summaries = tuple(WorkerSummary(**w) for w in data.pop("worker_reports", ()))
    return Report(services=services, worker_reports=summaries, **data)
