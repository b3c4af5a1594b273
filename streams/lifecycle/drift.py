"""Score drift: how far the scores of recent traffic have moved from the bundle's calibration
scores. Pure functions on numpy arrays plus a fixed-size window; nothing here touches Kafka.

With split-conformal calibration (trainer/calibrate.py), the score of a new normal image is
exchangeable with the calibration scores, so on normal traffic (a) the share of records over the
threshold is at most the target FPR, and (b) recent scores and calibration scores are two samples
of one distribution. The two-sample Kolmogorov-Smirnov statistic

    D = sup_x |F_recent(x) - F_calibration(x)|

measures (b); its asymptotic p-value (Kolmogorov's distribution with Stephens' small-sample
correction, Numerical Recipes 14.3) says how surprising D is for two independent samples of these
sizes. It is a guide, not a false-alarm rate: every window is compared with the same fixed
calibration set, whose own sampling noise all windows share, and a sliding window of consecutive
records is not an i.i.d. sample when traffic comes in bursts of one kind. The alert rule
therefore asks for both a tiny p-value and a large D for minutes on end
(deploy/prometheus/rules.yml).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from detector.calibration import Calibration

QUANTILES = (0.5, 0.9, 0.99)
# Terms of the Kolmogorov series; they fall as exp(-2 k^2 x^2), so 100 is far more than enough
# where the series is used (x >= 0.2; below that the p-value is 1 to double precision).
_KOLMOGOROV_TERMS = np.arange(1, 101, dtype=np.float64)


def kolmogorov_survival(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x < 0.2:
        return 1.0
    k = _KOLMOGOROV_TERMS
    terms = np.where(k % 2 == 1, 1.0, -1.0) * np.exp(-2.0 * k * k * x * x)
    return float(min(1.0, max(0.0, 2.0 * terms.sum())))


def ks_two_sample(sample: np.ndarray, reference_sorted: np.ndarray) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test of `sample` against a sorted `reference`.

    Both empirical CDFs only jump at data points, so the supremum is attained at one of them:
    the right-continuous CDFs are compared at every value of either sample (searchsorted, side
    right, counts ties fully). O((n + m) log(n + m)), whole arrays at once.
    """
    sample = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    reference = np.asarray(reference_sorted, dtype=np.float64).ravel()
    m, n = sample.size, reference.size
    if m == 0 or n == 0:
        return 0.0, 1.0
    points = np.concatenate([sample, reference])
    cdf_sample = np.searchsorted(sample, points, side="right") / m
    cdf_reference = np.searchsorted(reference, points, side="right") / n
    statistic = float(np.max(np.abs(cdf_sample - cdf_reference)))
    effective = math.sqrt(m * n / (m + n))
    p_value = kolmogorov_survival((effective + 0.12 + 0.11 / effective) * statistic)
    return statistic, p_value


@dataclass(frozen=True)
class DriftStatistics:
    """Drift of a window of recent scores against a model's calibration scores."""

    n: int  # scores in the window
    anomaly_rate: float  # share of the window over the threshold
    target_fpr: float  # what anomaly_rate should be at most on normal traffic
    ks_statistic: float  # two-sample KS distance, 0 (same distribution) .. 1
    ks_p_value: float  # asymptotic p-value of ks_statistic for these sample sizes
    quantiles: dict[float, float]  # score quantiles of the window (QUANTILES)


def drift_statistics(
    scores: np.ndarray,
    calibration_scores_sorted: np.ndarray,
    *,
    threshold: float,
    target_fpr: float,
) -> DriftStatistics:
    """Anomaly rate, KS distance with its p-value, and quantiles of `scores` (any order)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        nan = float("nan")
        return DriftStatistics(0, nan, target_fpr, nan, nan, dict.fromkeys(QUANTILES, nan))
    statistic, p_value = ks_two_sample(scores, calibration_scores_sorted)
    values = np.quantile(scores, QUANTILES)
    return DriftStatistics(
        n=int(scores.size),
        anomaly_rate=float(np.mean(scores > threshold)),
        target_fpr=target_fpr,
        ks_statistic=statistic,
        ks_p_value=p_value,
        quantiles={q: float(v) for q, v in zip(QUANTILES, values, strict=True)},
    )


class ScoreWindow:
    """The last `capacity` values of a stream, kept in a ring buffer; batches go in whole."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"window capacity must be at least 1, got {capacity}")
        self._values = np.empty(capacity, dtype=np.float64)
        self._next = 0
        self._size = 0

    @property
    def capacity(self) -> int:
        return self._values.size

    def __len__(self) -> int:
        return self._size

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        capacity = self.capacity
        if values.size >= capacity:
            self._values[:] = values[-capacity:]
            self._next, self._size = 0, capacity
            return
        end = self._next + values.size
        if end <= capacity:
            self._values[self._next : end] = values
        else:
            split = capacity - self._next
            self._values[self._next :] = values[:split]
            self._values[: end - capacity] = values[split:]
        self._next = end % capacity
        self._size = min(capacity, self._size + values.size)

    def values(self) -> np.ndarray:
        """The values in the window (oldest first), a copy."""
        if self._size < self.capacity:
            return self._values[: self._size].copy()
        return np.concatenate([self._values[self._next :], self._values[: self._next]])

    def clear(self) -> None:
        self._next = self._size = 0


class DriftMonitor:
    """One model's window of recent scores, compared with its calibration scores at most every
    `interval_s` (the KS test sorts the window: cheap, but not worth doing on every batch)."""

    def __init__(
        self,
        calibration: Calibration,
        *,
        window_records: int,
        interval_s: float,
        export: Callable[[DriftStatistics], None],
    ) -> None:
        self.calibration = calibration
        self._window = ScoreWindow(window_records)
        self._interval_s = interval_s
        self._export = export
        self._due = 0.0

    def observe(self, scores: np.ndarray, *, now: float | None = None) -> DriftStatistics | None:
        """Add a batch's scores; returns (and exports) the statistics when they were due."""
        self._window.extend(scores)
        now = time.monotonic() if now is None else now
        if now < self._due:
            return None
        self._due = now + self._interval_s
        return self.flush()

    def flush(self) -> DriftStatistics:
        stats = drift_statistics(
            self._window.values(),
            self.calibration.scores,
            threshold=self.calibration.threshold,
            target_fpr=self.calibration.target_fpr,
        )
        self._export(stats)
        return stats

    def recalibrated(self, calibration: Calibration) -> None:
        """A new model serves: its scores are on its own scale, so the window starts over."""
        self.calibration = calibration
        self._window.clear()
        self._due = 0.0
