"""--config, --set and --log-level before and after the subcommand; the progress bar on terminals.

The per-subcommand tests walk the real parser, so a subcommand added later is covered without a
change here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from detector import load_bundle
from vaewatch.cli import build_parser, main, parse_args

REPO = Path(__file__).resolve().parents[2]


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(names, parser) of every leaf subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))
            return
    if path:
        yield path, parser


def _required_args(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the arguments a subcommand requires, so that argparse accepts it."""
    args: list[str] = []
    for action in parser._actions:
        value = str(next(iter(action.choices))) if action.choices else "placeholder"
        if not action.option_strings and action.nargs not in ("?", "*"):
            args.append(value)
        elif action.option_strings and action.required:
            args += [action.option_strings[0], value]
    return args


SUBCOMMANDS = sorted(_subcommands(build_parser()), key=lambda item: item[0])
SUBCOMMAND_IDS = [" ".join(names) for names, _ in SUBCOMMANDS]


def _orders(names: tuple[str, ...], required: list[str], options: list[str]) -> list[list[str]]:
    return [[*options, *names, *required], [*names, *required, *options]]


def test_every_subcommand_is_found() -> None:
    assert {"train", "evaluate", "score", "sample", "worker", "demo"} <= set(SUBCOMMAND_IDS)


@pytest.mark.parametrize("names, parser", SUBCOMMANDS, ids=SUBCOMMAND_IDS)
def test_options_parse_the_same_before_and_after_the_subcommand(
    names: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    options = ["--config", "a.yaml", "--set", "train.epochs=2", "--log-level", "ERROR"]
    before, after = (parse_args(argv) for argv in _orders(names, _required_args(parser), options))
    for args in (before, after):
        assert (args.config, args.overrides, args.log_level) == (
            Path("a.yaml"), ["train.epochs=2"], "ERROR"
        )  # fmt: skip


@pytest.mark.parametrize("names, parser", SUBCOMMANDS, ids=SUBCOMMAND_IDS)
def test_a_setting_after_the_subcommand_reaches_the_settings(
    names: tuple[str, ...], parser: argparse.ArgumentParser, capsys
) -> None:
    """An invalid value is rejected by the settings (exit 2) in both orders: it was applied."""
    for argv in _orders(names, _required_args(parser), ["--set", "data.val_fraction=5"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("vaewatch: error: ") and " data.val_fraction: " in err


def test_later_set_wins_across_the_subcommand() -> None:
    args = parse_args(
        ["--set", "train.epochs=1", "--set", "train.lr=0.1", "train", "--out", "m",
         "--set", "train.epochs=3"]
    )  # fmt: skip
    assert args.overrides == ["train.epochs=1", "train.lr=0.1", "train.epochs=3"]


def test_options_after_the_subcommand_keep_the_defaults_when_absent() -> None:
    args = parse_args(["--log-level", "DEBUG", "--config", "x.yaml", "train", "--out", "m"])
    assert (args.config, args.log_level, args.overrides) == (Path("x.yaml"), "DEBUG", [])
    args = parse_args(["train", "--out", "m"])
    assert (args.config, args.log_level, args.overrides) == (None, "INFO", [])


def test_config_after_the_subcommand_is_read(tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  no_such_key: 1\n")
    assert main(["train", "--out", str(tmp_path / "m"), "--config", str(config)]) == 2
    assert f"vaewatch: error: {config}: unknown key 'train.no_such_key'" in capsys.readouterr().err


def _small_npz(fashion_mnist, tmp_path: Path) -> Path:
    train = fashion_mnist.train
    pick = np.flatnonzero(train.labels == 1)[:600]
    path = tmp_path / "d.npz"
    np.savez(path, x=train.images[pick], y=train.labels[pick])
    return path


def test_train_takes_settings_in_either_order(fashion_mnist, tmp_path: Path) -> None:
    settings = [
        "--set", f"data.dataset=npz:{_small_npz(fashion_mnist, tmp_path)}",
        "--set", "data.normal_classes=[1]", "--set", "data.val_fraction=0.2",
        "--set", "model.kind=mlp", "--set", "model.mlp_hidden=[32]",
        "--set", "train.epochs=2", "--set", "train.epochs=1",
        "--log-level", "WARNING",
    ]  # fmt: skip
    after = ["train", *settings, "--out", str(tmp_path / "after")]
    before = [*settings, "train", "--out", str(tmp_path / "before")]
    for argv in (after, before):
        assert main(argv) == 0
    for name in ("after", "before"):
        metadata = load_bundle(tmp_path / name).metadata
        assert metadata["data"]["normal_classes"] == [1]
        assert metadata["train"]["epochs"] == 1 and len(metadata["history"]) == 1


def test_train_logs_one_line_per_epoch_when_stderr_is_not_a_terminal(
    fashion_mnist, tmp_path: Path
) -> None:
    log = tmp_path / "train.log"
    command = [
        sys.executable, "-m", "vaewatch.cli", "train", "--out", str(tmp_path / "m"),
        "--set", f"data.dataset=npz:{_small_npz(fashion_mnist, tmp_path)}",
        "--set", "data.normal_classes=[1]", "--set", "data.val_fraction=0.2",
        "--set", "model.kind=mlp", "--set", "model.mlp_hidden=[32]", "--set", "train.epochs=2",
        "--set", "train.early_stopping_patience=0",
    ]  # fmt: skip
    with log.open("w") as stderr:
        done = subprocess.run(
            command, cwd=REPO, stderr=stderr, stdout=subprocess.DEVNULL, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    lines = text.splitlines()
    assert [sum(f"epoch {k}/2: train loss" in line for line in lines) for k in (1, 2)] == [1, 1]


def test_progress_true_forces_the_bar(fashion_mnist, tmp_path: Path, capsys) -> None:
    """The other side of the test above: the bar is there when asked for, so its absence there
    is the terminal check, not a bar that never shows."""
    code = main(
        ["--log-level", "WARNING", "train", "--out", str(tmp_path / "m"),
         "--set", f"data.dataset=npz:{_small_npz(fashion_mnist, tmp_path)}",
         "--set", "data.normal_classes=[1]", "--set", "data.val_fraction=0.2",
         "--set", "model.kind=mlp",
         "--set", "model.mlp_hidden=[32]", "--set", "train.epochs=1",
         "--set", "train.progress=true"]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "\r" in err
