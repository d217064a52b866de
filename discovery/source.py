"""The discovery-source interface the proxy composes with: the Consul `Watcher` and the `StaticWatcher` both
speak it, so the proxy never asks which one it has.

A source hands each new Snapshot to the callback it was built with (synchronously, on the event loop) and says
how current it is: `synced` once a first snapshot was handed over, `reachable` while no query is failing,
`last_success` when it last heard from its origin. `watch_also` names services to follow whether or not their
tags route them (the config file's and Consul KV's routes send to them); `reload` re-reads what SIGHUP
re-reads (the static file; nothing for Consul, which is followed continuously).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .model import Snapshot


class Source(Protocol):
    @property
    def synced(self) -> asyncio.Event: ...

    @property
    def reachable(self) -> bool: ...

    @property
    def last_success(self) -> float | None: ...

    @property
    def last_snapshot(self) -> Snapshot | None: ...

    async def run(self) -> None:
        """Follow the origin until cancelled."""

    def watch_also(self, services: frozenset[str]) -> None:
        """Also follow these services, from now on (a change may hand over a new snapshot at once)."""

    def reload(self) -> None:
        """SIGHUP: re-read what is read from files; a problem is logged and the last good state stays."""
