"""The authenticator: the classifier that the margin, kNN and Mahalanobis members all read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.augment import train_authenticator
from training.config import DEFAULT_STEPS, FitConfig
from training.data import load_dataset, trusted_split

pytestmark = pytest.mark.slow


def test_authenticator_reaches_its_accuracy_within_the_default_digits_budget() -> None:
    """On the embedded digits (about 200 trusted images, 800 steps) the network must classify
    unseen test digits at >= 94 % (measured 95.9-96.3 % over three seeds). The margin, kNN and
    Mahalanobis members all read this network: a change to its optimiser, augmentation or step
    budget that costs accuracy costs every label-consistency member with it. (Checked to fail
    with the learning rate cut 100-fold.)"""
    defaults = FitConfig(dataset="digits")
    splits = load_dataset("digits", None, download=False)
    trusted = trusted_split(splits.train, defaults.trusted_fraction, defaults.calibration_fraction, 0).trusted_train
    model, losses = train_authenticator(trusted, 10, DEFAULT_STEPS["digits"].auth_steps, defaults.batch_size,
                                        seed=100, device=torch.device("cpu"))
    with torch.no_grad():
        predicted = model(torch.from_numpy(splits.test.images)).argmax(1).numpy()
    accuracy = float(np.mean(predicted == splits.test.labels))
    assert accuracy >= 0.94, f"authenticator test accuracy {accuracy:.3f}"
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50]), "training loss did not fall"
    assert not model.training, "the trainer returns the model in eval mode (dropout off)"
