"""Settings of `vaewatch serve`: where it listens, its limits, its micro-batching."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(
        "127.0.0.1",
        description="Interface the HTTP service binds (127.0.0.1 keeps it local; 0.0.0.0 for "
        "containers, better with bearer_token set).",
    )
    port: int = Field(8000, ge=0, le=65535, description="Port of the service (0 = a free one).")
    bearer_token: SecretStr | None = Field(
        None,
        description="When set, every /v1/ route asks for `Authorization: Bearer <token>` "
        "(better set from the environment: VAEWATCH_SERVE__BEARER_TOKEN).",
    )
    max_batch_size: int = Field(
        256,
        ge=1,
        description="Micro-batching: images of concurrent requests scored together, at most.",
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        description="Micro-batching: how long the first request of a batch waits for others.",
    )
    max_queue_images: int = Field(
        2048,
        ge=1,
        description="Images waiting to be scored, at most; beyond, requests get 503 with "
        "Retry-After instead of queueing without bound.",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 503 when the queue is full.")
    max_images_per_request: int = Field(
        256, ge=1, description="Images one /v1/score or /v1/explain request may carry."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body, bytes (413 beyond)."
    )
    max_samples: int = Field(256, ge=1, description="Largest n of /v1/sample.")
    max_interpolation_steps: int = Field(64, ge=2, description="Largest steps of /v1/interpolate.")
    cpu_threads: int = Field(
        1,
        ge=0,
        description="torch CPU threads that score on the CPU (0 = torch's default, one per "
        "core). One leaves a core to the HTTP side, and idle OpenMP threads spin between small "
        "batches.",
    )
    live_alerts: bool = Field(
        False,
        description="Follow stream.alert_topic on stream.bootstrap_servers and show each alert "
        "in the console's Live alerts view (the image is read back from its source record).",
    )
    recent_alerts: int = Field(
        20, ge=0, description="Alerts the live view shows at once, and replays to a new viewer."
    )
