"""Settings: defaults < config file (TOML) < environment (FERRYMAN_<KEY>) < command-line flags.

Every key has one name in all three places: `read_timeout` in the file, FERRYMAN_READ_TIMEOUT in the
environment, --read-timeout on the command line; its row in `config_table.KEYS` gives its type, default and
parser. Each source is read and parsed on its own (so a bad value is reported even where a higher source
overrides it), the parsed values are merged by precedence, and `Settings` (proxy.settings) is built from them
once. An unknown key or a bad value is a ConfigError that names where it came from (file and line, variable, or
flag), the key and the problem; nothing is ignored silently.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from discovery.model import RouteSpec, ServiceSettings
from discovery.tags import MATCHERS, REALM_NAME_RE, TagError, parse_route_tag, with_service_setting

from .auth import RealmSettings
from .compiled import ENV as BUILD_ENV
from .config_table import BY_NAME, ENV_PREFIX, KEYS, SECTIONS, Key, build, env_name, flag_name, value_of, with_values
from .headers import HeaderRules
from .settings import HostPort, ServiceTables, Settings

# Re-exported: the settings' values live in proxy.settings, their table in proxy.config_table.
__all__ = [
    "DEFAULTS", "KEYS", "RESTART_KEYS", "ConfigError", "ConfigRoute", "HostPort", "Settings", "Source", "env_name",
    "flag_name", "load", "load_env", "load_file", "load_flags", "parse_route_entry", "reloaded", "value_of",
]


class ConfigError(Exception):
    """A configuration problem; the message names its source, the key and what is wrong."""


# The table's defaults, parsed: what `load` gives when no source sets anything.
_PARSED_DEFAULTS: Final[Mapping[str, Any]] = {key.name: key.parse(key.default) for key in KEYS}
DEFAULTS: Final = build(_PARSED_DEFAULTS)


def _coerce_text(key: Key, text: str) -> Any:
    """A value given as text (environment, flag) to the key's type."""
    kind = key.kind
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


def _check_typed(key: Key, value: Any) -> Any:
    """A value from TOML must already have the key's type (an int is accepted for a float)."""
    kind = key.kind
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


def load_file(
    path: str | Path, sources: dict[str, str] | None = None, matcher: str | None = None,
) -> dict[str, Any]:
    """Read and parse a TOML config file: {key: parsed value}; ConfigError naming file, line and key. Where each
    key was set goes into `sources` (file:line). `matcher`: the path_matcher the environment or a flag sets,
    which [[routes]] follow over the file's own."""
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
    # [[routes]] are parsed with the path_matcher in force, whichever line of the file sets it.
    in_file = data.get("path_matcher")
    if matcher is None:
        matcher = in_file if isinstance(in_file, str) and in_file in MATCHERS else "prefix"
    for key, value in data.items():
        line = _key_line(text, key)
        where = f"{path}:{line}" if line else str(path)
        if key == "services":
            out["services"] = _load_services(value, text, path, where)
            continue
        if key == "routes":
            out["routes"] = _load_routes(value, text, path, where, matcher)
            continue
        if key == "auth":
            out["auth"] = _load_auth(value, text, path, where)
            continue
        row = BY_NAME.get(key)
        if row is None:
            kind = "table" if isinstance(value, dict) else "key"
            raise ConfigError(f"{where}: unknown {kind} {key!r} (known keys: {', '.join(BY_NAME)})")
        try:
            value = row.parse(_check_typed(row, value))
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


def parse_route_entry(table: Any, origin: str, matcher: str = "prefix") -> ConfigRoute:
    """One route table (a `[[routes]]` entry, or a Consul KV value holding the same keys); ValueError.
    `matcher`: the global path_matcher, for a route without matcher=."""
    if not isinstance(table, dict):
        raise ValueError("must be a table")
    unknown = set(table) - set(_ROUTE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (known: {', '.join(_ROUTE_KEYS)})")
    route = table.get("route")
    if not isinstance(route, str):
        raise ValueError("key 'route' must be a route in tag syntax, such as \"/api strip=/api\"")
    try:
        spec = parse_route_tag("x-" + route.strip(), "x-", matcher=matcher)
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


def _load_routes(value: Any, text: str, path: Path, where: str, matcher: str) -> tuple[ConfigRoute, ...]:
    """`[[routes]]` tables, each checked like a route tag; errors name file, line and key."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'routes' must be [[routes]] tables")
    headers = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\[\[\s*routes\s*\]\]", line)]
    out = []
    for index, table in enumerate(value):
        here = f"{path}:{headers[index]}" if index < len(headers) else where
        try:
            out.append(parse_route_entry(table, here, matcher))
        except ValueError as exc:
            raise ConfigError(f"{here}: routes[{index}]: {exc}") from exc
    return tuple(out)


def _load_services(value: Any, text: str, path: Path, where: str) -> ServiceTables:
    """`[services.NAME]` tables: each a table of balancing settings, checked like route tag options."""
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
                if key in ("max_concurrent", "max_body_size", "read_timeout", "connect_timeout") and (
                    type(setting) is int or type(setting) is float
                ):
                    setting = str(setting)
                if not isinstance(setting, str):
                    raise TagError(f"must be text, got {type(setting).__name__} {setting!r}")
                settings = with_service_setting(settings, key, setting)
            except TagError as exc:
                raise ConfigError(f"{here}: key 'services.{name}.{key}': {exc}") from exc
        out.append((name, settings))
    return tuple(out)


_AUTH_KEYS: Final = ("file", "realm", "forward_authorization")


def _load_auth(value: Any, text: str, path: Path, where: str) -> tuple[RealmSettings, ...]:
    """`[auth.NAME]` tables: an htpasswd `file` (read now, so --check finds a missing one), the `realm` the
    challenge shows (default NAME), `forward_authorization` (default false). Errors name file, line and key."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'auth' must be tables such as [auth.ops]")
    out = []
    for name, table in sorted(value.items()):
        header = re.compile(rf"^\s*\[\s*auth\.(\"{re.escape(name)}\"|{re.escape(name)})\s*\]")
        line = next((n for n, text_line in enumerate(text.splitlines(), 1) if header.match(text_line)), None)
        here = f"{path}:{line}" if line else where
        if not REALM_NAME_RE.match(name):
            raise ConfigError(f"{here}: auth.{name}: a realm name is letters, digits, '_', '.' or '-'")
        if not isinstance(table, dict) or set(table) - set(_AUTH_KEYS):
            raise ConfigError(f"{here}: auth.{name} must be a table of {', '.join(_AUTH_KEYS)}")
        file, realm, forward = table.get("file"), table.get("realm", name), table.get("forward_authorization", False)
        if not isinstance(file, str) or not file:
            raise ConfigError(f"{here}: key 'auth.{name}.file': the htpasswd file's path is required")
        try:
            Path(file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{here}: key 'auth.{name}.file': cannot read htpasswd file {file}: "
                              f"{exc.strerror or exc}") from exc
        if not isinstance(realm, str) or not realm or any(c in realm for c in '"\\') or not realm.isprintable():
            raise ConfigError(f"{here}: key 'auth.{name}.realm': text without quotes, backslashes or controls")
        if not isinstance(forward, bool):
            raise ConfigError(f"{here}: key 'auth.{name}.forward_authorization': must be true or false")
        out.append(RealmSettings(name, file, realm, forward, here))
    return tuple(out)


def _load_text(name: str, text: str, where: str) -> Any:
    """A value given as text (environment, flag): typed and parsed, or ConfigError naming `where`."""
    key = BY_NAME[name]
    try:
        return key.parse(_coerce_text(key, text))
    except ValueError as exc:
        raise ConfigError(f"{where}: key {name!r}: {exc}") from exc


def load_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == BUILD_ENV:  # the build is chosen at import: no setting
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in BY_NAME:
            raise ConfigError(f"environment variable {name}: unknown key {key!r}")
        out[key] = _load_text(key, text, f"environment variable {name}")
    return out


def load_flags(flags: Mapping[str, str | None]) -> dict[str, Any]:
    """Flags given as text by argparse ({key: text or None when not given})."""
    return {key: _load_text(key, text, f"flag {flag_name(key)}") for key, text in flags.items() if text is not None}


def load(
    *, config_file: str | None, environ: Mapping[str, str], flags: Mapping[str, str | None]
) -> Settings:
    merged: dict[str, Any] = dict(_PARSED_DEFAULTS)
    sources: dict[str, str] = {}
    from_env = load_env(environ)
    from_flags = load_flags(flags)
    if config_file:
        merged.update(load_file(config_file, sources, from_flags.get("path_matcher", from_env.get("path_matcher"))))
    merged.update(from_env)
    sources.update({key: f"environment variable {env_name(key)}" for key in from_env})
    merged.update(from_flags)
    sources.update({key: f"flag {flag_name(key)}" for key in from_flags})
    settings = build(merged, **{name: merged[name] for name in SECTIONS if name in merged})
    _check_together(settings, sources)
    return settings


def _check_together(settings: Settings, sources: Mapping[str, str]) -> None:
    """Rules between keys, reported where the key that breaks them was set."""
    if settings.static_file and settings.tls.kv_prefix:
        key = "tls_kv_prefix"
        raise ConfigError(f"{sources.get(key, 'default')}: key 'tls_kv_prefix': certificates from Consul KV need "
                          "Consul, and static_file runs without it: use tls_certs")
    if settings.listeners.tls and not (settings.tls.certs or settings.tls.kv_prefix):
        key = "tls_listen"
        raise ConfigError(f"{sources.get(key, 'default')}: key 'tls_listen': a TLS listener needs certificates: "
                          "set tls_certs (files) or tls_kv_prefix (Consul KV)")
    listeners = settings.listeners
    if listeners.proxy_protocol:
        key = "proxy_protocol"
        where = sources.get(key, "default")
        known = [str(a) for a in (listeners.plain, *listeners.tls, *settings.tcp.listen, *settings.tcp.sni_listen)]
        unknown = [a for a in listeners.proxy_protocol if a != "*" and a not in known]
        if unknown:
            raise ConfigError(f"{where}: key 'proxy_protocol': {unknown[0]} is not a listener (listen, tls_listen, "
                              f"tcp_listen, sni_listen: {', '.join(known)})")
        if not settings.client.trusted_proxies:
            raise ConfigError(f"{where}: key 'proxy_protocol': a PROXY header is believed only from "
                              "trusted_proxies, which is empty: set it to the balancers' addresses")
    if listeners.tls_passthrough:
        key = "tls_passthrough"
        tls = [str(a) for a in listeners.tls]
        unknown = [a for a in listeners.tls_passthrough if (a != "*" or not tls) and a not in tls]
        if unknown:
            raise ConfigError(f"{sources.get(key, 'default')}: key 'tls_passthrough': {unknown[0]} is not a TLS "
                              f"listener (tls_listen: {', '.join(tls) or 'none'})")
    realms = {realm.name for realm in settings.auth}
    for route in settings.routes:
        if route.spec.options.auth is not None and route.spec.options.auth not in realms:
            raise ConfigError(f"{route.origin}: key 'route': auth={route.spec.options.auth} names no [auth.NAME] "
                              "table of this file")
    # A healthy blocking query answers within consul_wait plus up to 1/16 of jitter: a shorter bound would
    # flap /ready on a quiet, healthy cluster.
    wait, max_sync_age = settings.consul.wait, settings.timeouts.max_sync_age
    floor = wait * 17 / 16 + 1
    if max_sync_age and max_sync_age <= floor:
        key = "max_sync_age" if "max_sync_age" in sources or "consul_wait" not in sources else "consul_wait"
        raise ConfigError(
            f"{sources.get(key, 'default')}: key {key!r}: max_sync_age ({max_sync_age:g} s) must be "
            f"longer than consul_wait ({wait:g} s) plus its jitter and a second, over "
            f"{floor:g} s (or 0 to turn the readiness watchdog off)"
        )


# Keys a running proxy cannot take over on SIGHUP (their rows say so): they shape listeners, processes, the
# Consul client or the log set-up. A reload that changes them logs that a restart is needed and keeps their
# running values.
RESTART_KEYS: Final = frozenset(key.name for key in KEYS if not key.reload)


@dataclass(frozen=True, slots=True)
class Source:
    """Where the settings came from, to read them again on SIGHUP: the file (re-read), the flags (as given)
    and the environment (the process's own, which does not change under it). Picklable, for workers."""

    config_file: str | None = None
    flags: tuple[tuple[str, str | None], ...] = ()

    def load(self, environ: Mapping[str, str]) -> Settings:
        return load(config_file=self.config_file, environ=environ, flags=dict(self.flags))


def reloaded(running: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """(settings to run with, keys changed and applied, keys changed that need a restart). Keys are compared
    as parsed, in the table's order, then the file's sections."""
    changed = [key.name for key in KEYS if value_of(running, key) != value_of(new, key)]
    changed += [name for name in SECTIONS if getattr(running, name) != getattr(new, name)]
    restart = [name for name in changed if name in RESTART_KEYS]
    kept = with_values(new, {name: value_of(running, BY_NAME[name]) for name in RESTART_KEYS})
    return kept, [name for name in changed if name not in RESTART_KEYS], restart
