"""Routing on headers, cookies, method and query through a real Consul agent and Ferryman."""

from __future__ import annotations

import asyncio
import json

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, fetch

pytestmark = pytest.mark.integration


async def test_header_cookie_method_and_query_conditions_pick_their_service(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http,
) -> None:
    services = {
        "cond-stable": ["urlprefix-/cond"],
        "cond-canary": ["urlprefix-/cond header=X-Canary:1"],
        "cond-beta": ["urlprefix-/cond cookie=beta:1"],
        "cond-writer": ["urlprefix-/cond method=POST"],
        "cond-v2": ["urlprefix-/cond query=v:2"],
    }
    for name, tags in services.items():
        backend = await Backend(f"{name}-1").start()
        backends.append(backend)
        await asyncio.to_thread(consul.register, name, f"{name}-1", backend.port, tags)
    try:
        def all_routed() -> bool:
            ids = {r["id"] for r in ferryman.routes()["routes"]}
            return {"cond-stable@*any*/cond", "cond-canary@*any*/cond[header:x-canary:1]"} <= ids and len(
                [i for i in ids if i.startswith("cond-")]) == 5

        from .harness import wait_until
        await asyncio.to_thread(wait_until, all_routed, 10, "the five /cond routes")

        async def served_by(**kwargs: object) -> str:
            status, body, _ = await fetch(http, f"{ferryman.url}{kwargs.pop('path', '/cond/x')}", **kwargs)
            assert status == 200
            return str(json.loads(body)["instance"])

        assert await served_by() == "cond-stable-1"
        assert await served_by(headers={"X-Canary": "1"}) == "cond-canary-1"
        assert await served_by(headers={"Cookie": "theme=dark; beta=1"}) == "cond-beta-1"
        assert await served_by(method="POST", data=b"x") == "cond-writer-1"
        assert await served_by(path="/cond/x?v=2") == "cond-v2-1"
        assert await served_by(path="/cond/x?v=3") == "cond-stable-1"

        # /api/routes lists them in match order, with their conditions.
        routes = [r for r in ferryman.routes()["routes"] if r["id"].startswith("cond-")]
        assert routes[-1]["id"] == "cond-stable@*any*/cond"
        canary = next(r for r in routes if r["service"] == "cond-canary")
        assert canary["conditions"] == ["header x-canary:1"]
    finally:
        for name in services:
            await asyncio.to_thread(consul.deregister, f"{name}-1")


async def test_a_redirect_route_answers_itself(consul: ConsulAgent, ferryman: FerrymanProcess, http) -> None:
    from .harness import wait_until
    await asyncio.to_thread(consul.register, "cond-moved", "cond-moved-1", 9, [
        "urlprefix-/cond-old redirect=308,https://new.example.com$path"], ttl=False)
    try:
        await asyncio.to_thread(wait_until, lambda: any(
            r["service"] == "cond-moved" for r in ferryman.routes()["routes"]), 10, "the redirect route")
        status, _, headers = await fetch(http, f"{ferryman.url}/cond-old/a?b=1", method="POST", data=b"x",
                                         allow_redirects=False)
        assert status == 308 and headers["Location"] == "https://new.example.com/cond-old/a?b=1"
    finally:
        await asyncio.to_thread(consul.deregister, "cond-moved-1")
