"""Settings of the model's lifecycle in the worker: hot reload, shadow scoring, drift windows
(docs/lifecycle.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LifecycleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    watch_interval_s: float = Field(
        1.0,
        ge=0,
        description="How often the worker checks its --model path for a new bundle (the path "
        "leading elsewhere, e.g. a flipped symlink, or a rewritten manifest), seconds; 0 = "
        "only on SIGHUP or POST /admin/reload.",
    )
    admin_reload: bool = Field(
        False,
        description="Accept POST /admin/reload on the metrics port (404 when off): reload the "
        "--model path now and answer the outcome as JSON. Whoever reaches the port can "
        "trigger it.",
    )
    drift_window_records: int = Field(
        2048,
        ge=100,
        description="Scores in each model's drift window: the most recent records, compared "
        "with the bundle's calibration scores (KS distance and p-value, quantiles, anomaly "
        "ratio).",
    )
    drift_interval_s: float = Field(
        1.0,
        ge=0,
        description="How often the drift statistics are recomputed and exported, seconds (0 = "
        "after every batch).",
    )
    shadow_model: str = Field(
        "",
        description="Bundle directory of a candidate that scores every batch beside the serving "
        "model without affecting alerts or commits (same as worker --shadow DIR, which wins); "
        "empty = none.",
    )
    shadow_topic: str = Field(
        "",
        description="Topic for the verdicts of the shadow model (worker --shadow DIR): one JSON "
        "object per record, keyed topic/partition/offset; empty = metrics only.",
    )
