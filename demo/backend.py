"""A demo backend that registers itself in Consul with route tags and a health check, and deregisters on exit.

    python -m demo.backend --service web --port 8001 --tag urlprefix-/ --consul 127.0.0.1:8500

GET any path: JSON naming the service, the instance and what the proxy sent (path, headers).
GET /health: 200 while this instance is healthy, 503 once failed by hand (what an HTTP check asks).
POST /admin/fail and /admin/recover: turn this instance's check critical or passing, to watch the proxy
take it out of and back into the pool. GET /stream?chunks=N&delay=S: a slow chunked response.

The check is a TTL check the backend keeps passing (`--check ttl`, the default, what `make demo` uses), an
HTTP check Consul runs against GET /health at the advertised address (`--check http`, what the compose stack
uses: Consul there runs in another container), or both. Consul's address comes from `--consul` or
CONSUL_HTTP_ADDR (`host:port` or `http(s)://host:port`), its ACL token from CONSUL_HTTP_TOKEN. The address and
port registered in Consul are `--advertise` and `--advertise-port` (default: `--port`), or DEMO_ADVERTISE and
DEMO_ADVERTISE_PORT. When the agent loses the registration (a dev agent restarted), it is registered again.
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
HTTP_CHECK_INTERVAL_S = 2
REGISTER_WITHIN_S = 30  # at start, keep trying to register this long (Consul may still be starting)


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

    async def health(request: web.Request) -> web.Response:
        healthy = state["healthy"]
        return web.json_response({"service": service, "instance": instance, "healthy": healthy},
                                 status=200 if healthy else 503)

    async def set_health(request: web.Request) -> web.Response:
        state["healthy"] = request.match_info["what"] == "recover"
        await request.app["heartbeat"]()
        return web.json_response({"instance": instance, "healthy": state["healthy"]})

    app = web.Application()
    app["state"] = state
    app.router.add_post("/admin/{what:fail|recover}", set_health)
    app.router.add_get("/health", health)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def consul_client(addr: str) -> consul.aio.Consul:
    """`host:port` or `http(s)://host:port` (port 8500 by default); the token from CONSUL_HTTP_TOKEN."""
    scheme, sep, rest = addr.strip().partition("://")
    if not sep:
        scheme, rest = "http", addr.strip()
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        host, port = rest.rstrip("/"), "8500"
    return consul.aio.Consul(host=host.strip("[]") or "127.0.0.1", port=int(port), scheme=scheme,
                             token=os.environ.get("CONSUL_HTTP_TOKEN"))


def checks(args: argparse.Namespace, instance: str) -> list[dict[str, Any]]:
    """The Consul check definitions for `--check`: the TTL check first (its id is `service:<instance>`)."""
    out = []
    if args.check in ("ttl", "both"):
        out.append({"CheckID": f"service:{instance}", "Name": "TTL heartbeat", "TTL": f"{TTL_S}s",
                    "DeregisterCriticalServiceAfter": "1m"})
    if args.check in ("http", "both"):
        host = f"[{args.advertise}]" if ":" in args.advertise else args.advertise
        out.append({"CheckID": f"service:{instance}:http", "Name": "HTTP GET /health",
                    "HTTP": f"http://{host}:{args.advertise_port or args.port}/health", "Method": "GET",
                    "Interval": f"{HTTP_CHECK_INTERVAL_S}s", "Timeout": "1s",
                    "DeregisterCriticalServiceAfter": "1m"})
    return out


def log(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def serve_only(args: argparse.Namespace, instance: str) -> None:
    """No Consul: listen until SIGTERM or SIGINT (the static provider routes to it)."""
    runner = web.AppRunner(make_app(args.service, instance), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.listen, args.port).start()
    log("backend_serving", service=args.service, instance=instance, port=args.port, consul=None)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def serve(args: argparse.Namespace) -> None:
    instance = args.id or f"{args.service}-{socket.gethostname()}-{args.port}"
    if args.check == "none":
        await serve_only(args, instance)
        return
    app = make_app(args.service, instance)
    agent = consul_client(args.consul)
    check_id = f"service:{instance}"
    service_checks = checks(args, instance)
    has_ttl = args.check in ("ttl", "both")

    async def heartbeat() -> None:
        if not has_ttl:
            return  # an HTTP check reads GET /health, which follows app["state"] by itself
        if app["state"]["healthy"]:
            await agent.agent.check.ttl_pass(check_id, f"{instance} is serving")
        else:
            await agent.agent.check.ttl_fail(check_id, f"{instance} was failed by hand")

    async def register() -> None:
        await agent.agent.service.register(
            args.service, service_id=instance, address=args.advertise, port=args.advertise_port or args.port,
            tags=args.tag, check=service_checks[0], extra_checks=service_checks[1:],
        )

    async def registered() -> bool:
        return instance in await agent.agent.services()

    app["heartbeat"] = heartbeat
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.listen, args.port).start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REGISTER_WITHIN_S
    while True:
        try:
            await register()
            break
        except Exception as exc:
            if loop.time() > deadline:
                await agent.close()
                await runner.cleanup()
                raise SystemExit(f"demo.backend: cannot register in Consul at {args.consul}: {exc}") from exc
            log("register_failed", consul=args.consul, error=str(exc))
            await asyncio.sleep(1)
    await heartbeat()
    log("backend_registered", service=args.service, instance=instance, port=args.port, tags=args.tag,
        address=args.advertise, advertise_port=args.advertise_port or args.port,
        checks=[c["CheckID"] for c in service_checks])
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        while not stop.is_set():
            try:
                if not await registered():  # the agent forgot it (a dev agent restarted): register again
                    await register()
                    log("backend_reregistered", service=args.service, instance=instance)
                await heartbeat()
            except Exception as exc:  # Consul restarting: keep serving, try again next beat
                log("heartbeat_failed", error=str(exc))
            try:
                await asyncio.wait_for(stop.wait(), TTL_S / 3)
            except TimeoutError:
                pass
    finally:
        try:
            await agent.agent.service.deregister(instance)
            log("backend_deregistered", service=args.service, instance=instance)
        except Exception as exc:
            log("deregister_failed", error=str(exc))
        await agent.close()
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", required=True)
    parser.add_argument("--id", default="")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--listen", default=env("DEMO_LISTEN", "127.0.0.1"), help="address to bind")
    parser.add_argument("--advertise", default=env("DEMO_ADVERTISE", "127.0.0.1"),
                        help="address registered in Consul (an IP or a name Consul and Ferryman resolve)")
    parser.add_argument("--advertise-port", type=int, default=int(env("DEMO_ADVERTISE_PORT", "0")),
                        help="port registered in Consul (default: --port)")
    parser.add_argument("--check", choices=("ttl", "http", "both", "none"), default=env("DEMO_CHECK", "ttl"),
                        help="Consul check: a TTL the backend keeps passing, an HTTP GET /health, or both; "
                             "none: no Consul at all (serve only; Ferryman's static_file names it)")
    parser.add_argument("--tag", action="append", default=[], help="Consul tag (repeatable)")
    parser.add_argument("--consul", default=env("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
                        help="Consul agent: host:port or http(s)://host:port")
    return parser


def main() -> None:
    asyncio.run(serve(build_parser().parse_args()))


if __name__ == "__main__":
    main()
