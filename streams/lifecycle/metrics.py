"""Metrics of the model's lifecycle in a running worker: reloads and swaps, the shadow candidate,
and score drift. Declared once here and made part of WorkerMetrics (streams/worker/metrics.py).

Window metrics carry a `role` label, serving or shadow, so a dashboard puts the model in service
and the candidate side by side; model versions appear as labels only on the per-model record
counter and the info metrics, and a version's series are removed when it leaves the worker.
"""

from __future__ import annotations

import contextlib
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from streams.lifecycle.drift import QUANTILES, DriftStatistics

ROLES = ("serving", "shadow")
RELOAD_OUTCOMES = ("loaded", "failed", "unchanged")
MODEL_OUTCOMES = ("normal", "anomaly")


class LifecycleMetrics:
    def __init__(self, *, registry: CollectorRegistry) -> None:
        self.swaps = Counter(
            "vaewatch_model_swaps",
            "Model bundles swapped in between two batches (hot reloads that took effect).",
            registry=registry,
        )
        self.reloads = Counter(
            "vaewatch_model_reloads",
            "Reload attempts by outcome: loaded (verified, warmed up, swapped in at the next "
            "batch), failed (the old model keeps serving), unchanged (same version as serving).",
            ["outcome"],
            registry=registry,
        )
        self.reload_last_success = Gauge(
            "vaewatch_model_reload_last_success",
            "1 when the last reload attempt succeeded (or none was made), 0 when it failed.",
            registry=registry,
        )
        self.reload_last_timestamp = Gauge(
            "vaewatch_model_reload_last_timestamp_seconds",
            "Unix time of the last reload attempt (0: none since the worker started).",
            registry=registry,
        )
        self.model_records = Counter(
            "vaewatch_model_records",
            "Records scored by each model, serving or shadow, by version and verdict.",
            ["role", "version", "outcome"],
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "vaewatch_shadow_disagreements",
            "Records on which the shadow model's verdict differs from the serving model's.",
            ["version"],
            registry=registry,
        )
        self.shadow_model = Info(
            "vaewatch_shadow_model",
            "The shadow candidate scored beside the serving model (version empty: none).",
            registry=registry,
        )
        self.drift_ks_statistic = Gauge(
            "vaewatch_drift_ks_statistic",
            "Kolmogorov-Smirnov distance between the window of recent scores and the model's "
            "calibration scores (0 same distribution, 1 disjoint).",
            ["role"],
            registry=registry,
        )
        self.drift_ks_p_value = Gauge(
            "vaewatch_drift_ks_p_value",
            "Asymptotic p-value of the KS distance for the window and calibration sizes.",
            ["role"],
            registry=registry,
        )
        self.window_records = Gauge(
            "vaewatch_window_records",
            "Scores in the drift window (stream.drift_window_records at most).",
            ["role"],
            registry=registry,
        )
        self.window_anomaly_ratio = Gauge(
            "vaewatch_window_anomaly_ratio",
            "Share of the drift window's records over the model's threshold; on normal traffic "
            "at most the target FPR.",
            ["role"],
            registry=registry,
        )
        self.window_score_quantile = Gauge(
            "vaewatch_window_score_quantile",
            "Score quantiles of the drift window.",
            ["role", "quantile"],
            registry=registry,
        )
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome=outcome)
        self.reload_last_success.set(1)
        self.shadow_model.info({"version": "", "threshold": ""})

    def export_drift(self, role: str, stats: DriftStatistics) -> None:
        """Set the window gauges of `role`; an empty window leaves them absent (NaN)."""
        self.window_records.labels(role=role).set(stats.n)
        values = {
            self.drift_ks_statistic: stats.ks_statistic,
            self.drift_ks_p_value: stats.ks_p_value,
            self.window_anomaly_ratio: stats.anomaly_rate,
        }
        for gauge, value in values.items():
            gauge.labels(role=role).set(value if math.isfinite(value) else math.nan)
        for q in QUANTILES:
            self.window_score_quantile.labels(role=role, quantile=str(q)).set(stats.quantiles[q])

    def forget_model(self, role: str, version: str) -> None:
        """Drop the per-version series of a model that left the worker."""
        for outcome in MODEL_OUTCOMES:
            with contextlib.suppress(KeyError):
                self.model_records.remove(role, version, outcome)
        if role == "shadow":
            with contextlib.suppress(KeyError):
                self.shadow_disagreements.remove(version)
