"""`vaewatch demo`'s model: the bundle already at a path, or one trained there quickly."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from detector.bundle import MANIFEST, read_manifest
from detector.config import ModelConfig
from detector.preprocess import ImageSettings
from trainer.config import CalibrationConfig, DataConfig, TrainConfig

# Fashion-MNIST's class names by label, for what the demo says about each class.
FASHION_MNIST_CLASSES = {
    0: "T-shirt/top", 1: "Trouser", 2: "Pullover", 3: "Dress", 4: "Coat",
    5: "Sandal", 6: "Shirt", 7: "Sneaker", 8: "Bag", 9: "Ankle boot",
}  # fmt: skip


def demo_bundle(
    model_dir: Path,
    *,
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    calibration: CalibrationConfig,
    epochs: int,
    say: Callable[[str], None],
    image_settings: ImageSettings | None = None,
) -> tuple[Path, tuple[int | str, ...]]:
    """(`model_dir`, its normal classes) when it holds a bundle; else a bundle trained there on
    `data.normal_classes` for at most `epochs` epochs (a demo should start within minutes, not
    train to convergence)."""
    if (model_dir / MANIFEST).is_file():
        recorded = read_manifest(model_dir).get("metadata")
        trained_on = recorded.get("data") if isinstance(recorded, dict) else None
        classes = tuple(
            (trained_on.get("normal_classes") if isinstance(trained_on, dict) else None)
            or data.normal_classes
        )
        say(f"model: {model_dir}, trained on classes {list(classes)} (delete it to train anew)")
        if classes != tuple(data.normal_classes):
            say(
                f"model: not data.normal_classes {list(data.normal_classes)}: the replay's "
                f"labels follow the model; give --model NEW_DIR to train on those"
            )
        return model_dir, classes
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
        image_settings=image_settings,
    )
    say(f"model: trained in {time.monotonic() - started:.0f} s -> {model_dir}")
    return model_dir, tuple(data.normal_classes)
