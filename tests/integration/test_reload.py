"""SIGHUP re-reads the config file: live keys apply at once (in every worker), keys that need a restart are kept
and named, and a broken file keeps the running configuration."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, wait_until
from .rawhttp import Wire, request

pytestmark = pytest.mark.integration


async def _status(port: int, headers: int) -> int:
    """A new connection per request, so with several workers the kernel spreads them."""
    wire = await Wire.open(port)
    try:
        wire.send(request("GET", "/reload/x", *[f"X-F{i}: 1" for i in range(headers)]))
        return (await wire.response()).status
    finally:
        wire.abort()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_applies_live_keys_keeps_restart_keys_and_survives_a_bad_file(
    consul: ConsulAgent, workdir: Path, workers: int,
) -> None:
    config = workdir / f"reload-{workers}.toml"
    config.write_text("max_header_count = 100\n")
    proxy = FerrymanProcess(consul.addr, workdir, workers=workers, extra=["--config", str(config)])
    await asyncio.to_thread(proxy.start)
    backend = await Backend(f"reload-{workers}").start()
    try:
        await asyncio.to_thread(consul.register, "reload", f"reload-{workers}", backend.port, ["urlprefix-/reload"])
        await asyncio.to_thread(proxy.wait_instances, "reload@*any*/reload", [f"reload-{workers}"])
        for _ in range(10):
            assert await _status(proxy.port, 20) in (200, 404)  # 404 while a worker is still catching up

        assert proxy.proc is not None
        config.write_text('max_header_count = 10\ntag_prefix = "route-"\n')
        os.kill(proxy.proc.pid, signal.SIGHUP)
        # Every worker takes the new limit: 20 header fields are now too many, on every connection.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            statuses = {await _status(proxy.port, 20) for _ in range(12)}
            if statuses == {431}:
                break
            assert asyncio.get_running_loop().time() < deadline, statuses
            await asyncio.sleep(0.1)

        events = await asyncio.to_thread(wait_until, lambda: [
            e for e in proxy.log_events() if e.get("event") == "config_reload_needs_restart"] or None, 5, "log")
        assert events[0]["keys"] == ["tag_prefix"]
        assert any(e.get("event") == "config_reloaded" and "max_header_count" in e["changed"]
                   for e in proxy.log_events())
        assert await _status(proxy.port, 5) == 200  # routes still come from urlprefix- tags

        config.write_text("max_header_count = [broken\n")
        os.kill(proxy.proc.pid, signal.SIGHUP)
        failed = await asyncio.to_thread(wait_until, lambda: [
            e for e in proxy.log_events() if e.get("event") == "config_reload_failed"] or None, 5, "failure logged")
        assert str(config) in failed[0]["error"] and "invalid TOML" in failed[0]["error"]
        assert {await _status(proxy.port, 20) for _ in range(6)} == {431}  # the running config stays
        assert proxy.proc.poll() is None
    finally:
        await asyncio.to_thread(proxy.stop)
        await backend.stop()
        await asyncio.to_thread(consul.deregister, f"reload-{workers}")
