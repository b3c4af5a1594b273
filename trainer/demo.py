"""`vaewatch demo`'s model: the bundle already at a path, or one trained there quickly."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from detector.bundle import MANIFEST
from detector.config import ModelConfig
from trainer.config import CalibrationConfig, DataConfig, TrainConfig


def demo_bundle(
    model_dir: Path,
    *,
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    calibration: CalibrationConfig,
    epochs: int,
    say: Callable[[str], None],
) -> Path:
    """`model_dir` when it holds a bundle; else a bundle trained there for at most `epochs`
    epochs (a demo should start within a minute, not train to convergence)."""
    if (model_dir / MANIFEST).is_file():
        say(f"model: {model_dir} (delete it to train a new one)")
        return model_dir
    from trainer.fit import train_bundle  # torch's training stack only when it trains

    epochs = min(train.epochs, epochs)
    say(
        f"model: none in {model_dir}; training a quick {model.kind} VAE on "
        f"{data.dataset} classes {list(data.normal_classes)} ({epochs} epochs)"
    )
    started = time.monotonic()
    train_bundle(
        data=data,
        model=model,
        train=train.model_copy(update={"epochs": epochs, "progress": False}),
        calibration=calibration,
        out=model_dir,
    )
    say(f"model: trained in {time.monotonic() - started:.0f} s -> {model_dir}")
    return model_dir
