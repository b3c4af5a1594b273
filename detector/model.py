"""The variational autoencoder: an nn.Module that knows tensors and nothing else."""

from __future__ import annotations

import math

import torch
from torch import nn

from detector.config import IMAGE_PIXELS, IMAGE_SIDE, ModelConfig
from detector.latent import LatentDensity
from detector.loss import negative_elbo, total_variation


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [0, 1], the scale the VAE and its likelihoods expect.
    Converted on whatever device `images` is on, so uint8 crosses to a GPU (4x fewer bytes)."""
    return images.to(torch.float32).div_(255.0)


def _mlp_encoder(config: ModelConfig) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    width = IMAGE_PIXELS
    for hidden in config.mlp_hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
        width = hidden
    return nn.Sequential(*layers), width


def _mlp_decoder(config: ModelConfig) -> nn.Module:
    layers: list[nn.Module] = []
    width = config.latent_dim
    for hidden in reversed(config.mlp_hidden):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
        width = hidden
    layers.append(nn.Linear(width, IMAGE_PIXELS))
    return nn.Sequential(*layers)


def _conv_encoder(config: ModelConfig) -> tuple[nn.Module, int]:
    c1, c2 = config.conv_channels
    # 28 -> 14 -> 7 with stride-2, kernel-4, padding-1 convolutions.
    body = nn.Sequential(
        nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE)),
        nn.Conv2d(1, c1, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(config.dropout),
    )
    return body, c2 * 7 * 7


def _conv_decoder(config: ModelConfig) -> nn.Module:
    c1, c2 = config.conv_channels
    return nn.Sequential(
        nn.Linear(config.latent_dim, c2 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (c2, 7, 7)),
        nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),
        nn.Flatten(),
    )


class VAE(nn.Module):
    """Encoder q(z|x) = N(mu, diag(exp(logvar))), decoder p(x|z) given by logits over 784 pixels.

    Inputs are float tensors N x 784 in [0, 1]. The decoder returns logits: sigmoid(logits) is the
    Bernoulli probability or the Gaussian mean, depending on `config.likelihood`.

    With `config.latent_components` > 0 the model also carries `latent`, a density over the
    latent means of the training images (fitted after training, see trainer.latent), used by the
    score and for sampling. A fused score (a latent or complexity weight > 0) also carries
    `score_normalisation`, the centre and scale of each score term on the training images.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.kind == "mlp":
            self.encoder, features = _mlp_encoder(config)
            self.decoder = _mlp_decoder(config)
        else:
            self.encoder, features = _conv_encoder(config)
            self.decoder = _conv_decoder(config)
        self.fc_mu = nn.Linear(features, config.latent_dim)
        self.fc_logvar = nn.Linear(features, config.latent_dim)
        # One observation noise for all pixels; a buffer-like parameter when it is fixed.
        self.log_sigma = nn.Parameter(
            torch.tensor(math.log(config.sigma)),
            requires_grad=config.likelihood == "gaussian_learned",
        )
        self.latent: LatentDensity | None = (
            LatentDensity(config.latent_dim, config.latent_components)
            if config.latent_components
            else None
        )
        self.transform_head: nn.Linear | None = (
            nn.Linear(features, config.transforms) if config.transforms else None
        )
        if self.fused_score:
            # Rows: negative ELBO, -log q(mu), total variation (and, with a transform head, the
            # transform term); columns: centre, scale.
            self.register_buffer(
                "score_normalisation", torch.tensor([[0.0, 1.0]] * self.score_term_count)
            )

    @property
    def score_term_count(self) -> int:
        return 4 if self.transform_head is not None else 3

    @property
    def fused_score(self) -> bool:
        """Whether the score sums normalised terms (else it is the negative ELBO in nats)."""
        config = self.config
        return (
            config.latent_weight > 0.0
            or config.complexity_weight > 0.0
            or (config.transform_weight > 0.0)
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.fc_mu(features), self.fc_logvar(features)

    def rotations(self, x: torch.Tensor, which: range | None = None) -> torch.Tensor:
        """Rotations of N x 784 images, stacked: len(which)*N x 784. Rotation r turns by
        r * 360 / config.transforms degrees; `which` defaults to all of them, r = 0 first."""
        which = range(self.config.transforms) if which is None else which
        r = torch.as_tensor(list(which), device=x.device).repeat_interleave(len(x))
        return self.rotate(x.repeat(len(which), 1), r)

    def rotate(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Each of N x 784 images turned by its own rotation r[i]: r[i] * 360 / config.transforms
        degrees, the way of torch.rot90, as one gather of pixels."""
        turns = 4 // self.config.transforms  # quarter turns between successive rotations
        grid = torch.arange(IMAGE_PIXELS, device=x.device).view(IMAGE_SIDE, IMAGE_SIDE)
        sources = torch.stack(
            [torch.rot90(grid, k * turns).reshape(-1) for k in range(self.config.transforms)]
        )
        return x.gather(1, sources[r])

    def transform_log_probs(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None = None,
        *,
        which: range | None = None,
    ) -> torch.Tensor:
        """N x len(which): log p(r | rotation r of x) under the transform head, for each rotation
        r in `which` (default: all, r = 0 first). `features`: the encoder's features of x itself
        (rotation 0, which must come first in `which`), when already computed: saves a pass."""
        which = range(self.config.transforms) if which is None else which
        n, t = len(x), self.config.transforms
        if features is None:
            features = self.encoder(self.rotations(x, which))
        elif len(which) > 1:
            features = torch.cat([features, self.encoder(self.rotations(x, which[1:]))])
        logits = self.transform_head(features).float()
        log_probs = torch.log_softmax(logits, dim=1).reshape(len(which), n, t)
        picked = torch.as_tensor(list(which), device=log_probs.device)
        # [n, i] = log_probs[i, n, which[i]]
        return log_probs.gather(2, picked.view(-1, 1, 1).expand(-1, n, 1)).squeeze(2).T

    @property
    def scored_rotations(self) -> range:
        """The rotations the score's transform term uses (`config.transform_scored` of them,
        evenly spaced from the image itself)."""
        transforms = self.config.transforms
        return range(0, transforms, transforms // self.config.transform_scored)

    def transform_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per image: the head's cross-entropy summed over the rotations, in nats (>= 0)."""
        return -self.transform_log_probs(x).sum(dim=1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I), so gradients flow through mu and sigma."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
        """Per-image negative ELBO under this model's likelihood and beta."""
        return negative_elbo(
            x,
            logits.float(),
            mu.float(),
            logvar.float(),
            likelihood=self.config.likelihood,
            log_sigma=self.log_sigma,
            beta=self.config.beta,
        )

    def score_terms(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 raw terms of the score per image: negative ELBO at z = mu (nats), -log q(mu)
        under the latent density (0 without one) and the total variation of the image; with a
        transform head a fourth, the transform term: the head's cross-entropy on the scored
        rotations (`scored_rotations`; `transform_loss` is the same over all of them)."""
        features = self.encoder(x)
        mu, logvar = self.fc_mu(features), self.fc_logvar(features)
        elbo = self.loss(x, self.decode(mu), mu, logvar)
        latent = (
            self.latent.negative_log_density(mu) if self.latent is not None else elbo.new_zeros(())
        )
        terms = [elbo, latent, total_variation(x.float())]
        if self.transform_head is not None:
            scored = self.transform_log_probs(x, features, which=self.scored_rotations)
            terms.append(-scored.sum(dim=1))
        return torch.stack(torch.broadcast_tensors(*terms), 1)

    def elbo_score(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO at z = mu per image, in nats (deterministic: no sampling)."""
        mu, logvar = self.encode(x)
        return self.loss(x, self.decode(mu), mu, logvar)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic anomaly score per image, higher = more anomalous (docs/model.md).

        Plain: the negative ELBO at z = mu, in nats. Fused: each term z-normalised with its
        centre and scale on the training images, then
        elbo + latent_weight * (-log q(mu)) - complexity_weight * total_variation(x).
        """
        if not self.fused_score:
            return self.elbo_score(x)
        terms = self.score_terms(x)
        normalised = (terms - self.score_normalisation[:, 0]) / self.score_normalisation[:, 1]
        weights = [1.0, self.config.latent_weight, -self.config.complexity_weight]
        if self.transform_head is not None:
            weights.append(self.config.transform_weight)
        weights = normalised.new_tensor(weights)
        return normalised @ weights

    @torch.no_grad()
    def set_score_normalisation(self, centres: torch.Tensor, scales: torch.Tensor) -> None:
        """Install each term's centre and scale (one per score term; a term not in use may have
        scale 1)."""
        if not bool(torch.all(scales > 0)):
            raise ValueError(f"score normalisation scales must be positive, got {scales.tolist()}")
        self.score_normalisation.copy_(torch.stack([centres, scales], 1))

    @torch.no_grad()
    def sample_latent(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        prior: bool = False,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """n latent codes N x latent_dim on the model's device, from the density fitted to the
        training latents (or from the N(0, I) prior when `prior` is set or the model has none);
        `temperature` scales the spread (of each mixture component, or of the prior)."""
        device = self.fc_mu.weight.device
        if prior or self.latent is None:
            z = torch.randn(n, self.config.latent_dim, generator=generator) * temperature
            return z.to(device)
        return self.latent.sample(n, generator=generator, temperature=temperature)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, prior: bool = False
    ) -> torch.Tensor:
        """n images N x 784 in [0, 1], the decoder's mean at codes from `sample_latent`."""
        return torch.sigmoid(self.decode(self.sample_latent(n, generator=generator, prior=prior)))
