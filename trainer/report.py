"""Pictures and history written into a bundle's report/ folder (matplotlib, Agg backend: no
display needed, so it works on servers and in CI)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed

import matplotlib.pyplot as plt
import numpy as np
import torch

from detector.calibration import Calibration
from detector.explain import decode_mean, encode_mean, to_uint8
from detector.grid import image_grid
from detector.model import VAE

log = logging.getLogger(__name__)

REPORT_DIR = "report"


def save_grid(path: Path, images: np.ndarray, *, columns: int, title: str | None = None) -> None:
    grid = image_grid(images, columns=columns)
    height, width = grid.shape
    figure = plt.figure(figsize=(width / 40, height / 40 + (0.4 if title else 0)), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1 if not title else height / (height + 16)))
    axes.imshow(grid, cmap="gray", vmin=0, vmax=255 if grid.dtype == np.uint8 else 1.0)
    axes.axis("off")
    if title:
        figure.suptitle(title, fontsize=8)
    figure.savefig(path)
    plt.close(figure)


def reconstructions(model: VAE, images: np.ndarray) -> np.ndarray:
    """Decoder means at z = mu for uint8 images, as floats in [0, 1] (what /v1/explain shows)."""
    return decode_mean(model, encode_mean(model, images))


@torch.inference_mode()
def samples(model: VAE, n: int, *, seed: int = 0, prior: bool = False) -> np.ndarray:
    """n images decoded from z drawn from the fitted latent density (or from N(0, I) with
    `prior`, or when the model has no density): the decoder's mean, floats in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return model.sample(n, generator=generator, prior=prior).float().cpu().numpy()


def save_score_histogram(path: Path, calibration: Calibration) -> None:
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.hist(calibration.scores, bins=60, color="#4477aa")
    axes.axvline(calibration.threshold, color="#cc3311", linestyle="--", label="threshold")
    axes.set_xlabel("anomaly score (docs/model.md)")
    axes.set_ylabel("validation images")
    axes.set_title(
        f"{calibration.method} threshold {calibration.threshold:.1f}, "
        f"target FPR {calibration.target_fpr:g}, n = {calibration.n}",
        fontsize=9,
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def save_roc_curve(path: Path, fpr: np.ndarray, tpr: np.ndarray, *, auroc: float) -> None:
    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axes.plot(fpr, tpr, color="#4477aa", label=f"AUROC {auroc:.3f}")
    axes.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":")
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_training_report(
    bundle_dir: Path,
    *,
    model: VAE,
    calibration: Calibration,
    val_images: np.ndarray,
    history: list[dict[str, Any]],
) -> Path:
    """Reconstructions, 8 x 8 grids of samples from the fitted latent density and from the prior,
    the score histogram and the history."""
    report = Path(bundle_dir) / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    originals = val_images[:16]
    rebuilt = to_uint8(reconstructions(model, originals))
    save_grid(
        report / "reconstructions.png",
        np.concatenate([originals, rebuilt]),
        columns=len(originals),
        title="validation images (top) and reconstructions (bottom)",
    )
    save_grid(report / "samples.png", samples(model, 64), columns=8)
    save_grid(report / "prior_samples.png", samples(model, 64, prior=True), columns=8)
    save_score_histogram(report / "scores.png", calibration)
    (report / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    log.info("report written to %s", report)
    return report
