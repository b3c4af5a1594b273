"""The calibrated decision rule that travels with a model: threshold plus calibration scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """A threshold on the anomaly score and the held-out normal scores it came from.

    `scores` are the sorted calibration scores of normal validation images; they turn any new
    score s into a conformal p-value (1 + #{calibration scores >= s}) / (n + 1), which is
    super-uniform for a new normal image. An image is an anomaly when its score > threshold.
    """

    threshold: float
    target_fpr: float
    method: str
    scores: np.ndarray

    def __post_init__(self) -> None:
        scores = np.sort(np.asarray(self.scores, dtype=np.float64).ravel())
        if scores.size == 0:
            raise ValueError("calibration needs at least one score")
        if not np.all(np.isfinite(scores)):
            raise ValueError("calibration scores must be finite")
        object.__setattr__(self, "scores", scores)

    @property
    def n(self) -> int:
        return int(self.scores.size)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score against the calibration scores."""
        below = np.searchsorted(self.scores, np.asarray(scores, dtype=np.float64), side="left")
        return (1.0 + self.n - below) / (self.n + 1.0)

    def is_anomaly(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold
