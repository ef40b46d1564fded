"""PNG diagnostics of a training run: loss curves and a grid of accepted synthetic samples.

They answer the two questions a user has after a run: did the GANs train (or collapse), and do
the samples that passed the authenticator look like their labels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.data import LabeledImages

PANELS = {
    "authenticator (cross-entropy)": ("authenticator",),
    "authenticated cGAN": ("cgan_d", "cgan_g", "cgan_aux"),
    "mimic WGAN-GP": ("critic", "wasserstein", "wgan_g"),
}


def smooth(values: list[float], window: int = 25) -> np.ndarray:
    """Moving average; GAN losses are too noisy step to step to read trends from."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_losses(losses: dict[str, list[float]], path: str | Path) -> Path:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.5))
    for ax, (title, keys) in zip(axes, PANELS.items()):
        for key in keys:
            if losses.get(key):
                ax.plot(smooth(losses[key]), label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_sample_grid(samples: LabeledImages, num_classes: int, path: str | Path, per_class: int = 8) -> Path:
    """One row per class; an empty row means no sample of that class passed the gate."""
    fig, axes = plt.subplots(num_classes, per_class, figsize=(per_class * 0.8, num_classes * 0.8), squeeze=False)
    for c in range(num_classes):
        images = samples.images[samples.labels == c][:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(images):
                ax.imshow(images[j].mean(axis=0), cmap="gray", vmin=0.0, vmax=1.0)
        axes[c, 0].text(-0.15, 0.5, str(c), transform=axes[c, 0].transAxes, ha="right", va="center")
    fig.suptitle("accepted synthetic samples (row = label)", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
