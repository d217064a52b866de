"""Consul's HTTP API through py-consul's asyncio client: blocking queries on the catalog and on health.

Only the endpoints every Consul release since 1.0 speaks are used: /v1/catalog/services,
/v1/health/service/<name>, /v1/health/state/any, /v1/catalog/nodes, /v1/catalog/node/<node> and
/v1/kv/<prefix>?recurse, each with `index` and `wait` (plus
/v1/acl/token/self, 1.4+, in the start-time access check), and `dc` to read another datacenter. Every failure
leaves this module as one ConsulError carrying a bounded `reason` (used as a metric label), so callers never
see aiohttp or py-consul exception types.

Several addresses (servers or agents of one cluster) are tried in order: a request that finds its address
unreachable, silent, or answering 5xx / 429 (a server that lost its leader answers 500 "No cluster leader" or
"rpc error ..." until an election ends) moves the client to the next address for the requests that follow.
The caller's retry goes there. A blocking-query index is the cluster's Raft index, so one read from one server
is valid on another; an index that went backwards is the watcher's `next_index` business.

Several datacenters (`dc="dc1,dc2"`, in order of preference) are read through the same addresses, each query
naming its datacenter (`?dc=`): the local servers forward it over the WAN. A remote datacenter that cannot be
reached answers 500 "No path to datacenter" from every local server alike, so that answer does not move the
client to another address.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp
import consul
import consul.aio
import orjson
import structlog
from consul.callback import CB

from .triggers import StateAny

log = structlog.get_logger("ferryman.discovery")

# Consul adds up to wait/16 of jitter to a blocking query; the HTTP timeout must outlast both.
_TIMEOUT_MARGIN_S: Final = 10.0
# Each request of the start-time access check waits this long at most (a silent address is skipped).
_CHECK_TIMEOUT_S: Final = 5.0
# Connections one Ferryman host opens to Consul, whatever the number of services, datacenters and workers
# (only the discovery process talks to Consul): two blocking queries per datacenter, a few reads of changed
# services, the KV followers. Queries beyond it wait for a connection (aiohttp's connector queues them).
MAX_CONNECTIONS: Final = 8
# The anonymous token's AccessorID, the same in every Consul with the 1.4+ ACL system.
_ANONYMOUS_ACCESSOR: Final = "00000000-0000-0000-0000-000000000002"
MINIMAL_POLICY: Final = 'service_prefix "" { policy = "read" }  node_prefix "" { policy = "read" }'
# What Consul answers (500) for a datacenter it has no route to: unknown, or its servers out of WAN reach.
_NO_DC_PATH: Final = "No path to datacenter"
# Consul's own rule for datacenter names (agent config `datacenter`).
_DC_NAME: Final = re.compile(r"[A-Za-z0-9_-]+")


# Every ConsulError's reason (a bounded metric label).
ERROR_REASONS: Final = ("unreachable", "forbidden", "timeout", "bad_response")


class ConsulError(Exception):
    """A Consul request that failed. `reason` is one of ERROR_REASONS; `status` is the HTTP status when
    Consul answered one."""

    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status

    @property
    def failover(self) -> bool:
        """Another address of the cluster may answer: this one is down, silent, without a leader or overloaded.
        A refused token (403), a bad request, or a remote datacenter out of reach would be answered by every
        server alike."""
        if self.reason in ("unreachable", "timeout"):
            return True
        if _NO_DC_PATH in self.detail:
            return False
        return self.status is not None and (self.status >= 500 or self.status == 429)


class ConsulAccessError(ConsulError):
    """The token is unknown to Consul, or may not read what Ferryman needs: a configuration error."""

    def __init__(self, detail: str) -> None:
        super().__init__("forbidden", detail, 403)


@dataclass(frozen=True, slots=True)
class ConsulAddress:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> ConsulAddress:
        """`host:port`, `http://host:port` or `https://host:port`; ValueError naming what is wrong."""
        raw = text.strip()
        try:
            parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        except ValueError as exc:  # "Invalid IPv6 URL"
            raise ValueError(f"consul address {text!r}: {exc}") from exc
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"consul address {text!r}: scheme must be http or https")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"consul address {text!r}: invalid port") from exc
        if port == 0:
            raise ValueError(f"consul address {text!r}: invalid port")
        host = parts.hostname
        if not host:
            raise ValueError(f"consul address {text!r}: missing host")
        if "@" in parts.netloc:
            raise ValueError(f"consul address {text!r}: must not have user info (the token is consul_token)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"consul address {text!r}: must not have a path")
        if any(c.isspace() for c in raw) or ("[" in host or "]" in host):
            raise ValueError(f"consul address {text!r}: invalid host")
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise ValueError(f"consul address {text!r}: invalid IPv6 address") from exc
        return cls(parts.scheme, host, port or (443 if parts.scheme == "https" else 8500))

    @classmethod
    def parse_list(cls, text: str) -> tuple[ConsulAddress, ...]:
        """One address or several, comma-separated (`a:8500,b:8500,https://c:8501`), in the order they are
        tried; ValueError naming the item that is wrong."""
        items = text.split(",")
        addresses: list[ConsulAddress] = []
        for number, item in enumerate(items, 1):
            if len(items) > 1 and not item.strip():
                raise ValueError(f"consul address list {text!r}: item {number} is empty")
            address = cls.parse(item)
            if address in addresses:
                raise ValueError(f"consul address {item.strip()!r} is listed twice (as {address})")
            addresses.append(address)
        return tuple(addresses)


def parse_datacenters(text: str) -> tuple[str, ...]:
    """`consul_dc`: empty (the agent's own datacenter: `()`), one name, or several comma-separated in order of
    preference (`dc1,dc2`); ValueError naming the item that is wrong. Names are Consul's: letters, digits, `-`
    and `_`; a name listed twice (in any case: Consul lower-cases datacenter names) is an error."""
    if not text.strip():
        return ()
    items = text.split(",")
    names: list[str] = []
    for number, item in enumerate(items, 1):
        name = item.strip()
        if not name:
            raise ValueError(f"datacenter list {text!r}: item {number} is empty")
        if not _DC_NAME.fullmatch(name):
            raise ValueError(f"datacenter {name!r}: a name has only letters, digits, '-' and '_'")
        if name.lower() in (n.lower() for n in names):
            raise ValueError(f"datacenter {name!r} is listed twice")
        names.append(name)
    return tuple(names)


_STATUS = re.compile(r"(\d{3}) ")


def _index(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError) as exc:
        raise ConsulError("bad_response", f"X-Consul-Index {raw!r} is not a number") from exc


class ConsulClient:
    """Blocking-query reads of the catalog and of service health from one of several addresses of a cluster.
    Create and close inside the event loop.

    `dc` is `consul_dc` (text, parsed by `parse_datacenters`) or the names themselves: `datacenters` is what the
    watcher follows, in order of preference, `("",)` for the agent's own datacenter. A query given no `dc`
    reads the first of them."""

    def __init__(
        self,
        addresses: ConsulAddress | Sequence[ConsulAddress],
        *,
        token: str | None,
        dc: str | Sequence[str] | None,
        wait_s: float,
        stale: bool = False,
        cached: bool = False,
    ) -> None:
        self.addresses = (addresses,) if isinstance(addresses, ConsulAddress) else tuple(addresses)
        if not self.addresses:
            raise ValueError("at least one Consul address is needed")
        names = parse_datacenters(dc) if isinstance(dc, str) else parse_datacenters(",".join(dc or ()))
        self.datacenters: tuple[str, ...] = names or ("",)
        self.wait = f"{max(1, int(wait_s))}s"
        self._token = token or None
        self._dc = self.datacenters[0] or None
        self._consistency: list[tuple[str, str]] = [("stale", "1")] if stale else []
        self._cached = cached
        self._timeout = wait_s + wait_s / 16 + _TIMEOUT_MARGIN_S
        self._current = 0
        self._failed: set[int] = set()  # addresses that failed since one last answered
        self._apis: dict[int, consul.aio.Consul] = {}  # one py-consul client per address, made on first use

    @property
    def address(self) -> ConsulAddress:
        """The address requests go to now."""
        return self.addresses[self._current]

    async def services(self, index: int, dc: str = "") -> tuple[int, dict[str, list[str]]]:
        """(index, {service: tags}) from /v1/catalog/services of datacenter `dc` (empty: the first listed);
        blocks until a change when index > 0."""
        raw_index, data = await self._request(
            lambda api: api.catalog.services(index=index or None, wait=self.wait, dc=dc or self._dc)
        )
        if not isinstance(data, dict):
            raise ConsulError("bad_response", "catalog/services did not return an object")
        return _index(raw_index), data

    async def health(self, service: str, index: int, dc: str = "") -> tuple[int, list[dict[str, Any]]]:
        """(index, entries) from /v1/health/service/<service> of datacenter `dc` (empty: the first listed),
        every instance with its checks. Read with ?cached when asked (and not blocking)."""
        extra = [("cached", "")] if self._cached and not index else []
        raw_index, data = await self._get(f"/v1/health/service/{quote(service, safe='')}", index, dc, extra)
        if data is None:
            data = []
        if not isinstance(data, list):
            raise ConsulError("bad_response", f"health/service/{service} did not return a list")
        return _index(raw_index), data

    async def nodes(self, dc: str = "") -> list[str]:
        """The names of every node of datacenter `dc` (/v1/catalog/nodes)."""
        _, data = await self._get("/v1/catalog/nodes", 0, dc)
        if not isinstance(data, list) or not all(isinstance(n, dict) and isinstance(n.get("Node"), str)
                                                 for n in data):
            raise ConsulError("bad_response", "catalog/nodes did not return a list of nodes")
        return [n["Node"] for n in data]

    async def node_services(self, node: str, dc: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the Node object, every instance on it) from /v1/catalog/node/<node>; ({}, []) for a node that is
        gone."""
        _, data = await self._get(f"/v1/catalog/node/{quote(node, safe='')}", 0, dc)
        if data is None:
            return {}, []
        services = data.get("Services") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("Node"), dict) or not isinstance(services, dict):
            raise ConsulError("bad_response", f"catalog/node/{node} did not return a Node and its Services")
        return data["Node"], list(services.values())

    async def checks(self, index: int, dc: str = "") -> tuple[int, StateAny | None]:
        """(index, checks) from /v1/health/state/any of datacenter `dc`: every check of every node and
        instance; blocks until one changes when index > 0. (index, None) when the query's wait ran out with
        nothing changed (the same index). The answer is kept as Consul sent it and decoded only when read as a
        list (triggers.StateAny): at 30,000 checks decoding alone is about 100 ms of CPU."""
        raw_index, data = await self._get("/v1/health/state/any", index, dc, unchanged_at=index, raw=True)
        if data is _UNCHANGED:
            return _index(raw_index), None
        answer = StateAny(data if isinstance(data, bytes) else b"[]")
        if answer.parts() is None:  # a layout the raw comparison does not know: decoded (and checked) now
            try:
                answer.checks()
            except ValueError as exc:  # orjson's JSONDecodeError too
                raise ConsulError("bad_response", f"health/state/any: {exc}") from exc
        return _index(raw_index), answer

    async def _get(
        self, path: str, index: int, dc: str, extra: Sequence[tuple[str, str]] = (), unchanged_at: int = 0,
        raw: bool = False,
    ) -> tuple[Any, Any]:
        """A read through py-consul's HTTP client with the parameters both Consul 1.8 and current releases
        take: index and wait (blocking), dc, stale, cached."""
        params: list[tuple[str, Any]] = [("index", index), ("wait", self.wait)] if index else []
        datacenter = dc or self._dc
        if datacenter:
            params.append(("dc", datacenter))
        params += self._consistency
        params += extra

        decode = functools.partial(_indexed_json, unchanged_at=unchanged_at, raw=raw)

        def make(api: consul.aio.Consul) -> Awaitable[Any]:
            return api.http.get(decode, path, params=params,  # type: ignore[no-any-return]
                                headers=api.prepare_headers(self._token), **({"raw": True} if raw else {}))

        return await self._request(make)  # type: ignore[no-any-return]

    async def kv(self, prefix: str, index: int, dc: str = "") -> tuple[int, dict[str, bytes]]:
        """(index, {key: value}) of every key under `prefix` from /v1/kv/<prefix>?recurse of datacenter `dc`
        (empty: the first listed); blocks until a change when index > 0. Values are the stored bytes (a key
        stored without a value reads b""). No key under the prefix is `{}` with the index to block on (Consul
        answers 404 then), so a watch also sees the first key appear."""
        key = prefix.lstrip("/")
        try:
            raw_index, data = await self._request(
                lambda api: api.kv.get(key, index=index or None, wait=self.wait, recurse=True, dc=dc or self._dc)
            )
        except (ValueError, AttributeError) as exc:  # py-consul decodes each item's Value from base64
            raise ConsulError("bad_response", f"kv/{key}: not a list of entries with base64 values: {exc}") from exc
        if data is None:
            return _index(raw_index), {}
        if not isinstance(data, list):
            raise ConsulError("bad_response", f"kv/{key} did not return a list")
        values: dict[str, bytes] = {}
        for item in data:
            if not isinstance(item, dict) or not isinstance(item.get("Key"), str):
                raise ConsulError("bad_response", f"kv/{key}: an entry has no Key")
            value = item.get("Value")
            if value is not None and not isinstance(value, bytes):
                raise ConsulError("bad_response", f"kv/{item['Key']}: Value is not base64 text")
            values[item["Key"]] = value or b""
        return _index(raw_index), values

    async def check_access(self) -> None:
        """At start: raise ConsulAccessError when Consul does not know the token, or when the token (the
        anonymous one if none is set) may not read services or nodes. Returns quietly when ACLs are off, and
        when no address answers (the watcher will retry; that is not a configuration error).

        `GET /v1/acl/token/self` needs no permission: 401 means ACLs are off, 403 that the token does not exist
        (also what Consul 1.8 answers without a token). A known token that lacks read rights is not refused:
        Consul filters what it may not see, so reads answer 200 and empty. Every datacenter lists the `consul`
        service (its servers), so an empty catalog means no service:read; a listed service whose health comes
        back empty means no node:read (health entries need both).

        With datacenters named, the reads are checked in each (a token is only valid where it is known, or
        replicated). A name Consul does not list in /v1/catalog/datacenters (which needs no ACL) is named as a
        configuration problem (`consul_dc_unknown`), ACLs on or off: its queries will fail with "No path to
        datacenter" until it joins the WAN, which would otherwise show only as `consul_unreachable`."""
        try:
            datacenters = await self._known_datacenters()
            try:
                me = await self._answer(lambda api: api.acl.token.read_self())
            except ConsulError as exc:
                if exc.status == 401:  # "ACL support disabled"
                    return
                if exc.reason != "forbidden":
                    raise
                if self._token is not None:
                    raise ConsulAccessError(
                        f"Consul does not know the consul_token ({exc.detail}): set the SecretID of an existing "
                        f"token whose policy grants {MINIMAL_POLICY}"
                    ) from exc
                me = None  # no token: the anonymous token, which Consul 1.8 does not show
            who = _who(self._token, me)
            for dc in datacenters:
                try:
                    await self._check_reads(who, dc)
                except ConsulAccessError:
                    raise
                except ConsulError as exc:
                    if exc.reason == "forbidden":
                        raise
                    log.info("consul_access_unchecked", reason=exc.reason, error=exc.detail,
                             **({"dc": dc} if dc else {}))
        except ConsulAccessError:
            raise
        except ConsulError as exc:
            if exc.reason == "forbidden":
                raise ConsulAccessError(f"Consul refuses the consul_token: {exc.detail}") from exc
            log.info("consul_access_unchecked", reason=exc.reason, error=exc.detail)

    async def _known_datacenters(self) -> tuple[str, ...]:
        """The listed datacenters Consul knows (every one when it cannot tell); the others are logged."""
        if not any(self.datacenters):
            return self.datacenters
        try:
            known = await self._answer(lambda api: api.catalog.datacenters())
        except ConsulError:
            return self.datacenters
        if not isinstance(known, list):
            return self.datacenters
        missing = [dc for dc in self.datacenters if dc not in known]
        if missing:
            log.error("consul_dc_unknown", datacenters=missing, known=known, problem="configuration",
                      detail="consul_dc names datacenters Consul does not know (misspelt, or not joined over the "
                             "WAN): their queries fail with 'No path to datacenter' until they exist")
        return tuple(dc for dc in self.datacenters if dc in known)

    async def _check_reads(self, who: str, dc: str) -> None:
        where = f" in datacenter {dc}" if dc else ""
        services = await self._answer(lambda api: api.catalog.services(dc=dc or None))
        if not isinstance(services, tuple) or not isinstance(services[1], dict):
            return
        if not services[1]:
            raise ConsulAccessError(
                f"{who} may not read any service{where} (the catalog comes back empty, without even `consul`): "
                f'Ferryman needs service:read and node:read, e.g. {MINIMAL_POLICY}'
            )
        probe = "consul" if "consul" in services[1] else sorted(services[1])[0]
        health = await self._answer(lambda api: api.health.service(probe, dc=dc or None))
        if isinstance(health, tuple) and not health[1]:
            raise ConsulAccessError(
                f"{who} may read services{where} but not nodes (the health of `{probe}` comes back empty): "
                f'its policy needs node:read too, e.g. node_prefix "" {{ policy = "read" }}'
            )

    async def close(self) -> None:
        apis, self._apis = list(self._apis.values()), {}
        for api in apis:
            await api.close()

    async def _answer(self, make: Callable[[consul.aio.Consul], Awaitable[Any]]) -> Any:
        """One short request, tried on each address in turn until one answers (for the access check)."""
        for attempt in range(len(self.addresses)):
            try:
                return await self._request(make, timeout=_CHECK_TIMEOUT_S)
            except ConsulError as exc:
                if not exc.failover or attempt == len(self.addresses) - 1:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _request(
        self, make: Callable[[consul.aio.Consul], Awaitable[Any]], *, timeout: float | None = None
    ) -> Any:
        at = self._current
        try:
            try:
                async with asyncio.timeout(timeout):
                    answer = await _call(make(self._api(at)))
            except TimeoutError as exc:  # only the `timeout` above: _call turns its own into ConsulError
                raise ConsulError("timeout", "no answer from Consul in time") from exc
        except ConsulError as exc:
            if exc.failover:
                self._fail_over(at, exc)
            raise
        self._failed.clear()
        return answer

    def _fail_over(self, at: int, exc: ConsulError) -> None:
        """Move on from address `at`, unless another request already did: every loop blocked on a server that
        dies fails at once, and that is one switch, not one per loop. Each switch is logged; once every address
        has failed without one answering in between (all down, or an election under way) the switches go on
        at debug level: the outage itself is the watcher's `consul_unreachable`."""
        self._failed.add(at)
        if len(self.addresses) < 2 or self._current != at:
            return
        self._current = (at + 1) % len(self.addresses)
        emit = log.debug if self._current in self._failed else log.warning
        emit(
            "consul_failover", **{"from": str(self.addresses[at])}, to=str(self.addresses[self._current]),
            reason=exc.reason, status=exc.status, error=exc.detail,
        )

    def _api(self, at: int) -> consul.aio.Consul:
        api = self._apis.get(at)
        if api is None:
            address = self.addresses[at]
            api = self._apis[at] = consul.aio.Consul(
                host=address.host,
                port=address.port,
                scheme=address.scheme,
                token=self._token,
                dc=self._dc,
                connections_timeout=self._timeout,
                connections_limit=MAX_CONNECTIONS,
            )
        return api


_UNCHANGED: Final = object()  # a blocking read whose wait ran out at the index it asked with: not decoded


def _indexed_json(response: Any, unchanged_at: int = 0, raw: bool = False) -> tuple[Any, Any]:
    """py-consul's answer callback, decoding with orjson: state/any of a large cluster is megabytes of JSON
    (30,000 checks: about 10 MB), read again at every change; the standard library's decoder was the biggest
    share of a change's cost there. With `unchanged_at`, an answer at that same index (the wait ran out) is
    _UNCHANGED, not decoded; with `raw`, the body is returned as bytes, undecoded. Status errors are py-consul's
    own (`CB._status`), as for every other read."""
    if raw and response.code >= 400:  # error texts as py-consul words them for every other read
        response = response._replace(body=bytes(response.body).decode("utf-8", "replace"))
    CB._status(response, allow_404=True)
    if response.code == 404:
        return response.headers.get("X-Consul-Index"), None
    if unchanged_at and response.headers.get("X-Consul-Index") == str(unchanged_at):
        return response.headers["X-Consul-Index"], _UNCHANGED
    if raw:
        return response.headers["X-Consul-Index"], response.body
    try:
        return response.headers["X-Consul-Index"], orjson.loads(response.body)
    except orjson.JSONDecodeError as exc:
        raise consul.ConsulException(f"Failed to decode JSON: {response.body[:100]!r}") from exc


def _who(token: str | None, me: Any) -> str:
    if token is None:
        return "no consul_token is set, and the anonymous token"
    if isinstance(me, dict) and me.get("AccessorID") == _ANONYMOUS_ACCESSOR:
        return "the consul_token (Consul's anonymous token)"
    if isinstance(me, dict) and me.get("AccessorID"):
        description = f", {me['Description']!r}" if me.get("Description") else ""
        return f"the consul_token (accessor {me['AccessorID']}{description})"
    return "the consul_token"


async def _call(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except asyncio.CancelledError:
        raise
    except consul.ACLPermissionDenied as exc:
        raise ConsulError("forbidden", str(exc) or "ACL permission denied", 403) from exc
    except consul.ACLDisabled as exc:
        raise ConsulError("bad_response", str(exc) or "ACL support disabled", 401) from exc
    except (TimeoutError, consul.Timeout) as exc:
        raise ConsulError("timeout", "no answer from Consul in time") from exc
    except consul.ConsulException as exc:
        # py-consul words HTTP errors "<status> <body>"; decoding errors have no status.
        match = _STATUS.match(str(exc))
        raise ConsulError("bad_response", str(exc), int(match[1]) if match else None) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ConsulError("unreachable", str(exc) or type(exc).__name__) from exc
