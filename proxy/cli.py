"""`ferryman`: the command line. Flags mirror config keys (--read-timeout for read_timeout)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import structlog

from . import __version__, logs
from .config import DEFAULTS, FIELD_TYPES, ConfigError, Settings, Source, env_name, flag_name, load
from .workers import effective_workers, run_event_loop, run_supervisor, serve

_HELP = {
    "listen": "proxy listener, host:port",
    "admin_listen": "admin listener (status page, /metrics, /healthz, /ready, /api/routes, /api/status), host:port",
    "consul_addr": "Consul HTTP API, host:port or http(s)://host:port; several, comma-separated, are tried in "
                   "order, moving to the next when one is down, silent or without a leader",
    "consul_token": "Consul ACL token",
    "consul_dc": "Consul datacenter (default: the agent's); several, comma-separated, in order of preference: "
                 "a service with no healthy instance in one is served from the next",
    "consul_wait": "blocking-query wait in seconds",
    "tag_prefix": "prefix of route tags (Fabio's urlprefix-)",
    "log_format": "auto (json unless stdout is a terminal), json or console",
    "log_level": "debug, info, warning or error",
    "access_log": "one log line per request (true/false)",
    "access_log_format": "json, common or combined (NCSA, as nginx and Apache write them)",
    "access_log_file": "file the access log is appended to; empty = with the other log lines on stdout",
    "access_log_sample": "share of successful (< 400) requests logged, 0..1; errors are always logged",
    "log_flush_interval": "seconds info lines (the access log) may wait in a buffer; 0 writes each at once",
    "connect_timeout": "seconds to connect to an upstream",
    "read_timeout": "seconds an upstream may stay silent (head or body) before 504 / abort",
    "max_attempts": "instances tried per request on connection failures (capped by the pool size)",
    "upstream_keepalive": "idle keep-alive connections kept per upstream instance",
    "upstream_idle_timeout": "seconds an idle upstream keep-alive connection is kept",
    "shutdown_timeout": "seconds in-flight requests get to finish on SIGTERM",
    "websocket_idle_timeout": "seconds a WebSocket connection may pass no byte either way before it is closed",
    "trusted_proxies": "CIDRs/addresses of proxies in front whose X-Forwarded-*/Forwarded headers are kept",
    "routes_kv_prefix": "Consul KV prefix whose keys each hold a [[routes]] table in TOML; empty: off",
    "static_file": "TOML file of services, routes and instances: run without Consul (re-read when it changes)",
    "tls_listen": "HTTPS listeners, host:port, comma-separated",
    "tls_certs": "certificate files, CERT.pem:KEY.pem comma-separated; the first is the default",
    "tls_kv_prefix": "Consul KV prefix holding <name>/cert and <name>/key PEM pairs",
    "tls_reload_interval": "seconds between checks of the certificate files for changes",
    "https_redirect": "plain-HTTP hosts answered with a redirect to HTTPS: * or names, comma-separated",
    "upstream_ca_file": "CA bundle to verify proto=https upstreams (default: the system store)",
    "drain_delay": "seconds /ready answers 503 on SIGTERM before the listener closes (for load balancers)",
    "max_sync_age": "seconds without an answer from Consul after which /ready answers 503; 0 = never",
    "client_idle_timeout": "seconds a client connection may wait idle, or send a request head, before it is closed",
    "workers": "proxy processes sharing the listener (SO_REUSEPORT); 0 = one per CPU",
    "eject_after": "consecutive failures of an instance before it is ejected",
    "eject_base": "seconds of a first ejection (doubling with each ejection in a row)",
    "eject_max_share": "largest share of a pool ejected at once",
    "eject_on_5xx": "count 5xx answers as failures for ejection (true/false)",
    "retry_budget": "retries allowed per request over 10 s windows (0.2 = 20%%), plus 3",
    "slow_start": "seconds over which a newly added instance ramps up to its full share; 0 = off",
    "active_check_interval": "seconds between Ferryman's own checks (service meta ferryman-health-path)",
    "active_check_timeout": "seconds one active check may take",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferryman",
        description="HTTP reverse proxy that routes to the healthy instances Consul knows.",
        epilog="Each flag can also be set as FERRYMAN_<KEY> in the environment or as <key> in the config "
        "file. Precedence: flag > environment > file > default.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"ferryman {__version__}")
    for key, kind in FIELD_TYPES.items():
        default = getattr(DEFAULTS, key)
        parser.add_argument(
            flag_name(key), dest=key, metavar=kind.__name__.upper() if kind is not str else "VALUE",
            default=None, help=f"{_HELP.get(key, key)} (default: {default!r}; env {env_name(key)})",
        )
    return parser


def load_settings(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    args = build_parser().parse_args(argv)
    flags = {key: getattr(args, key) for key in FIELD_TYPES}
    return args, load(config_file=args.config, environ=os.environ, flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, settings = load_settings(argv)
    except ConfigError as exc:
        print(f"ferryman: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"ferryman: configuration OK{' (' + args.config + ')' if args.config else ''}")
        return 0
    logs.configure(settings.log_format, settings.log_level, buffered=settings.log_flush_interval > 0)
    try:
        # SIGHUP reads the file again, with the same flags and environment.
        source = Source(args.config, tuple((key, getattr(args, key)) for key in FIELD_TYPES))
        if effective_workers(settings) > 1:
            return run_supervisor(settings, source)
        run_event_loop(serve(settings, source=source))
    except ConfigError as exc:  # found only at start, such as a Consul token Consul refuses
        logs.flush()
        print(f"ferryman: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        structlog.get_logger("ferryman").error("startup_failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
