"""Consul's HTTP API through py-consul's asyncio client: blocking queries on the catalog and on health.

Only the endpoints every Consul release since 1.0 speaks are used: /v1/catalog/services and
/v1/health/service/<name>, each with `index` and `wait`. Every failure leaves this module as one
ConsulError carrying a bounded `reason` (used as a metric label), so callers never see aiohttp or
py-consul exception types.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio

# Consul adds up to wait/16 of jitter to a blocking query; the HTTP timeout must outlast both.
_TIMEOUT_MARGIN_S: Final = 10.0


class ConsulError(Exception):
    """A Consul request that failed. `reason` is one of: unreachable, forbidden, timeout, bad_response."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ConsulAddress:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ConsulAddress:
        """`host:port`, `http://host:port` or `https://host:port`; ValueError naming what is wrong."""
        raw = text.strip()
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"consul address {text!r}: scheme must be http or https")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"consul address {text!r}: invalid port") from exc
        if not parts.hostname:
            raise ValueError(f"consul address {text!r}: missing host")
        if parts.path not in ("", "/"):
            raise ValueError(f"consul address {text!r}: must not have a path")
        return cls(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 8500))


def _index(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError) as exc:
        raise ConsulError("bad_response", f"X-Consul-Index {raw!r} is not a number") from exc


class ConsulClient:
    """Blocking-query reads of the catalog and of service health. Create and close inside the event loop."""

    def __init__(self, address: ConsulAddress, *, token: str | None, dc: str | None, wait_s: float) -> None:
        self.address = address
        self.wait = f"{max(1, int(wait_s))}s"
        self._api = consul.aio.Consul(
            host=address.host,
            port=address.port,
            scheme=address.scheme,
            token=token or None,
            dc=dc or None,
            connections_timeout=wait_s + wait_s / 16 + _TIMEOUT_MARGIN_S,
        )

    async def services(self, index: int) -> tuple[int, dict[str, list[str]]]:
        """(index, {service: tags}) from /v1/catalog/services; blocks until a change when index > 0."""
        raw_index, data = await self._call(self._api.catalog.services(index=index or None, wait=self.wait))
        if not isinstance(data, dict):
            raise ConsulError("bad_response", "catalog/services did not return an object")
        return _index(raw_index), data

    async def health(self, service: str, index: int) -> tuple[int, list[dict[str, Any]]]:
        """(index, entries) from /v1/health/service/<service>, every instance with its checks."""
        raw_index, data = await self._call(self._api.health.service(service, index=index or None, wait=self.wait))
        if data is None:
            data = []
        if not isinstance(data, list):
            raise ConsulError("bad_response", f"health/service/{service} did not return a list")
        return _index(raw_index), data

    async def close(self) -> None:
        await self._api.close()

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise
        except consul.ACLPermissionDenied as exc:
            raise ConsulError("forbidden", str(exc) or "ACL permission denied") from exc
        except (TimeoutError, consul.Timeout) as exc:
            raise ConsulError("timeout", "no answer from Consul in time") from exc
        except consul.ConsulException as exc:
            raise ConsulError("bad_response", str(exc)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConsulError("unreachable", str(exc) or type(exc).__name__) from exc
