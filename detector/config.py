"""The model's configuration: one object, passed whole to the model and saved in the bundle."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

Likelihood = Literal["bernoulli", "gaussian_fixed", "gaussian_learned"]


class ModelConfig(BaseModel):
    """Architecture and likelihood of the VAE. Everything needed to rebuild it from weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["mlp", "conv"] = "conv"
    latent_dim: int = Field(8, ge=1, le=1024)
    mlp_hidden: tuple[int, ...] = Field((400, 400), min_length=1)
    conv_channels: tuple[int, ...] = Field((32, 64), min_length=2, max_length=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(1.0, ge=0.0)
    likelihood: Likelihood = "gaussian_learned"
    sigma: float = Field(0.1, gt=0.0)


class DetectorSettings(BaseModel):
    """Where and in what batches a loaded model scores (`vaewatch score`, `evaluate`, worker)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "auto"
    max_batch_size: int = Field(8192, ge=1)
