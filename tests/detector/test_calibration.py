"""Conformal p-values of detector.calibration.Calibration."""

from __future__ import annotations

import numpy as np
import pytest

from detector.calibration import Calibration


def test_scores_are_sorted_and_p_values_count_higher_scores() -> None:
    calibration = Calibration(threshold=3.0, target_fpr=0.25, method="x", scores=[4, 1, 3, 2])
    assert calibration.scores.tolist() == [1, 2, 3, 4]
    # p = (1 + #{s_i >= s}) / (n + 1)
    np.testing.assert_allclose(
        calibration.p_values(np.array([0.0, 1.0, 2.5, 4.0, 9.0])), [1, 1, 0.6, 0.4, 0.2]
    )


def test_anomaly_is_strictly_above_threshold() -> None:
    calibration = Calibration(threshold=2.0, target_fpr=0.1, method="x", scores=[1, 2, 3])
    assert calibration.is_anomaly(np.array([1.9, 2.0, 2.1])).tolist() == [False, False, True]


def test_p_values_of_normal_data_are_super_uniform() -> None:
    """P(p <= a) <= a for a new score exchangeable with the calibration scores."""
    rng = np.random.default_rng(0)
    levels = np.array([0.01, 0.05, 0.1, 0.5])
    hits = np.zeros_like(levels)
    draws = 2000
    for _ in range(draws):
        calibration = Calibration(1.0, 0.1, "x", rng.normal(size=50))
        p = calibration.p_values(rng.normal(size=1))[0]
        hits += p <= levels
    assert np.all(hits / draws <= levels + 3 * np.sqrt(levels * (1 - levels) / draws))
    assert hits[-1] / draws > 0.45  # and not trivially conservative


@pytest.mark.parametrize("scores", [[], [1.0, float("nan")], [float("inf")]])
def test_bad_scores_are_rejected(scores: list[float]) -> None:
    with pytest.raises(ValueError):
        Calibration(threshold=0.0, target_fpr=0.1, method="x", scores=np.array(scores))
