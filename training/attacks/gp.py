"""The generative poisoning (GP) attack of Yang et al. 2017 (arXiv 1703.01340), in torch.

An autoencoder G turns clean images into poisons; the poisons carry the reference code's label
rule (label + 1 mod K). G is rewarded by how much one training step of the target model on its
poisons *raises* that model's loss on clean samples. The reference estimates that change with a
second forward pass per poison and makes one poison per run; here the target's update is unrolled
once (a differentiable SGD step), so G gets an exact gradient of the loss change and, once trained,
poisons any number of images in one forward pass. The target model keeps training on clean data
mixed with the current poisons, as in the paper's alternating scheme, so G chases a moving victim.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.func import functional_call

from depois_stream.sim.attacks import Labeled, PoisonedStream, poison_count
from training.downstream import ClassifierConfig, one_thread, train_classifier
from training.torchutil import sample_index, seeded


class GPConfig(BaseModel):
    """Budget of the attack. ``recon_weight`` keeps poisons image-like: without it G drifts to
    saturated noise, which any detector (and any human) would reject on sight."""

    pretrain_steps: int = 300
    attack_steps: int = 300
    batch_size: int = 64
    inner_lr: float = 0.5
    gen_lr: float = 1e-3
    recon_weight: float = 5.0
    target: ClassifierConfig = ClassifierConfig(hidden=128, steps=400)


def make_autoencoder(input_dim: int, code: int = 64) -> nn.Sequential:
    """MLP autoencoder with a sigmoid output so poisons stay in [0, 1]."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(input_dim, 256), nn.ReLU(),
        nn.Linear(256, code), nn.ReLU(),
        nn.Linear(code, 256), nn.ReLU(),
        nn.Linear(256, input_dim), nn.Sigmoid(),
    )


def loss_change_objective(
    target: nn.Module, poisons: torch.Tensor, poison_labels: torch.Tensor,
    clean: torch.Tensor, clean_labels: torch.Tensor, inner_lr: float,
) -> torch.Tensor:
    """Clean loss of ``target`` after one SGD step on the poisons, differentiable in the poisons."""
    params = dict(target.named_parameters())
    inner = nn.functional.cross_entropy(functional_call(target, params, (poisons,)), poison_labels)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    stepped = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
    return nn.functional.cross_entropy(functional_call(target, stepped, (clean,)), clean_labels)


def train_generator(
    images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, config: GPConfig
) -> nn.Sequential:
    """Pre-train G as an identity autoencoder, then ascend the target's clean-loss change."""
    gen = seeded(seed)
    n = len(labels)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    generator = make_autoencoder(int(np.prod(images.shape[1:])))
    target = train_classifier(images, labels, num_classes, seed, config.target).train()
    g_opt = torch.optim.Adam(generator.parameters(), lr=config.gen_lr)
    t_opt = torch.optim.Adam(target.parameters(), lr=config.target.lr)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = sample_index(n, config.batch_size, gen)
        return x[idx], y[idx]

    with one_thread():
        for _ in range(config.pretrain_steps):
            xb, _ = batch()
            g_opt.zero_grad()
            nn.functional.mse_loss(generator(xb), xb.flatten(1)).backward()
            g_opt.step()
        for _ in range(config.attack_steps):
            _ascend(generator, target, g_opt, t_opt, batch(), batch(), num_classes, config)
    return generator.eval()


def _ascend(
    generator: nn.Module, target: nn.Module, g_opt: torch.optim.Optimizer, t_opt: torch.optim.Optimizer,
    poison_batch: tuple[torch.Tensor, torch.Tensor], clean_batch: tuple[torch.Tensor, torch.Tensor],
    num_classes: int, config: GPConfig,
) -> None:
    """One alternating step: G up the clean-loss change, then the target down on clean + poisons."""
    (xb, yb), (xv, yv) = poison_batch, clean_batch
    shifted = (yb + 1) % num_classes
    poisons = generator(xb)
    clean_loss = loss_change_objective(target, poisons, shifted, xv, yv, config.inner_lr)
    recon = nn.functional.mse_loss(poisons, xb.flatten(1))
    g_opt.zero_grad()
    (-clean_loss + config.recon_weight * recon).backward()
    g_opt.step()

    t_opt.zero_grad()
    mixed_x = torch.cat([xv, poisons.detach().view_as(xb)])
    mixed_y = torch.cat([yv, shifted])
    nn.functional.cross_entropy(target(mixed_x), mixed_y).backward()
    t_opt.step()


def gp_attack(
    data: Labeled, rate: float, seed: int, *, num_classes: int | None = None,
    config: GPConfig | None = None,
) -> PoisonedStream:
    """Replace round(rate * N) samples by G(image) labelled label + 1 mod K.

    The attacker trains G and its surrogate target on the stream's own clean images (what it
    would intercept), not on the defender's trusted pool.
    """
    config = config or GPConfig()
    k = num_classes or getattr(data, "num_classes", None) or int(np.max(data.labels)) + 1
    rng = np.random.default_rng(seed)
    n = len(data.labels)
    idx = np.sort(rng.choice(n, size=poison_count(n, rate), replace=False))
    generator = train_generator(data.images, data.labels, k, seed, config)
    images = np.array(data.images, dtype=np.float32, copy=True)
    labels = np.array(data.labels, dtype=np.int64, copy=True)
    if idx.size:
        with torch.no_grad():
            poisons = generator(torch.from_numpy(np.ascontiguousarray(images[idx])))
        images[idx] = poisons.view(-1, *images.shape[1:]).numpy()
        labels[idx] = (labels[idx] + 1) % k
    return PoisonedStream.from_slots(data, idx, "gp", images=images, labels=labels)
