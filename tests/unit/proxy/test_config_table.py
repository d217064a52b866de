"""The settings table: every key has a flag, a variable, a help line and a field; values arrive parsed."""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from discovery.consul import ConsulAddress
from discovery.model import ServiceSettings
from proxy.cli import build_parser
from proxy.config import DEFAULTS, RESTART_KEYS, HostPort, load, load_file, load_flags, reloaded, value_of
from proxy.config_table import BY_NAME, KEYS, SECTIONS, Key
from proxy.settings import GROUPS, Settings

KEY_IDS = [key.name for key in KEYS]


@pytest.fixture(scope="module")
def help_text() -> str:
    """`ferryman --help`, with argparse's line wrapping undone."""
    return " ".join(build_parser().format_help().split())


class TestEveryKey:
    """Each row of the table reaches every place a key is named: flag, variable, help, file, a field."""

    @pytest.mark.parametrize("key", KEYS, ids=KEY_IDS)
    def test_has_a_flag_a_variable_and_a_help_line(self, key: Key, help_text: str) -> None:
        """--help lists the key's flag with its own help line, default and FERRYMAN_ variable."""
        assert key.flag == "--" + key.name.replace("_", "-") and key.env == "FERRYMAN_" + key.name.upper()
        assert key.help.strip()
        assert f"{key.flag} " in help_text
        assert f"{' '.join(key.help.split())} (default: {key.default!r}; env {key.env})" in help_text

    @pytest.mark.parametrize("key", KEYS, ids=KEY_IDS)
    def test_lands_in_a_field_of_settings(self, key: Key) -> None:
        """The row names a group of Settings and a field of that group (or a field of Settings itself)."""
        if key.group is None:
            assert key.field in {f.name for f in fields(Settings)} - set(GROUPS) - set(SECTIONS)
        else:
            assert key.field in {f.name for f in fields(GROUPS[key.group])}

    def test_every_field_is_fed_by_exactly_one_key(self) -> None:
        """No field of a group (or of Settings) is left without a key, and no two keys land in one field."""
        landings = [key.lands for key in KEYS]
        group_fields = [f"{name}.{f.name}" for name, group in GROUPS.items() for f in fields(group)]
        top_fields = [f.name for f in fields(Settings) if f.name not in GROUPS and f.name not in SECTIONS]
        assert sorted(landings) == sorted(group_fields + top_fields)

    @pytest.mark.parametrize("key", KEYS, ids=KEY_IDS)
    def test_default_given_through_each_source_parses_to_the_default(self, key: Key, tmp_path: Path) -> None:
        """The row's default written in the file, in the environment or as a flag gives DEFAULTS' value."""
        as_text = str(key.default).lower() if key.kind is bool else str(key.default)
        as_toml = repr(key.default).lower() if key.kind is bool else (
            f'"{key.default}"' if key.kind is str else repr(key.default))
        config = tmp_path / "f.toml"
        config.write_text(f"{key.name} = {as_toml}\n", encoding="utf-8")
        expected = value_of(DEFAULTS, key)
        assert load_file(config) == {key.name: expected}
        assert value_of(load(config_file=None, environ={key.env: as_text}, flags={}), key) == expected
        assert value_of(load(config_file=None, environ={}, flags={key.name: as_text}), key) == expected

    @pytest.mark.parametrize("key", [k for k in KEYS if k.kind is not str], ids=lambda k: k.name)
    def test_a_number_or_switch_is_held_in_its_type(self, key: Key) -> None:
        """An int, float or bool key is held as that type, never as the text it was given in."""
        assert type(value_of(DEFAULTS, key)) is key.kind


class TestParsedOnce:
    """Addresses, sizes, lists and networks are parsed at load: Settings holds values, not text."""

    @pytest.mark.parametrize(
        ("name", "text", "expected"),
        [
            ("listen", ":9000", HostPort("0.0.0.0", 9000)),
            ("admin_listen", "127.0.0.1:9191", HostPort("127.0.0.1", 9191)),
            ("tls_listen", ":8443, [::1]:9443", (HostPort("0.0.0.0", 8443), HostPort("::1", 9443))),
            ("consul_addr", "c1:8500,https://c2", (ConsulAddress("http", "c1", 8500),
                                                   ConsulAddress("https", "c2", 443))),
            ("consul_dc", "dc1, dc2", ("dc1", "dc2")),
            ("max_body_size", "10m", 10 * 1024**2),
            ("trusted_proxies", "10.0.0.0/8, 192.0.2.7", (ipaddress.ip_network("10.0.0.0/8"),
                                                          ipaddress.ip_network("192.0.2.7/32"))),
            ("https_redirect", "Shop.Example.com, *.example.org", ("shop.example.com", "*.example.org")),
            ("read_timeout", "5", 5.0),
            ("max_attempts", "2", 2),
            ("eject_on_5xx", "yes", True),
        ],
        ids=["listen", "admin-listen", "tls-listen-list", "consul-addresses", "datacenters", "size-in-bytes",
             "networks", "redirect-hosts-lower-cased", "float", "int", "bool"],
    )
    def test_value_is_parsed(self, name: str, text: str, expected: Any) -> None:
        """The flag's text is parsed once, to the value Settings holds (rules between keys aside)."""
        value = load_flags({name: text})[name]
        assert value == expected and not isinstance(value, str)

    def test_certificate_files_are_parsed(self) -> None:
        """tls_certs becomes CertFile entries, a PEM holding both the key's file too."""
        from proxy.tls import CertFile

        settings = load(config_file=None, environ={}, flags={"tls_certs": "a.pem:a.key,both.pem", "tls_listen": ":0"})
        assert settings.tls.certs == (CertFile("a.pem", "a.key"), CertFile("both.pem", "both.pem"))

    @pytest.mark.parametrize(
        ("name", "empty"),
        [("tls_listen", ()), ("consul_dc", ()), ("trusted_proxies", ()), ("https_redirect", ()), ("tls_certs", ())],
        ids=["tls-listen", "consul-dc", "trusted-proxies", "https-redirect", "tls-certs"],
    )
    def test_an_empty_list_is_off(self, name: str, empty: tuple[()]) -> None:
        """An empty list key defaults to no items, not to an empty string."""
        assert value_of(DEFAULTS, BY_NAME[name]) == empty


class TestReloadRule:
    """The rows say which keys a SIGHUP takes over; the others keep their running values until a restart."""

    def test_restart_keys(self) -> None:
        """The keys that shape listeners, processes, the Consul client and logging need a restart."""
        assert RESTART_KEYS == {
            "listen", "admin_listen", "workers", "consul_addr", "consul_token", "consul_dc", "consul_wait",
            "consul_stale", "consul_cached", "tag_prefix", "path_matcher", "log_format", "log_level", "access_log",
            "access_log_format", "access_log_file",
            "log_flush_interval", "tls_listen", "tls_kv_prefix", "tls_reload_interval", "upstream_ca_file",
            "static_file", "routes_kv_prefix", "proxy_protocol", "http2", "tcp_listen", "sni_listen", "tls_passthrough",
        }

    def test_a_group_mixing_both_kinds_takes_the_live_keys_only(self) -> None:
        """tls_certs is taken over, tls_reload_interval (same group) keeps its running value."""
        running = load(config_file=None, environ={}, flags={"tls_certs": "a.pem", "tls_listen": ":0"})
        new = load(config_file=None, environ={}, flags={
            "tls_certs": "b.pem", "tls_listen": ":0", "tls_reload_interval": "9", "eject_after": "7"})
        settings, changed, restart = reloaded(running, new)
        assert (settings.tls.certs[0].cert, settings.tls.reload_interval) == ("b.pem", DEFAULTS.tls.reload_interval)
        assert settings.health.eject_after == 7
        assert (changed, restart) == (["tls_certs", "eject_after"], ["tls_reload_interval"])

    def test_file_sections_are_taken_over(self, tmp_path: Path) -> None:
        """[services.NAME] tables changed in the file are reported and taken over."""
        config = tmp_path / "f.toml"
        config.write_text('[services.api]\nlb = "round_robin"\n')
        settings, changed, restart = reloaded(DEFAULTS, load(config_file=str(config), environ={}, flags={}))
        assert settings.service_overrides() == {"api": ServiceSettings(lb="round_robin")}
        assert (changed, restart) == (["services"], [])
