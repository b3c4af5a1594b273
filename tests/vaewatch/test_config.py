"""Settings: config.yaml, --set overrides, environment, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaewatch.cli import main
from vaewatch.config import ConfigError, Settings, load_settings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def test_repository_config_is_valid() -> None:
    settings = load_settings(REPO_CONFIG, env={})
    assert set(settings.model_dump()) == set(Settings.model_fields)


@pytest.mark.parametrize("section", ["data", "model", "train", "calibration", "detector"])
def test_repository_config_states_the_code_defaults(section: str) -> None:
    """config.yaml documents every setting; its values are the built-in defaults, so running
    without a config file trains the same model as running with it."""
    from_file = getattr(load_settings(REPO_CONFIG, env={}), section)
    assert from_file == getattr(Settings(), section)


def test_overrides_are_yaml_and_win_over_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    settings = load_settings(
        config,
        ["data.normal_classes=[3, 4]", "train.epochs=7", "train.amp=false"],
        env={"VAEWATCH_TRAIN__EPOCHS": "5", "VAEWATCH_TRAIN__BATCH_SIZE": "32"},
    )
    assert settings.data.normal_classes == (3, 4)
    assert settings.train.epochs == 7
    assert settings.train.batch_size == 32
    assert settings.train.lr == 0.01
    assert settings.train.amp is False


@pytest.mark.parametrize(
    ("content", "overrides", "expected"),
    [
        ("train:\n  epochz: 3\n", [], "unknown key 'train.epochz'"),
        ("train:\n  epochs: many\n", [], "train.epochs"),
        ("model:\n  likelihood: poisson\n", [], "model.likelihood"),
        ("data:\n  dataset: cifar\n", [], "data.dataset"),
        ("calibration:\n  target_fpr: 2\n", [], "calibration.target_fpr"),
        ("train: [1, 2\n", [], "not valid YAML"),
        ("", ["train.epochs=0"], "train.epochs"),
        ("", ["model.conv_channels=[8]"], "model.conv_channels"),
        ("", ["nosuch.key=1"], "unknown section 'nosuch'"),
        ("", ["train.epochs"], "expected section.key=value"),
        ("", ["data.normal_classes=[1"], "data.normal_classes"),
    ],
)
def test_errors_are_one_line_naming_the_key(
    tmp_path: Path, content: str, overrides: list[str], expected: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config, overrides, env={})
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_config_error_exits_2_without_traceback(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  latent_dimm: 3\n")
    code = main(["--config", str(config), "sample", "--model", str(tmp_path), "--out", "x.png"])
    captured = capsys.readouterr()
    assert code == 2
    assert (
        captured.err.strip() == "vaewatch: error: " + f"{config}: unknown key 'model.latent_dimm'"
    )
    assert "Traceback" not in captured.err


def test_cli_bad_override_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["--set", "train.batch_size=-1", "train", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "train.batch_size" in err
