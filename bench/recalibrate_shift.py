"""Does `vaewatch recalibrate` restore the target FPR on shifted-but-normal data?

The normal class of the real Fashion-MNIST test split, moved by a shift under which a garment is
still that garment (1-2 px to the right, brighter, darker), is split at random into a calibration
half and a held-out half, `--repeats` times. Per shift it prints the held-out false-positive rate
of the bundle as trained (the baseline, also on unshifted images) and after recalibrating on the
calibration half (trainer.recalibrate, the code behind the command), as multiples of the target
FPR, plus the detection rate on the other classes under the same shift, before and after.

    python bench/recalibrate_shift.py --model models/tshirt [--repeats 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from detector import Detector, load_bundle
from detector.config import DetectorSettings
from trainer.calibrate import calibrate_threshold
from trainer.config import DataConfig
from trainer.data import load_images
from trainer.recalibrate import recalibrate_bundle


def _brightness(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(images: np.ndarray) -> np.ndarray:
        return np.clip(np.round(images.astype(np.float32) * factor), 0, 255).astype(np.uint8)

    return apply


def _roll(pixels: int) -> Callable[[np.ndarray], np.ndarray]:
    def apply(images: np.ndarray) -> np.ndarray:
        moved = np.roll(images.reshape(-1, 28, 28), pixels, axis=2)
        return moved.reshape(len(images), 784)

    return apply


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda images: images,
    "1 px right, contrast x1.2": lambda images: _brightness(1.2)(_roll(1)(images)),
    "2 px right": _roll(2),
    "contrast x1.4": _brightness(1.4),
    "contrast x0.7": _brightness(0.7),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    detector = Detector.from_bundle(bundle, DetectorSettings(device="cpu"))
    target = bundle.calibration.target_fpr
    data = DataConfig.model_validate(bundle.metadata["data"])
    test = load_images(data.model_copy(update={"download": False}), split="test")
    is_normal = np.isin(test.labels, data.normal_classes)
    print(
        f"model {bundle.version} ({args.model}), normal classes {list(data.normal_classes)}, "
        f"target FPR {target:g}; {int(is_normal.sum())} normal / {int((~is_normal).sum())} "
        f"other test images; {args.repeats} random 50/50 calibrate/held-out splits"
    )
    header = (
        f"{'shift':<28}{'FPR as trained':>16}{'x target':>10}{'FPR recal.':>12}"
        f"{'x target':>10}{'TPR as trained':>16}{'TPR recal.':>12}"
    )
    print(header)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for name, shift in SHIFTS.items():
            normal = detector.score(shift(test.images[is_normal])).scores
            others = detector.score(shift(test.images[~is_normal])).scores
            old_fpr, new_fpr, new_tpr = [], [], []
            for repeat in range(args.repeats):
                order = rng.permutation(len(normal))
                half = len(order) // 2
                calibrate_on, held_out = order[:half], order[half:]
                old_fpr.append(float(np.mean(normal[held_out] > bundle.calibration.threshold)))
                if repeat == 0:  # once through the real command path: the bundle it writes
                    out = Path(scratch) / f"{len(SHIFTS)}-{name.replace(' ', '_')}"
                    images = shift(test.images[is_normal])[calibrate_on]
                    threshold = recalibrate_bundle(
                        args.model, images, out=out, source=name
                    ).calibration.threshold
                else:  # the same threshold from the same scores, without writing a bundle
                    threshold = calibrate_threshold(
                        normal[calibrate_on], target_fpr=target
                    ).threshold
                new_fpr.append(float(np.mean(normal[held_out] > threshold)))
                new_tpr.append(float(np.mean(others > threshold)))
            old_tpr = float(np.mean(others > bundle.calibration.threshold))
            print(
                f"{name:<28}{np.mean(old_fpr):>16.4f}{np.mean(old_fpr) / target:>10.2f}"
                f"{np.mean(new_fpr):>12.4f}{np.mean(new_fpr) / target:>10.2f}"
                f"{old_tpr:>16.3f}{np.mean(new_tpr):>12.3f}"
            )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
