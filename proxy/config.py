"""Settings: defaults < config file (TOML) < environment (FERRYMAN_<KEY>) < command-line flags.

Every key has one name in all three places: `read_timeout` in the file, FERRYMAN_READ_TIMEOUT in the
environment, --read-timeout on the command line. An unknown key or a bad value is a ConfigError that names
where it came from (file and line, variable, or flag), the key and the problem; nothing is ignored silently.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from discovery.consul import ConsulAddress, parse_datacenters
from discovery.model import RouteSpec, ServiceSettings
from discovery.tags import TagError, parse_route_tag, parse_size, with_service_setting

from .headers import HeaderRules

ENV_PREFIX: Final = "FERRYMAN_"


class ConfigError(Exception):
    """A configuration problem; the message names its source, the key and what is wrong."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """`host:port`, `:port` (every interface) or `[v6]:port`."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        host = host.strip("[]") or "0.0.0.0"
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:9090"
    consul_addr: str = "127.0.0.1:8500"
    consul_token: str = ""
    consul_dc: str = ""
    consul_wait: float = 30.0
    tag_prefix: str = "urlprefix-"
    log_format: str = "auto"
    log_level: str = "info"
    access_log: bool = True
    access_log_format: str = "json"
    access_log_file: str = ""
    access_log_sample: float = 1.0
    log_flush_interval: float = 0.25
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    max_attempts: int = 3
    upstream_keepalive: int = 64
    upstream_idle_timeout: float = 30.0
    shutdown_timeout: float = 10.0
    drain_delay: float = 0.0
    max_sync_age: float = 60.0
    client_idle_timeout: float = 75.0
    client_header_timeout: float = 10.0
    websocket_idle_timeout: float = 600.0
    static_file: str = ""
    trusted_proxies: str = ""
    routes_kv_prefix: str = "ferryman/routes/"
    tls_listen: str = ""
    tls_certs: str = ""
    tls_kv_prefix: str = ""
    tls_reload_interval: float = 2.0
    https_redirect: str = ""
    upstream_ca_file: str = ""
    max_connections: int = 10_000
    max_request_target: int = 8192
    max_header_bytes: int = 65536
    max_header_count: int = 100
    max_body_size: str = "0"
    service_max_concurrent: int = 0
    workers: int = 0
    eject_after: int = 3
    eject_base: float = 10.0
    eject_max_share: float = 0.5
    eject_on_5xx: bool = False
    retry_budget: float = 0.2
    slow_start: float = 0.0
    active_check_interval: float = 5.0
    active_check_timeout: float = 2.0
    # [services.NAME] tables of the config file: per-service balancing (lb, hash_key, sticky), health path and
    # limits, which take precedence over service meta and route tags (proxy.policy). File only: no flag or
    # variable sets them.
    services: tuple[tuple[str, ServiceSettings], ...] = ()
    # [[routes]] of the config file: routes operators declare beside the tags, with header rules and splits.
    routes: tuple[ConfigRoute, ...] = ()

    def service_overrides(self) -> dict[str, ServiceSettings]:
        return dict(self.services)

    @property
    def listen_addr(self) -> HostPort:
        return HostPort.parse(self.listen)

    @property
    def tls_addresses(self) -> tuple[HostPort, ...]:
        return tuple(HostPort.parse(item) for item in self.tls_listen.split(",") if item.strip())

    @property
    def admin_addr(self) -> HostPort:
        return HostPort.parse(self.admin_listen)

    @property
    def consul_addresses(self) -> tuple[ConsulAddress, ...]:
        """Every address of `consul_addr` (comma-separated), in the order they are tried."""
        return ConsulAddress.parse_list(self.consul_addr)

    @property
    def consul_address(self) -> ConsulAddress:
        """The first of `consul_addresses`."""
        return self.consul_addresses[0]

    @property
    def consul_datacenters(self) -> tuple[str, ...]:
        """The datacenters of `consul_dc` (comma-separated) in order of preference; () for the agent's own."""
        return parse_datacenters(self.consul_dc)


def _choice(*allowed: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
    return check


def _positive(value: Any) -> None:
    if not (value > 0 and math.isfinite(value)):  # written so that NaN fails too
        raise ValueError(f"must be a finite number greater than 0, got {value!r}")


def _between(low: float, high: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not low <= value <= high:  # NaN fails every comparison, so it is refused here too
            raise ValueError(f"must be between {low:g} and {high:g}")
    return check


def _parses(parser: Callable[[str], Any]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        parser(value)
    return check


def _cert_files(text: str) -> None:
    from .tls import CertFile  # the TLS module loads cryptography: only when TLS is configured

    CertFile.parse_list(text)


def _kv_prefix(text: str) -> None:
    if text and (text.startswith("/") or any(c.isspace() for c in text)):
        raise ValueError("a Consul KV prefix such as ferryman/certs/ (no leading '/', no blanks)")


_REDIRECT_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)$")


def _networks(text: str) -> None:
    import ipaddress

    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None


def _redirect_hosts(text: str) -> None:
    for item in (part.strip().lower() for part in text.split(",")):
        if item and not _REDIRECT_HOST.match(item):
            raise ValueError(f"{item!r} is not a host name, *.suffix or *")


def _prefix(value: Any) -> None:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty word without blanks")


_CHECKS: Final[Mapping[str, Callable[[Any], None]]] = {
    "listen": _parses(HostPort.parse),
    "admin_listen": _parses(HostPort.parse),
    "consul_addr": _parses(ConsulAddress.parse_list),
    "consul_dc": _parses(parse_datacenters),
    "consul_wait": _between(1, 600),
    "tag_prefix": _prefix,
    "log_format": _choice("auto", "json", "console"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_flush_interval": _between(0, 60),
    "connect_timeout": _positive,
    "read_timeout": _positive,
    "max_attempts": _between(1, 10),
    "upstream_keepalive": _between(0, 100_000),
    "client_idle_timeout": _positive,
    "client_header_timeout": _positive,
    "websocket_idle_timeout": _positive,
    "tls_listen": _parses(lambda text: [HostPort.parse(item) for item in text.split(",") if item.strip()]),
    "tls_certs": _parses(lambda text: _cert_files(text)),
    "tls_kv_prefix": _parses(lambda text: _kv_prefix(text)),
    "tls_reload_interval": _between(0.1, 3600),
    "https_redirect": _parses(lambda text: _redirect_hosts(text)),
    "trusted_proxies": _parses(lambda text: _networks(text)),
    "routes_kv_prefix": _parses(lambda text: _kv_prefix(text)),
    "max_connections": _between(1, 10_000_000),
    "max_request_target": _between(256, 1024 * 1024),
    "max_header_bytes": _between(1024, 16 * 1024 * 1024),
    "max_header_count": _between(8, 100_000),
    "max_body_size": _parses(parse_size),
    "service_max_concurrent": _between(0, 10_000_000),
    "upstream_idle_timeout": _positive,
    "shutdown_timeout": _between(0, 3600),
    "drain_delay": _between(0, 3600),
    "max_sync_age": _between(0, 86400),
    "access_log_format": _choice("json", "common", "combined"),
    "access_log_sample": _between(0, 1),
    "workers": _between(0, 256),
    "eject_after": _between(1, 1000),
    "eject_base": _between(0.1, 3600),
    "eject_max_share": _between(0, 1),
    "retry_budget": _between(0, 10),
    "slow_start": _between(0, 3600),
    "active_check_interval": _between(0.1, 3600),
    "active_check_timeout": _between(0.01, 600),
}

FIELD_TYPES: Final[Mapping[str, type]] = {
    f.name: {"str": str, "float": float, "int": int, "bool": bool}[str(f.type)]
    for f in fields(Settings)
    if f.name not in ("services", "routes")
}
DEFAULTS: Final = Settings()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _coerce_text(key: str, text: str) -> Any:
    """A value given as text (environment, flag) to the key's type."""
    kind = FIELD_TYPES[key]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    return text


def _check_typed(key: str, value: Any) -> Any:
    """A value from TOML must already have the key's type (an int is accepted for a float)."""
    kind = FIELD_TYPES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{value} is out of range") from None
    if kind is int and isinstance(value, bool):
        raise ValueError(f"must be a whole number, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"must be a {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(key: str, value: Any) -> None:
    check = _CHECKS.get(key)
    if check is not None:
        check(value)


def _key_line(text: str, key: str) -> int | None:
    """The line where a top-level key is set: `key =`, a dotted `key.sub =`, or a `[key]` table header."""
    name = rf"(\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})"
    pattern = re.compile(rf"^\s*(\[\[?\s*{name}\s*[\].]|{name}\s*[=.])")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def text_line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def load_file(path: str | Path, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Read and validate a TOML config file: {key: value}; ConfigError naming file, line and key. Where each
    key was set goes into `sources` (file:line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        at = text_line_of(path.read_bytes(), exc.start)
        raise ConfigError(f"{path}:{at}: not UTF-8 (byte {exc.object[exc.start]:#04x}); TOML is UTF-8") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for key, value in data.items():
        line = _key_line(text, key)
        where = f"{path}:{line}" if line else str(path)
        if key == "services":
            out["services"] = _load_services(value, text, path, where)
            continue
        if key == "routes":
            out["routes"] = _load_routes(value, text, path, where)
            continue
        if key not in FIELD_TYPES:
            kind = "table" if isinstance(value, dict) else "key"
            raise ConfigError(f"{where}: unknown {kind} {key!r} (known keys: {', '.join(FIELD_TYPES)})")
        try:
            value = _check_typed(key, value)
            _validate(key, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: key {key!r}: {exc}") from exc
        out[key] = value
        if sources is not None:
            sources[key] = where
    return out


@dataclass(frozen=True, slots=True)
class ConfigRoute:
    """One `[[routes]]` table: a route in tag syntax, the services it sends to (one, or a weighted split), and
    header rules for requests and responses."""

    spec: RouteSpec
    services: tuple[tuple[str, int], ...]
    request: HeaderRules | None = None
    response: HeaderRules | None = None
    origin: str = ""  # file:line, for messages
    rewrite: tuple[re.Pattern[str], str] | None = None  # a regular expression on the upstream path, first match


_ROUTE_KEYS: Final = ("route", "service", "split", "request_headers", "response_headers", "rewrite")
# Framing and connection fields are the proxy's to write: header rules may not touch them.
_RULES_FORBIDDEN: Final = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade",
    # ... and the fields this hop writes itself, once each.
    "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip",
    "forwarded",
})
_FIELD_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_rules(value: Any, key: str) -> HeaderRules | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"set", "add", "remove"}:
        raise ValueError(f"{key} must be a table with set, add and/or remove")
    pairs: dict[str, list[tuple[bytes, bytes]]] = {"set": [], "add": []}
    for op in ("set", "add"):
        table = value.get(op, {})
        if not isinstance(table, dict):
            raise ValueError(f"{key}.{op} must be a table of field = value")
        for name, text in table.items():
            if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
                raise ValueError(f"{key}.{op}.{name}: the value must be text on one line")
            pairs[op].append((_rule_name(name, f"{key}.{op}"), text.strip().encode("latin-1", "replace")))
    remove = value.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
        raise ValueError(f"{key}.remove must be a list of field names")
    return HeaderRules(pairs["set"], pairs["add"], [_rule_name(n, f"{key}.remove") for n in remove])


def _rule_name(name: str, key: str) -> bytes:
    if not _FIELD_NAME.match(name):
        raise ValueError(f"{key}: {name!r} is not a field name")
    if name.lower() in _RULES_FORBIDDEN:
        raise ValueError(f"{key}: {name} is framing or routing, which the proxy writes itself")
    return name.encode("ascii")


def parse_route_entry(table: Any, origin: str) -> ConfigRoute:
    """One route table (a `[[routes]]` entry, or a Consul KV value holding the same keys); ValueError."""
    if not isinstance(table, dict):
        raise ValueError("must be a table")
    unknown = set(table) - set(_ROUTE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (known: {', '.join(_ROUTE_KEYS)})")
    route = table.get("route")
    if not isinstance(route, str):
        raise ValueError("key 'route' must be a route in tag syntax, such as \"/api strip=/api\"")
    try:
        spec = parse_route_tag("x-" + route.strip(), "x-")
    except TagError as exc:
        raise ValueError(f"key 'route': {exc}") from exc
    service, split = table.get("service"), table.get("split")
    if (service is None) == (split is None):
        raise ValueError("give either 'service' or 'split' (a table of service = weight)")
    if service is not None:
        if not isinstance(service, str) or not service:
            raise ValueError("key 'service' must be a service name")
        services: tuple[tuple[str, int], ...] = ((service, 1),)
    else:
        if not isinstance(split, dict) or len(split) < 2 or not all(
            type(w) is int and 0 < w <= 1_000_000 for w in split.values()
        ):
            raise ValueError("key 'split' must name two or more services with whole weights above 0")
        services = tuple((name, int(weight)) for name, weight in split.items())
    return ConfigRoute(
        spec, services, _header_rules(table.get("request_headers"), "request_headers"),
        _header_rules(table.get("response_headers"), "response_headers"), origin, _rewrite(table.get("rewrite")),
    )


def _rewrite(value: Any) -> tuple[re.Pattern[str], str] | None:
    """`rewrite = { pattern = "^/old/(.*)", replacement = "/new/\\1" }`: re.sub on the path sent upstream."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"pattern", "replacement"} or not all(
        isinstance(v, str) for v in value.values()
    ):
        raise ValueError("rewrite must be a table with text keys pattern and replacement")
    try:
        pattern = re.compile(value["pattern"])
        # The pattern made optional matches "" at once, so the replacement is expanded here: a group it names
        # that the pattern lacks fails now, not at request time.
        re.compile(f"(?:{pattern.pattern})?").sub(value["replacement"], "", count=1)
    except (re.error, IndexError) as exc:
        raise ValueError(f"rewrite: {exc}") from exc
    return pattern, value["replacement"]


def _load_routes(value: Any, text: str, path: Path, where: str) -> tuple[ConfigRoute, ...]:
    """`[[routes]]` tables, each checked like a route tag; errors name file, line and key."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'routes' must be [[routes]] tables")
    headers = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\[\[\s*routes\s*\]\]", line)]
    out = []
    for index, table in enumerate(value):
        here = f"{path}:{headers[index]}" if index < len(headers) else where
        try:
            out.append(parse_route_entry(table, here))
        except ValueError as exc:
            raise ConfigError(f"{here}: routes[{index}]: {exc}") from exc
    return tuple(out)


def _load_services(value: Any, text: str, path: Path, where: str) -> tuple[tuple[str, ServiceSettings], ...]:
    """`[services.NAME]` tables: each a table of settings, parsed as service meta's and route tags' are."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'services' must be tables such as [services.api]")
    out = []
    for name, table in sorted(value.items()):
        header = re.compile(rf"^\s*\[\s*services\.(\"{re.escape(name)}\"|{re.escape(name)})\s*\]")
        line = next((n for n, text_line in enumerate(text.splitlines(), 1) if header.match(text_line)), None)
        here = f"{path}:{line}" if line else where
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: services.{name} must be a table of settings (lb, hash_key, sticky)")
        settings = ServiceSettings()
        for key, setting in sorted(table.items()):
            try:
                if key in ("max_concurrent", "max_body_size") and type(setting) is int:
                    setting = str(setting)
                if not isinstance(setting, str):
                    raise TagError(f"must be text, got {type(setting).__name__} {setting!r}")
                settings = with_service_setting(settings, key, setting)
            except TagError as exc:
                raise ConfigError(f"{here}: key 'services.{name}.{key}': {exc}") from exc
        out.append((name, settings))
    return tuple(out)


def _load_text(key: str, text: str, where: str) -> Any:
    """A value given as text (environment, flag): typed and validated, or ConfigError naming `where`."""
    try:
        value = _coerce_text(key, text)
        _validate(key, value)
    except ValueError as exc:
        raise ConfigError(f"{where}: key {key!r}: {exc}") from exc
    return value


def load_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in FIELD_TYPES:
            raise ConfigError(f"environment variable {name}: unknown key {key!r}")
        out[key] = _load_text(key, text, f"environment variable {name}")
    return out


def load_flags(flags: Mapping[str, str | None]) -> dict[str, Any]:
    """Flags given as text by argparse ({key: text or None when not given})."""
    return {key: _load_text(key, text, f"flag {flag_name(key)}") for key, text in flags.items() if text is not None}


def load(
    *, config_file: str | None, environ: Mapping[str, str], flags: Mapping[str, str | None]
) -> Settings:
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file:
        merged.update(load_file(config_file, sources))
    from_env = load_env(environ)
    merged.update(from_env)
    sources.update({key: f"environment variable {env_name(key)}" for key in from_env})
    from_flags = load_flags(flags)
    merged.update(from_flags)
    sources.update({key: f"flag {flag_name(key)}" for key in from_flags})
    settings = Settings(**merged)
    _check_together(settings, sources)
    return settings


def _check_together(settings: Settings, sources: Mapping[str, str]) -> None:
    """Rules between keys, reported where the key that breaks them was set."""
    # A healthy blocking query answers within consul_wait plus up to 1/16 of jitter: a shorter bound would
    # flap /ready on a quiet, healthy cluster.
    if settings.static_file and settings.tls_kv_prefix:
        key = "tls_kv_prefix"
        raise ConfigError(f"{sources.get(key, 'default')}: key 'tls_kv_prefix': certificates from Consul KV need "
                          "Consul, and static_file runs without it: use tls_certs")
    if settings.tls_listen and not (settings.tls_certs or settings.tls_kv_prefix):
        key = "tls_listen"
        raise ConfigError(f"{sources.get(key, 'default')}: key 'tls_listen': a TLS listener needs certificates: "
                          "set tls_certs (files) or tls_kv_prefix (Consul KV)")
    floor = settings.consul_wait * 17 / 16 + 1
    if settings.max_sync_age and settings.max_sync_age <= floor:
        key = "max_sync_age" if "max_sync_age" in sources or "consul_wait" not in sources else "consul_wait"
        raise ConfigError(
            f"{sources.get(key, 'default')}: key {key!r}: max_sync_age ({settings.max_sync_age:g} s) must be "
            f"longer than consul_wait ({settings.consul_wait:g} s) plus its jitter and a second, over "
            f"{floor:g} s (or 0 to turn the readiness watchdog off)"
        )


# Keys a running proxy cannot take over on SIGHUP: they shape listeners, processes, the Consul client or the
# log set-up. A reload that changes them logs that a restart is needed and keeps their running values.
RESTART_KEYS: Final = frozenset({
    "listen", "admin_listen", "workers", "consul_addr", "consul_token", "consul_dc", "consul_wait", "tag_prefix",
    "log_format", "log_level", "access_log", "access_log_format", "access_log_file", "log_flush_interval",
    "tls_listen", "tls_kv_prefix", "tls_reload_interval", "upstream_ca_file", "static_file", "routes_kv_prefix",
})


@dataclass(frozen=True, slots=True)
class Source:
    """Where the settings came from, to read them again on SIGHUP: the file (re-read), the flags (as given)
    and the environment (the process's own, which does not change under it). Picklable, for workers."""

    config_file: str | None = None
    flags: tuple[tuple[str, str | None], ...] = ()

    def load(self, environ: Mapping[str, str]) -> Settings:
        return load(config_file=self.config_file, environ=environ, flags=dict(self.flags))


def reloaded(running: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """(settings to run with, keys changed and applied, keys changed that need a restart)."""
    changed = [f.name for f in fields(Settings) if getattr(running, f.name) != getattr(new, f.name)]
    restart = [key for key in changed if key in RESTART_KEYS]
    kept = {key: getattr(running, key) for key in RESTART_KEYS}
    return replace(new, **kept), [key for key in changed if key not in RESTART_KEYS], restart
