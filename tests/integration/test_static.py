"""Ferryman with `--static-file` and no Consul anywhere: routes from the file, followed as it changes; a broken
edit keeps the last good routes; a broken file at start is a config error."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from .harness import Backend, FerrymanProcess, fetch, free_port, wait_until

pytestmark = pytest.mark.integration


def _file(path: Path, ports: list[int]) -> None:
    instances = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    path.write_text(f'[[services]]\nname = "st"\nroutes = ["/st"]\ninstances = [{instances}]\n')


async def test_static_file_routes_without_consul_and_follows_edits(workdir: Path) -> None:
    a, b = await Backend("st-a").start(), await Backend("st-b").start()
    static = workdir / "static-routes.toml"
    _file(static, [a.port])
    # consul_addr points at a port nothing listens on: the static provider must not need it.
    proxy = FerrymanProcess(f"127.0.0.1:{free_port()}", workdir, extra=["--static-file", str(static)])
    try:
        await asyncio.to_thread(proxy.start)
        async with aiohttp.ClientSession() as http:
            status, body, _ = await fetch(http, f"{proxy.url}/st/x")
            assert status == 200 and json.loads(body)["instance"] == "st-a"
            assert (await fetch(http, f"{proxy.admin_url}/ready"))[0] == 200

            _file(static, [a.port, b.port])
            await asyncio.to_thread(proxy.wait_instances, "st@*any*/st", [
                f"st-127.0.0.1:{a.port}", f"st-127.0.0.1:{b.port}"], 10)
            seen = {json.loads((await fetch(http, f"{proxy.url}/st/x"))[1])["instance"] for _ in range(20)}
            assert seen == {"st-a", "st-b"}

            static.write_text('[[services]]\nname = "st"\ninstances = ["nohost"]\n')
            await asyncio.to_thread(wait_until, lambda: any(
                e.get("event") == "static_file_invalid" for e in proxy.log_events()), 10, "the bad edit logged")
            events = [e for e in proxy.log_events() if e.get("event") == "static_file_invalid"]
            assert str(static) in events[0]["error"] and "'nohost' is not host:port" in events[0]["error"]
            assert (await fetch(http, f"{proxy.url}/st/x"))[0] == 200  # the last good routes stay
            assert (await fetch(http, f"{proxy.admin_url}/ready"))[0] == 200
    finally:
        await asyncio.to_thread(proxy.stop)
        await a.stop()
        await b.stop()


def test_a_bad_static_file_at_start_is_a_config_error(workdir: Path) -> None:
    static = workdir / "bad-static.toml"
    static.write_text('[[services]]\nname = "st"\nroutes = ["nopath"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ferryman"), "--static-file", str(static), "--listen",
         f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}", "--workers", "1"],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"ferryman: config error: static_file: {static}: service 'st'")
