"""A small convolutional variational autoencoder (Kingma & Welling, ICLR 2014) for images.

Encoder: ``len(channels)`` blocks ``Conv 4×4 stride 2 → BatchNorm → LeakyReLU(0.2)`` halving
the size each time, then two linear maps to the posterior's mean ``μ`` and log-variance
``log σ²`` (``latent`` dimensions). Decoder: a linear map back to the smallest feature map and
the mirrored blocks with ``ConvTranspose 4×4 stride 2``, ending in a sigmoid (pixels in
``[0, 1]``). Training minimises

    L = Σ_pixels (x̂ − x)² + β · KL(N(μ, σ²) ‖ N(0, I)),
    KL = −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)

per image, averaged over the batch (:func:`vae_loss`; the sum-of-squares reconstruction term is
the Gaussian likelihood up to a constant). :meth:`ConvVAE.sample` decodes ``z ~ N(0, I)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError


class ConvVAE(nn.Module):
    """A convolutional VAE for ``[B, C, H, W]`` images in ``[0, 1]``.

    Args:
        image_size: ``(height, width)``; both divisible by ``2 ** len(channels)``.
        channels: the encoder's widths, one per stride-2 block (the decoder mirrors them).
        latent: dimensions of ``z``.
        in_channels: image channels.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (64, 64),
        channels: Sequence[int] = (32, 64, 128, 256),
        latent: int = 128,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        height, width = (int(v) for v in image_size)
        factor = 2 ** len(channels)
        if not channels or height % factor or width % factor:
            raise ConfigError(
                f"vae: image size {height}x{width} must be divisible by 2^{len(channels)} "
                f"= {factor} (one halving per encoder block)"
            )
        self.image_size = (height, width)
        self.latent = int(latent)
        self.in_channels = int(in_channels)
        self.bottom = (int(channels[-1]), height // factor, width // factor)
        blocks: list[nn.Module] = []
        previous = in_channels
        for width_out in channels:
            blocks += [
                nn.Conv2d(previous, width_out, 4, stride=2, padding=1),
                nn.BatchNorm2d(width_out),
                nn.LeakyReLU(0.2),
            ]
            previous = width_out
        self.encoder = nn.Sequential(*blocks, nn.Flatten())
        flat = self.bottom[0] * self.bottom[1] * self.bottom[2]
        self.to_mu = nn.Linear(flat, self.latent)
        self.to_logvar = nn.Linear(flat, self.latent)
        self.from_latent = nn.Linear(self.latent, flat)
        ups: list[nn.Module] = []
        widths = [*reversed(channels)]
        for width_in, width_out in pairwise(widths):
            ups += [
                nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1),
                nn.BatchNorm2d(width_out),
                nn.LeakyReLU(0.2),
            ]
        ups += [nn.ConvTranspose2d(widths[-1], in_channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*ups)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ²)``, each ``[B, latent]``."""
        features = self.encoder(images)
        return self.to_mu(features), self.to_logvar(features)

    def decode(self, z: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` from ``z [B, latent]``."""
        return self.decoder(self.from_latent(z).view(-1, *self.bottom))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, μ, log σ²)`` with ``z = μ + σ ε`` (the reparameterisation)."""
        mu, logvar = self.encode(images)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """``count`` images decoded from ``z ~ N(0, I)`` (in eval mode; mode restored)."""
        was_training = self.training
        self.eval()
        device = self.to_mu.weight.device
        z = torch.randn(count, self.latent, generator=generator).to(device)
        images = self.decode(z)
        self.train(was_training)
        return images


def vae_loss(
    reconstruction: Tensor, images: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, reconstruction, KL)``, each the per-image value averaged over the batch:
    ``Σ (x̂ − x)²`` and ``−½ Σ (1 + log σ² − μ² − σ²)``; total = reconstruction + β · KL."""
    squared = (reconstruction - images).pow(2).flatten(1).sum(dim=1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
    return squared + beta * kl, squared, kl
