"""Recalibration: the same weights, a new threshold and new calibration scores from fresh normal
images, written as a new bundle with a new version.

The natural follow-up to a drift alert when the model still separates normal from anomalous but
the normal data itself has moved (a new camera, a brightness change): the conformal guarantee
of trainer/calibrate.py holds for images exchangeable with the calibration images, so
calibrating on the new normal data restores the target FPR on it (BENCHMARKS.md, "Model
lifecycle"). The bundle is written next to its destination and renamed into place, so a worker
watching the path never sees half of it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from detector.bundle import Bundle, load_bundle, save_bundle
from detector.config import DetectorSettings
from detector.preprocess import ImageDecoding
from detector.scorer import Detector
from trainer.calibrate import CalibrationError, calibrate_threshold, validate_precisions
from trainer.config import DataConfig
from trainer.data import DataError, ImageSet, load_images, normal_mask, read_image_file

log = logging.getLogger(__name__)

DATASET_PREFIXES = ("idx:", "npz:", "folder:")
DATASET_NAMES = ("fashion-mnist", "mnist")


def is_dataset_spec(source: str) -> bool:
    """Whether `source` names a data set (with splits) rather than a file of images."""
    return source in DATASET_NAMES or source.startswith(DATASET_PREFIXES)


def read_calibration_images(
    source: str,
    *,
    normal_classes: tuple[int | str, ...],
    split: str,
    data: DataConfig,
    decoding: ImageDecoding | None = None,
) -> np.ndarray:
    """Normal images from a file `vaewatch score` reads, or a data set (`fashion-mnist`,
    `mnist`, `idx:DIR`, `npz:FILE`, `folder:DIR`; its `split`); image files made the model's
    input by `decoding` (the bundle's preprocessing). Labelled images are narrowed to
    `normal_classes`, the classes the bundle was trained on; unlabelled ones are all taken as
    normal."""
    if is_dataset_spec(source):
        dataset = data.model_copy(update={"dataset": source})
        images: ImageSet = load_images(dataset, split=split, decoding=decoding)
    else:
        images = read_image_file(source, decoding=decoding)
    keep = normal_mask(images, normal_classes)
    if images.labels is not None:
        log.info(
            "%s: %d of %d images are of the normal classes %s",
            source, int(keep.sum()), len(images), list(normal_classes),
        )  # fmt: skip
    normal = images.images[keep]
    if len(normal) == 0:
        raise DataError(f"{source}: no images of the normal classes {list(normal_classes)}")
    return normal


def calibration_source(
    source: str,
    *,
    normal_classes: tuple[int | str, ...],
    split: str,
    data: DataConfig,
    decoding: ImageDecoding | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`read_calibration_images`, and what the new bundle records of where they came from (the
    split of a data set; nothing more of a file)."""
    images = read_calibration_images(
        source, normal_classes=normal_classes, split=split, data=data, decoding=decoding
    )
    return images, {"split": split} if is_dataset_spec(source) else {}


def recalibrated_metadata(
    bundle: Bundle, *, source: str, n_images: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The old bundle's metadata plus where the new calibration came from."""
    history = list(bundle.metadata.get("recalibrations", []))
    history.append(
        {
            "from_version": bundle.version,
            "source": source,
            "n_images": n_images,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
    )
    return {
        **bundle.metadata,
        "calibration_source": {"source": source, "n_images": n_images, **(extra or {})},
        "recalibrated_from": bundle.version,
        "recalibrations": history,
    }


def recalibrate_bundle(
    model: str | Path,
    images: np.ndarray,
    *,
    out: str | Path,
    source: str,
    target_fpr: float | None = None,
    detector: DetectorSettings | None = None,
    source_details: dict[str, Any] | None = None,
) -> Bundle:
    """Score `images` (uint8 N x 784, all normal) with the bundle at `model`, set the conformal
    threshold for `target_fpr` (default: the bundle's own) and write a new bundle to `out`."""
    model, out = Path(model), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CalibrationError(f"--out {out}: already exists; choose a new directory")
    if out.resolve() == model.resolve():
        raise CalibrationError(f"--out {out}: must differ from --model (bundles are immutable)")
    bundle = load_bundle(model)
    target = bundle.calibration.target_fpr if target_fpr is None else target_fpr
    # The CPU unless told otherwise: recalibration scores a few thousand images once. In fp32,
    # the reference that each faster precision is then checked against (`auto` picks those).
    settings = (detector or DetectorSettings(device="cpu")).model_copy(update={"precision": "fp32"})
    scorer = Detector.from_bundle(bundle, settings)
    scores = scorer.score(images).scores
    calibration = calibrate_threshold(scores, target_fpr=target)
    # int8 keeps the bundle's activation ranges (from its training images): the same weights
    # score the same in int8 too; a bundle without them gets them from these images.
    calibration = validate_precisions(
        scorer.model.cpu(), images, calibration, int8_ranges=bundle.calibration.int8_ranges
    )
    metadata = recalibrated_metadata(
        bundle, source=source, n_images=len(images), extra=source_details
    )
    # Written beside `out` and renamed into place: a watcher never sees a partial bundle.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = save_bundle(
            staging,
            model=scorer.model.cpu(),
            calibration=calibration,
            metadata=metadata,
            preprocessing=bundle.preprocessing,  # the same weights take the same input
        )
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "recalibrated %s -> %s on %d images from %s: threshold %.4g -> %.4g (target FPR %g)",
        bundle.version, written.version, len(images), source,
        bundle.calibration.threshold, calibration.threshold, target,
    )  # fmt: skip
    return Bundle(written.model, calibration, written.version, metadata, out, written.preprocessing)
