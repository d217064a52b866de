"""`ferryman --check`: validates the configuration, says where a mistake is, and exits 0 or 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy import BUILD, __version__
from proxy.cli import main

GOOD = 'listen = ":8080"\nread_timeout = 15\nlog_format = "json"\n'
BAD = '# ferryman\nlisten = ":8080"\nread_timeout = "fast"\n'


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() reads the real environment; a FERRYMAN_* variable of the developer's must not leak in."""
    for name in list(os.environ):
        if name.startswith("FERRYMAN_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ferryman.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


class TestCheck:
    """--check loads every source, reports the first mistake and never starts the proxy."""

    def test_good_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write(tmp_path, GOOD)
        assert main(["--check", "--config", config]) == 0
        out, err = capsys.readouterr()
        assert out == f"ferryman: configuration OK ({config})\n"
        assert err == ""

    def test_no_file(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--check"]) == 0
        assert capsys.readouterr().out == "ferryman: configuration OK\n"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (BAD, ":3: key 'read_timeout': must be a float"),
            ('listen = ":8080"\nlisten_port = 80\n', ":2: unknown key 'listen_port'"),
        ],
        ids=["bad-value", "unknown-key"],
    )
    def test_bad_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
    ) -> None:
        config = write(tmp_path, text)
        assert main(["--check", "--config", config]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"ferryman: config error: {config}{expected}")

    def test_bad_environment(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("FERRYMAN_MAX_ATTEMPTS", "many")
        assert main(["--check"]) == 2
        assert "environment variable FERRYMAN_MAX_ATTEMPTS" in capsys.readouterr().err

    def test_bad_flag(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--check", "--read-timeout", "soon"]) == 2
        assert "flag --read-timeout: key 'read_timeout'" in capsys.readouterr().err

    def test_bad_environment_value_is_an_error_even_under_a_flag(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every source is validated, even one a higher-precedence source overrides."""
        monkeypatch.setenv("FERRYMAN_READ_TIMEOUT", "fast")
        assert main(["--check", "--read-timeout", "5"]) == 2
        assert "FERRYMAN_READ_TIMEOUT" in capsys.readouterr().err


class TestArguments:
    """Flags mirror config keys; argparse handles --version and unknown flags."""

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--version"])
        assert info.value.code == 0
        assert capsys.readouterr().out == f"ferryman {__version__} ({BUILD.describe()})\n"

    def test_unknown_flag(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--check", "--read-timout", "5"])
        assert info.value.code == 2
        assert "--read-timout" in capsys.readouterr().err

    def test_every_key_has_a_flag(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["--help"])
        help_text = capsys.readouterr().out
        for flag in ("--listen", "--admin-listen", "--consul-addr", "--read-timeout", "--max-attempts",
                     "--log-format", "--access-log", "FERRYMAN_READ_TIMEOUT"):
            assert flag in help_text


class TestConsoleScript:
    """The installed `ferryman` entry point runs the same main()."""

    def test_check_through_the_entry_point(self, tmp_path: Path) -> None:
        script = Path(sys.executable).parent / "ferryman"
        config = write(tmp_path, GOOD)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
        result = subprocess.run(
            [str(script), "--check", "--config", config],
            capture_output=True, text=True, env=environ, timeout=60, check=False,
        )
        assert (result.returncode, result.stdout, result.stderr) == (
            0, f"ferryman: configuration OK ({config})\n", ""
        )


class TestShippedExample:
    """The example config in the repository is valid and spells out every key with its default."""

    def test_example_config_checks_and_matches_the_defaults(self) -> None:
        from proxy.config import DEFAULTS, load_file, value_of
        from proxy.config_table import BY_NAME

        example = Path(__file__).resolve().parents[3] / "ferryman.example.toml"
        assert main(["--check", "--config", str(example)]) == 0
        values = load_file(example)
        assert set(values) == set(BY_NAME)
        assert {k: value_of(DEFAULTS, BY_NAME[k]) for k in values} == values


class TestLogBuffer:
    """Info lines are batched; a warning flushes everything before it, in order."""

    def test_info_lines_wait_and_urgent_lines_flush_in_order(self) -> None:
        import io

        from proxy.logs import BufferedBytesLogger, LineBuffer

        sink = io.BytesIO()
        logger = BufferedBytesLogger(LineBuffer(sink))
        logger.info(b'{"event":"access","n":1}')
        logger.info(b'{"event":"access","n":2}')
        assert sink.getvalue() == b""
        logger.warning(b'{"event":"proxy_error"}')
        assert sink.getvalue().splitlines() == [
            b'{"event":"access","n":1}', b'{"event":"access","n":2}', b'{"event":"proxy_error"}',
        ]

    def test_a_full_buffer_is_written_without_waiting(self) -> None:
        import io

        from proxy.logs import BufferedBytesLogger, LineBuffer

        sink = io.BytesIO()
        logger = BufferedBytesLogger(LineBuffer(sink, max_bytes=100))
        for _ in range(10):
            logger.info(b"x" * 20)
        assert len(sink.getvalue().splitlines()) >= 4


class TestAccessLine:
    """The access log's fast path writes the line structlog would: same keys, context and timestamp format."""

    def test_fast_access_line_matches_structlog_json(self) -> None:
        import io
        import json
        import re

        import structlog

        from proxy import logs

        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, write_through=True)
        logs.configure("json", "info", stream, buffered=False)
        structlog.contextvars.bind_contextvars(worker=3)
        try:
            write = logs.access_writer()
            req = SimpleNamespace(method="GET", host=b"shop.example.com", target=b"/cart?x=1", headers=[],
                                  http10=False, http2=False, request_id=b"abc123")
            write(req, "/cart", 200, "shop", "10.0.0.5:8080", 1.25, 512, "192.0.2.1")
            structlog.get_logger("t").info("access", method="GET", protocol="HTTP/1.1", host="shop.example.com",
                                           path="/cart", status=200, service="shop", upstream="10.0.0.5:8080",
                                           duration_ms=1.25, bytes=512, client="192.0.2.1", request_id="abc123")
        finally:
            structlog.contextvars.clear_contextvars()
            structlog.reset_defaults()
        fast, reference = (json.loads(line) for line in raw.getvalue().splitlines())
        assert set(fast) == set(reference)
        assert {k: v for k, v in fast.items() if k != "timestamp"} == {
            k: v for k, v in reference.items() if k != "timestamp"
        }
        assert fast["worker"] == 3
        iso = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"
        assert re.match(iso, fast["timestamp"]) and re.match(iso, reference["timestamp"])
