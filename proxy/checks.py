"""Ferryman's own active health checks, for services whose meta names a `ferryman-health-path`.

Every `interval` seconds a GET goes to each instance of such a service; an answer other than 2xx/3xx (or none
within `timeout`) takes the instance out of its pool (`Pool.down`) until a check passes again. On top of
Consul's checks, never instead of them. The pools are read at each round, so instances that came or went since
the last one are checked as they are now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import structlog

from discovery.model import Endpoint

from .pool import Pool

log = structlog.get_logger("ferryman")


async def active_checks(pools: Iterable[Pool], interval: float, timeout: float) -> None:
    """Check every instance of every pool with a health path, each `interval` seconds, until cancelled."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, auto_decompress=False) as session:
        while True:
            await asyncio.sleep(interval)
            checks = [
                check(session, pool, endpoint)
                for pool in pools if pool.health_path
                for endpoint in pool.endpoints
            ]
            if checks:
                await asyncio.gather(*checks)


async def check(session: aiohttp.ClientSession, pool: Pool, endpoint: Endpoint) -> None:
    """One check of one instance: in or out of rotation by its answer (logged when it changes)."""
    url = f"{pool.check_scheme}://{endpoint.authority}{pool.health_path}"
    try:
        async with session.get(url, allow_redirects=False, ssl=not pool.check_skip_verify) as resp:
            healthy, detail = resp.status < 400, f"status {resp.status}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        healthy, detail = False, f"{type(exc).__name__}: {exc}"
    if healthy and pool.mark_down(endpoint.key, False):
        log.info("upstream_check_passed", service=pool.service, upstream=endpoint.authority)
    elif not healthy and endpoint in pool.endpoints and pool.health_path and pool.mark_down(endpoint.key, True):
        # (an instance that left, or checks switched off, while this check was under way stays out of it)
        log.warning("upstream_check_failed", service=pool.service, upstream=endpoint.authority,
                    path=pool.health_path, error=detail)
