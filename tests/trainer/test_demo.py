"""The demo's model: a bundle already there is used as it is, without training, and the classes
it was trained on (not the ones asked for) label the replay."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.bundle import BundleError
from detector.config import ModelConfig
from trainer.config import CalibrationConfig, DataConfig, TrainConfig
from trainer.demo import demo_bundle


def _demo_bundle(model_dir: Path, data: DataConfig, said: list[str]) -> tuple[Path, tuple]:
    return demo_bundle(
        model_dir,
        data=data,
        model=ModelConfig(),
        train=TrainConfig(),
        calibration=CalibrationConfig(),
        epochs=1,
        say=said.append,
    )


def test_a_bundle_already_there_is_used(trained_bundle: Path) -> None:
    said: list[str] = []
    found = _demo_bundle(trained_bundle, DataConfig(normal_classes=[0]), said)
    assert found == (trained_bundle, (0,))
    assert said == [f"model: {trained_bundle}, trained on classes [0] (delete it to train anew)"]


def test_a_bundle_of_other_classes_is_used_and_its_classes_said(trained_bundle: Path) -> None:
    said: list[str] = []
    found = _demo_bundle(trained_bundle, DataConfig(normal_classes=[1, 7]), said)
    assert found == (trained_bundle, (0,))
    assert len(said) == 2
    assert "not data.normal_classes [1, 7]" in said[1] and "--model NEW_DIR" in said[1]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format_version": 99}'])
def test_a_broken_manifest_is_a_one_line_bundle_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "bundle.json").write_text(text)
    with pytest.raises(BundleError) as raised:
        _demo_bundle(tmp_path, DataConfig(normal_classes=[0]), [])
    assert str(tmp_path / "bundle.json") in str(raised.value)
    assert "\n" not in str(raised.value)
