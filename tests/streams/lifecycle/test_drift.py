"""Drift statistics (streams/lifecycle/drift.py): the KS test against scipy, its p-value's
calibration, and real Fashion-MNIST scores of the calibrated class (no drift) against another
class (drift)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from detector import Detector
from streams.lifecycle.drift import (
    ScoreWindow,
    drift_statistics,
    kolmogorov_survival,
    ks_two_sample,
)
from tests.fixtures_model import CPU, SMALL_BUNDLE_NORMAL_CLASS, FashionMNIST


def test_ks_statistic_equals_scipy_and_p_value_is_close() -> None:
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.05, 0.2):
        sample = rng.normal(shift, 1.0, 2000)
        reference = np.sort(rng.normal(0.0, 1.0, 600))
        statistic, p_value = ks_two_sample(sample, reference)
        expected = stats.ks_2samp(sample, reference, method="asymp")
        assert statistic == pytest.approx(expected.statistic, abs=1e-12)
        assert p_value == pytest.approx(expected.pvalue, abs=0.02)


def test_ks_counts_ties_like_scipy() -> None:
    rng = np.random.default_rng(2)
    sample = rng.integers(0, 5, 300).astype(float)
    reference = np.sort(rng.integers(0, 6, 200).astype(float))
    statistic, _ = ks_two_sample(sample, reference)
    assert statistic == pytest.approx(stats.ks_2samp(sample, reference).statistic, abs=1e-12)


def test_kolmogorov_survival_matches_the_limit_distribution() -> None:
    for x in (0.3, 0.5, 1.0, 1.36, 2.0):
        assert kolmogorov_survival(x) == pytest.approx(stats.kstwobign.sf(x), abs=1e-9)
    assert kolmogorov_survival(0.0) == 1.0


def test_p_values_are_uniform_when_nothing_drifted() -> None:
    """Under the null hypothesis about 5 % of (window, calibration set) pairs have p < 0.05, so
    a wrong formula (0 % or far more) shows. Each pair draws its own reference: against one
    fixed calibration set the windows share that set's sampling noise and are not uniform."""
    rng = np.random.default_rng(3)
    p_values = np.array(
        [
            ks_two_sample(rng.gamma(3.0, 1.0, 1024), np.sort(rng.gamma(3.0, 1.0, 600)))[1]
            for _ in range(400)
        ]
    )
    assert 0.02 <= np.mean(p_values < 0.05) <= 0.09
    assert 0.35 <= np.mean(p_values < 0.5) <= 0.65


def test_empty_window_reports_no_statistic() -> None:
    result = drift_statistics(np.empty(0), np.arange(10.0), threshold=5.0, target_fpr=0.1)
    assert result.n == 0 and np.isnan(result.ks_statistic) and np.isnan(result.anomaly_rate)


def test_window_keeps_the_last_values_in_order() -> None:
    window = ScoreWindow(5)
    window.extend(np.array([1.0, 2.0]))
    assert window.values().tolist() == [1.0, 2.0]
    window.extend(np.array([3.0, 4.0, 5.0, 6.0]))
    assert window.values().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    window.extend(np.array([7.0]))
    assert window.values().tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    window.extend(np.arange(10.0, 20.0))
    assert window.values().tolist() == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert len(window) == 5
    window.clear()
    assert len(window) == 0 and window.values().size == 0
    with pytest.raises(ValueError, match="at least 1"):
        ScoreWindow(0)


@pytest.mark.slow
def test_calibrated_class_does_not_drift_another_class_does(
    trained_bundle: Path, fashion_mnist: FashionMNIST
) -> None:
    """Real scores: held-out test images of the normal class (never seen in training or
    calibration) look like the calibration scores; trousers (class 1) do not."""
    detector = Detector.from_bundle(trained_bundle, CPU)
    calibration = detector.calibration
    test = fashion_mnist.test
    normal = test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS]
    other = test.images[test.labels == 1]

    window = ScoreWindow(1000)
    window.extend(detector.score(normal).scores)
    same = drift_statistics(
        window.values(),
        calibration.scores,
        threshold=calibration.threshold,
        target_fpr=calibration.target_fpr,
    )
    assert same.n == 1000
    assert same.ks_p_value > 0.001, same
    assert same.ks_statistic < 0.1, same
    assert same.anomaly_rate < 5 * calibration.target_fpr, same

    window.extend(detector.score(other).scores)
    moved = drift_statistics(
        window.values(),
        calibration.scores,
        threshold=calibration.threshold,
        target_fpr=calibration.target_fpr,
    )
    assert moved.ks_p_value < 1e-9, moved
    assert moved.ks_statistic > 0.5, moved
    assert moved.quantiles[0.5] > same.quantiles[0.5]
