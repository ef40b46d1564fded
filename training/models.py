"""The four networks of De-Pois, sized after the paper and its released code.

Label conditioning follows the paper's cGAN: a learned label embedding is multiplied element-wise
with the input (noise for the generator, the flattened image for the discriminator and the
critic), so the same weights score the pair (sample, label) rather than the sample alone.

All networks take images in [0, 1]: the generator's tanh output is rescaled inside ``forward``
so callers never juggle two ranges.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LATENT_DIM = 100


def _flat(shape: tuple[int, int, int]) -> int:
    return math.prod(shape)


class Generator(nn.Module):
    """Conditional MLP generator 256-512-1024 with BatchNorm and a tanh output (the paper's)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, latent_dim: int = LATENT_DIM):
        super().__init__()
        self.shape, self.latent_dim = shape, latent_dim
        self.embed = nn.Embedding(num_classes, latent_dim)
        layers: list[nn.Module] = []
        width = latent_dim
        for out in (256, 512, 1024):
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2), nn.BatchNorm1d(out, momentum=0.2)]
            width = out
        layers += [nn.Linear(width, _flat(shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.net(z * self.embed(labels))
        return (x.view(-1, *self.shape) + 1.0) / 2.0


class Discriminator(nn.Module):
    """The cGAN discriminator (512-512-512 with dropout, as in the released code); outputs logits."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        flat = _flat(shape)
        self.embed = nn.Embedding(num_classes, flat)
        self.net = nn.Sequential(
            nn.Linear(flat, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Dropout(0.4),
            nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Dropout(0.4),
            nn.Linear(512, 1),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net((images.flatten(1) * 2.0 - 1.0) * self.embed(labels)).squeeze(1)


class Critic(nn.Module):
    """The mimic model: conditional WGAN-GP critic, label-embedding x image -> 1024-128-16-1.

    No normalisation layers: the gradient penalty is defined per sample, and BatchNorm would couple
    the samples of a batch (and make a streamed sample's score depend on its neighbours)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        flat = _flat(shape)
        self.embed = nn.Embedding(num_classes, flat)
        layers: list[nn.Module] = []
        width = flat
        for out in (1024, 128, 16):
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net((images.flatten(1) * 2.0 - 1.0) * self.embed(labels)).squeeze(1)


class Authenticator(nn.Module):
    """Small CNN classifier p(label | image) trained on trusted data only.

    Two conv blocks with 2x2 pooling and a linear head sized from the input, so the same class
    serves 8x8 digits (-> 2x2 maps) and 28x28 MNIST (-> 7x7 maps) without adaptive pooling, which
    keeps the ONNX graph static apart from the batch dimension."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after the 128-unit ReLU): the space of the kNN and Mahalanobis
        evidence members."""
        return self.head[:4](self.features(images))

    def logits_and_embedding(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(images)
        return self.head[4](e), e

    def log_p_label(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(images), dim=1).gather(1, labels[:, None]).squeeze(1)
