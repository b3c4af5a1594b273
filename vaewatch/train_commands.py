"""Subcommands train, evaluate, score and sample (owned by the trainer work)."""

from __future__ import annotations

import argparse

USER_ERRORS: tuple[type[Exception], ...] = ()


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
