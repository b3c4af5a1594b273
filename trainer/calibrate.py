"""Thresholds for the anomaly score, set from held-out normal images.

Split-conformal threshold (Vovk et al., "Algorithmic Learning in a Random World", 2005; Lei et
al., "Distribution-Free Predictive Inference for Regression", 2018, for the split form):

Let s_1..s_n be the scores of n normal validation images the model never trained on, sorted
s_(1) <= ... <= s_(n), and alpha the target false-positive rate. Take

    k = ceil((n + 1) * (1 - alpha)),   threshold = s_(k),   anomaly  <=>  score > threshold.

If a new normal image's score S is exchangeable with s_1..s_n (same distribution, e.g. drawn
from the same normal data), its rank among the n + 1 scores is uniform, so

    P(S > s_(k)) <= 1 - k / (n + 1) <= alpha.

The probability is over both the calibration set and the new image: the FPR is at most alpha in
expectation over calibration draws (and at least alpha - 1 / (n + 1) when scores have no ties).
For one fixed calibration set the FPR follows Beta(n + 1 - k, k), so with n = 600 and alpha =
0.01 single runs land between about 0.3% and 2%. It needs k <= n, i.e. n >= 1 / alpha - 1
validation images (99 for alpha = 0.01); with fewer there is no finite threshold that keeps the
guarantee, and `calibrate_threshold` raises `CalibrationError` rather than quietly using s_(n).

The same sorted scores give each new image a conformal p-value (detector.calibration):
p = (1 + #{s_i >= S}) / (n + 1), and score > threshold implies p <= alpha, so the threshold and
the p-values never disagree about an anomaly at level alpha.

Precision (issue 21): the scores above are the fp32 model's. `validate_precisions` scores the
same calibration images in the other precisions (int8 and bf16, on the CPU) and records in the
calibration whether each keeps the decision rule: its FPR at this threshold on those images
within `PRECISION_BAND` of fp32's, and with labelled anomalies also its AUROC. A detector set to
`detector.precision: auto` only picks a precision that passed (detector.scorer). int8's fixed
activation scales (issue 29, detector.int8) are measured first, on normal images (the training
images when `vaewatch train` calibrates), and recorded with its check: the int8 that was
checked is the int8 that scores.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from detector.calibration import Calibration
from detector.int8 import activation_ranges
from detector.model import VAE, to_model_input
from detector.scorer import score_batches

# Issue 21: per-class AUROC and test FPR at the calibrated threshold within this of fp32.
PRECISION_BAND = 0.003
_CHECK_BATCH = 1024


class CalibrationError(Exception):
    """No valid threshold can be set from these scores. The message is one line."""


def _finite_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise CalibrationError(f"no {what} scores to calibrate on")
    if not np.all(np.isfinite(scores)):
        raise CalibrationError(f"{what} scores contain NaN or infinity (did training diverge?)")
    return scores


def conformal_rank(n: int, target_fpr: float) -> int:
    """k = ceil((n + 1)(1 - alpha)), the 1-based rank of the threshold among n sorted scores."""
    # The small tolerance keeps exact products such as 100 * 0.99 = 99 from rounding up to 100.
    return math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)


def calibrate_threshold(
    val_scores: np.ndarray, *, target_fpr: float, precision: str = "fp32"
) -> Calibration:
    """Split-conformal threshold for `target_fpr` from normal validation scores (see module doc),
    computed in `precision` (a detector's `precision`, when one scored them)."""
    if not 0.0 < target_fpr < 1.0:
        raise CalibrationError(f"calibration.target_fpr must lie in (0, 1), got {target_fpr}")
    scores = np.sort(_finite_scores(val_scores, "validation"))
    n = scores.size
    k = conformal_rank(n, target_fpr)
    if k > n:
        needed = math.ceil(1.0 / target_fpr - 1.0)
        raise CalibrationError(
            f"{n} validation scores are too few for calibration.target_fpr={target_fpr}: "
            f"the conformal threshold needs at least {needed} (raise data.val_fraction, use more "
            "normal images, or raise calibration.target_fpr)"
        )
    return Calibration(
        threshold=float(scores[k - 1]),
        target_fpr=target_fpr,
        method="conformal",
        scores=scores,
        precision=precision,
    )


def f1_optimal_threshold(normal_scores: np.ndarray, anomaly_scores: np.ndarray) -> float:
    """The threshold t maximising F1 of the rule `score > t` on labelled scores.

    Candidates are every distinct score (flagging everything strictly above it) and one value
    below all scores (flagging everything); ties go to the higher threshold, i.e. fewer alarms.
    """
    normal = _finite_scores(normal_scores, "normal")
    anomaly = _finite_scores(anomaly_scores, "anomaly")
    scores = np.concatenate([normal, anomaly])
    is_anomaly = np.concatenate([np.zeros(normal.size, bool), np.ones(anomaly.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_anomaly = scores[order], is_anomaly[order]
    # Flagging the top i scores (i = 1..N) is `score > t` for t just below scores[i-1]; it is
    # only realisable when scores[i] < scores[i-1], i.e. at the last of a run of equal scores.
    tp = np.cumsum(is_anomaly)
    fp = np.cumsum(~is_anomaly)
    f1 = 2.0 * tp / (tp + fp + anomaly.size)
    distinct = np.r_[scores[1:] < scores[:-1], True]
    f1 = np.where(distinct, f1, -1.0)
    best = int(np.argmax(f1))  # first maximum = fewest images flagged = highest threshold
    if best == f1.size - 1:
        return float(np.nextafter(scores[-1], -np.inf))
    return float(scores[best + 1])


def calibrate_f1(
    val_scores: np.ndarray, anomaly_scores: np.ndarray, *, target_fpr: float
) -> Calibration:
    """F1-optimal threshold on normal validation + labelled anomaly scores. The normal scores are
    still kept for p-values; `target_fpr` is recorded but does not set the threshold."""
    threshold = f1_optimal_threshold(val_scores, anomaly_scores)
    return Calibration(
        threshold=threshold,
        target_fpr=target_fpr,
        method="f1",
        scores=_finite_scores(val_scores, "validation"),
    )


def _auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    from trainer.evaluate import auroc  # trainer.evaluate imports this module

    labels = np.r_[np.zeros(len(normal), bool), np.ones(len(anomalous), bool)]
    return auroc(labels, np.r_[normal, anomalous])


def _cpu_scores(
    model: VAE,
    images: np.ndarray,
    anomalies: np.ndarray | None,
    precision: str,
    int8_ranges: dict | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`model`'s scores of the uint8 N x 784 normal `images` and `anomalies` (None for none) on
    the CPU in `precision` (int8: with the scales of `int8_ranges`)."""
    cpu = torch.device("cpu")

    def scores(batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(batch))
        return score_batches(
            model,
            tensor,
            device=cpu,
            batch_size=_CHECK_BATCH,
            precision=precision,
            int8_ranges=int8_ranges,
        ).numpy()

    has_anomalies = anomalies is not None and len(anomalies) > 0
    return scores(images), scores(anomalies) if has_anomalies else None


def _compare(
    reference: tuple[np.ndarray, np.ndarray | None],
    checked: tuple[np.ndarray, np.ndarray | None],
    threshold: float,
    band: float,
) -> dict[str, float | int | bool]:
    """The check's figures from (normal, anomalous) scores in the reference precision and in
    the checked one."""
    (normal_ref, anomalous_ref), (normal, anomalous) = reference, checked
    flagged_ref, flagged = normal_ref > threshold, normal > threshold
    result: dict[str, float | int | bool] = {
        "n": len(normal),
        "fpr": float(flagged.mean()),
        "fpr_reference": float(flagged_ref.mean()),
        "decisions_changed": float((flagged != flagged_ref).mean()),
        "max_abs_score_difference": float(np.abs(normal - normal_ref).max()),
    }
    fpr_delta = abs(result["fpr"] - result["fpr_reference"])
    passed = bool(np.all(np.isfinite(normal))) and fpr_delta <= band
    if anomalous is not None and anomalous_ref is not None:
        result["n_anomalies"] = len(anomalous)
        result["auroc"] = _auroc(normal, anomalous)
        result["auroc_reference"] = _auroc(normal_ref, anomalous_ref)
        passed = passed and abs(result["auroc"] - result["auroc_reference"]) <= band
    result["passed"] = passed
    return result


def check_precision(
    model: VAE,
    images: np.ndarray,
    calibration: Calibration,
    *,
    precision: str,
    anomalies: np.ndarray | None = None,
    band: float = PRECISION_BAND,
    int8_ranges: dict | None = None,
) -> dict[str, float | int | bool]:
    """Score the normal `images` (the calibration images: uint8 N x 784) in `precision` and in
    the calibration's own precision, on the CPU, and compare at the calibrated threshold: the
    share flagged (the FPR on these normal images), the share of decisions that differ, the
    largest score difference; with labelled `anomalies`, the AUROC of both. `passed` when the
    FPR (and the AUROC) differ by at most `band`."""
    model = model.eval()
    reference = _cpu_scores(model, images, anomalies, calibration.precision)
    checked = _cpu_scores(model, images, anomalies, precision, int8_ranges)
    return _compare(reference, checked, calibration.threshold, band)


def _measured_ranges(model: VAE, normal: np.ndarray) -> dict:
    pixels = to_model_input(torch.from_numpy(np.ascontiguousarray(normal)))
    return activation_ranges(model, pixels)


def validate_precisions(
    model: VAE,
    images: np.ndarray,
    calibration: Calibration,
    *,
    precisions: tuple[str, ...] = ("int8", "bf16"),
    anomalies: np.ndarray | None = None,
    range_images: np.ndarray | None = None,
    int8_ranges: dict | None = None,
) -> Calibration:
    """`calibration` with a `check_precision` of each of `precisions` on its calibration images
    (`images`: the normal validation images whose scores set it) recorded in it, so that the
    bundle written with it says which precisions `detector.precision: auto` may pick. The
    reference scores are computed once for all the precisions checked. int8 is checked with the
    activation ranges `int8_ranges` (a recalibrated bundle keeps its own) or, without them, with
    ranges measured on the normal `range_images` (default: `images`); they are recorded with its
    check (`activation_ranges`): its scales."""
    others = [p for p in precisions if p != calibration.precision]
    if not others:
        return calibration
    model = model.eval()
    checks = dict(calibration.precision_checks)
    reference = _cpu_scores(model, images, anomalies, calibration.precision)
    for precision in others:
        ranges = None
        if precision == "int8":
            ranges = int8_ranges or _measured_ranges(
                model, images if range_images is None else range_images
            )
        checked = _cpu_scores(model, images, anomalies, precision, ranges)
        checks[precision] = _compare(reference, checked, calibration.threshold, PRECISION_BAND)
        if ranges is not None:
            checks[precision]["activation_ranges"] = ranges
    return dataclasses.replace(calibration, precision_checks=checks)
