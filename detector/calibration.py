"""The calibrated decision rule that travels with a model: threshold plus calibration scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detector.config import PRECISIONS


@dataclass(frozen=True)
class Calibration:
    """A threshold on the anomaly score and the held-out normal scores it came from.

    `scores` are the sorted calibration scores of normal validation images; they turn any new
    score s into a conformal p-value (1 + #{calibration scores >= s}) / (n + 1), which is
    super-uniform for a new normal image. An image is an anomaly when its score > threshold.

    `precision` is the precision the calibration scores were computed in; `precision_checks`
    holds, per other precision, how its scores of the same images compared at this threshold
    (trainer.calibrate.validate_precisions), with `passed` when they held the quality band.
    int8's check also holds the activation ranges its scales come from (`int8_ranges`).
    """

    threshold: float
    target_fpr: float
    method: str
    scores: np.ndarray
    precision: str = "fp32"
    precision_checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.sort(np.asarray(self.scores, dtype=np.float64).ravel())
        if scores.size == 0:
            raise ValueError("calibration needs at least one score")
        if not np.all(np.isfinite(scores)):
            raise ValueError("calibration scores must be finite")
        object.__setattr__(self, "scores", scores)
        if not all(isinstance(check, dict) for check in self.precision_checks.values()):
            raise ValueError("precision_checks must map each precision to a mapping")
        for name in (self.precision, *self.precision_checks):
            if name not in PRECISIONS:
                raise ValueError(f"precision {name!r} is unknown (one of {', '.join(PRECISIONS)})")

    @property
    def validated_precisions(self) -> tuple[str, ...]:
        """The precisions this calibration holds for: its own and those whose check passed."""
        passed = [p for p, check in sorted(self.precision_checks.items()) if check.get("passed")]
        if self.int8_ranges is None:  # a check of issue 21's per-batch int8: not this int8
            passed = [p for p in passed if p != "int8"]
        return (self.precision, *[p for p in passed if p != self.precision])

    @property
    def int8_ranges(self) -> dict[str, list[float]] | None:
        """The activation ranges int8 scoring takes its fixed scales from (detector.int8), as
        measured at calibration; None for a calibration that measured none."""
        return self.precision_checks.get("int8", {}).get("activation_ranges") or None

    @property
    def n(self) -> int:
        return int(self.scores.size)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score against the calibration scores."""
        below = np.searchsorted(self.scores, np.asarray(scores, dtype=np.float64), side="left")
        return (1.0 + self.n - below) / (self.n + 1.0)

    def is_anomaly(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold
