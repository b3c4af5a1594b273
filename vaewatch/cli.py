"""`vaewatch` console command: one subcommand per job; settings options before or after it.

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
from typing import Any

from detector.bundle import BundleError
from streams.tls import TLSSettingsError
from vaewatch import (
    acls_command,
    config_command,
    serve_commands,
    stream_commands,
    train_commands,
)
from vaewatch.config import ConfigError, load_settings
from vaewatch.secret_settings import mask_secrets_in_logs

DEFAULT_CONFIG = Path("config.yaml")
_OVERRIDES_AFTER = "overrides_after_command"


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that end a command with `vaewatch: error: ...` and exit code 2. `main` calls
    this only when an exception is on its way: the Kafka-side ones import kafka-python, which
    commands without a Kafka client should not load."""
    from streams.connection_errors import BrokerRefusedError

    return (
        ConfigError,
        BundleError,
        BrokerRefusedError,
        TLSSettingsError,
        *train_commands.USER_ERRORS,
        *stream_commands.user_errors(),
        *serve_commands.USER_ERRORS,
        *acls_command.USER_ERRORS,
    )


class _SubcommandsAction(argparse._SubParsersAction):
    """Gives every subcommand the global options, so they work after it too.

    `vaewatch train --set k=v` and `vaewatch --set k=v train` mean the same. A subcommand's own
    copies default to SUPPRESS, so a subcommand that does not repeat an option leaves the global
    value alone; its --set values go to a separate list that `parse_args` appends after the
    global ones (later --set wins, as within one list).
    """

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", ()), _global_options(after_command=True)]
        parser = super().add_parser(name, **kwargs)
        parser.register("action", "parsers", _SubcommandsAction)  # nested subcommands too
        return parser

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        # argparse parses a subcommand into a fresh namespace and copies it over this one: keep
        # the --set values of the enclosing subcommand in front of the nested one's.
        enclosing = getattr(namespace, _OVERRIDES_AFTER, [])
        super().__call__(parser, namespace, values, option_string)
        setattr(
            namespace, _OVERRIDES_AFTER, [*enclosing, *getattr(namespace, _OVERRIDES_AFTER, [])]
        )


def _global_options(*, after_command: bool) -> argparse.ArgumentParser:
    """--config, --set, --log-level: defined once, for the top-level parser and each subcommand."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("settings options (before or after the command)")
    unset = argparse.SUPPRESS if after_command else None
    group.add_argument(
        "--config",
        type=Path,
        default=unset,
        help="settings file (default: ./config.yaml if present, else built-in defaults)",
    )
    group.add_argument(
        "--set",
        dest=_OVERRIDES_AFTER if after_command else "overrides",
        action="append",
        default=unset if after_command else [],
        metavar="SECTION.KEY=VALUE",
        help="override one setting; VALUE is YAML, a secret's is taken verbatim (repeatable; "
        "the last one wins)",
    )
    group.add_argument(
        "--log-level",
        default=unset if after_command else "INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaewatch",
        description="VAE anomaly detection for streams of 28x28 images.",
        parents=[_global_options(after_command=False)],
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", action=_SubcommandsAction
    )
    train_commands.register(subparsers)
    stream_commands.register(subparsers)
    config_command.register(subparsers)
    serve_commands.register(subparsers)
    acls_command.register(subparsers)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `overrides` holds every --set in command-line order."""
    args = build_parser().parse_args(argv)
    args.overrides = [*args.overrides, *vars(args).pop(_OVERRIDES_AFTER, [])]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    try:
        settings = load_settings(config_path, args.overrides)
        mask_secrets_in_logs(settings)
        return int(args.run(args, settings) or 0)
    except user_errors() as exc:
        print(f"vaewatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
