"""A demo backend that registers itself in Consul with route tags and a TTL check, and deregisters on exit.

    python -m demo.backend --service web --port 8001 --tag urlprefix-/ --consul 127.0.0.1:8500

GET any path: JSON naming the service, the instance and what the proxy sent (path, headers).
POST /admin/fail and /admin/recover: turn this instance's TTL check critical or passing, to watch the proxy
take it out of and back into the pool. GET /stream?chunks=N&delay=S: a slow chunked response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
from typing import Any

import consul.aio
from aiohttp import web

TTL_S = 10


def make_app(service: str, instance: str) -> web.Application:
    state: dict[str, Any] = {"healthy": True}

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "service": service,
            "instance": instance,
            "method": request.method,
            "path": request.raw_path,
            "headers": {k: v for k, v in request.headers.items()},
            "body_bytes": len(body),
        })

    async def stream(request: web.Request) -> web.StreamResponse:
        chunks = min(int(request.query.get("chunks", "5")), 1000)
        delay = min(float(request.query.get("delay", "0.5")), 5.0)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for i in range(chunks):
            await resp.write(f"{instance} chunk {i}\n".encode())
            await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    async def set_health(request: web.Request) -> web.Response:
        state["healthy"] = request.match_info["what"] == "recover"
        await request.app["heartbeat"]()
        return web.json_response({"instance": instance, "healthy": state["healthy"]})

    app = web.Application()
    app["state"] = state
    app.router.add_post("/admin/{what:fail|recover}", set_health)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(args: argparse.Namespace) -> None:
    instance = args.id or f"{args.service}-{socket.gethostname()}-{args.port}"
    app = make_app(args.service, instance)
    host, _, port = args.consul.rpartition(":")
    agent = consul.aio.Consul(host=host or "127.0.0.1", port=int(port), token=os.environ.get("CONSUL_HTTP_TOKEN"))
    check_id = f"service:{instance}"

    async def heartbeat() -> None:
        if app["state"]["healthy"]:
            await agent.agent.check.ttl_pass(check_id, f"{instance} is serving")
        else:
            await agent.agent.check.ttl_fail(check_id, f"{instance} was failed by hand")

    app["heartbeat"] = heartbeat
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.listen, args.port).start()
    await agent.agent.service.register(
        args.service, service_id=instance, address=args.advertise, port=args.port, tags=args.tag,
        check={"CheckID": check_id, "Name": "TTL heartbeat", "TTL": f"{TTL_S}s",
               "DeregisterCriticalServiceAfter": "1m"},
    )
    await heartbeat()
    print(json.dumps({"event": "backend_registered", "service": args.service, "instance": instance,
                      "port": args.port, "tags": args.tag}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        while not stop.is_set():
            try:
                await heartbeat()
            except Exception as exc:  # Consul restarting: keep serving, try again next beat
                print(json.dumps({"event": "heartbeat_failed", "error": str(exc)}), flush=True)
            try:
                await asyncio.wait_for(stop.wait(), TTL_S / 3)
            except TimeoutError:
                pass
    finally:
        try:
            await agent.agent.service.deregister(instance)
        except Exception as exc:
            print(json.dumps({"event": "deregister_failed", "error": str(exc)}), flush=True)
        await agent.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", required=True)
    parser.add_argument("--id", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--listen", default="127.0.0.1", help="address to bind")
    parser.add_argument("--advertise", default="127.0.0.1", help="address registered in Consul")
    parser.add_argument("--tag", action="append", default=[], help="Consul tag (repeatable)")
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"))
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
