"""Detection quality on labelled data: ROC/PR summaries and the metrics at the bundle's threshold.

AUROC and average precision are computed here with numpy (scikit-learn is only a test-time
cross-check), with the same conventions as scikit-learn's `roc_auc_score` and
`average_precision_score`: tied scores are one threshold, AUROC is the trapezoid area (= the
Mann-Whitney probability P(anomaly score > normal score) + 1/2 P(tie)), and AUPRC is the
step-wise average precision sum_n (R_n - R_{n-1}) P_n.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from detector.preprocess import ImageDecoding
from detector.scorer import Detector
from trainer.calibrate import CalibrationError, calibrate_threshold
from trainer.config import DataConfig
from trainer.data import DataError, load_images, normal_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    auroc: float
    auprc: float
    threshold: float
    fpr: float  # share of normal images flagged
    tpr: float  # share of anomalies flagged (= recall)
    precision: float
    recall: float
    f1: float
    n_normal: int
    n_anomaly: int
    # The calibration's target FPR, and the TPR at the split-conformal threshold for it (the
    # bundle's own threshold when its method is conformal; recomputed from its calibration
    # scores when it is f1). None when evaluating bare scores without a calibration.
    target_fpr: float | None = None
    tpr_at_target_fpr: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _check(is_anomaly: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    is_anomaly = np.asarray(is_anomaly, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if is_anomaly.shape != scores.shape:
        raise ValueError(f"{is_anomaly.size} labels for {scores.size} scores")
    if is_anomaly.all() or not is_anomaly.any():
        raise ValueError("ROC and PR curves need both normal and anomalous examples")
    return is_anomaly, scores


def _cumulative_counts(is_anomaly: np.ndarray, scores: np.ndarray):
    """True/false positives when flagging every score >= each distinct score, high to low."""
    order = np.argsort(-scores, kind="mergesort")
    scores, is_anomaly = scores[order], is_anomaly[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(is_anomaly)[last_of_run]
    fp = np.cumsum(~is_anomaly)[last_of_run]
    return tp, fp, scores[last_of_run]


def roc_curve(is_anomaly: np.ndarray, scores: np.ndarray):
    """(fpr, tpr, thresholds) from (0, 0) to (1, 1); point i flags scores >= thresholds[i]."""
    is_anomaly, scores = _check(is_anomaly, scores)
    tp, fp, thresholds = _cumulative_counts(is_anomaly, scores)
    tpr = np.r_[0.0, tp / is_anomaly.sum()]
    fpr = np.r_[0.0, fp / (~is_anomaly).sum()]
    return fpr, tpr, np.r_[np.inf, thresholds]


def auroc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; ties count one half)."""
    fpr, tpr, _ = roc_curve(is_anomaly, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def auprc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over distinct thresholds of (recall gain) x precision."""
    is_anomaly, scores = _check(is_anomaly, scores)
    tp, fp, _ = _cumulative_counts(is_anomaly, scores)
    precision = tp / (tp + fp)
    recall = tp / is_anomaly.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def evaluate_scores(is_anomaly: np.ndarray, scores: np.ndarray, *, threshold: float) -> Evaluation:
    """Ranking quality plus the confusion-matrix rates of the rule `score > threshold`."""
    is_anomaly, scores = _check(is_anomaly, scores)
    flagged = scores > threshold
    tp = int(np.sum(flagged & is_anomaly))
    fp = int(np.sum(flagged & ~is_anomaly))
    n_anomaly = int(is_anomaly.sum())
    n_normal = int(is_anomaly.size - n_anomaly)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_anomaly
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Evaluation(
        auroc=auroc(is_anomaly, scores),
        auprc=auprc(is_anomaly, scores),
        threshold=float(threshold),
        fpr=fp / n_normal,
        tpr=recall,
        precision=precision,
        recall=recall,
        f1=f1,
        n_normal=n_normal,
        n_anomaly=n_anomaly,
    )


@dataclass(frozen=True)
class BundleEvaluation:
    evaluation: Evaluation
    fpr_curve: np.ndarray
    tpr_curve: np.ndarray


def evaluate_detector(
    detector: Detector, data: DataConfig, *, decoding: ImageDecoding | None = None
) -> BundleEvaluation:
    """Score the labelled test split: normal classes against all other classes. Image files
    (folder:DIR) are made the model's input by `decoding`, by default the detector's own
    preprocessing with the default limits."""
    decoding = decoding or ImageDecoding(detector.preprocessing)
    test = load_images(data, split="test", decoding=decoding)
    if test.labels is None:
        raise DataError(f"{data.dataset}: the test split has no labels, so it cannot be evaluated")
    is_anomaly = ~normal_mask(test, data.normal_classes)
    if is_anomaly.all() or not is_anomaly.any():
        raise DataError(
            f"{data.dataset}: the test split needs images of normal classes "
            f"{list(data.normal_classes)} and of other classes to be evaluated"
        )
    scores = detector.score(test.images).scores
    evaluation = evaluate_scores(is_anomaly, scores, threshold=detector.threshold)
    calibration = detector.calibration
    try:
        at_target = calibrate_threshold(calibration.scores, target_fpr=calibration.target_fpr)
        tpr_at_target = float(np.mean(scores[is_anomaly] > at_target.threshold))
    except CalibrationError:  # too few calibration scores for this target
        tpr_at_target = None
    evaluation = replace(
        evaluation, target_fpr=calibration.target_fpr, tpr_at_target_fpr=tpr_at_target
    )
    fpr, tpr, _ = roc_curve(is_anomaly, scores)
    log.info(
        "evaluated %d normal and %d anomalous test images: AUROC %.4f",
        evaluation.n_normal, evaluation.n_anomaly, evaluation.auroc,
    )  # fmt: skip
    return BundleEvaluation(evaluation, fpr, tpr)


def write_roc_report(bundle_dir: Path, result: BundleEvaluation) -> Path | None:
    """ROC curve PNG into the bundle's report/ folder; a read-only bundle only gets a warning."""
    from trainer.report import REPORT_DIR, save_roc_curve

    path = Path(bundle_dir) / REPORT_DIR / "roc.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_roc_curve(path, result.fpr_curve, result.tpr_curve, auroc=result.evaluation.auroc)
    except OSError as exc:
        log.warning("could not write %s (%s)", path, exc)
        return None
    return path
