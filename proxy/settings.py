"""The settings a running Ferryman follows: one frozen value of frozen groups, every field already parsed.

`proxy.config` reads the file, the environment and the flags, parses each key once with the parser its row of
`proxy.config_table.KEYS` names, and builds a `Settings`; nothing downstream parses text again (an address is a
`HostPort`, a size a number of bytes, a list of networks `ip_network`s). Each group is what one part of the
proxy takes: the listeners, the Consul client, the upstream connections, the limits of a client connection,
the pools' health policy, the logs, TLS. Which key lands in which field is said once, in the table.

Pure values: no I/O, no defaults here (the table holds them, as the operator would write them; `config.DEFAULTS`
is the table's defaults parsed).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from discovery.consul import ConsulAddress
from discovery.model import ServiceSettings

if TYPE_CHECKING:
    from .auth import RealmSettings
    from .config import ConfigRoute
    from .tls import CertFile  # tls loads `cryptography`: imported only when certificates are configured

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# [services.NAME] tables: each service's typed settings (discovery.model.ServiceSettings), by name.
ServiceTables = tuple[tuple[str, ServiceSettings], ...]


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
class Listeners:
    """Where Ferryman listens: the plain proxy listener, the HTTPS ones (none: no TLS), the admin listener."""

    plain: HostPort
    tls: tuple[HostPort, ...]
    admin: HostPort
    # Listeners whose connections start with a PROXY protocol header: `host:port` as written in listen,
    # tls_listen, tcp_listen or sni_listen, or "*" for every one; () when off.
    proxy_protocol: tuple[str, ...] = ()
    # TLS listeners that pass the server names of `proto=tcp` routes through untouched (Fabio's https+tcp+sni):
    # `host:port` as written in tls_listen, or "*" for every one; () when off.
    tls_passthrough: tuple[str, ...] = ()

    def expects_proxy_header(self, address: HostPort) -> bool:
        return "*" in self.proxy_protocol or str(address) in self.proxy_protocol

    def passes_through(self, address: HostPort) -> bool:
        return "*" in self.tls_passthrough or str(address) in self.tls_passthrough


@dataclass(frozen=True, slots=True)
class ConsulSettings:
    """The Consul client and what it follows."""

    addresses: tuple[ConsulAddress, ...]  # tried in order; at least one
    token: str
    datacenters: tuple[str, ...]  # in order of preference; () for the agent's own
    wait: float  # seconds a blocking query waits
    stale: bool  # ?stale reads: any server answers
    cached: bool  # ?cached reads of service health: the agent's cache answers
    tag_prefix: str
    routes_kv_prefix: str  # "" when off

    @property
    def shown(self) -> str:
        """The addresses for log lines and the status page, as an operator usually writes them (`host:port`,
        with the scheme only when it is https)."""
        return ",".join(
            str(a).removeprefix("http://") if a.scheme == "http" else str(a) for a in self.addresses
        )


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Connections to upstream instances."""

    connect_timeout: float
    keepalive: int  # idle keep-alive connections kept per instance
    idle_timeout: float
    ca_file: str  # "" for the system store
    max_attempts: int  # instances tried per request
    grpc_max_connections: int = 4  # HTTP/2 connections per instance of proto=grpc / grpcs routes


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What a client connection may do: the limits and timeouts a listener enforces, and whose forwarding
    headers it believes."""

    max_connections: int
    max_request_target: int
    max_header_bytes: int
    max_header_count: int
    max_body: int  # bytes; 0: no limit
    header_timeout: float
    idle_timeout: float
    websocket_idle_timeout: float
    trusted_proxies: tuple[IPNetwork, ...]
    # The global source-address rules (Fabio's per-route allow=/deny= for the whole proxy); () when off.
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    # Keep header fields named with '_' (`Transfer_Encoding`): CGI/WSGI backends read them as their '-' twins.
    underscores_in_headers: bool = False
    proxy_header_timeout: float = 3.0  # seconds a PROXY protocol header may take (proxy_protocol listeners)
    # HTTP/2 to clients (ALPN h2 on the TLS listeners, h2c with prior knowledge on the plain one) and its limits.
    http2: bool = True
    http2_max_concurrent_streams: int = 100
    http2_max_header_list_size: int = 65536
    http2_max_frame_size: int = 16384
    http2_header_table_size: int = 4096
    http2_max_resets: int = 200
    http2_max_control_frames: int = 100


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The upstream read timeout and the process's life-cycle timings, in seconds."""

    read: float
    shutdown: float
    drain_delay: float
    max_sync_age: float  # 0: the readiness watchdog is off


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Passive and active health, retries and concurrency every pool follows (a pool's `policy`, replaced
    whole on reload)."""

    eject_after: int
    eject_base: float
    eject_max_share: float
    eject_on_5xx: bool
    retry_budget: float
    slow_start: float
    service_max_concurrent: int
    active_check_interval: float
    active_check_timeout: float


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str  # auto, json or console
    level: str
    access: bool
    access_format: str  # json, common or combined
    access_file: str  # "" for stdout
    access_sample: float
    flush_interval: float  # 0: unbuffered


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Certificates and the plain listener's redirects to HTTPS; the HTTPS listeners are in `Listeners`."""

    certs: tuple[CertFile, ...]  # the first is the default certificate
    kv_prefix: str  # "" when off
    reload_interval: float
    https_redirect: tuple[str, ...]  # lower-case names, `*.suffix` wildcards or `*`; () when off


@dataclass(frozen=True, slots=True)
class CompressionSettings:
    """Response compression (Fabio's proxy.gzip.contenttype): which Content-Types, how hard, from what size."""

    content_type: re.Pattern[str] | None  # None: off, except on routes with gzip=on
    level: int  # zlib's 1..9
    min_length: int  # bytes: an answer declaring a shorter Content-Length goes out as it is


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """TCP and TLS pass-through listeners (proxy/tcp/) and what their connections may do."""

    listen: tuple[HostPort, ...]  # TCP listeners: routes `urlprefix-:PORT proto=tcp`
    sni_listen: tuple[HostPort, ...]  # TLS pass-through listeners: routes `urlprefix-HOST/ proto=tcp`
    idle_timeout: float  # seconds a connection may pass no byte either way
    max_connections: int  # open connections per listener and worker
    hello_timeout: float  # seconds a client of an SNI listener has to send its whole ClientHello
    sni_default_service: str  # where a TLS connection no route names goes; "": closed


@dataclass(frozen=True, slots=True)
class Settings:
    listeners: Listeners
    consul: ConsulSettings
    upstream: UpstreamSettings
    client: ClientLimits
    timeouts: Timeouts
    health: HealthPolicy
    logs: LogSettings
    tls: TlsSettings
    compression: CompressionSettings
    tcp: TcpSettings
    workers: int  # 0: one per CPU
    static_file: str  # "" for Consul
    # How route paths match when a route does not say (Fabio's proxy.matcher): prefix, iprefix or glob.
    path_matcher: str = "prefix"
    # [services.NAME] tables of the config file: per-service balancing and limits, which take precedence over
    # service meta and route tags. File only: no flag or variable sets them.
    services: ServiceTables = ()
    # [[routes]] of the config file: routes operators declare beside the tags, with header rules and splits.
    routes: tuple[ConfigRoute, ...] = ()
    # [auth.NAME] tables: the basic-authentication realms route tags name with auth=NAME.
    auth: tuple[RealmSettings, ...] = ()

    def service_overrides(self) -> dict[str, ServiceSettings]:
        return dict(self.services)


# The group types by their field name in Settings: the table says "health.slow_start", this finds the class.
GROUPS: Final[dict[str, type]] = {
    "listeners": Listeners, "consul": ConsulSettings, "upstream": UpstreamSettings, "client": ClientLimits,
    "timeouts": Timeouts, "health": HealthPolicy, "logs": LogSettings, "tls": TlsSettings,
    "compression": CompressionSettings, "tcp": TcpSettings,
}
