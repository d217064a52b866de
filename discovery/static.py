"""The static provider: services, routes and instances from a TOML file, no Consul at all.

    [[services]]
    name = "web"
    routes = ["/", "www.example.com/"]                 # route tags without their prefix (Fabio's syntax)
    instances = ["127.0.0.1:8081", "127.0.0.1:8082"]    # host:port, [v6]:port, or a table:
    # instances = [{ address = "10.0.0.5", port = 8080, id = "web-a", weight = 3 }]
    meta = { ferryman-lb = "round_robin" }              # optional: service meta, as Consul would carry it

The file becomes the shapes Consul answers with (a catalog of tags, health entries whose every check passes)
and goes through the same snapshot builder, so a route or a setting is checked once, the same way, whichever
provider it comes from. `StaticWatcher` re-reads the file when it changes; a file that does not load keeps the
last good snapshot and says why, naming the file, the line and the key.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from .model import Snapshot
from .snapshot import build_dc_snapshot
from .tags import DEFAULT_PREFIX

log = structlog.get_logger("ferryman.discovery")

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: modification time, size and inode (a file replaced by a rename has a new
    one); None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class StaticError(Exception):
    """A static file that cannot be used; the message names the file, the line and the key."""


def _where(path: str, text: str, index: int) -> str:
    """`file:line` of the index-th `[[services]]` table (its header line), or the file alone."""
    headers = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\[\[\s*services\s*\]\]", line)]
    return f"{path}:{headers[index]}" if index < len(headers) else path


def _instance(raw: Any, name: str) -> dict[str, Any]:
    """One instance, as a health entry whose every check passes."""
    if isinstance(raw, str):
        host, sep, digits = raw.strip().rpartition(":")
        if not sep or not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"{raw!r} is not host:port")
        spec: dict[str, Any] = {"address": host.strip("[]"), "port": int(digits)}
    elif isinstance(raw, dict):
        spec = dict(raw)
        unknown = set(spec) - {"address", "port", "id", "weight"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (known: address, port, id, weight)")
    else:
        raise ValueError(f"{raw!r} is neither host:port nor a table")
    address: Any = spec.get("address")
    port: Any = spec.get("port")
    if not isinstance(address, str) or not address:
        raise ValueError("address must be a host name or an IP address")
    if type(port) is not int or not 0 < port < 65536:
        raise ValueError(f"port {port!r} is not a TCP port")
    weight = spec.get("weight", 1)
    if type(weight) is not int or not 0 < weight <= 10_000:
        raise ValueError(f"weight {weight!r} must be a whole number from 1 to 10000")
    instance_id = spec.get("id") or f"{name}-{address}:{port}"
    if not isinstance(instance_id, str):
        raise ValueError("id must be text")
    return {
        "Node": {"Node": "static", "Address": address},
        "Service": {"ID": instance_id, "Service": name, "Address": address, "Port": port,
                    "Weights": {"Passing": weight, "Warning": 1}, "Meta": {}},
        "Checks": [],
    }


def parse_static(text: str, path: str, prefix: str = DEFAULT_PREFIX, *, matcher: str = "prefix") -> Snapshot:
    """A static file's text to a Snapshot; StaticError naming file, line and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StaticError(f"{path}: invalid TOML: {exc}") from exc
    unknown = set(data) - {"services"}
    if unknown:
        raise StaticError(f"{path}: unknown key {sorted(unknown)[0]!r} (the file holds [[services]] tables)")
    services = data.get("services", [])
    if not isinstance(services, list):
        raise StaticError(f"{path}: 'services' must be [[services]] tables")
    catalog: dict[str, list[str]] = {}
    health: dict[str, list[dict[str, Any]]] = {}
    for index, table in enumerate(services):
        where = _where(path, text, index)
        if not isinstance(table, dict):
            raise StaticError(f"{where}: services[{index}] must be a table")
        name = table.get("name")
        if not isinstance(name, str) or not _SERVICE_NAME.match(name):
            raise StaticError(f"{where}: services[{index}]: key 'name' must be a service name, got {name!r}")
        if name in catalog:
            raise StaticError(f"{where}: service {name!r} is declared twice")
        extra = set(table) - {"name", "routes", "instances", "meta"}
        if extra:
            raise StaticError(f"{where}: service {name!r}: unknown key {sorted(extra)[0]!r} "
                              "(known: name, routes, instances, meta)")
        routes, instances, meta = table.get("routes", []), table.get("instances", []), table.get("meta", {})
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise StaticError(f"{where}: service {name!r}: key 'routes' must be a list of route texts")
        if not isinstance(instances, list):
            raise StaticError(f"{where}: service {name!r}: key 'instances' must be a list")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise StaticError(f"{where}: service {name!r}: key 'meta' must be a table of texts")
        entries = []
        for i, raw in enumerate(instances):
            try:
                entry = _instance(raw, name)
            except ValueError as exc:
                raise StaticError(f"{where}: service {name!r}: instances[{i}]: {exc}") from exc
            entry["Service"]["Meta"] = dict(meta)
            entries.append(entry)
        catalog[name] = [prefix + route.strip() for route in routes]
        health[name] = entries
    # Every service of the file is kept, routed or not: the config file's [[routes]] may send to it.
    snapshot = build_dc_snapshot(("",), {"": catalog}, {name: {"": entries} for name, entries in health.items()},
                                 prefix, frozenset(catalog), matcher=matcher)
    if snapshot.problems:
        problem = snapshot.problems[0]
        raise StaticError(f"{path}: service {problem.service!r}: {problem.item or problem.kind}: {problem.detail}")
    return snapshot


def load_static(path: str, prefix: str = DEFAULT_PREFIX, *, matcher: str = "prefix") -> Snapshot:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StaticError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise StaticError(f"{path}: not UTF-8 text") from exc
    return parse_static(text, path, prefix, matcher=matcher)


class StaticWatcher:
    """The static file as a discovery source: loaded at start (a bad file is a StaticError), then watched every
    `interval` seconds; each change that loads becomes a new snapshot, one that does not is logged
    (`static_file_invalid`) and the last good one stays. A discovery `Source`, like the Consul `Watcher`."""

    def __init__(self, path: str, on_snapshot: Callable[[Snapshot], None], *, prefix: str = DEFAULT_PREFIX,
                 interval: float = 2.0, matcher: str = "prefix") -> None:
        self.path, self.prefix, self.interval, self.matcher = path, prefix, interval, matcher
        self._on_snapshot = on_snapshot
        self._last: Snapshot | None = None
        self._stamp: tuple[int, int, int] | None = None
        self.synced = asyncio.Event()
        self.last_success: float | None = None

    @property
    def last_snapshot(self) -> Snapshot | None:
        return self._last

    @property
    def reachable(self) -> bool:
        return True  # a file is always at hand: readiness never goes stale on its account

    def load(self) -> None:
        """Read the file now (start-up, SIGHUP); StaticError when it does not load."""
        stamp = file_stamp(self.path)
        snapshot = load_static(self.path, self.prefix, matcher=self.matcher)
        self._stamp = stamp
        self.last_success = time.time()
        if snapshot != self._last:
            self._last = snapshot
            self.synced.set()
            self._on_snapshot(snapshot)

    def watch_also(self, services: frozenset[str]) -> None:
        """Nothing to add: every service of the file is in the snapshot, routed by its tags or not."""

    def reload(self) -> None:
        """SIGHUP: read the file now; one that does not load is logged and the last good snapshot stays."""
        try:
            self.load()
        except StaticError as exc:
            log.error("static_file_invalid", error=str(exc), detail="the routes loaded before stay")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.last_success = time.time()
            if file_stamp(self.path) == self._stamp:
                continue
            try:
                self.load()
            except StaticError as exc:
                self._stamp = file_stamp(self.path)  # said once per change, not every interval
                log.error("static_file_invalid", error=str(exc), detail="the routes loaded before stay")
                continue
            log.info("static_file_loaded", path=self.path, services=len(self._last.services) if self._last else 0)
