"""The latent density: its log-density against torch.distributions, the fused score's formula,
the complexity term, and sampling from the density rather than from the prior."""

from __future__ import annotations

import pytest
import torch
from torch import distributions as D

from detector.config import ModelConfig
from detector.latent import LatentDensity
from detector.loss import total_variation
from detector.model import VAE

MIXTURE = {
    "means": torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]]),
    "scale_tril": torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.0, 0.3, 0.5]],
            [[0.4, 0.0, 0.0], [0.0, 1.5, 0.0], [0.2, 0.1, 0.7]],
        ]
    ),
    "weights": torch.tensor([0.3, 0.7]),
}


@pytest.fixture
def density() -> LatentDensity:
    latent = LatentDensity(3, 2)
    latent.set_density(**MIXTURE)
    return latent


def test_negative_log_density_matches_torch_distributions(density: LatentDensity) -> None:
    reference = D.MixtureSameFamily(
        D.Categorical(probs=MIXTURE["weights"]),
        D.MultivariateNormal(MIXTURE["means"], scale_tril=MIXTURE["scale_tril"]),
    )
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(density.negative_log_density(z), -reference.log_prob(z))


def test_samples_follow_the_mixture(density: LatentDensity) -> None:
    z = density.sample(20000, generator=torch.Generator().manual_seed(0))
    second = z[:, 0] > 2.0  # the components are far apart along the first axis
    assert second.float().mean().item() == pytest.approx(0.7, abs=0.02)
    torch.testing.assert_close(z[second].mean(0), MIXTURE["means"][1], atol=0.05, rtol=0)
    tril = MIXTURE["scale_tril"][1]
    torch.testing.assert_close(torch.cov(z[second].T), tril @ tril.T, atol=0.08, rtol=0)


def test_same_seed_same_samples(density: LatentDensity) -> None:
    first = density.sample(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, density.sample(5, generator=torch.Generator().manual_seed(3)))


def test_a_mixture_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        LatentDensity(3, 1).set_density(**MIXTURE)


def _model(**changes) -> VAE:
    torch.manual_seed(0)
    # Issue 13's three-term score: no transform head unless a test asks for one.
    no_head = {"transforms": 0, "transform_weight": 0.0}
    config = ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=3, **no_head | changes)
    return VAE(config).eval()


def test_model_score_sums_the_normalised_terms_by_weight() -> None:
    model = _model(latent_components=2, latent_weight=2.0, complexity_weight=0.5)
    model.latent.set_density(**MIXTURE)
    model.set_score_normalisation(torch.tensor([500.0, 3.0, 40.0]), torch.tensor([50.0, 1.5, 8.0]))
    x = torch.rand(4, 784)
    mu = model.encode(x)[0]
    elbo = model.elbo_score(x)
    tv = total_variation(x)
    expected = (
        (elbo - 500.0) / 50.0
        + 2.0 * (model.latent.negative_log_density(mu) - 3.0) / 1.5
        - 0.5 * (tv - 40.0) / 8.0
    )
    torch.testing.assert_close(model.score(x), expected)


def test_total_variation_by_hand() -> None:
    image = torch.zeros(1, 28, 28)
    image[0, 10, 10] = 1.0  # one bright pixel: 4 edges of height 1
    image[0, 20, 5:8] = 0.5  # a bar of 3: 2 horizontal and 6 vertical edges of 0.5
    assert total_variation(image.reshape(1, 784)).item() == pytest.approx(4.0 + 4.0)


def test_total_variation_does_not_join_the_end_of_a_row_to_the_next_row() -> None:
    image = torch.zeros(1, 28, 28)
    image[0, 5, 27] = 1.0  # last pixel of a row: 1 horizontal and 2 vertical edges
    image[0, 7, 0] = 1.0  # first pixel of a row: the same
    assert total_variation(image.reshape(1, 784)).item() == pytest.approx(6.0)


def test_total_variation_is_the_sum_over_the_image_grid() -> None:
    x = torch.rand(64, 784)
    kept = x.clone()
    grid = x.view(64, 28, 28)
    expected = (grid[:, :, 1:] - grid[:, :, :-1]).abs().sum(dim=(1, 2)) + (
        grid[:, 1:, :] - grid[:, :-1, :]
    ).abs().sum(dim=(1, 2))
    torch.testing.assert_close(total_variation(x), expected)
    assert torch.equal(x, kept)  # the input is left alone


def test_normalisation_scales_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        _model().set_score_normalisation(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))


def test_zero_weights_or_an_old_config_score_the_plain_elbo() -> None:
    x = torch.rand(4, 784)
    plain = {"latent_weight": 0.0, "complexity_weight": 0.0}
    for model in (_model(**plain), _model(latent_components=0, **plain)):
        assert not hasattr(model, "score_normalisation")
        torch.testing.assert_close(model.score(x), model.elbo_score(x))


def test_a_latent_weight_without_a_density_is_refused() -> None:
    with pytest.raises(ValueError, match="latent_components"):
        ModelConfig(latent_components=0, latent_weight=1.0)


def test_model_samples_from_the_density_unless_asked_for_the_prior() -> None:
    model = _model(latent_components=2)
    far = {**MIXTURE, "means": MIXTURE["means"] + 50.0}
    model.latent.set_density(**far)
    decoded_z: list[torch.Tensor] = []
    hook = model.decoder.register_forward_pre_hook(lambda _m, args: decoded_z.append(args[0]))
    drawn = {}
    for prior in (False, True):
        images = model.sample(200, generator=torch.Generator().manual_seed(0), prior=prior)
        assert images.shape == (200, 784)
        drawn[prior] = decoded_z[-1]
    hook.remove()
    assert drawn[False].mean().item() > 40.0  # around the fitted means
    assert abs(drawn[True].mean().item()) < 0.3  # N(0, I)
