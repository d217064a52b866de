"""Sizes, the maxbody route option, per-service limits from the config file, and the limit keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from discovery.model import ServiceRoutes, Snapshot
from discovery.tags import TagError, parse_route_tag, parse_size
from proxy.config import DEFAULTS, ConfigError, load
from proxy.pool import Pools
from proxy.table import Route


@pytest.mark.parametrize("text, size", [
    ("0", 0), ("1048576", 1048576), ("512k", 512 * 1024), ("10m", 10 * 1024**2), ("1g", 1024**3),
    ("10M", 10 * 1024**2), ("64kb", 64 * 1024), ("64KiB", 64 * 1024), (" 2m ", 2 * 1024**2),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "m", "-1", "1.5m", "10 tb", "1e6", "10mm"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(TagError, match="is not a size"):
        parse_size(text)


def test_maxbody_route_option() -> None:
    spec = parse_route_tag("urlprefix-/upload maxbody=10m")
    assert Route.from_spec("up", spec).max_body == 10 * 1024**2
    assert Route.from_spec("up", parse_route_tag("urlprefix-/x")).max_body == 0
    with pytest.raises(TagError, match="is not a size"):
        parse_route_tag("urlprefix-/upload maxbody=lots")


def test_service_limits_from_the_config_file_over_the_global_default(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text('service_max_concurrent = 50\n[services.api]\nmax_concurrent = 5\nmax_body_size = "1m"\n'
                      '[services.free]\nmax_concurrent = 0\n')
    settings = load(config_file=str(config), environ={}, flags={})
    policy = replace(DEFAULTS.health, service_max_concurrent=settings.health.service_max_concurrent)
    pools = Pools(settings.service_overrides(), policy)
    pools.reconcile(Snapshot(tuple(ServiceRoutes(name, (), ()) for name in ("api", "free", "other"))))
    limits = {p.service: (p.max_concurrent, p.max_body) for p in pools}
    assert limits == {"api": (5, 1024**2), "free": (0, 0), "other": (50, 0)}


def test_bad_limits_name_where_they_came_from(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text('[services.api]\nmax_concurrent = "many"\n')
    with pytest.raises(ConfigError, match=r"f\.toml:1: key 'services\.api\.max_concurrent'.*whole number"):
        load(config_file=str(config), environ={}, flags={})
    with pytest.raises(ConfigError, match=r"environment variable FERRYMAN_MAX_BODY_SIZE.*is not a size"):
        load(config_file=None, environ={"FERRYMAN_MAX_BODY_SIZE": "big"}, flags={})
    with pytest.raises(ConfigError, match="flag --max-header-count"):
        load(config_file=None, environ={}, flags={"max_header_count": "2"})
    with pytest.raises(ConfigError, match="flag --client-header-timeout"):
        load(config_file=None, environ={}, flags={"client_header_timeout": "0"})


def test_reload_applies_live_keys_and_keeps_restart_keys() -> None:
    from proxy.config import HostPort, reloaded

    running = load(config_file=None, environ={}, flags={"listen": "127.0.0.1:8080", "read_timeout": "30"})
    new = load(config_file=None, environ={}, flags={"listen": "127.0.0.1:9999", "read_timeout": "5",
                                                    "max_header_count": "10"})
    settings, changed, restart = reloaded(running, new)
    assert (settings.listeners.plain, settings.timeouts.read, settings.client.max_header_count) == (
        HostPort("127.0.0.1", 8080), 5.0, 10)
    assert changed == ["read_timeout", "max_header_count"] and restart == ["listen"]
    assert reloaded(running, running)[1:] == ([], [])
