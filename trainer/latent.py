"""Fit what a trained VAE's score needs besides its weights: a Gaussian mixture over the encoder
means of the training images (the latent density), and the centre and scale of each score term
(negative ELBO, -log q(mu), total variation) on those images (docs/model.md, "The score").

Fitted on the images the VAE trained on, never on the held-out images: those calibrate the
threshold, and the conformal guarantee needs their scores to be computed by a score fixed
without them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from detector.model import VAE, to_model_input

log = logging.getLogger(__name__)

_CHUNK = 4096
_EM_ITERATIONS = 100
# Added to every covariance's diagonal, relative to the latents' overall variance: keeps a
# component that collapses onto a few points invertible.
_RELATIVE_REGULARISATION = 1e-4


@torch.inference_mode()
def latent_means(model: VAE, images: np.ndarray, *, device: torch.device) -> np.ndarray:
    """mu (float64 N x d) of uint8 N x 784 images."""
    return _chunks(model, images, device, lambda x: model.encode(x)[0])


@torch.inference_mode()
def score_terms(model: VAE, images: np.ndarray, *, device: torch.device) -> np.ndarray:
    """The raw score terms (`VAE.score_terms`, float64 N x 3) of uint8 N x 784 images."""
    return _chunks(model, images, device, model.score_terms)


def _chunks(model: VAE, images: np.ndarray, device: torch.device, function) -> np.ndarray:
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(images), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + _CHUNK]))
        parts.append(function(to_model_input(chunk.to(device))).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(parts)


def _kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each next centre drawn with probability
    proportional to the squared distance to the nearest centre so far."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        nearest = np.min(((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(points[rng.choice(len(points), p=nearest / nearest.sum())])
    return np.array(centres)


def _log_gaussians(points: np.ndarray, means: np.ndarray, trils: np.ndarray) -> np.ndarray:
    """log N(x_n; m_k, L_k L_k^T) as an N x K array."""
    n, d = points.shape
    out = np.empty((n, len(means)))
    for k, (mean, tril) in enumerate(zip(means, trils, strict=True)):
        solved = np.linalg.solve(tril, (points - mean).T)
        out[:, k] = -0.5 * (
            (solved**2).sum(0) + 2.0 * np.log(np.diag(tril)).sum() + d * np.log(2.0 * np.pi)
        )
    return out


def fit_gaussian_mixture(
    points: np.ndarray, components: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood Gaussian mixture with full covariances by EM (Dempster, Laird & Rubin,
    1977), k-means++ start. Returns means K x d, Cholesky factors K x d x d and weights K."""
    points = np.asarray(points, dtype=np.float64)
    n, d = points.shape
    if n < 2 * components * d:
        raise ValueError(
            f"{n} latent vectors are too few for a {components}-component mixture in {d} dims"
        )
    regularisation = _RELATIVE_REGULARISATION * float(points.var(axis=0).mean()) * np.eye(d)
    rng = np.random.default_rng(seed)
    means = _kmeans_pp(points, components, rng) if components > 1 else points.mean(0)[None]
    # Start with hard assignments to the nearest seed, then alternate E and M steps.
    nearest = ((points[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    responsibilities = np.eye(components)[nearest]
    previous = -np.inf
    for _ in range(_EM_ITERATIONS if components > 1 else 1):
        counts = responsibilities.sum(0) + 1e-12
        weights = counts / n
        means = (responsibilities.T @ points) / counts[:, None]
        trils = np.empty((components, d, d))
        for k in range(components):
            centred = points - means[k]
            covariance = (responsibilities[:, k, None] * centred).T @ centred / counts[k]
            trils[k] = np.linalg.cholesky(covariance + regularisation)
        if components == 1:
            break
        joint = _log_gaussians(points, means, trils) + np.log(weights)
        total = np.logaddexp.reduce(joint, axis=1)
        responsibilities = np.exp(joint - total[:, None])
        likelihood = float(total.mean())
        if likelihood - previous < 1e-6:
            break
        previous = likelihood
    return means, trils, weights


def fit_score_statistics(
    model: VAE, train_images: np.ndarray, *, device: torch.device, seed: int = 0
) -> None:
    """Fit `model.latent` (the mixture over the training images' mu) and then, for a fused score,
    the mean and standard deviation of each score term over the same images (in place)."""
    if model.latent is not None:
        mu = latent_means(model, train_images, device=device)
        means, trils, weights = fit_gaussian_mixture(mu, model.latent.components, seed=seed)
        as_buffer = {"dtype": torch.float32, "device": model.latent.means.device}
        model.latent.set_density(
            torch.as_tensor(means, **as_buffer),
            torch.as_tensor(trils, **as_buffer),
            torch.as_tensor(weights, **as_buffer),
        )
        log.info("latent density: %d component(s) over %d training latents", len(means), len(mu))
    if not model.fused_score:
        return
    terms = score_terms(model, train_images, device=device)
    centres, scales = terms.mean(0), terms.std(0)
    if model.latent is None:  # the latent column is all zeros: leave it out of the scale
        centres[1], scales[1] = 0.0, 1.0
    model.set_score_normalisation(
        torch.as_tensor(centres, dtype=torch.float32), torch.as_tensor(scales, dtype=torch.float32)
    )
    log.info(
        "score terms on the training images (mean +- sd): negative ELBO %.1f +- %.1f, "
        "-log q(mu) %.2f +- %.2f, total variation %.1f +- %.1f",
        centres[0], scales[0], centres[1], scales[1], centres[2], scales[2],
    )  # fmt: skip
