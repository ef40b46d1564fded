"""Stage 1 of De-Pois: grow the small trusted set with an authenticated conditional GAN.

The released De-Pois code has an authenticator that does nothing. Here it acts twice:

* during training its cross-entropy on generated samples is added to the generator loss
  (AC-GAN style), which pulls each class's samples towards what a classifier trained on trusted
  data recognises as that class;
* after training it is a gate: a synthetic sample is kept only if the authenticator gives its
  conditioning label probability >= ``threshold``. A generated "7" that looks like a "1" would
  teach the mimic model that such pairs are trustworthy, which is exactly the label-flip
  poison the defense must catch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.data import LabeledImages
from training.models import LATENT_DIM, Authenticator, Discriminator, Generator
from training.torchutil import adam, batched, sample_index, seeded, to_tensors


def train_authenticator(
    data: LabeledImages,
    num_classes: int,
    steps: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[Authenticator, list[float]]:
    """Fit the CNN classifier on trusted data; returns the model (eval mode) and its loss curve."""
    gen = seeded(seed)
    model = Authenticator(tuple(data.images.shape[1:]), num_classes).to(device)
    opt = adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = to_tensors(data, device)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="authenticator", disable=not progress, leave=False):
        idx = sample_index(len(y), batch_size, gen).to(device)
        loss = F.cross_entropy(model(_jitter(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


MAX_ROTATION_DEG = 10.0


def max_shift(height: int) -> int:
    """Largest random translation in pixels: 1 on 8x8 digits, 2 on 28x28 images (about 7 %)."""
    return max(1, round(height / 14))


def _jitter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels and rotate it by up to 10 degrees, each
    sample its own draw.

    The trusted set is small (about 250 digits by default) and the classifier trains for hundreds
    of epochs on it; small translations and rotations are label-preserving for digits and clothes
    alike and are the cheapest prior that keeps it from memorising the pool (the margin, kNN and
    Mahalanobis members all read this network)."""
    n, _, h, w = images.shape
    s = max_shift(h)
    angle = (torch.rand(n, generator=gen) * 2.0 - 1.0) * MAX_ROTATION_DEG * torch.pi / 180.0
    tx = torch.randint(-s, s + 1, (n,), generator=gen).float() * 2.0 / w
    ty = torch.randint(-s, s + 1, (n,), generator=gen).float() * 2.0 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def authentic_mask(log_p_label: np.ndarray, threshold: float) -> np.ndarray:
    """The gate: keep a sample iff p_auth(label | x) >= threshold."""
    return np.exp(log_p_label) >= threshold


@dataclass
class CganResult:
    generator: Generator
    history: dict[str, list[float]] = field(default_factory=dict)


def train_cgan(
    trusted: LabeledImages,
    authenticator: Authenticator,
    num_classes: int,
    steps: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    aux_weight: float = 1.0,
    progress: bool = False,
) -> CganResult:
    """Conditional GAN with the frozen authenticator's cross-entropy in the generator loss."""
    gen = seeded(seed)
    shape = tuple(trusted.images.shape[1:])
    g = Generator(shape, num_classes).to(device)
    d = Discriminator(shape, num_classes).to(device)
    opt_g = adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    authenticator.eval().requires_grad_(False)
    x, y = to_tensors(trusted, device)
    hist: dict[str, list[float]] = {"cgan_d": [], "cgan_g": [], "cgan_aux": []}
    for _ in tqdm(range(steps), desc="cGAN", disable=not progress, leave=False):
        idx = sample_index(len(y), batch_size, gen).to(device)
        real, labels = x[idx], y[idx]
        z = torch.randn(len(idx), LATENT_DIM, generator=gen).to(device)
        fake_labels = torch.randint(0, num_classes, (len(idx),), generator=gen).to(device)
        fake = g(z, fake_labels)

        logits_real, logits_fake = d(real, labels), d(fake.detach(), fake_labels)
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.full_like(logits_real, 0.9)  # one-sided label smoothing
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()

        adv = F.binary_cross_entropy_with_logits(d(fake, fake_labels), torch.ones_like(logits_fake))
        aux = F.cross_entropy(authenticator(fake), fake_labels)
        loss_g = adv + aux_weight * aux
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        for key, val in (("cgan_d", loss_d), ("cgan_g", adv), ("cgan_aux", aux)):
            hist[key].append(val.item())
    return CganResult(g.eval(), hist)


@dataclass(frozen=True)
class SynthesisResult:
    accepted: LabeledImages  # the first n that passed the gate
    attempted: int
    passed: int  # may exceed len(accepted): the last batch is generated whole

    @property
    def acceptance_rate(self) -> float:
        return self.passed / self.attempted if self.attempted else 0.0


@torch.no_grad()
def synthesize(
    generator: Generator,
    authenticator: Authenticator,
    n: int,
    num_classes: int,
    threshold: float,
    seed: int,
    device: torch.device,
    batch_size: int = 1024,
    max_attempts_factor: int = 10,
    progress: bool = False,
) -> SynthesisResult:
    """Generate class-balanced samples until ``n`` pass the gate (or the attempt budget runs out,
    in which case fewer are returned and the acceptance rate tells why)."""
    gen = seeded(seed)
    shape = generator.shape
    kept_x, kept_y, kept, attempted = [], [], 0, 0
    budget = max(n, 1) * max_attempts_factor
    bar = tqdm(total=n, desc="synthesise", disable=not progress, leave=False)
    while kept < n and attempted < budget:
        labels = (torch.arange(attempted, attempted + batch_size) % num_classes).to(device)
        z = torch.randn(batch_size, LATENT_DIM, generator=gen).to(device)
        images = generator(z, labels)
        log_p = authenticator.log_p_label(images, labels).cpu().numpy()
        mask = authentic_mask(log_p, threshold)
        attempted += batch_size
        kept_x.append(images.cpu().numpy()[mask])
        kept_y.append(labels.cpu().numpy()[mask])
        kept += int(mask.sum())
        bar.update(min(int(mask.sum()), n - bar.n))
    bar.close()
    images = np.concatenate(kept_x)[:n] if kept_x else np.zeros((0, *shape), np.float32)
    labels = np.concatenate(kept_y)[:n] if kept_y else np.zeros(0, np.int64)
    return SynthesisResult(
        LabeledImages(images.astype(np.float32), labels.astype(np.int64)), attempted, kept
    )


def authenticator_log_p(
    authenticator: Authenticator, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> np.ndarray:
    return batched(authenticator.log_p_label, images, labels, device)
