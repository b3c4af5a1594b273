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


# --- the self-supervised transform head (issue 22) -----------------------------------------------

HEADED = ModelConfig(kind="conv", conv_channels=(8, 16), latent_dim=5, transforms=4)


def test_rotations_are_quarter_turns_identity_first() -> None:
    x = torch.rand(3, IMAGE_PIXELS)
    turned = VAE(HEADED).rotations(x).reshape(4, 3, 28, 28)
    images = x.reshape(3, 28, 28)
    for r in range(4):
        assert torch.equal(turned[r], torch.rot90(images, r, dims=(1, 2))), r
    halves = VAE(HEADED.model_copy(update={"transforms": 2})).rotations(x).reshape(2, 3, 28, 28)
    assert torch.equal(halves[1], torch.rot90(images, 2, dims=(1, 2)))


def test_rotate_turns_each_image_by_its_own_rotation() -> None:
    x = torch.rand(3, IMAGE_PIXELS)
    images = x.reshape(3, 28, 28)
    for transforms in (2, 4):
        model = VAE(HEADED.model_copy(update={"transforms": transforms}))
        r = [transforms - 1, 0, 1]
        turns = [k * 4 // transforms for k in r]
        expected = torch.stack([torch.rot90(images[i], turns[i]) for i in range(3)])
        assert torch.equal(model.rotate(x, torch.tensor(r)), expected.reshape(3, -1)), transforms


def test_transform_log_probs_reuse_the_features_of_x() -> None:
    torch.manual_seed(0)
    model = VAE(HEADED).eval()
    x = torch.rand(6, IMAGE_PIXELS)
    log_probs = model.transform_log_probs(x)
    assert log_probs.shape == (6, 4)
    assert bool(torch.all(log_probs <= 0))
    torch.testing.assert_close(model.transform_log_probs(x, model.encoder(x)), log_probs)
    torch.testing.assert_close(model.transform_loss(x), -log_probs.sum(1))


def test_the_transform_term_is_the_fourth_score_term() -> None:
    torch.manual_seed(0)
    config = HEADED.model_copy(update={"transform_weight": 0.5, "transform_scored": 4})
    model = VAE(config).eval()
    x = torch.rand(4, IMAGE_PIXELS)
    terms = model.score_terms(x)
    assert terms.shape == (4, 4)
    torch.testing.assert_close(terms[:, 3], model.transform_loss(x))
    # Fewer scored rotations: the image itself, then its half turn.
    log_probs = model.transform_log_probs(x)
    for scored, columns in ((1, [0]), (2, [0, 2])):
        model.config = config.model_copy(update={"transform_scored": scored})
        torch.testing.assert_close(
            model.score_terms(x)[:, 3], -log_probs[:, columns].sum(1), rtol=1e-5, atol=1e-5
        )
    model.config = config
    model.set_score_normalisation(
        torch.tensor([100.0, 2.0, 40.0, 5.0]), torch.tensor([10.0, 1.0, 8.0, 0.5])
    )
    z = (terms - torch.tensor([100.0, 2.0, 40.0, 5.0])) / torch.tensor([10.0, 1.0, 8.0, 0.5])
    expected = z[:, 0] + z[:, 1] - z[:, 2] + 0.5 * z[:, 3]
    torch.testing.assert_close(model.score(x), expected)
    # Without a head the score keeps its three terms.
    assert VAE(HEADED.model_copy(update={"transforms": 0})).score_terms(x).shape == (4, 3)


def test_a_transform_weight_needs_a_head() -> None:
    with pytest.raises(ValueError, match="transforms"):
        ModelConfig(transforms=0, transform_weight=1.0)
    with pytest.raises(ValueError, match="transform_scored"):
        ModelConfig(transforms=2, transform_scored=4)


def test_sample_decodes_the_codes_sample_latent_draws() -> None:
    """One way to draw latent codes: `sample` is `sample_latent` decoded (explain uses it too)."""
    model = VAE(ModelConfig(kind="mlp", latent_dim=4)).eval()
    codes = model.sample_latent(5, generator=torch.Generator().manual_seed(3), temperature=0.5)
    images = model.sample(5, generator=torch.Generator().manual_seed(3))
    assert codes.shape == (5, 4) and images.shape == (5, 784)
    again = model.sample_latent(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(images, torch.sigmoid(model.decode(again)))
    torch.testing.assert_close(codes, again * 0.5)  # the prior's spread, scaled
