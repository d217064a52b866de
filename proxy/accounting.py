"""What a finished request leaves behind: its metrics and its access line (sampled for successes)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .h1.head import Request

if TYPE_CHECKING:
    from .listener import ProxyContext


def record(
    ctx: ProxyContext, req: Request, service: str, route_id: str, status: int, started: float, upstream: str,
    sent: int, path: str, upstream_s: float | None, peer: str,
) -> None:
    elapsed = time.perf_counter() - started
    ctx.metrics.observe_request(service, route_id, req.method, status, elapsed, upstream_s, req.body_sent, sent)
    access_log = ctx.access_log
    sample = ctx.limits.access_sample
    if access_log is not None and (status >= 400 or sample >= 1.0 or ctx.rng.random() < sample):
        access_log(req, path, status, service, upstream, round(elapsed * 1000, 3), sent, peer)
