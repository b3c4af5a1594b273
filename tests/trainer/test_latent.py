"""Fitting the latent density: EM recovers a known mixture, the normalisation comes from the
training images, and the bundle's calibration scores are the detector's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainer.latent
from detector import Detector, load_bundle
from detector.config import ModelConfig
from tests.fixtures_model import CPU_FP32
from trainer.config import DataConfig, TrainConfig
from trainer.data import load_images, split_normal
from trainer.fit import fit_vae, score_images
from trainer.latent import fit_gaussian_mixture, fit_sample, latent_means, score_terms


def test_one_component_is_the_sample_mean_and_covariance() -> None:
    points = np.random.default_rng(0).normal(size=(500, 3)) @ np.diag([1.0, 2.0, 0.5]) + 3.0
    means, trils, weights = fit_gaussian_mixture(points, 1, seed=0)
    np.testing.assert_allclose(means[0], points.mean(0))
    np.testing.assert_allclose(trils[0] @ trils[0].T, np.cov(points.T, bias=True), atol=1e-3)
    assert weights.tolist() == pytest.approx([1.0])


def test_em_recovers_two_separated_clusters() -> None:
    rng = np.random.default_rng(1)
    first = rng.normal(size=(600, 2)) * 0.5 + [5.0, 0.0]
    second = rng.normal(size=(1400, 2)) * [1.0, 0.3] + [-5.0, 2.0]
    means, trils, weights = fit_gaussian_mixture(np.concatenate([first, second]), 2, seed=0)
    order = np.argsort(-means[:, 0])
    np.testing.assert_allclose(means[order], [[5.0, 0.0], [-5.0, 2.0]], atol=0.1)
    np.testing.assert_allclose(weights[order], [0.3, 0.7], atol=0.01)
    covariance = trils[order[1]] @ trils[order[1]].T
    np.testing.assert_allclose(np.diag(covariance), [1.0, 0.09], rtol=0.15)


def test_too_few_points_for_the_mixture_is_an_error() -> None:
    with pytest.raises(ValueError, match="too few"):
        fit_gaussian_mixture(np.zeros((10, 4)), 2, seed=0)


def _mean_log_likelihood(points: np.ndarray, fit: tuple) -> float:
    means, trils, weights = fit
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.as_tensor(weights)),
        torch.distributions.MultivariateNormal(
            torch.as_tensor(means), scale_tril=torch.as_tensor(trils)
        ),
    )
    return float(reference.log_prob(torch.as_tensor(points)).mean())


def test_em_stops_at_convergence_with_the_likelihood_of_the_full_run(
    fashion_mnist, monkeypatch
) -> None:
    """Real, clustered points (class 7's images on their first 4 principal axes): EM with the
    tolerance stops well before the iteration cap, and its log-likelihood (checked against
    torch.distributions) is within a hundredth of a nat of EM run to the cap."""
    images = fashion_mnist.train.images[fashion_mnist.train.labels == 7][:3000] / 255.0
    centred = images - images.mean(0)
    points = centred @ np.linalg.svd(centred, full_matrices=False)[2][:4].T
    iterations = []

    def counted(fit_tolerance: float) -> tuple:
        calls = 0
        original = trainer.latent._log_gaussians

        def counting(*args):
            nonlocal calls
            calls += 1
            return original(*args)

        with monkeypatch.context() as patch:
            patch.setattr(trainer.latent, "_EM_TOLERANCE", fit_tolerance)
            patch.setattr(trainer.latent, "_log_gaussians", counting)
            fit = fit_gaussian_mixture(points, 4, seed=0)
        iterations.append(calls)
        return fit

    early = counted(trainer.latent._EM_TOLERANCE)
    full = counted(-np.inf)  # never converged: every iteration up to the cap
    assert iterations[1] == trainer.latent._EM_MAX_ITERATIONS
    assert iterations[0] < iterations[1] / 2
    assert _mean_log_likelihood(points, early) == pytest.approx(
        _mean_log_likelihood(points, full), abs=0.01
    )


def test_fit_sample_is_a_seeded_subset_above_the_limit() -> None:
    images = np.arange(1000 * 3).reshape(1000, 3)
    assert fit_sample(images, seed=0, limit=1000) is images
    picked = fit_sample(images, seed=0, limit=300)
    assert picked.shape == (300, 3)
    rows = [tuple(row) for row in images.tolist()]
    indices = [rows.index(tuple(row)) for row in picked.tolist()]
    assert indices == sorted(set(indices))  # distinct images, in their original order
    np.testing.assert_array_equal(fit_sample(images, seed=0, limit=300), picked)
    assert not np.array_equal(fit_sample(images, seed=1, limit=300), picked)


def test_score_statistics_are_fitted_on_the_subset_above_the_limit(
    fashion_mnist, monkeypatch
) -> None:
    normal = fashion_mnist.train.images[fashion_mnist.train.labels == 1]
    train_images, val_images = normal[:600], normal[600:700]
    monkeypatch.setattr(trainer.latent, "_FIT_IMAGES", 400)
    config = ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4, latent_components=2)
    train = TrainConfig(epochs=1, batch_size=50, progress=False, device="cpu")
    model = fit_vae(train_images, val_images, model_config=config, train=train).model
    subset = fit_sample(train_images, seed=train.seed, limit=400)
    mu = latent_means(model, subset, device=torch.device("cpu"))
    refit = fit_gaussian_mixture(mu, 2, seed=train.seed)
    np.testing.assert_allclose(model.latent.means.numpy(), refit[0], rtol=1e-5, atol=1e-5)
    terms = score_terms(model, subset, device=torch.device("cpu"))
    np.testing.assert_allclose(
        model.score_normalisation.numpy(), np.stack([terms.mean(0), terms.std(0)], 1), rtol=1e-4
    )


def test_fit_normalises_on_the_training_images(fashion_mnist) -> None:
    normal = fashion_mnist.train.images[fashion_mnist.train.labels == 7]
    train_images, val_images = normal[:600], normal[600:700]
    config = ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4, latent_components=2)
    train = TrainConfig(epochs=2, batch_size=50, progress=False, device="cpu")
    model = fit_vae(train_images, val_images, model_config=config, train=train).model
    mu = latent_means(model, train_images, device=torch.device("cpu"))
    refit = fit_gaussian_mixture(mu, 2, seed=train.seed)
    np.testing.assert_allclose(model.latent.means.numpy(), refit[0], rtol=1e-5, atol=1e-5)
    terms = score_terms(model, train_images, device=torch.device("cpu"))
    np.testing.assert_allclose(
        model.score_normalisation.numpy(), np.stack([terms.mean(0), terms.std(0)], 1), rtol=1e-4
    )
    # Centred on the training images: the fused score's mean there is 0.
    assert score_images(model, train_images, device=torch.device("cpu")).mean() == pytest.approx(
        0.0, abs=1e-3
    )
    # ... and not on the held-out images, which the threshold is calibrated on.
    assert not np.allclose(
        score_terms(model, val_images, device=torch.device("cpu")).mean(0)[0],
        terms.mean(0)[0],
        rtol=1e-4,
    )


def test_calibration_scores_are_the_detectors_scores_of_the_held_out_images(
    trained_bundle,
) -> None:
    """The threshold was set on the very score the detector computes (latent term included)."""
    bundle = load_bundle(trained_bundle)
    assert bundle.model.latent is not None and bundle.model.config.latent_weight > 0
    data = DataConfig.model_validate(bundle.metadata["data"])
    seed = bundle.metadata["train"]["seed"]
    split = split_normal(load_images(data, split="train"), data, seed=seed)
    # In fp32, the calibration's own precision.
    scores = Detector.from_bundle(trained_bundle, CPU_FP32).score(split.val).scores
    np.testing.assert_allclose(np.sort(scores), bundle.calibration.scores, rtol=1e-6, atol=1e-6)


def test_samples_come_from_the_fitted_density_and_look_more_like_the_class(
    trained_bundle, fashion_mnist, tmp_path
) -> None:
    """`vaewatch sample` draws from the density by default: its images are nearer the normal
    class's mean image than prior samples are (the σ-VAE's prior has regions no image maps to)."""
    from vaewatch.cli import main

    for name, extra in (("density", []), ("prior", ["--prior"])):
        argv = ["sample", "--model", str(trained_bundle), "--n", "300"]
        assert main([*argv, "--out", str(tmp_path / f"{name}.npz"), *extra]) == 0
    train = fashion_mnist.train
    class_mean = train.images[train.labels == 0].mean(0) / 255.0

    def distance(name: str) -> float:
        with np.load(tmp_path / f"{name}.npz") as arrays:
            images = arrays["x"].reshape(-1, 784) / 255.0
        return float(np.linalg.norm(images.mean(0) - class_mean))

    assert distance("density") < distance("prior")
