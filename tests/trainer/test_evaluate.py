"""AUROC/AUPRC/ROC against scikit-learn, and the rates at a threshold by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from tests.fixtures_model import CPU
from trainer.evaluate import auprc, auroc, evaluate_scores, roc_curve


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_auprc_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    assert auroc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert auprc(labels, scores) == pytest.approx(
        metrics.average_precision_score(labels, scores), abs=1e-12
    )


def test_roc_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)
    fpr, tpr, _ = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_perfect_and_reversed_rankings() -> None:
    labels = np.array([0, 0, 1, 1], bool)
    assert auroc(labels, np.array([1.0, 2, 3, 4])) == 1.0
    assert auroc(labels, np.array([4.0, 3, 2, 1])) == 0.0
    assert auroc(labels, np.ones(4)) == 0.5
    assert auprc(labels, np.array([1.0, 2, 3, 4])) == 1.0


def test_rates_at_threshold() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    scores = np.array([1, 2, 3, 6, 4, 5, 2.5])
    result = evaluate_scores(labels, scores, threshold=3.0)
    # flagged: 6 (normal), 4, 5 (anomalies) -> tp 2, fp 1, fn 1
    assert result.fpr == pytest.approx(1 / 4)
    assert result.tpr == result.recall == pytest.approx(2 / 3)
    assert result.precision == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 / 3)
    assert (result.n_normal, result.n_anomaly) == (4, 3)
    assert set(result.as_dict()) >= {"auroc", "auprc", "threshold", "fpr", "tpr", "f1"}


def test_one_class_only_is_an_error() -> None:
    with pytest.raises(ValueError, match="both"):
        auroc(np.zeros(5, bool), np.arange(5.0))


def test_tpr_at_target_fpr_uses_the_conformal_threshold_whatever_the_method(
    trained_bundle,
) -> None:
    from detector import Calibration, Detector
    from trainer.config import DataConfig
    from trainer.evaluate import evaluate_detector

    detector = Detector.from_bundle(trained_bundle, CPU)
    data = DataConfig.model_validate(load_bundle_metadata(trained_bundle)["data"])
    conformal = evaluate_detector(detector, data).evaluation
    assert conformal.target_fpr == 0.01
    assert conformal.tpr_at_target_fpr == conformal.tpr
    # The same scores with an F1 threshold far below: tpr changes, tpr_at_target_fpr does not.
    calibration = detector.calibration
    detector.calibration = Calibration(
        threshold=float(calibration.scores[0]),
        target_fpr=calibration.target_fpr,
        method="f1",
        scores=calibration.scores,
    )
    f1 = evaluate_detector(detector, data).evaluation
    assert f1.tpr > conformal.tpr
    assert f1.tpr_at_target_fpr == conformal.tpr_at_target_fpr


def load_bundle_metadata(path) -> dict:
    from detector import load_bundle

    return load_bundle(path).metadata
