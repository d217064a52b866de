"""The admin listener: /metrics (Prometheus text), /healthz (liveness), /api/routes (the current table)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .pool import Pools
from .server import Router


def routes_document(router: Router, pools: Pools) -> dict[str, Any]:
    table = router.current
    out = []
    for route in table.routes:
        pool = pools.get(route.service)
        out.append({
            "id": route.id,
            "host": route.host or "*",
            "path": route.path,
            "service": route.service,
            "strip": route.strip,
            "proto": route.scheme,
            "instances": [
                {"id": e.instance_id, "node": e.node, "address": e.address, "port": e.port, "weight": e.weight}
                for e in (pool.endpoints if pool else ())
            ],
        })
    return {
        "generation": table.generation,
        "routes": out,
        "conflicts": [{"route": p.item, "service": p.service, "detail": p.detail} for p in table.conflicts],
    }


def make_admin_app(router: Router, pools: Pools, exposition: Callable[[], bytes]) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def api_routes(_: web.Request) -> web.Response:
        return web.json_response(routes_document(router, pools))

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/routes", api_routes)
    return app
