"""Stage 2 of De-Pois: the mimic model, the critic of a conditional WGAN-GP.

A Wasserstein critic trained to separate real (sample, label) pairs from a generator's pairs ends
up scoring how well a pair fits the clean joint distribution, which is what a poison detector
needs; unlike a discriminator with a sigmoid it does not saturate, so its scores stay comparable
across samples and can be thresholded. Gradient penalty 10 and five critic updates per
generator update are the WGAN-GP defaults the paper uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from training.data import LabeledImages
from training.models import LATENT_DIM, Critic, Generator
from training.torchutil import adam, sample_index, seeded, to_tensors

GP_WEIGHT = 10.0
CRITIC_ITERS = 5


def gradient_penalty(
    critic: Critic, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """(||grad_x critic(x_hat, y)|| - 1)^2 on random interpolates of real and fake with the same label."""
    eps = torch.rand(len(real), 1, 1, 1, generator=gen).to(real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad = torch.autograd.grad(critic(x_hat, labels).sum(), x_hat, create_graph=True)[0]
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


@dataclass
class MimicResult:
    critic: Critic
    history: dict[str, list[float]] = field(default_factory=dict)


def train_mimic(
    data: LabeledImages,
    num_classes: int,
    steps: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> MimicResult:
    """Train the WGAN-GP for ``steps`` generator updates and return its critic (eval mode).

    The critic's loss is E[critic(fake)] - E[critic(real)] + GP, so real pairs score high: the
    score is "higher = more trustworthy" without a sign flip anywhere downstream."""
    gen = seeded(seed)
    shape = tuple(data.images.shape[1:])
    g = Generator(shape, num_classes).to(device)
    c = Critic(shape, num_classes).to(device)
    opt_g = adam(g.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_c = adam(c.parameters(), lr=1e-4, betas=(0.5, 0.9))
    x, y = to_tensors(data, device)
    hist: dict[str, list[float]] = {"critic": [], "wasserstein": [], "wgan_g": []}
    for _ in tqdm(range(steps), desc="mimic (WGAN-GP)", disable=not progress, leave=False):
        for _ in range(CRITIC_ITERS):
            idx = sample_index(len(y), batch_size, gen).to(device)
            real, labels = x[idx], y[idx]
            z = torch.randn(len(idx), LATENT_DIM, generator=gen).to(device)
            with torch.no_grad():
                fake = g(z, labels)
            w_dist = c(real, labels).mean() - c(fake, labels).mean()
            loss_c = -w_dist + GP_WEIGHT * gradient_penalty(c, real, fake, labels, gen)
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
        z = torch.randn(batch_size, LATENT_DIM, generator=gen).to(device)
        fake_labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        c.requires_grad_(False)  # the generator step needs no critic weight gradients
        loss_g = -c(g(z, fake_labels), fake_labels).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        c.requires_grad_(True)
        hist["critic"].append(loss_c.item())
        hist["wasserstein"].append(w_dist.item())
        hist["wgan_g"].append(loss_g.item())
    return MimicResult(c.eval(), hist)
