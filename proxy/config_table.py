"""The one table of settings: every key's type, default, parser, help text, reload rule and place in `Settings`.

A row is all there is to a key: `proxy.config` loads it from the file (`read_timeout`), the environment
(FERRYMAN_READ_TIMEOUT) and the flags (--read-timeout) by the row's name and type, parses it once with the
row's parser, and puts the result where the row says (`timeouts.read`); `proxy.cli` writes the flag and its
help line from the row; a SIGHUP takes the key over unless the row says it needs a restart. Adding a key is
adding a row (and the field it lands in).

A parser takes the value in the row's type (text already converted to int/float/bool) and returns the value
`Settings` holds, or raises ValueError saying what is wrong; the loader adds where the value came from.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from discovery.consul import ConsulAddress, parse_datacenters
from discovery.tags import MATCHERS, parse_size

from .settings import GROUPS, HostPort, IPNetwork, Settings

ENV_PREFIX: Final = "FERRYMAN_"


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Key:
    name: str  # in the file; FERRYMAN_<NAME> in the environment; --name-with-dashes on the command line
    kind: type  # str, int, float or bool: what the file must give, what text is converted to
    default: str | int | float | bool  # as an operator would write it
    lands: str  # "group.field" of Settings, or a field of Settings itself
    parse: Callable[[Any], Any]  # the value in `kind` -> the value Settings holds; ValueError when wrong
    reload: bool  # False: it shapes listeners, processes, the Consul client or logging, so needs a restart
    help: str

    @property
    def group(self) -> str | None:
        group, _, _ = self.lands.rpartition(".")
        return group or None

    @property
    def field(self) -> str:
        return self.lands.rpartition(".")[2]

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def env(self) -> str:
        return env_name(self.name)


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


# --- parsers ----------------------------------------------------------------------------------------------------

def _choice(*allowed: str) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value
    return parse


def _positive(value: Any) -> Any:
    if not (value > 0 and math.isfinite(value)):  # written so that NaN fails too
        raise ValueError(f"must be a finite number greater than 0, got {value!r}")
    return value


def _between(low: float, high: float) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if not low <= value <= high:  # NaN fails every comparison, so it is refused here too
            raise ValueError(f"must be between {low:g} and {high:g}")
        return value
    return parse


def _host_ports(text: str) -> tuple[HostPort, ...]:
    return tuple(HostPort.parse(item) for item in text.split(",") if item.strip())


def _cert_files(text: str) -> tuple[Any, ...]:
    if not text.strip():
        return ()
    from .tls import CertFile  # the TLS module loads cryptography: only when TLS is configured

    return CertFile.parse_list(text)


def _kv_prefix(text: str) -> str:
    if text and (text.startswith("/") or any(c.isspace() for c in text)):
        raise ValueError("a Consul KV prefix such as ferryman/certs/ (no leading '/', no blanks)")
    return text


_REDIRECT_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)$")


def _networks(text: str) -> tuple[IPNetwork, ...]:
    out = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(out)


def _proxy_listeners(text: str) -> tuple[str, ...]:
    """`*`, or listener addresses as in listen / tls_listen (`127.0.0.1:8080`, `:8443`), normalized."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    return tuple(item if item == "*" else str(HostPort.parse(item)) for item in items)


def _redirect_hosts(text: str) -> tuple[str, ...]:
    out = []
    for item in (part.strip().lower() for part in text.split(",")):
        if item:
            if not _REDIRECT_HOST.match(item):
                raise ValueError(f"{item!r} is not a host name, *.suffix or *")
            out.append(item)
    return tuple(out)


def _prefix(value: Any) -> Any:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty word without blanks")
    return value


def _regex(text: str) -> re.Pattern[str] | None:
    """A regular expression (Python's, searched as Fabio's Go MatchString: not anchored); "" is None (off)."""
    if not text:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a regular expression: {exc}") from None


RESTART, LIVE = False, True

# In the order `--help` lists them (and a reload reports them).
KEYS: Final[tuple[Key, ...]] = (
    Key("listen", str, "0.0.0.0:8080", "listeners.plain", HostPort.parse, RESTART,
        "proxy listener, host:port"),
    Key("admin_listen", str, "127.0.0.1:9919", "listeners.admin", HostPort.parse, RESTART,
        "admin listener (status page, /metrics, /healthz, /ready, /api/routes, /api/status), host:port"),
    Key("consul_addr", str, "127.0.0.1:8500", "consul.addresses", ConsulAddress.parse_list, RESTART,
        "Consul HTTP API, host:port or http(s)://host:port; several, comma-separated, are tried in order, moving "
        "to the next when one is down, silent or without a leader"),
    Key("consul_token", str, "", "consul.token", _same, RESTART, "Consul ACL token"),
    Key("consul_dc", str, "", "consul.datacenters", parse_datacenters, RESTART,
        "Consul datacenter (default: the agent's); several, comma-separated, in order of preference: a service "
        "with no healthy instance in one is served from the next"),
    Key("consul_wait", float, 50.0, "consul.wait", _between(1, 600), RESTART,
        "blocking-query wait in seconds (two blocking queries per datacenter, whatever the number of services)"),
    Key("consul_stale", bool, False, "consul.stale", _same, RESTART,
        "read with ?stale: any Consul server answers, not only the leader (spreads load; may lag a little)"),
    Key("consul_cached", bool, False, "consul.cached", _same, RESTART,
        "read services' health with ?cached: the agent's cache answers (needs a local agent, not a server)"),
    Key("tag_prefix", str, "urlprefix-", "consul.tag_prefix", _prefix, RESTART,
        "prefix of route tags (Fabio's urlprefix-)"),
    Key("path_matcher", str, "prefix", "path_matcher", _choice(*MATCHERS), RESTART,
        "how route paths match (Fabio's proxy.matcher): prefix (on a segment boundary), iprefix (the same, "
        "ignoring case) or glob (the whole path; * and ** match any characters, / included); a route's "
        "matcher= option wins"),
    Key("log_format", str, "auto", "logs.format", _choice("auto", "json", "console"), RESTART,
        "auto (json unless stdout is a terminal), json or console"),
    Key("log_level", str, "info", "logs.level", _choice("debug", "info", "warning", "error"), RESTART,
        "debug, info, warning or error"),
    Key("access_log", bool, True, "logs.access", _same, RESTART, "one log line per request (true/false)"),
    Key("access_log_format", str, "json", "logs.access_format", _choice("json", "common", "combined"), RESTART,
        "json, common or combined (NCSA, as nginx and Apache write them)"),
    Key("access_log_file", str, "", "logs.access_file", _same, RESTART,
        "file the access log is appended to; empty = with the other log lines on stdout"),
    Key("access_log_sample", float, 1.0, "logs.access_sample", _between(0, 1), LIVE,
        "share of successful (< 400) requests logged, 0..1; errors are always logged"),
    Key("log_flush_interval", float, 0.25, "logs.flush_interval", _between(0, 60), RESTART,
        "seconds info lines (the access log) may wait in a buffer; 0 writes each at once"),
    Key("connect_timeout", float, 2.0, "upstream.connect_timeout", _positive, LIVE,
        "seconds to connect to an upstream"),
    Key("read_timeout", float, 30.0, "timeouts.read", _positive, LIVE,
        "seconds an upstream may stay silent (head or body) before 504 / abort"),
    Key("max_attempts", int, 3, "upstream.max_attempts", _between(1, 10), LIVE,
        "instances tried per request on connection failures (capped by the pool size)"),
    Key("upstream_keepalive", int, 64, "upstream.keepalive", _between(0, 100_000), LIVE,
        "idle keep-alive connections kept per upstream instance"),
    Key("grpc_max_connections_per_instance", int, 4, "upstream.grpc_max_connections", _between(1, 1000), LIVE,
        "HTTP/2 connections per instance of proto=grpc / grpcs routes (each carries up to 100 streams)"),
    Key("upstream_idle_timeout", float, 30.0, "upstream.idle_timeout", _positive, LIVE,
        "seconds an idle upstream keep-alive connection is kept"),
    Key("shutdown_timeout", float, 10.0, "timeouts.shutdown", _between(0, 3600), LIVE,
        "seconds in-flight requests get to finish on SIGTERM"),
    Key("drain_delay", float, 0.0, "timeouts.drain_delay", _between(0, 3600), LIVE,
        "seconds /ready answers 503 on SIGTERM before the listener closes (for load balancers)"),
    Key("max_sync_age", float, 60.0, "timeouts.max_sync_age", _between(0, 86400), LIVE,
        "seconds without an answer from Consul after which /ready answers 503; 0 = never"),
    Key("client_idle_timeout", float, 75.0, "client.idle_timeout", _positive, LIVE,
        "seconds a client connection may wait idle, or send a request head, before it is closed"),
    Key("client_header_timeout", float, 10.0, "client.header_timeout", _positive, LIVE,
        "seconds a request head may take from its first byte (and a new connection's first request from "
        "connect): 408 and closed"),
    Key("websocket_idle_timeout", float, 600.0, "client.websocket_idle_timeout", _positive, LIVE,
        "seconds a WebSocket connection may pass no byte either way before it is closed"),
    Key("static_file", str, "", "static_file", _same, RESTART,
        "TOML file of services, routes and instances: run without Consul (re-read when it changes)"),
    Key("trusted_proxies", str, "", "client.trusted_proxies", _networks, LIVE,
        "CIDRs/addresses of proxies in front whose X-Forwarded-*/Forwarded headers are kept"),
    Key("allow", str, "", "client.allow", _networks, LIVE,
        "CIDRs/addresses of the only clients served (403 for others); empty: everyone"),
    Key("deny", str, "", "client.deny", _networks, LIVE,
        "CIDRs/addresses of clients refused with 403, on every route"),
    Key("proxy_protocol", str, "", "listeners.proxy_protocol", _proxy_listeners, RESTART,
        "listeners (host:port as in listen, tls_listen, tcp_listen or sni_listen, several separated by commas, "
        "or *) whose connections start with a PROXY protocol v1 or v2 header, accepted from trusted_proxies "
        "only; empty: none"),
    Key("proxy_protocol_timeout", float, 3.0, "client.proxy_header_timeout", _between(0.01, 600), LIVE,
        "seconds a PROXY protocol header may take to arrive before the connection is closed"),
    Key("routes_kv_prefix", str, "ferryman/routes/", "consul.routes_kv_prefix", _kv_prefix, RESTART,
        "Consul KV prefix whose keys each hold a [[routes]] table in TOML; empty: off"),
    Key("tls_listen", str, "", "listeners.tls", _host_ports, RESTART,
        "HTTPS listeners, host:port, comma-separated"),
    Key("tls_passthrough", str, "", "listeners.tls_passthrough", _proxy_listeners, RESTART,
        "TLS listeners (host:port as in tls_listen, several separated by commas, or *) that pass a connection "
        "whose server name has a proto=tcp route through untouched (Fabio's https+tcp+sni); empty: none"),
    Key("tls_certs", str, "", "tls.certs", _cert_files, LIVE,
        "certificate files, CERT.pem:KEY.pem comma-separated; the first is the default"),
    Key("tls_kv_prefix", str, "", "tls.kv_prefix", _kv_prefix, RESTART,
        "Consul KV prefix holding <name>/cert and <name>/key PEM pairs"),
    Key("tls_reload_interval", float, 2.0, "tls.reload_interval", _between(0.1, 3600), RESTART,
        "seconds between checks of the certificate files for changes"),
    Key("https_redirect", str, "", "tls.https_redirect", _redirect_hosts, LIVE,
        "plain-HTTP hosts answered with a redirect to HTTPS: * or names, comma-separated"),
    Key("tcp_listen", str, "", "tcp.listen", _host_ports, RESTART,
        "TCP listeners, host:port, several separated by commas: a connection goes to the service tagged "
        "urlprefix-:PORT proto=tcp"),
    Key("sni_listen", str, "", "tcp.sni_listen", _host_ports, RESTART,
        "TLS pass-through listeners, host:port, several separated by commas: a connection goes, never decrypted, "
        "to the service tagged urlprefix-NAME/ proto=tcp for the server name in its ClientHello"),
    Key("tcp_idle_timeout", float, 3600.0, "tcp.idle_timeout", _positive, LIVE,
        "seconds a TCP or TLS pass-through connection may pass no byte either way before it is closed"),
    Key("tcp_max_connections", int, 10_000, "tcp.max_connections", _between(1, 10_000_000), LIVE,
        "open connections per TCP or SNI listener and worker; beyond: closed at once"),
    Key("sni_hello_timeout", float, 5.0, "tcp.hello_timeout", _between(0.1, 600), LIVE,
        "seconds a client of an SNI listener has to send its ClientHello before it is closed"),
    Key("sni_default_service", str, "", "tcp.sni_default_service", _same, LIVE,
        "service a TLS connection goes to when no route names its server name (or it names none); "
        "empty: closed"),
    Key("upstream_ca_file", str, "", "upstream.ca_file", _same, RESTART,
        "CA bundle to verify proto=https upstreams (default: the system store)"),
    Key("max_connections", int, 10_000, "client.max_connections", _between(1, 10_000_000), LIVE,
        "open client connections per worker; beyond: 503 with Retry-After, closed at once"),
    Key("max_request_target", int, 8192, "client.max_request_target", _between(256, 1024 * 1024), LIVE,
        "bytes of the request target; beyond: 414"),
    Key("max_header_bytes", int, 65536, "client.max_header_bytes", _between(1024, 16 * 1024 * 1024), LIVE,
        "bytes of all request header fields; beyond: 431"),
    Key("max_header_count", int, 100, "client.max_header_count", _between(8, 100_000), LIVE,
        "request header fields; beyond: 431"),
    Key("underscores_in_headers", bool, False, "client.underscores_in_headers", _same, LIVE,
        "keep request header fields whose name has '_' (default: dropped, as nginx does)"),
    Key("http2", bool, True, "client.http2", _same, RESTART,
        "HTTP/2 to clients: ALPN h2 on the TLS listeners, h2c with prior knowledge on the plain one (true/false)"),
    Key("http2_max_concurrent_streams", int, 100, "client.http2_max_concurrent_streams", _between(1, 10_000),
        LIVE, "streams a client may have open on one HTTP/2 connection (advertised); beyond: refused"),
    Key("http2_max_header_list_size", int, 65536, "client.http2_max_header_list_size",
        _between(1024, 16 * 1024 * 1024), LIVE,
        "bytes of a decoded HTTP/2 header list (HPACK output, RFC 9113 accounting); beyond: connection error"),
    Key("http2_max_frame_size", int, 16384, "client.http2_max_frame_size", _between(16384, 16_777_215), LIVE,
        "largest HTTP/2 frame payload a client may send (advertised)"),
    Key("http2_header_table_size", int, 4096, "client.http2_header_table_size", _between(0, 1024 * 1024), LIVE,
        "bytes of HPACK dynamic table a client may make Ferryman keep per connection"),
    Key("http2_max_resets", int, 200, "client.http2_max_resets", _between(1, 1_000_000), LIVE,
        "RST_STREAM frames a client may send per second (rapid reset); beyond: GOAWAY ENHANCE_YOUR_CALM"),
    Key("http2_max_control_frames", int, 100, "client.http2_max_control_frames", _between(1, 1_000_000), LIVE,
        "SETTINGS, PING and PRIORITY frames a client may send per second; beyond: GOAWAY ENHANCE_YOUR_CALM"),
    Key("max_body_size", str, "0", "client.max_body", parse_size, LIVE,
        "request body limit, such as 1048576, 512k, 10m, 1g; 0 = none; beyond: 413"),
    Key("service_max_concurrent", int, 0, "health.service_max_concurrent", _between(0, 10_000_000), LIVE,
        "requests in progress per service and worker; 0 = no limit; beyond: 503 with Retry-After"),
    Key("gzip_content_type", str, "", "compression.content_type", _regex, LIVE,
        "regular expression of response Content-Types compressed for clients that accept gzip (or br), as "
        "Fabio's proxy.gzip.contenttype; empty = off (except routes with gzip=on)"),
    Key("gzip_level", int, 1, "compression.level", _between(1, 9), LIVE,
        "gzip compression level, 1 (fastest) to 9 (smallest)"),
    Key("gzip_min_length", int, 1024, "compression.min_length", _between(0, 1 << 40), LIVE,
        "bytes: an answer with a shorter Content-Length is not compressed"),
    Key("workers", int, 0, "workers", _between(0, 256), RESTART,
        "proxy processes sharing the listener (SO_REUSEPORT); 0 = one per CPU"),
    Key("eject_after", int, 3, "health.eject_after", _between(1, 1000), LIVE,
        "consecutive failures of an instance before it is ejected"),
    Key("eject_base", float, 10.0, "health.eject_base", _between(0.1, 3600), LIVE,
        "seconds of a first ejection (doubling with each ejection in a row)"),
    Key("eject_max_share", float, 0.5, "health.eject_max_share", _between(0, 1), LIVE,
        "largest share of a pool ejected at once"),
    Key("eject_on_5xx", bool, False, "health.eject_on_5xx", _same, LIVE,
        "count 5xx answers as failures for ejection (true/false)"),
    Key("retry_budget", float, 0.2, "health.retry_budget", _between(0, 10), LIVE,
        "retries allowed per request over 10 s windows (0.2 = 20%), plus 3"),
    Key("slow_start", float, 0.0, "health.slow_start", _between(0, 3600), LIVE,
        "seconds over which a newly added instance ramps up to its full share; 0 = off"),
    Key("active_check_interval", float, 5.0, "health.active_check_interval", _between(0.1, 3600), LIVE,
        "seconds between Ferryman's own checks (service meta ferryman-health-path)"),
    Key("active_check_timeout", float, 2.0, "health.active_check_timeout", _between(0.01, 600), LIVE,
        "seconds one active check may take"),
)

BY_NAME: Final[Mapping[str, Key]] = {key.name: key for key in KEYS}
# The config file's tables, besides the keys: read from the file only, taken over on SIGHUP.
SECTIONS: Final = ("services", "routes", "auth")


def value_of(settings: Settings, key: Key) -> Any:
    """The parsed value of `key` in a Settings."""
    where = settings if key.group is None else getattr(settings, key.group)
    return getattr(where, key.field)


def build(values: Mapping[str, Any], **sections: Any) -> Settings:
    """Settings from parsed values by key name (every key given) and the file's sections, grouped as the
    table says."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    top: dict[str, Any] = {}
    for key in KEYS:
        (top if key.group is None else groups[key.group])[key.field] = values[key.name]
    return Settings(**{name: GROUPS[name](**given) for name, given in groups.items()}, **top, **sections)


def with_values(settings: Settings, values: Mapping[str, Any]) -> Settings:
    """`settings` with the keys of `values` set to those (parsed) values."""
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, value in values.items():
        key = BY_NAME[name]
        (top if key.group is None else groups.setdefault(key.group, {}))[key.field] = value
    changed = {name: replace(getattr(settings, name), **given) for name, given in groups.items()}
    return replace(settings, **changed, **top)
