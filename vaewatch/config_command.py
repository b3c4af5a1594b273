"""Subcommand config: the effective settings (file, then environment, then --set) as YAML."""

from __future__ import annotations

import argparse
import sys

import yaml

from vaewatch.config import Settings
from vaewatch.secret_settings import MASK


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line (`normal_classes: [0]`), as config.yaml writes them."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def effective_settings_yaml(settings: Settings) -> str:
    """Every setting as YAML that `--config` reads back; secrets are masked (pydantic's JSON
    form of a SecretStr is its mask), an unset secret stays null."""
    tree = settings.model_dump(mode="json")
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def run_config(args: argparse.Namespace, settings: Settings) -> int:
    sys.stdout.write(effective_settings_yaml(settings))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser(
        "config",
        help="print the effective settings as YAML (secrets masked)",
        description="Print every setting as the command would run with it: config file, then "
        "VAEWATCH_<SECTION>__<KEY> environment variables, then --set. Secret settings show as "
        f"{MASK!r} when set, null when not.",
    )
    config.set_defaults(run=run_config)
