"""What a model sees in an image, and what it makes from latent codes: per-pixel reconstruction
error, reconstructions, encoding to and decoding from z. Used by the HTTP service (serve/).

The per-pixel map splits the reconstruction term of the score, -log p(x|z=mu), into one share
per pixel: summed over the pixels it gives that term exactly (up to float rounding), so a
heatmap shows which part of an image the score comes from. The KL term belongs to the whole
image and is not split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from detector.model import VAE, to_model_input
from detector.scorer import as_image_batch


def _device(model: VAE) -> torch.device:
    return model.fc_mu.weight.device


def pixel_nll(model: VAE, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log p(x_i|z) per pixel (N x 784, nats) under the model's likelihood; each row sums to
    detector.loss.reconstruction_nll of that row."""
    if model.config.likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    log_sigma = model.log_sigma
    squared = F.mse_loss(torch.sigmoid(logits), x, reduction="none")
    return squared * torch.exp(-2.0 * log_sigma) / 2.0 + (log_sigma + 0.5 * math.log(2 * math.pi))


@dataclass(frozen=True)
class Explanation:
    """Per image: the decoder's mean at z = mu and each pixel's share of the reconstruction
    term. Rows align with the input images."""

    reconstructions: np.ndarray  # float32 N x 784 in [0, 1]
    pixel_nll: np.ndarray  # float32 N x 784, nats; rows sum to `reconstruction_nll`
    reconstruction_nll: np.ndarray  # float64 N, the reconstruction term of the score


@torch.inference_mode()
def explain(model: VAE, images: np.ndarray) -> Explanation:
    """Reconstructions and per-pixel anomaly maps of uint8 images (N x 784 or N x 28 x 28).
    The model must be in eval mode (dropout off)."""
    batch = torch.from_numpy(as_image_batch(images)).to(_device(model))
    x = to_model_input(batch)
    mu, _ = model.encode(x)
    logits = model.decode(mu).float()
    per_pixel = pixel_nll(model, x, logits).float()
    return Explanation(
        reconstructions=torch.sigmoid(logits).cpu().numpy(),
        pixel_nll=per_pixel.cpu().numpy(),
        reconstruction_nll=per_pixel.double().sum(dim=1).cpu().numpy(),
    )


@torch.inference_mode()
def encode_mean(model: VAE, images: np.ndarray) -> np.ndarray:
    """The encoder's mean mu (N x latent_dim, float32) of uint8 images."""
    batch = torch.from_numpy(as_image_batch(images)).to(_device(model))
    mu, _ = model.encode(to_model_input(batch))
    return mu.float().cpu().numpy()


@torch.inference_mode()
def decode_mean(model: VAE, z: np.ndarray) -> np.ndarray:
    """The decoder's mean (N x 784 floats in [0, 1]) of latent codes z (N x latent_dim)."""
    codes = torch.as_tensor(np.asarray(z, dtype=np.float32), device=_device(model))
    return torch.sigmoid(model.decode(codes)).float().cpu().numpy()


def latent_codes(
    model: VAE, n: int, *, seed: int, temperature: float = 1.0, prior: bool = False
) -> np.ndarray:
    """n latent codes from a CPU generator seeded with `seed`, by `VAE.sample_latent` (so at
    temperature 1 they decode to `vaewatch sample --seed`'s images)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = model.sample_latent(n, generator=generator, prior=prior, temperature=temperature)
    return z.detach().cpu().numpy()


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 0..255, rounded as `vaewatch sample` does."""
    return (np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8)
