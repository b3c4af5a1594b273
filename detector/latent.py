"""A density over the latent space, fitted to the encoder means of the training images.

Two uses of one statistic (docs/model.md):

- the latent term of the anomaly score: -log q(mu(x)) under a Gaussian mixture q fitted to the
  training latents (for one component, half the squared Mahalanobis distance plus a constant);
- generation: sampling z from q instead of the N(0, I) prior ("ex-post density estimation",
  Ghosh et al., "From Variational to Deterministic Autoencoders", ICLR 2020), because the
  aggregate posterior of a VAE does not fill its prior.

Everything lives in buffers, so it is saved with the weights and verified by the bundle's digest.
Until `set_density` is called the density is the prior N(0, I), so an untrained model still scores
and samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


class LatentDensity(nn.Module):
    """Gaussian mixture q(z) = sum_k w_k N(z; m_k, L_k L_k^T) over `dim` latent dimensions."""

    def __init__(self, dim: int, components: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(components, dim))
        # Identity factors. Not torch.eye: on the meta device (the bundle's shape check) it
        # imports torch._dynamo, a second of every command's start-up.
        scale_tril = torch.zeros(components, dim, dim)
        scale_tril.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        self.register_buffer("scale_tril", scale_tril)
        self.register_buffer("log_weights", torch.full((components,), -math.log(components)))

    @property
    def components(self) -> int:
        return int(self.means.shape[0])

    @torch.no_grad()
    def set_density(
        self, means: torch.Tensor, scale_tril: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """Install a fitted mixture: means K x d, Cholesky factors K x d x d, weights K."""
        if means.shape != self.means.shape or scale_tril.shape != self.scale_tril.shape:
            raise ValueError(
                f"mixture of shape {tuple(means.shape)} / {tuple(scale_tril.shape)} does not fit "
                f"{tuple(self.means.shape)} / {tuple(self.scale_tril.shape)}"
            )
        self.means.copy_(means)
        self.scale_tril.copy_(torch.tril(scale_tril))
        self.log_weights.copy_(torch.log(weights / weights.sum()))

    def negative_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z) per row of z (N x d), in nats."""
        z = z.float()
        diff = (z.unsqueeze(0) - self.means.unsqueeze(1)).transpose(1, 2)  # K x d x N
        solved = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)
        mahalanobis = solved.pow(2).sum(dim=1)  # K x N
        log_det = 2.0 * torch.log(torch.diagonal(self.scale_tril, dim1=1, dim2=2)).sum(dim=1)
        dim = z.shape[1]
        log_components = -0.5 * (mahalanobis + log_det.unsqueeze(1) + dim * _LOG_2PI)
        return -torch.logsumexp(log_components + self.log_weights.unsqueeze(1), dim=0)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """n latent vectors z ~ q, drawn on the CPU with `generator`, then moved to the buffers'
        device (so a seed gives the same draws on any device). `temperature` scales each
        component's spread around its mean (1: the fitted density itself)."""
        weights = self.log_weights.detach().cpu().exp()
        component = torch.multinomial(weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], 1, generator=generator)
        means, tril = self.means.detach().cpu(), self.scale_tril.detach().cpu()
        z = means[component] + temperature * (tril[component] @ eps).squeeze(2)
        return z.to(self.means.device)
