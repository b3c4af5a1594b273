"""`vaewatch` console command: global options, then one subcommand per job.

Each command module registers its subcommands with `register(subparsers)`; a subcommand's
handler takes (args, settings) and returns an exit code. Errors a user can fix (config, data,
bundle, input files) print one line and exit 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detector.bundle import BundleError
from vaewatch import stream_commands, train_commands
from vaewatch.config import ConfigError, load_settings

DEFAULT_CONFIG = Path("config.yaml")
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    BundleError,
    *train_commands.USER_ERRORS,
    *stream_commands.USER_ERRORS,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaewatch", description="VAE anomaly detection for streams of 28x28 images."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="settings file (default: ./config.yaml if present, else built-in defaults)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting; VALUE is YAML (repeatable)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_commands.register(subparsers)
    stream_commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    try:
        settings = load_settings(config_path, args.overrides)
        return int(args.run(args, settings) or 0)
    except USER_ERRORS as exc:
        print(f"vaewatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
