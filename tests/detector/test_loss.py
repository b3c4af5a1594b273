"""Loss terms against torch.distributions: KL in closed form and by Monte Carlo, and the NLLs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from detector.loss import kl_divergence as vae_kl
from detector.loss import negative_elbo, reconstruction_nll


def _posterior(n: int = 5, d: int = 4):
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(n, d, generator=generator, dtype=torch.float64)
    logvar = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return mu, logvar


def test_kl_matches_torch_closed_form() -> None:
    mu, logvar = _posterior()
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(vae_kl(mu, logvar), kl_divergence(q, p))


def test_kl_matches_monte_carlo() -> None:
    mu, logvar = _posterior(n=3, d=2)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.manual_seed(0)
    z = q.sample((200_000,))
    estimate = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(vae_kl(mu, logvar), estimate, rtol=0.03, atol=0.02)


def test_kl_is_zero_only_at_the_prior() -> None:
    zeros = torch.zeros(2, 3)
    assert torch.equal(vae_kl(zeros, zeros), torch.zeros(2))
    assert bool((vae_kl(zeros + 0.1, zeros) > 0).all())


def _images(n: int = 4):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 784, generator=generator, dtype=torch.float64)
    logits = torch.randn(n, 784, generator=generator, dtype=torch.float64)
    return x, logits


def test_bernoulli_nll_matches_torch() -> None:
    x, logits = _images()
    expected = -Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(1)
    got = reconstruction_nll(
        x, logits, likelihood="bernoulli", log_sigma=torch.tensor(0.0, dtype=torch.float64)
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("likelihood", ["gaussian_fixed", "gaussian_learned"])
@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_gaussian_nll_matches_torch(likelihood: str, sigma: float) -> None:
    x, logits = _images()
    log_sigma = torch.tensor(math.log(sigma), dtype=torch.float64)
    expected = -Normal(torch.sigmoid(logits), sigma).log_prob(x).sum(1)
    got = reconstruction_nll(x, logits, likelihood=likelihood, log_sigma=log_sigma)
    torch.testing.assert_close(got, expected)


def test_negative_elbo_weights_kl_by_beta() -> None:
    x, logits = _images(n=5)
    mu, logvar = _posterior(n=5, d=3)
    log_sigma = torch.tensor(math.log(0.1), dtype=torch.float64)
    kwargs = {"likelihood": "gaussian_learned", "log_sigma": log_sigma}
    one = negative_elbo(x, logits, mu, logvar, beta=1.0, **kwargs)
    three = negative_elbo(x, logits, mu, logvar, beta=3.0, **kwargs)
    torch.testing.assert_close(three - one, 2.0 * vae_kl(mu, logvar))


def test_learned_sigma_gets_a_gradient() -> None:
    x, logits = _images()
    log_sigma = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)
    reconstruction_nll(
        x, logits, likelihood="gaussian_learned", log_sigma=log_sigma
    ).sum().backward()
    assert log_sigma.grad is not None and log_sigma.grad != 0
