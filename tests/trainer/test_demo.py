"""The demo's model: a bundle already there is used as it is, without training."""

from __future__ import annotations

from pathlib import Path

from detector.config import ModelConfig
from trainer.config import CalibrationConfig, DataConfig, TrainConfig
from trainer.demo import demo_bundle


def test_a_bundle_already_there_is_used(trained_bundle: Path) -> None:
    said: list[str] = []
    found = demo_bundle(
        trained_bundle,
        data=DataConfig(),
        model=ModelConfig(),
        train=TrainConfig(),
        calibration=CalibrationConfig(),
        epochs=1,
        say=said.append,
    )
    assert found == trained_bundle
    assert said == [f"model: {trained_bundle} (delete it to train a new one)"]
