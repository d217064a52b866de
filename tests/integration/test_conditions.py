"""Routing on headers, cookies, method and query through a real Consul agent and Ferryman."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, fetch

pytestmark = pytest.mark.integration


async def test_header_cookie_method_and_query_conditions_pick_their_service(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession,
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


async def test_a_redirect_route_answers_itself(
    consul: ConsulAgent, ferryman: FerrymanProcess, http: aiohttp.ClientSession
) -> None:
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


async def test_a_95_5_split_and_header_rules_from_the_config_file(
    consul: ConsulAgent, workdir: Path, backends: list[Backend]
) -> None:
    """2,000 requests over a [[routes]] split of 95/5: the canary's share within ±2 points; the route's header
    rules set, add and remove fields both ways."""
    config = workdir / "split.toml"
    config.write_text('''\
[[routes]]
route = "/cut"
split = { cut-stable = 95, cut-canary = 5 }
request_headers = { set = { X-Env = "prod" }, remove = ["X-Debug"] }
response_headers = { remove = ["X-Powered-By"], add = { X-Served-Via = "ferryman" } }
''')
    for name in ("cut-stable", "cut-canary"):
        backend = await Backend(f"{name}-1").start()
        backends.append(backend)
        await asyncio.to_thread(consul.register, name, f"{name}-1", backend.port, ["no-route"])
    proxy = FerrymanProcess(consul.addr, workdir, extra=["--config", str(config), "--access-log", "false"])
    try:
        await asyncio.to_thread(proxy.start)
        from .harness import wait_until
        await asyncio.to_thread(wait_until, lambda: len(proxy.routes()["routes"]) > 0, 10, "the split route")
        import aiohttp
        counts = {"cut-stable-1": 0, "cut-canary-1": 0}
        async with aiohttp.ClientSession() as http:
            status, body, headers = await fetch(http, f"{proxy.url}/cut/x", headers={"X-Debug": "1", "X-Env": "dev"})
            seen = dict(json.loads(body)["headers"])
            assert status == 200 and seen["X-Env"] == "prod" and "X-Debug" not in seen
            assert headers["X-Served-Via"] == "ferryman" and "X-Powered-By" not in headers
            for _ in range(2000):
                _, body, _ = await fetch(http, f"{proxy.url}/cut/x")
                counts[json.loads(body)["instance"]] += 1
        share = counts["cut-canary-1"] / 2000
        assert 0.03 <= share <= 0.07, counts
    finally:
        await asyncio.to_thread(proxy.stop)
        for name in ("cut-stable", "cut-canary"):
            await asyncio.to_thread(consul.deregister, f"{name}-1")


async def test_routes_from_service_meta(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    """A service whose routes do not fit in tags: the bare prefix tag, and the routes in meta."""
    backend = await Backend("cond-meta-1").start()
    backends.append(backend)
    await asyncio.to_thread(consul.register, "cond-meta", "cond-meta-1", backend.port, ["urlprefix-"],
                            meta={"ferryman-route": "/cond-meta strip=/cond-meta",
                                  "ferryman-route-1": "/cond-meta2 header=X-Long-Condition:with-a-long-value"})
    try:
        from .harness import wait_until
        await asyncio.to_thread(wait_until, lambda: len(
            [r for r in ferryman.routes()["routes"] if r["service"] == "cond-meta"]) == 2, 10, "two meta routes")
        status, body, _ = await fetch(http, f"{ferryman.url}/cond-meta/hello")
        assert status == 200 and json.loads(body)["path"] == "/hello"
        status, body, _ = await fetch(http, f"{ferryman.url}/cond-meta2/x",
                                      headers={"X-Long-Condition": "with-a-long-value"})
        assert status == 200 and json.loads(body)["instance"] == "cond-meta-1"
    finally:
        await asyncio.to_thread(consul.deregister, "cond-meta-1")


async def test_routes_from_consul_kv_follow_puts_and_deletes(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    """ferryman/routes/<name> holds a [[routes]] table: added, shifted (a split) and deleted at run time."""
    import time
    import urllib.request

    def kv(method: str, key: str, value: str | None = None) -> None:
        data = value.encode() if value is not None else None
        request = urllib.request.Request(f"{consul.url}/v1/kv/ferryman/routes/{key}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=5):
            pass

    for name in ("kvr-a", "kvr-b"):
        backend = await Backend(f"{name}-1").start()
        backends.append(backend)
        await asyncio.to_thread(consul.register, name, f"{name}-1", backend.port, ["no-route"])

    async def served() -> str | None:
        status, body, _ = await fetch(http, f"{ferryman.url}/kvr/x")
        return str(json.loads(body)["instance"]) if status == 200 else None

    async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> float:
        started = time.monotonic()
        while not await predicate():
            assert time.monotonic() - started < 5, what
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    try:
        await asyncio.to_thread(kv, "PUT", "kvr", 'route = "/kvr"\nservice = "kvr-a"\n')
        took = await until(lambda: _is(served(), "kvr-a-1"), "the KV route to take effect")
        print(f"KV route served {took * 1000:.0f} ms after the put")
        assert took < 1.0
        await asyncio.to_thread(kv, "PUT", "broken", 'route = "/kvr-broken"\n')  # no service: logged, skipped
        await asyncio.to_thread(kv, "PUT", "kvr", 'route = "/kvr"\nsplit = { kvr-a = 1, kvr-b = 999 }\n')
        await until(lambda: _is(served(), "kvr-b-1"), "the weight shift")
        from .harness import wait_until
        await asyncio.to_thread(wait_until, lambda: any(
            e.get("event") == "kv_route_invalid" and e.get("key") == "ferryman/routes/broken"
            for e in ferryman.log_events()), 5, "the bad key logged")
        await asyncio.to_thread(kv, "DELETE", "kvr")
        await until(lambda: _is(served(), None), "the route gone")
    finally:
        for key in ("kvr", "broken"):
            await asyncio.to_thread(kv, "DELETE", key)
        for name in ("kvr-a", "kvr-b"):
            await asyncio.to_thread(consul.deregister, f"{name}-1")


async def _is(result: Awaitable[str | None], expected: str | None) -> bool:
    return await result == expected


async def test_prepend_and_upstream_host(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    backend = await Backend("cond-pre-1").start()
    backends.append(backend)
    await asyncio.to_thread(consul.register, "cond-pre", "cond-pre-1", backend.port,
                            ["urlprefix-/cond-pre strip=/cond-pre prepend=/v2 host=internal.example"])
    try:
        await asyncio.to_thread(ferryman.wait_instances, "cond-pre@*any*/cond-pre", ["cond-pre-1"])
        status, body, _ = await fetch(http, f"{ferryman.url}/cond-pre/users?id=7", headers={"Host": "shop.test"})
        seen = json.loads(body)
        headers = dict(seen["headers"])
        assert status == 200 and seen["path"] == "/v2/users?id=7"
        assert headers["Host"] == "internal.example" and headers["X-Forwarded-Host"] == "shop.test"
    finally:
        await asyncio.to_thread(consul.deregister, "cond-pre-1")
