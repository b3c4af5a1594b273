"""The self-supervised transform head (issue 22) trained on real Fashion-MNIST: it learns to tell
an image's rotations apart, its term is larger on other classes, and the score statistics cover
its term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.config import IMAGE_PIXELS, ModelConfig
from detector.model import VAE
from trainer.config import TrainConfig
from trainer.evaluate import auroc
from trainer.fit import fit_vae, transform_head_loss
from trainer.latent import score_terms

HEADED = ModelConfig(
    kind="conv", conv_channels=(8, 16), latent_dim=4, latent_components=2,
    transforms=4, transform_weight=1.0,
)  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def headed(fashion_mnist):
    """Trained with the default `transform_rotations` (1: one drawn rotation per image and
    step besides the image itself)."""
    train = fashion_mnist.train
    shirts = train.images[train.labels == 0]
    result = fit_vae(
        shirts[:1200],
        shirts[1200:1400],
        model_config=HEADED,
        train=TrainConfig(epochs=3, batch_size=64, progress=False, device="cpu"),
    )
    return result.model, shirts[1400:1800]


def test_the_head_tells_rotations_apart(headed) -> None:
    model, held_out = headed
    x = torch.from_numpy(held_out).float() / 255.0
    with torch.inference_mode():
        log_probs = model.transform_log_probs(x)
    # Chance is 1/4 per rotation; after three short epochs the head already gives the right
    # rotation of a held-out image about 0.6 (the default model's, 15 epochs: more).
    assert float(log_probs.exp().mean()) > 0.45


def test_the_transform_term_is_larger_on_other_classes(headed, fashion_mnist) -> None:
    model, held_out = headed
    test = fashion_mnist.test
    others = test.images[np.isin(test.labels, (5, 7, 8, 9))][:400]  # sandals, sneakers, bags, boots
    normal_terms = score_terms(model, held_out, device=CPU)
    other_terms = score_terms(model, others, device=CPU)
    labels = np.r_[np.zeros(len(held_out), bool), np.ones(len(others), bool)]
    assert auroc(labels, np.r_[normal_terms[:, 3], other_terms[:, 3]]) > 0.7


def test_score_statistics_include_the_transform_term(headed) -> None:
    model, _ = headed
    centre, scale = model.score_normalisation[3]
    assert model.score_normalisation.shape == (4, 2)
    assert float(centre) >= 0.0 and float(scale) > 0.0


@pytest.mark.parametrize("rotations", [1, 2])
def test_the_drawn_rotations_estimate_the_loss_over_all_of_them(rotations: int) -> None:
    torch.manual_seed(0)
    model = VAE(HEADED).eval()
    # A head that ignores the image and gives each rotation its own cross-entropy (about 6.0,
    # 4.0, 2.1 and 0.2 nats): a draw that favours one rotation, or a wrong weight, moves the mean.
    with torch.no_grad():
        model.transform_head.weight.zero_()
        model.transform_head.bias.copy_(torch.tensor([0.0, 2.0, 4.0, 6.0]))
    x = torch.rand(1, IMAGE_PIXELS).repeat(20_000, 1)
    with torch.inference_mode():
        features = model.encoder(x)
        every = transform_head_loss(model, x[:1], features[:1], rotations=3)
        drawn = transform_head_loss(model, x, features, rotations=rotations)
    torch.testing.assert_close(every, model.transform_loss(x[:1]))
    assert float(drawn.std()) > 1.0  # it does draw
    torch.testing.assert_close(drawn.mean(), every[0], rtol=0.01, atol=0.0)
