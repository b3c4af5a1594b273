"""Settings of `vaewatch serve`: where it listens, its limits, its micro-batching."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


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
    ssl_certfile: str | None = Field(
        None,
        description="Certificate (PEM, chain) of the service (uvicorn's ssl_certfile): when set, "
        "it speaks HTTPS only.",
    )
    ssl_keyfile: str | None = Field(
        None, description="Private key (PEM) of ssl_certfile (uvicorn's ssl_keyfile)."
    )
    ssl_keyfile_password: SecretStr | None = Field(
        None,
        description="Password of an encrypted ssl_keyfile; better set from the environment "
        "(VAEWATCH_SERVE__SSL_KEYFILE_PASSWORD).",
    )
    ssl_ca_certs: str | None = Field(
        None, description="CA bundle (PEM) that client certificates are checked against."
    )
    ssl_cert_reqs: Literal["none", "optional", "required"] = Field(
        "none",
        description="Client certificates (mutual TLS): none, optional or required; the last two "
        "need ssl_ca_certs.",
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> ServeConfig:
        if (self.ssl_keyfile or self.ssl_ca_certs) and not self.ssl_certfile:
            raise ValueError("ssl_keyfile and ssl_ca_certs need ssl_certfile")
        if self.ssl_cert_reqs != "none" and not self.ssl_ca_certs:
            raise ValueError(f"ssl_cert_reqs {self.ssl_cert_reqs} needs ssl_ca_certs")
        return self
