"""The split-conformal threshold keeps FPR <= target on synthetic score distributions; the F1
threshold is the brute-force optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.calibrate import (
    CalibrationError,
    calibrate_f1,
    calibrate_threshold,
    conformal_rank,
    f1_optimal_threshold,
)

DISTRIBUTIONS = {
    "normal": lambda rng, n: rng.normal(size=n),
    "exponential": lambda rng, n: rng.exponential(size=n),
    "heavy-tailed": lambda rng, n: rng.standard_t(df=2, size=n),
    "discrete": lambda rng, n: rng.integers(0, 50, size=n).astype(float),
}


def test_rank_formula() -> None:
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(100, 0.01) == 100
    assert conformal_rank(199, 0.01) == 198
    assert conformal_rank(19, 0.1) == 18
    for n in (100, 600, 5400):
        assert conformal_rank(n, 0.01) == math.ceil((n + 1) * 0.99 - 1e-9)


def test_threshold_is_the_kth_smallest_score() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 200.0))  # 199 scores, 1..199
    calibration = calibrate_threshold(scores, target_fpr=0.01)
    assert calibration.threshold == 198.0  # k = ceil(200 * 0.99) = 198
    assert calibration.method == "conformal" and calibration.n == 199
    np.testing.assert_array_equal(calibration.scores, np.arange(1.0, 200.0))


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize(("n", "alpha"), [(300, 0.01), (200, 0.05), (50, 0.1)])
def test_measured_fpr_is_at_most_target(name: str, n: int, alpha: float) -> None:
    """Over many calibration draws the FPR on fresh normal scores averages <= alpha (and not far
    below: the split-conformal threshold is tight to 1 / (n + 1) without ties)."""
    rng = np.random.default_rng(1)
    draw = DISTRIBUTIONS[name]
    draws, fresh = 400, 2000
    fprs = np.empty(draws)
    for i in range(draws):
        calibration = calibrate_threshold(draw(rng, n), target_fpr=alpha)
        fprs[i] = np.mean(calibration.is_anomaly(draw(rng, fresh)))
    standard_error = fprs.std() / math.sqrt(draws)
    assert fprs.mean() <= alpha + 3 * standard_error
    if name != "discrete":  # ties make the rule more conservative, as it should
        assert fprs.mean() >= alpha - 1 / (n + 1) - 3 * standard_error


def test_too_few_scores_is_a_clear_error() -> None:
    with pytest.raises(CalibrationError, match="at least 99"):
        calibrate_threshold(np.arange(98.0), target_fpr=0.01)
    calibrate_threshold(np.arange(99.0), target_fpr=0.01)  # exactly enough


@pytest.mark.parametrize("scores", [[], [1.0, np.nan] * 100])
def test_bad_scores(scores: list[float]) -> None:
    with pytest.raises(CalibrationError):
        calibrate_threshold(np.array(scores), target_fpr=0.1)


def _brute_force_f1(normal: np.ndarray, anomaly: np.ndarray) -> float:
    best = -1.0
    for t in np.r_[np.unique(np.r_[normal, anomaly]), -np.inf]:
        tp = np.sum(anomaly > t)
        fp = np.sum(normal > t)
        f1 = 2 * tp / (2 * tp + fp + (anomaly.size - tp))
        best = max(best, f1)
    return best


def _f1(normal: np.ndarray, anomaly: np.ndarray, t: float) -> float:
    tp, fp = np.sum(anomaly > t), np.sum(normal > t)
    return 2 * tp / (2 * tp + fp + (anomaly.size - tp))


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    normal = rng.integers(0, 30, 80).astype(float)  # ties on purpose
    anomaly = rng.integers(15, 45, 20).astype(float)
    t = f1_optimal_threshold(normal, anomaly)
    assert _f1(normal, anomaly, t) == pytest.approx(_brute_force_f1(normal, anomaly))


def test_f1_threshold_separates_separable_scores() -> None:
    t = f1_optimal_threshold(np.array([1.0, 2.0, 3.0]), np.array([10.0, 11.0]))
    assert 3.0 <= t < 10.0
    calibration = calibrate_f1(np.array([1.0, 2.0, 3.0]), np.array([10.0, 11.0]), target_fpr=0.1)
    assert calibration.method == "f1" and calibration.n == 3
