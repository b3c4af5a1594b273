"""The model's configuration: one object, passed whole to the model and saved in the bundle."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

Likelihood = Literal["bernoulli", "gaussian_fixed", "gaussian_learned"]
# The numeric precisions a detector can score in (detector.precision adds `auto`).
PRECISIONS = ("fp32", "int8", "bf16")

# Settings that bundles written before them lack, with the values that reproduce those bundles'
# behaviour (no latent density: the score is the plain negative ELBO, samples come from N(0, I)).
MODEL_CONFIG_BEFORE_LATENT = {
    "latent_components": 0,
    "latent_weight": 0.0,
    "complexity_weight": 0.0,
    "transforms": 0,
    "transform_weight": 0.0,
}


class ModelConfig(BaseModel):
    """Architecture and likelihood of the VAE. Everything needed to rebuild it from weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["mlp", "conv"] = Field(
        "conv",
        description="conv: 2 strided conv layers and 2 transposed-conv layers; mlp: fully "
        "connected layers of widths mlp_hidden (the article's model is mlp with "
        "400-400 and latent_dim 20).",
    )
    latent_dim: int = Field(
        8,
        ge=1,
        le=1024,
        description="Size of z. 8 and 16 score alike on one-class Fashion-MNIST, 32 lower "
        "(BENCHMARKS.md, detection quality).",
    )
    mlp_hidden: tuple[int, ...] = Field(
        (400, 400),
        min_length=1,
        description="Hidden widths of the mlp encoder (mirrored in the decoder).",
    )
    conv_channels: tuple[int, ...] = Field(
        (32, 64),
        min_length=2,
        max_length=2,
        description="Channels of the two conv layers (mirrored in the decoder).",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout rate after each hidden layer while training (0 = none).",
    )
    beta: float = Field(
        1.0, ge=0.0, description="Weight of the KL term in the loss and in the score (beta-VAE)."
    )
    likelihood: Likelihood = Field(
        "gaussian_learned",
        description="p(x|z): gaussian_learned (one learned noise sigma for all pixels), "
        "gaussian_fixed (sigma below) or bernoulli (binary cross-entropy). Bernoulli "
        "ranks dark, simple images as normal whatever their class (BENCHMARKS.md, "
        "likelihood).",
    )
    sigma: float = Field(
        0.1,
        gt=0.0,
        description="Noise sigma of gaussian_fixed; the starting value of gaussian_learned.",
    )
    latent_components: int = Field(
        8,
        ge=0,
        le=16,
        description="Gaussian components of the density fitted to the training images' latent "
        "means after training (used by the score's latent term and by `vaewatch sample`); 0 = "
        "none (scores are the plain negative ELBO, samples come from the N(0, I) prior). 8 "
        "measured best of 0-16 on validation (BENCHMARKS.md, detection quality round two).",
    )
    latent_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the latent term -log q(mu) in the anomaly score (docs/model.md); "
        "every term is z-normalised on the training images.",
    )
    complexity_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the input-complexity correction: the z-normalised total "
        "variation of the image is subtracted from the score, so that simple images (few edges) "
        "no longer look normal to every model. With this, latent_weight and transform_weight all 0 "
        "the score is the plain negative ELBO in nats.",
    )

    transforms: Literal[0, 2, 4] = Field(
        4,
        description="Self-supervised head on the encoder: it learns to tell which of this many "
        "rotations of the image (by multiples of 360/transforms degrees) it sees; 0 = no head. "
        "Its loss on the unrotated and rotated image is the score's transform term "
        "(docs/model.md).",
    )
    transform_loss_weight: float = Field(
        10.0,
        ge=0.0,
        description="Weight of the transform head's cross-entropy (nats per image, summed over "
        "the rotations) in the training loss, next to the negative ELBO.",
    )
    transform_scored: Literal[1, 2, 4] = Field(
        1,
        description="How many of the rotations the score's transform term asks the head about, "
        "evenly spaced from the image itself: 1 (the image alone: no extra encoder pass), 2 (and "
        "its half turn) or 4 (all quarter turns, as GEOM: 2.5-3x the scoring cost); at most "
        "transforms.",
    )
    transform_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the transform term in the anomaly score (z-normalised on the "
        "training images like the others); needs transforms > 0.",
    )

    @model_validator(mode="after")
    def _latent_term_needs_a_density(self) -> ModelConfig:
        if self.latent_weight > 0.0 and self.latent_components == 0:
            raise ValueError("latent_weight > 0 needs latent_components >= 1")
        if self.transform_weight > 0.0 and self.transforms == 0:
            raise ValueError("transform_weight > 0 needs transforms >= 2")
        if self.transforms and self.transform_scored > self.transforms:
            raise ValueError("transform_scored must be at most transforms")
        return self


class DetectorSettings(BaseModel):
    """Where and in what batches a loaded model scores (`vaewatch score`, `evaluate`, worker)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(
        "auto",
        description="Device for scoring (vaewatch score, evaluate, the worker): auto = CUDA when "
        "present, else the CPU; or cpu, cuda, cuda:1, ...",
    )
    max_batch_size: int = Field(
        8192, ge=1, description="Largest batch sent to the device at once; larger inputs are split."
    )
    precision: Literal["fp32", "int8", "bf16", "auto"] = Field(
        "auto",
        description="Numeric precision of CPU scoring: fp32; int8 (the big layers with fixed "
        "activation scales measured at calibration: an image's score does not depend on its "
        "batch; the MLP's fastest; needs a bundle written since issue 29); bf16 (needs a CPU with "
        "AVX512-BF16 or AMX; the conv model's fastest there); auto = the fastest of those that "
        "the bundle's calibration validated (FPR at the threshold within 0.003 of fp32) and the "
        "CPU runs fast (MLP: int8, then bf16; conv: bf16, then int8), else fp32. On CUDA always "
        "fp32 (int8 and bf16 are refused there). docs/model.md, precision on the CPU.",
    )
