"""Shapes and determinism of both VAE kinds."""

from __future__ import annotations

import pytest
import torch

from detector.config import IMAGE_PIXELS, ModelConfig
from detector.model import VAE

KINDS = [
    ModelConfig(kind="mlp", mlp_hidden=(64, 32), latent_dim=5),
    ModelConfig(kind="conv", conv_channels=(8, 16), latent_dim=5),
]


@pytest.fixture(params=KINDS, ids=lambda c: c.kind)
def model(request) -> VAE:
    torch.manual_seed(0)
    return VAE(request.param).eval()


def test_forward_shapes(model: VAE) -> None:
    x = torch.rand(7, IMAGE_PIXELS)
    logits, mu, logvar = model(x)
    assert logits.shape == (7, IMAGE_PIXELS)
    assert mu.shape == logvar.shape == (7, 5)
    assert model.loss(x, logits, mu, logvar).shape == (7,)


def test_score_is_deterministic_and_per_image(model: VAE) -> None:
    x = torch.rand(6, IMAGE_PIXELS)
    first, second = model.score(x), model.score(x)
    assert first.shape == (6,)
    assert torch.equal(first, second)
    # One image's score does not depend on the rest of the batch.
    assert torch.allclose(model.score(x[2:3]), first[2:3], rtol=1e-5, atol=1e-4)


def test_forward_samples_z(model: VAE) -> None:
    torch.manual_seed(1)
    x = torch.rand(4, IMAGE_PIXELS)
    a, _, _ = model(x)
    b, _, _ = model(x)
    assert not torch.equal(a, b)


def test_sample_shape_and_range(model: VAE) -> None:
    images = model.sample(9, generator=torch.Generator().manual_seed(0))
    assert images.shape == (9, IMAGE_PIXELS)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_mlp_widths_follow_config() -> None:
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(400, 400), latent_dim=20))
    linear = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 400), (400, 400)]
    assert model.fc_mu.out_features == 20


def test_sigma_is_learned_only_for_gaussian_learned() -> None:
    assert VAE(ModelConfig(likelihood="gaussian_learned")).log_sigma.requires_grad
    assert not VAE(ModelConfig(likelihood="gaussian_fixed")).log_sigma.requires_grad
