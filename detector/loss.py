"""Per-image terms of the negative evidence lower bound (ELBO).

    -ELBO(x) = E_q(z|x)[-log p(x|z)] + beta * KL(q(z|x) || N(0, I))

(Kingma & Welling, "Auto-Encoding Variational Bayes", 2014, eq. 3 and appendix B; the beta
weight is Higgins et al., "beta-VAE", 2017.) Every function returns one value per image so that
training takes the mean and scoring keeps them apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from detector.config import Likelihood

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, in closed form:
    -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_nll(
    x: torch.Tensor, logits: torch.Tensor, *, likelihood: Likelihood, log_sigma: torch.Tensor
) -> torch.Tensor:
    """-log p(x|z) per row, in nats, for inputs x in [0, 1] (N x 784) and decoder logits.

    bernoulli: binary cross-entropy summed over pixels.
    gaussian_*: sum_i (x_i - m_i)^2 / (2 sigma^2) + log sigma + 1/2 log 2 pi, with
    m = sigmoid(logits) and one sigma shared by all pixels (fixed, or learned through log_sigma).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
    # mse_loss: one fused pass for (x - m)^2, bit-identical to sub + pow, and the whole score
    # of a batch runs faster with it on the CPU (BENCHMARKS.md, "Choices made by measurement").
    squared = F.mse_loss(torch.sigmoid(logits), x, reduction="none").sum(dim=1)
    pixels = x.shape[1]
    return squared * torch.exp(-2.0 * log_sigma) / 2.0 + pixels * (log_sigma + _HALF_LOG_2PI)


def negative_elbo(
    x: torch.Tensor,
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: Likelihood,
    log_sigma: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Reconstruction NLL + beta * KL per row: the training loss and the anomaly score."""
    recon = reconstruction_nll(x, logits, likelihood=likelihood, log_sigma=log_sigma)
    return recon + beta * kl_divergence(mu, logvar)


def total_variation(x: torch.Tensor, *, side: int = 28) -> torch.Tensor:
    """Anisotropic total variation per row of x (N x side*side in [0, 1]): the summed absolute
    differences between horizontally and vertically adjacent pixels. A cheap measure of an
    image's complexity, the part of its likelihood that any model assigns alike (docs/model.md)."""
    # On the flat rows, not an N x side x side view, whose rows of side - 1 differences are
    # short for vector loops, and in place (two fresh buffers instead of four): 1.1-1.4x faster
    # for 1,024 images, both CPU modes (the whole score: within noise). Horizontal neighbours
    # are 1 apart in a flat row, less the pairs that wrap from one image row to the next;
    # vertical ones are `side` apart.
    across = (x[:, 1:] - x[:, :-1]).abs_()
    across[:, side - 1 :: side] = 0
    return across.sum(dim=1) + (x[:, side:] - x[:, :-side]).abs_().sum(dim=1)
