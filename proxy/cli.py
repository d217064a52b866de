"""`ferryman`: the command line. Flags mirror config keys (--read-timeout for read_timeout)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import structlog

from . import BUILD, __version__, logs
from .config import KEYS, ConfigError, Settings, Source, load
from .workers import effective_workers, run_event_loop, run_supervisor, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferryman",
        description="HTTP reverse proxy that routes to the healthy instances Consul knows.",
        epilog="Each flag can also be set as FERRYMAN_<KEY> in the environment or as <key> in the config "
        "file. Precedence: flag > environment > file > default.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    # Which build runs (proxy/compiled.py): "ferryman 0.1.0 (compiled: mypyc, 12 modules)" or "(pure Python)".
    parser.add_argument("--version", action="version", version=f"ferryman {__version__} ({BUILD.describe()})")
    for key in KEYS:  # one flag per row of the settings table, its help line from the row
        help_line = f"{key.help} (default: {key.default!r}; env {key.env})".replace("%", "%%")  # argparse formats it
        parser.add_argument(
            key.flag, dest=key.name, metavar=key.kind.__name__.upper() if key.kind is not str else "VALUE",
            default=None, help=help_line,
        )
    return parser


def load_settings(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    args = build_parser().parse_args(argv)
    flags = {key.name: getattr(args, key.name) for key in KEYS}
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
    logs.configure(settings.logs.format, settings.logs.level, buffered=settings.logs.flush_interval > 0)
    try:
        # SIGHUP reads the file again, with the same flags and environment.
        source = Source(args.config, tuple((key.name, getattr(args, key.name)) for key in KEYS))
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
