"""Follow a Consul KV prefix with blocking queries and hand every changed set of keys over, raw.

Runs the one blocking-query loop (`follow.py`) on /v1/kv/<prefix>?recurse. Each answer that differs from the
last one handed over goes to `on_change` as `{key: value bytes}` (every key under the prefix, so a deleted key
is one missing from the dict); what the values mean (certificates, route tables) is the caller's to parse.
Failures back off and are logged once per outage (`unreadable`, then `recovered`); the values handed over
before stay in force meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .follow import DEFAULT_LIMIT, Backoff, Outage, RateLimit, follow


class KvReader(Protocol):
    async def kv(self, prefix: str, index: int, dc: str = "") -> tuple[int, dict[str, bytes]]: ...


class KvFollower:
    """One KV prefix followed; `run()` until cancelled."""

    def __init__(self, reader: KvReader, prefix: str, on_change: Callable[[dict[str, bytes]], None], *,
                 unreadable: str, recovered: str, limit: RateLimit = DEFAULT_LIMIT,
                 backoff: Backoff | None = None) -> None:
        self.prefix = prefix
        self._reader, self._on_change = reader, on_change
        self._limit, self._backoff = limit, backoff
        self.outage = Outage(unreadable, recovered, prefix=prefix)
        self._last: dict[str, bytes] | None = None

    async def _fetch(self, index: int) -> tuple[int, dict[str, bytes]]:
        return await self._reader.kv(self.prefix, index)

    def _answered(self, values: dict[str, bytes]) -> None:
        if values != self._last:
            self._last = values
            self._on_change(values)

    async def run(self) -> None:
        await follow(self._fetch, self._answered, query=f"kv:{self.prefix}", outage=self.outage,
                     limit=self._limit, backoff=self._backoff)
