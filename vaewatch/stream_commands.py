"""Subcommands worker, broker, produce and demo (owned by the streams work)."""

from __future__ import annotations

import argparse

USER_ERRORS: tuple[type[Exception], ...] = ()


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
