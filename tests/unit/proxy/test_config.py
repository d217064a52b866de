"""Settings from defaults, a TOML file, FERRYMAN_* variables and flags; a mistake is named where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery.consul import ConsulAddress
from discovery.model import ServiceSettings
from proxy.config import DEFAULTS, ConfigError, HostPort, Settings, load


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ferryman.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def settings(config_file: str | None = None, environ: dict[str, str] | None = None,
             flags: dict[str, str | None] | None = None) -> Settings:
    return load(config_file=config_file, environ=environ or {}, flags=flags or {})


def config_error(config_file: str | None = None, environ: dict[str, str] | None = None,
                 flags: dict[str, str | None] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        settings(config_file, environ, flags)
    return str(info.value)


class TestPrecedence:
    """A flag beats the environment, which beats the file, which beats the default."""

    @pytest.mark.parametrize(
        ("in_file", "in_env", "in_flag", "expected"),
        [
            (False, False, False, 30.0),
            (True, False, False, 11.0),
            (True, True, False, 22.0),
            (True, True, True, 33.0),
            (False, True, False, 22.0),
            (True, False, True, 33.0),
            (False, False, True, 33.0),
        ],
        ids=["default", "file-over-default", "env-over-file", "flag-over-env", "env-only", "flag-over-file",
             "flag-only"],
    )
    def test_read_timeout(self, tmp_path: Path, in_file: bool, in_env: bool, in_flag: bool,
                          expected: float) -> None:
        config = write(tmp_path, "read_timeout = 11\n") if in_file else None
        environ = {"FERRYMAN_READ_TIMEOUT": "22"} if in_env else {}
        flags: dict[str, str | None] = {"read_timeout": "33" if in_flag else None}
        assert settings(config, environ, flags).timeouts.read == expected

    def test_sources_combine_key_by_key(self, tmp_path: Path) -> None:
        config = write(tmp_path, 'listen = ":9000"\nlog_level = "debug"\nmax_attempts = 5\n')
        result = settings(config, {"FERRYMAN_LOG_LEVEL": "warning"}, {"max_attempts": "2", "listen": None})
        assert (result.listeners.plain, result.logs.level, result.upstream.max_attempts, result.listeners.admin) == (
            HostPort("0.0.0.0", 9000), "warning", 2, DEFAULTS.listeners.admin
        )

    def test_nothing_given_gives_defaults(self) -> None:
        assert settings() == DEFAULTS

    def test_other_environment_variables_are_ignored(self) -> None:
        assert settings(environ={"PATH": "/bin", "HOME": "/root", "FERRYMANX": "1"}) == DEFAULTS

    def test_file_values_typed(self, tmp_path: Path) -> None:
        config = write(tmp_path, 'access_log = false\nconnect_timeout = 1\nconsul_addr = "https://consul:8501"\n')
        result = settings(config)
        assert result.logs.access is False
        assert result.upstream.connect_timeout == 1.0 and isinstance(result.upstream.connect_timeout, float)
        assert result.consul.addresses == (ConsulAddress("https", "consul", 8501),)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("true", True), ("1", True), ("yes", True), ("ON", True),
            ("false", False), ("0", False), ("no", False), ("off", False),
        ],
        ids=["true", "1", "yes", "on-upper-case", "false", "0", "no", "off"],
    )
    def test_boolean_words(self, text: str, expected: bool) -> None:
        assert settings(environ={"FERRYMAN_ACCESS_LOG": text}).logs.access is expected
        assert settings(flags={"access_log": text}).logs.access is expected


class TestFileErrors:
    """A mistake in the config file names the file, the line and the key."""

    def test_unknown_key(self, tmp_path: Path) -> None:
        config = write(tmp_path, '# proxy settings\nlisten = ":8080"\nread_timout = 5\n')
        message = config_error(config)
        assert message.startswith(f"{config}:3: unknown key 'read_timout'")
        assert "read_timeout" in message  # the known keys are listed, so the typo is easy to spot

    @pytest.mark.parametrize(
        ("text", "line", "key", "detail"),
        [
            ('# settings\nread_timeout = "fast"\n', 2, "read_timeout", "must be a float, got str 'fast'"),
            ('max_attempts = 2.5\n', 1, "max_attempts", "got float 2.5"),
            ('max_attempts = true\n', 1, "max_attempts", "must be a whole number"),
            ('read_timeout = true\n', 1, "read_timeout", "must be a float"),
            ('access_log = "yes"\n', 1, "access_log", "must be a bool"),
            ('listen = 8080\n', 1, "listen", "must be a str"),
            ('\n\n"read_timeout" = "fast"\n', 3, "read_timeout", "must be a float"),
            ('log_format = "xml"\n', 1, "log_format", "must be one of auto, json, console"),
            ('read_timeout = 0\n', 1, "read_timeout", "greater than 0"),
            ('max_attempts = 11\n', 1, "max_attempts", "must be between 1 and 10"),
            ('listen = "8080"\n', 1, "listen", "is not host:port"),
            ('consul_addr = "ftp://consul:21"\n', 1, "consul_addr", "scheme must be http or https"),
            ('tag_prefix = "url prefix-"\n', 1, "tag_prefix", "without blanks"),
            ('gzip_content_type = "^(text/"\n', 1, "gzip_content_type", "is not a regular expression"),
            ('gzip_level = 0\n', 1, "gzip_level", "must be between 1 and 9"),
        ],
        ids=["text-for-float", "float-for-int", "bool-for-int", "bool-for-float", "text-for-bool",
             "number-for-text", "quoted-key", "log-format-choice", "zero-timeout", "attempts-out-of-range",
             "listen-without-colon", "consul-scheme", "prefix-with-blank", "gzip-content-type-not-a-regex",
             "gzip-level-zero"],
    )
    def test_bad_value(self, tmp_path: Path, text: str, line: int, key: str, detail: str) -> None:
        config = write(tmp_path, text)
        message = config_error(config)
        assert message.startswith(f"{config}:{line}: key {key!r}: ")
        assert detail in message

    def test_invalid_toml(self, tmp_path: Path) -> None:
        config = write(tmp_path, 'listen = ":8080"\nread_timeout = \n')
        message = config_error(config)
        assert message.startswith(f"{config}: invalid TOML")
        assert "line 2" in message

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "nope.toml")
        assert config_error(missing).startswith(f"{missing}: cannot read config file")

    @pytest.mark.parametrize(
        ("text", "line"),
        [
            ('listen = ":8080"\n\n[consul]\naddr = "127.0.0.1:8500"\n', 3),
            ('listen = ":8080"\nconsul.addr = "x"\n', 2),
        ],
        ids=["table-header", "dotted-key"],
    )
    def test_unknown_table_names_its_line(self, tmp_path: Path, text: str, line: int) -> None:
        # BUG: proxy/config.py _key_line only recognises `key =` lines, so `[consul]` and `consul.addr = ...`
        # are reported as "<file>: unknown table 'consul'" with no line number.
        config = write(tmp_path, text)
        assert config_error(config).startswith(f"{config}:{line}: unknown table 'consul'")


class TestEnvironmentErrors:
    """A mistake in a FERRYMAN_* variable names the variable."""

    def test_unknown_variable(self) -> None:
        message = config_error(environ={"FERRYMAN_READ_TIMOUT": "5"})
        assert message == "environment variable FERRYMAN_READ_TIMOUT: unknown key 'read_timout'"

    @pytest.mark.parametrize(
        ("name", "value", "detail"),
        [
            ("FERRYMAN_READ_TIMEOUT", "fast", "'fast' is not a number"),
            ("FERRYMAN_MAX_ATTEMPTS", "2.5", "'2.5' is not a whole number"),
            ("FERRYMAN_ACCESS_LOG", "maybe", "'maybe' is not a boolean"),
            ("FERRYMAN_LOG_FORMAT", "xml", "must be one of auto, json, console"),
            ("FERRYMAN_LISTEN", "localhost", "is not host:port"),
            ("FERRYMAN_CONSUL_WAIT", "0", "must be between 1 and 600"),
        ],
        ids=["not-a-number", "not-whole", "not-boolean", "not-a-choice", "not-host-port", "out-of-range"],
    )
    def test_bad_value(self, name: str, value: str, detail: str) -> None:
        message = config_error(environ={name: value})
        key = name.removeprefix("FERRYMAN_").lower()
        assert message.startswith(f"environment variable {name}: key {key!r}: ")
        assert detail in message


class TestFlagErrors:
    """A bad flag value names the flag as the user typed it."""

    @pytest.mark.parametrize(
        ("key", "value", "flag", "detail"),
        [
            ("read_timeout", "fast", "--read-timeout", "'fast' is not a number"),
            ("max_attempts", "0", "--max-attempts", "must be between 1 and 10"),
            ("log_level", "loud", "--log-level", "must be one of debug, info, warning, error"),
            ("admin_listen", "nowhere", "--admin-listen", "is not host:port"),
        ],
        ids=["not-a-number", "out-of-range", "not-a-choice", "not-host-port"],
    )
    def test_bad_value(self, key: str, value: str, flag: str, detail: str) -> None:
        message = config_error(flags={key: value})
        assert message.startswith(f"flag {flag}: key {key!r}: ")
        assert detail in message

    def test_flag_error_wins_over_good_env(self) -> None:
        message = config_error(environ={"FERRYMAN_READ_TIMEOUT": "5"}, flags={"read_timeout": "slow"})
        assert message.startswith("flag --read-timeout:")


class TestNotANumber:
    """A timeout of NaN is no timeout at all and is refused wherever it is given."""

    @pytest.mark.parametrize(
        ("source", "key"),
        [("file", "connect_timeout"), ("env", "read_timeout"), ("flag", "upstream_idle_timeout")],
        ids=["file-connect-timeout", "env-read-timeout", "flag-idle-timeout"],
    )
    def test_nan_timeout_rejected(self, tmp_path: Path, source: str, key: str) -> None:
        # BUG: proxy/config.py _positive (line 83-85) checks `value <= 0`, which is False for NaN, so
        # `connect_timeout = nan` passes `ferryman --check` and then every upstream connect fails at once.
        if source == "file":
            message = config_error(write(tmp_path, f"{key} = nan\n"))
        elif source == "env":
            message = config_error(environ={f"FERRYMAN_{key.upper()}": "nan"})
        else:
            message = config_error(flags={key: "nan"})
        assert repr(key) in message


class TestChoicesAndAddresses:
    """log_format takes a fixed set of words; listen addresses parse to host and port."""

    @pytest.mark.parametrize("log_format", ["auto", "json", "console"])
    def test_log_format_choices(self, log_format: str) -> None:
        assert settings(flags={"log_format": log_format}).logs.format == log_format

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (":8080", HostPort("0.0.0.0", 8080)),
            ("127.0.0.1:9090", HostPort("127.0.0.1", 9090)),
            ("localhost:80", HostPort("localhost", 80)),
            ("[::1]:8080", HostPort("::1", 8080)),
            ("[::]:8080", HostPort("::", 8080)),
            (" :8080 ", HostPort("0.0.0.0", 8080)),
        ],
        ids=["port-only-means-every-interface", "ipv4", "name", "ipv6", "ipv6-any", "blanks"],
    )
    def test_listen_parsing(self, text: str, expected: HostPort) -> None:
        assert settings(flags={"listen": text}).listeners.plain == expected

    @pytest.mark.parametrize(
        ("host_port", "text"),
        [(HostPort("0.0.0.0", 8080), "0.0.0.0:8080"), (HostPort("::1", 80), "[::1]:80")],
        ids=["ipv4", "ipv6-bracketed"],
    )
    def test_host_port_text(self, host_port: HostPort, text: str) -> None:
        assert str(host_port) == text

    @pytest.mark.parametrize(
        "text", ["8080", "localhost", "host:", "host:65536", "host:-1", "host:http"],
        ids=["no-colon", "no-port", "empty-port", "port-too-large", "negative-port", "port-not-a-number"],
    )
    def test_bad_listen(self, text: str) -> None:
        assert "is not host:port" in config_error(flags={"listen": text})

    def test_default_addresses(self) -> None:
        assert DEFAULTS.listeners.plain == HostPort("0.0.0.0", 8080)
        assert DEFAULTS.listeners.admin == HostPort("127.0.0.1", 9919)

    @pytest.mark.parametrize(
        ("port", "owner"),
        [(9090, "Prometheus"), (9091, "Pushgateway"), (9093, "Alertmanager"), (9100, "node exporter"),
         (8500, "Consul"), (8080, "Traefik, Ferryman's proxy"), (8081, "Traefik"), (3000, "Grafana"),
         (9000, "MinIO, PHP-FPM"), (9901, "Envoy's admin"), (9911, "lnd's watchtower"), (9998, "Fabio's UI"),
         (9999, "Fabio's proxy")],
        ids=lambda value: str(value),
    )
    def test_the_admin_port_is_nobody_elses_default(self, port: int, owner: str) -> None:
        """The admin listener's default port is no common service's default (9090 was Prometheus's)."""
        assert DEFAULTS.listeners.admin.port != port, f"{port} is {owner}'s default"


class TestServiceTables:
    """[services.NAME] tables set a service's balancing; a bad one is an error naming file, line and key."""

    def test_tables_are_read(self, tmp_path: Path) -> None:
        path = tmp_path / "ferryman.toml"
        path.write_text('listen = ":8080"\n\n[services.api]\nlb = "hash"\nhash_key = "cookie:session"\n'
                        '\n[services.web]\nsticky = "srv"\n')
        settings = load(config_file=str(path), environ={}, flags={})
        assert settings.service_overrides() == {
            "api": ServiceSettings(lb="hash", hash_on=("cookie", "session")), "web": ServiceSettings(sticky="srv"),
        }

    def test_timeouts_are_numbers_of_seconds(self, tmp_path: Path) -> None:
        path = tmp_path / "ferryman.toml"
        path.write_text('[services.ui]\nread_timeout = 360\nconnect_timeout = 1.5\n')
        settings = load(config_file=str(path), environ={}, flags={})
        assert settings.service_overrides() == {"ui": ServiceSettings(read_timeout=360.0, connect_timeout=1.5)}

    @pytest.mark.parametrize(
        ("text", "detail"),
        [
            ('[services.api]\nlb = "fastest"\n', "key 'services.api.lb': lb='fastest' must be one of"),
            ('[services.api]\nweight = "3"\n', "key 'services.api.weight': unknown service setting"),
            ('[services.api]\nlb = 3\n', "key 'services.api.lb': must be text"),
            ('[services.api]\nread_timeout = 0\n', "key 'services.api.read_timeout': read_timeout='0' must be"),
        ],
        ids=["bad-algorithm", "unknown-setting", "not-text", "read-timeout-zero"],
    )
    def test_bad_table_names_file_line_and_key(self, tmp_path: Path, text: str, detail: str) -> None:
        path = tmp_path / "ferryman.toml"
        path.write_text('listen = ":8080"\n' + text)
        with pytest.raises(ConfigError) as err:
            load(config_file=str(path), environ={}, flags={})
        assert f"{path}:2: " in str(err.value) and detail in str(err.value)
