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
from threadpoolctl import threadpool_limits

from detector.model import VAE, to_model_input

log = logging.getLogger(__name__)

_CHUNK = 4096
_EM_MAX_ITERATIONS = 100
# EM stops once an iteration raises the mean log-likelihood per latent by less than this, in
# nats: far below the spread of -log q(mu) over the training images (several nats), so further
# iterations no longer move the score. Was 1e-6, which ran most fits to the iteration cap for
# changes of thousandths of a nat (issue 21).
_EM_TOLERANCE = 1e-4
# The latent mixture and the score terms' centre and scale are fitted on at most this many of
# the training images: a seeded random subset when there are more (one class's 5,400 are all
# used). On all ten Fashion-MNIST classes' 54,000 latents (MLP, d = 20, 8 components), mixtures
# fitted on 20,000 scored the same mean log-likelihood on all 54,000 as mixtures fitted on all
# of them (24.61-24.71 against 24.63-24.65 nats, two seeds each; 10,000 gave 24.38-24.59), in
# a third of the time, and the score terms' mean and sd come from 20,000 to a fraction of a
# percent of their spread (issue 21).
_FIT_IMAGES = 20_000
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
    """log N(x_n; m_k, L_k L_k^T) as an N x K array.

    All components at once: with W_k = L_k^-1 (d x d, cheap), the whitened residuals
    W_k x_n - W_k m_k of every k come from one N x d by d x (K d) product, instead of K
    triangular solves of d x N systems.
    """
    n, d = points.shape
    k = len(means)
    inverse = np.linalg.inv(trils)  # K x d x d
    stacked = inverse.transpose(2, 0, 1).reshape(d, k * d)  # column block k is W_k^T
    whitened = (points @ stacked).reshape(n, k, d) - np.einsum("kij,kj->ki", inverse, means)
    mahalanobis = np.einsum("nkd,nkd->nk", whitened, whitened)
    log_det = 2.0 * np.log(np.diagonal(trils, axis1=1, axis2=2)).sum(1)
    return -0.5 * (mahalanobis + log_det + d * np.log(2.0 * np.pi))


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    """log sum_k exp(values[n, k]) per row, stable (np.logaddexp.reduce is several times slower)."""
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def _one_blas_thread():
    """EM's products are small (N x d by d x K d, d ~ 8-20): OpenBLAS's threads, which spin while
    they wait, cost more than they share. On a busy 2-core machine (load 5) a 10,000-latent fit
    took 32 s with two threads and 1.5 s with one (issue 21). One thread, as scikit-learn's
    k-means does."""
    return threadpool_limits(1, user_api="blas")


def fit_gaussian_mixture(
    points: np.ndarray, components: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood Gaussian mixture with full covariances by EM (Dempster, Laird & Rubin,
    1977), k-means++ start; stops when an iteration gains less than `_EM_TOLERANCE` in mean
    log-likelihood, or after `_EM_MAX_ITERATIONS`. Returns means K x d, Cholesky factors
    K x d x d and weights K."""
    with _one_blas_thread():
        return _fit_gaussian_mixture(points, components, seed=seed)


def _fit_gaussian_mixture(
    points: np.ndarray, components: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    for _ in range(_EM_MAX_ITERATIONS if components > 1 else 1):
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
        total = _logsumexp_rows(joint)
        responsibilities = np.exp(joint - total[:, None])
        likelihood = float(total.mean())
        if likelihood - previous < _EM_TOLERANCE:
            break
        previous = likelihood
    return means, trils, weights


def fit_sample(images: np.ndarray, *, seed: int, limit: int = _FIT_IMAGES) -> np.ndarray:
    """The images the score statistics are fitted on: all of them up to `limit`, else `limit` of
    them drawn without replacement by `seed` (kept in their original order)."""
    if len(images) <= limit:
        return images
    # A generator of its own, so the k-means++ draws of the mixture fit stay those of `seed`.
    pick = np.random.default_rng([seed, len(images)]).choice(len(images), limit, replace=False)
    return images[np.sort(pick)]


def fit_score_statistics(
    model: VAE, train_images: np.ndarray, *, device: torch.device, seed: int = 0
) -> None:
    """Fit `model.latent` (the mixture over the training images' mu) and then, for a fused score,
    the mean and standard deviation of each score term over the same images (in place); on at
    most `_FIT_IMAGES` of them (`fit_sample`)."""
    available = len(train_images)
    train_images = fit_sample(train_images, seed=seed, limit=_FIT_IMAGES)
    if model.latent is not None:
        mu = latent_means(model, train_images, device=device)
        means, trils, weights = fit_gaussian_mixture(mu, model.latent.components, seed=seed)
        as_buffer = {"dtype": torch.float32, "device": model.latent.means.device}
        model.latent.set_density(
            torch.as_tensor(means, **as_buffer),
            torch.as_tensor(trils, **as_buffer),
            torch.as_tensor(weights, **as_buffer),
        )
        log.info(
            "latent density: %d component(s) over %d of %d training latents",
            len(means), len(mu), available,
        )  # fmt: skip
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
