"""The admin listener (aiohttp): the status page, /metrics, /healthz, /ready, /api/routes, /api/status.

- `/healthz`: liveness only (the process answers).
- `/ready`: 200 once a first routing table came from discovery, 503 while draining (shutting down) or when
  Consul last answered longer than `max_sync_age` ago: a proxy whose table silently went stale takes itself
  out of its load balancer instead of routing to instances that may be long gone.
- `/api/status`: routes in match order, every service's instances with state, in-flight and recent errors,
  and the discovery state; `/` is a page that shows it and refreshes itself (static HTML + vanilla JS).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import BUILD, __version__
from .dispatch import side_shares
from .listener import Router
from .pool import Pools
from .state import Report
from .table import Route
from .tcp.routes import TcpListening

STATUS_PAGE: Final = Path(__file__).with_name("static") / "status.html"


def _instances(service: str, pools: Pools) -> list[dict[str, Any]]:
    # `datacenter`: where the instance was read from when several are followed (consul_dc = "dc1,dc2"), the one
    # serving this service now; null with a single datacenter.
    pool = pools.get(service)
    return [
        {"id": e.instance_id, "node": e.node, "address": e.address, "port": e.port, "weight": e.weight,
         "datacenter": e.dc or None, "service": service}
        for e in (pool.endpoints if pool else ())
    ]


def route_sides(route: Route) -> list[dict[str, Any]]:
    """Every service a route sends to, with its weight: the sides of a route several services share (`weight`:
    the side's weight=, null when it goes by instance count), the services of a config split (its weights), or
    the route's one service (null)."""
    if route.shares:
        return [{"name": side.service, "weight": side.weight or None} for side in route.shares]
    if route.split:
        before, out = 0, []
        for name, upto in route.split:
            out.append({"name": name, "weight": upto - before})
            before = upto
        return out
    return [{"name": route.service, "weight": None}]


def route_services(route: Route, pools: Pools) -> list[dict[str, Any]]:
    """`route_sides`, each with its share of the route's traffic now (a shared route's sides without a healthy
    instance take none) and its instances."""
    sides = route_sides(route)
    if route.shares:
        computed = side_shares(route, pools)
        now = [next((share for side, share in computed if side is s), 0.0) for s in route.shares]
    else:
        now = [float(side["weight"] or 1) for side in sides]
    total = sum(now) or 1.0
    for side, share in zip(sides, now, strict=True):
        side["share"] = round(share / total, 4)
        side["instances"] = _instances(side["name"], pools)
    return sides


def shown_host(route: Route) -> str:
    """The host column: `*` for any host; a TCP route of a TCP listener shows its port (`:6379`)."""
    if route.scheme == "tcp" and not route.host:
        return f":{route.port}"
    return route.host or "*"


def routes_document(router: Router, pools: Pools, tcp: TcpListening | None = None) -> dict[str, Any]:
    """Routes in match order. A route that sends to several services (shared by their tags, or a split) lists
    each in `services`, with its weight, share and instances; `instances` holds every one of them, each naming
    its service; `service` is the first. `warning`: why no listener takes a TCP route (null when one does)."""
    tcp = tcp or TcpListening()
    table = router.current
    out = []
    for route in table.routes:
        services = route_services(route, pools)
        out.append({
            "id": route.id,
            "host": shown_host(route),
            "path": route.path,
            "service": route.service,
            "strip": route.strip,
            "proto": route.scheme,
            "exact": route.exact,
            "methods": sorted(route.methods),
            "conditions": [f"{c.kind} {c.text()}" for c in route.conditions],
            "priority": route.priority,
            "matcher": "exact" if route.exact else route.matcher,
            "services": services,
            "instances": [instance for service in services for instance in service["instances"]],
            "port": route.port,  # the listener port a route is restricted to (a TCP route's listener); 0: any
            "pxyproto": route.proxy_protocol or None,  # a TCP route's PROXY header version
            "warning": tcp.missing(route),
        })
    return {
        "generation": table.generation,
        "routes": out,
        "conflicts": [{"route": p.item, "service": p.service, "detail": p.detail} for p in table.conflicts],
    }


def readiness(report: Report, max_sync_age: float, now: float) -> tuple[bool, str]:
    """(ready, why) for /ready."""
    if report.draining:
        return False, "draining: shutting down"
    if not report.synced:
        return False, "no routing table from Consul yet"
    if max_sync_age:
        if report.last_success is None:
            return False, "Consul has not answered yet"
        age = now - report.last_success
        if age > max_sync_age:
            return False, f"routing table stale: Consul last answered {age:.1f} s ago (max_sync_age {max_sync_age:g} s)"
    return True, "ready"


def status_document(router: Router, report: Report, consul: str, max_sync_age: float, now: float) -> dict[str, Any]:
    ready, why = readiness(report, max_sync_age, now)
    return {
        "version": __version__,
        "build": BUILD.as_dict(),  # compiled hot path or pure Python (proxy/compiled.py)
        "ready": ready,
        "ready_reason": why,
        "draining": report.draining,
        "discovery": {
            "consul": consul,
            "reachable": report.reachable,
            "last_sync_age_s": None if report.last_success is None else round(max(0.0, now - report.last_success), 3),
            "generation": report.generation,
            "routes": report.routes,
            "workers": report.workers,
        },
        "worker_reports": [asdict(w) for w in report.worker_reports],
        "connections": report.connections,
        "routes": [
            {"id": r.id, "host": shown_host(r), "path": r.path, "service": r.service, "strip": r.strip,
             "proto": r.scheme, "services": route_sides(r)}
            for r in router.current.routes
        ],
        "services": [
            {"name": s.name, "algorithm": s.algorithm, "instances": [
                {k: v for k, v in asdict(i).items() if k not in ("key", "label")} for i in s.instances
            ]}
            for s in report.services
        ],
    }


def make_admin_app(
    router: Router,
    pools: Pools,
    exposition: Callable[[], bytes],
    report: Callable[[], Report],
    *,
    consul: str = "",
    max_sync_age: Callable[[], float] = lambda: 0.0,
    tcp: TcpListening | None = None,
) -> web.Application:
    """`max_sync_age` is read at each request: a SIGHUP reload may change it. `tcp`: what the TCP listeners
    take (TCP routes no listener takes carry a warning)."""
    async def status_page(_: web.Request) -> web.Response:
        return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        ok, why = readiness(report(), max_sync_age(), time.time())
        return web.Response(text=why + "\n", status=200 if ok else 503, headers={"Cache-Control": "no-store"})

    async def api_routes(_: web.Request) -> web.Response:
        return web.json_response(routes_document(router, pools, tcp))

    async def api_status(_: web.Request) -> web.Response:
        document = status_document(router, report(), consul, max_sync_age(), time.time())
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_get("/api/routes", api_routes)
    app.router.add_get("/api/status", api_status)
    return app
