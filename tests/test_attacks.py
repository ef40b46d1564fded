"""Attacks poison exactly the requested share, keep the stream's shape, and repeat under a seed."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from depois_stream.sim.attacks import (
    PoisonedStream,
    apply_trigger,
    backdoor_patch,
    ood_injection,
    random_flip,
    resize_area,
    systematic_shift,
    targeted_flip,
    trigger_size,
)
from training.attacks import (
    ATTACKS,
    HELDOUT2_ATTACKS,
    HELDOUT3_ATTACKS,
    HELDOUT4_ATTACKS,
    HELDOUT_ATTACKS,
    SUITES,
    blended_backdoor,
    hard_flip,
    low_contrast_injection,
    mosaic_injection,
    noisy_flip,
    sig_backdoor,
    CollisionConfig,
    GPConfig,
    blend_flip,
    cutmix_flip,
    feature_collision,
    gp_attack,
    noise_injection,
    shape_injection,
    transform_injection,
)
from training.attacks.heldout2 import elastic_flip, patch_shuffle_injection, warp_backdoor
from training.attacks.heldout3 import additive_backdoor, blur_flip, faint_patch_backdoor
from training.attacks.heldout4 import (
    cutout_flip,
    label_consistent_backdoor,
    nudged_flip,
    plus_side,
    plus_trigger,
    shift,
    shift_pixels,
    shifted_flip,
    sparse_pixels,
    sparse_trigger,
    sparse_trigger_backdoor,
)
from training.downstream import ClassifierConfig


@dataclass(frozen=True)
class Data:
    images: np.ndarray
    labels: np.ndarray
    num_classes: int = 10


@pytest.fixture(scope="module")
def digits() -> Data:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Data((bunch.images[:400] / 16.0).astype(np.float32)[:, None], bunch.target[:400].astype(np.int64))


def changed(data: Data, s: PoisonedStream) -> np.ndarray:
    img = np.any(s.images != data.images, axis=(1, 2, 3))
    return img | (s.labels != data.labels)


NUMPY_ATTACKS = {
    "random_flip": random_flip,
    "systematic_shift": systematic_shift,
    "targeted_flip": targeted_flip,
    "backdoor": backdoor_patch,
    "ood_injection": ood_injection,
    "noise_injection": noise_injection,
    "shape_injection": shape_injection,
    "transform_injection": transform_injection,
    "blend_flip": blend_flip,
    "cutmix_flip": cutmix_flip,
    # the held-out suite obeys the same contract
    "hard_flip": hard_flip,
    "noisy_flip": noisy_flip,
    "sig_backdoor": sig_backdoor,
    "blended_backdoor": blended_backdoor,
    "low_contrast_injection": low_contrast_injection,
    "mosaic_injection": mosaic_injection,
    # and so does the second one
    "warp_backdoor": warp_backdoor,
    "elastic_flip": elastic_flip,
    "patch_shuffle_injection": patch_shuffle_injection,
    # and the third
    "additive_backdoor": additive_backdoor,
    "faint_patch_backdoor": faint_patch_backdoor,
    "blur_flip": blur_flip,
    # and the fourth
    "label_consistent_backdoor": label_consistent_backdoor,
    "nudged_flip": nudged_flip,
    "shifted_flip": shifted_flip,
    "sparse_trigger_backdoor": sparse_trigger_backdoor,
    "cutout_flip": cutout_flip,
}


@pytest.mark.parametrize("name", sorted(NUMPY_ATTACKS))
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_numpy_attack_changes_exactly_the_poisoned_slots(digits: Data, name: str, rate: float) -> None:
    s = NUMPY_ATTACKS[name](digits, rate, seed=3)
    assert s.images.shape == digits.images.shape and s.images.dtype == np.float32
    assert s.labels.shape == digits.labels.shape and s.labels.dtype == np.int64
    assert s.is_poison.sum() == round(rate * len(digits.labels))
    np.testing.assert_array_equal(changed(digits, s), s.is_poison)
    assert s.images.min() >= 0.0 and s.images.max() <= 1.0
    assert s.labels.min() >= 0 and s.labels.max() < 10


@pytest.mark.parametrize("name", sorted(NUMPY_ATTACKS))
def test_numpy_attack_is_deterministic_and_leaves_input_alone(digits: Data, name: str) -> None:
    before = digits.images.copy(), digits.labels.copy()
    a, b = NUMPY_ATTACKS[name](digits, 0.2, seed=7), NUMPY_ATTACKS[name](digits, 0.2, seed=7)
    other = NUMPY_ATTACKS[name](digits, 0.2, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.is_poison, other.is_poison)
    np.testing.assert_array_equal(digits.images, before[0])
    np.testing.assert_array_equal(digits.labels, before[1])


def test_label_rules(digits: Data) -> None:
    shift = systematic_shift(digits, 0.3, seed=0)
    np.testing.assert_array_equal(shift.labels[shift.is_poison], (digits.labels[shift.is_poison] + 1) % 10)
    flip = random_flip(digits, 0.3, seed=0)
    assert np.all(flip.labels[flip.is_poison] != digits.labels[flip.is_poison])
    assert len(np.unique(flip.labels[flip.is_poison] - digits.labels[flip.is_poison])) > 2


def test_targeted_flip_teaches_source_as_target(digits: Data) -> None:
    # 40 ones in 400 samples: rate 0.3 flips all of them, then injects 80 copies of ones.
    s = targeted_flip(digits, 0.3, seed=0, source=1, target=7)
    assert np.all(s.labels[s.is_poison] == 7)
    assert np.all(s.labels[digits.labels == 1] == 7)
    ones = {im.tobytes() for im in digits.images[digits.labels == 1]}
    assert all(im.tobytes() in ones for im in s.images[s.is_poison])


def test_backdoor_stamps_trigger_on_other_classes(digits: Data) -> None:
    s = backdoor_patch(digits, 0.2, seed=0, target=0)
    assert np.all(digits.labels[s.is_poison] != 0) and np.all(s.labels[s.is_poison] == 0)
    np.testing.assert_array_equal(s.images[s.is_poison], apply_trigger(digits.images[s.is_poison]))
    assert trigger_size(8) == 2 and trigger_size(28) == 4


def test_ood_injection_uses_donor_resized_or_noise(digits: Data) -> None:
    donor = np.zeros((5, 1, 28, 28), np.float32)
    donor[:, :, 10:18, 10:18] = 1.0  # a centred square -> a 2x2 bright centre at 8x8
    s = ood_injection(digits, 0.1, seed=0, donor=donor)
    np.testing.assert_allclose(s.images[s.is_poison], resize_area(donor[:1], 8, 8).repeat(40, 0))
    noise = ood_injection(digits, 0.1, seed=0)
    assert noise.images[noise.is_poison].std() > 0.2


def test_resize_area_keeps_mean_intensity() -> None:
    img = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(resize_area(img, 8, 8).mean(axis=(1, 2, 3)), img.mean(axis=(1, 2, 3)), rtol=1e-5)


def test_runtime_attacks_do_not_import_torch() -> None:
    code = "import sys, depois_stream.sim.attacks; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_names_every_attack_and_one_clean_label() -> None:
    held_out = (HELDOUT_ATTACKS, HELDOUT2_ATTACKS, HELDOUT3_ATTACKS, HELDOUT4_ATTACKS)
    every = set(ATTACKS).union(*held_out)
    assert set(NUMPY_ATTACKS) | {"gp", "feature_collision"} == every
    # the suites are disjoint
    assert len(every) == len(ATTACKS) + sum(len(suite) for suite in held_out)
    assert [n for n, spec in ATTACKS.items() if spec.clean_label] == ["feature_collision"]
    assert not any(spec.clean_label for spec in HELDOUT_ATTACKS.values())
    assert not any(spec.clean_label for spec in HELDOUT2_ATTACKS.values())
    assert not any(spec.clean_label for spec in HELDOUT3_ATTACKS.values())
    # the label-consistent backdoor keeps its labels but plants a visible trigger: it counts as a case
    assert not any(spec.clean_label for spec in HELDOUT4_ATTACKS.values())
    assert SUITES == {"development": tuple(ATTACKS), "heldout": tuple(HELDOUT_ATTACKS),
                      "heldout2": tuple(HELDOUT2_ATTACKS), "heldout3": tuple(HELDOUT3_ATTACKS),
                      "heldout4": tuple(HELDOUT4_ATTACKS)}


def test_hard_flip_moves_to_the_nearest_other_class_mean(digits: Data) -> None:
    s = hard_flip(digits, 0.3, seed=0)
    flat = digits.images.reshape(len(digits.labels), -1)
    means = np.stack([flat[digits.labels == c].mean(axis=0) for c in range(10)])
    for i in np.flatnonzero(s.is_poison):
        d = ((means - flat[i]) ** 2).sum(axis=1)
        d[digits.labels[i]] = np.inf
        assert s.labels[i] == d.argmin() != digits.labels[i]
    np.testing.assert_array_equal(s.images, digits.images)  # a pure label attack


def test_noisy_flip_changes_label_and_pixels(digits: Data) -> None:
    s = noisy_flip(digits, 0.3, seed=0)
    assert np.all(s.labels[s.is_poison] != digits.labels[s.is_poison])
    assert len(np.unique(s.labels[s.is_poison] - digits.labels[s.is_poison])) > 2
    moved = np.abs(s.images[s.is_poison] - digits.images[s.is_poison]).mean(axis=(1, 2, 3))
    assert np.all(moved > 0.03)


def backdoor_poisons(digits: Data, attack, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Run a dirty-label backdoor, check it took images of other classes to ``target``, and
    return its poisons' images before and after the trigger."""
    s = attack(digits, 0.2, seed=0)
    assert s.target_label == target
    assert np.all(digits.labels[s.is_poison] != target) and np.all(s.labels[s.is_poison] == target)
    return digits.images[s.is_poison], s.images[s.is_poison]


@pytest.mark.parametrize("attack", [sig_backdoor, blended_backdoor])
def test_dirty_label_backdoors_carry_one_trigger_to_the_target(digits: Data, attack) -> None:
    x, y = backdoor_poisons(digits, attack, 0)
    if attack is blended_backdoor:
        trigger = (y - 0.8 * x) / 0.2  # no clipping: a convex mix stays in [0, 1]
    else:
        inside = (x > 0.25) & (x < 0.75)  # the 0.2 sinusoid cannot clip there
        trigger = np.where(inside, y - x, np.nan)
    spread = np.fmax.reduce(trigger, axis=0) - np.fmin.reduce(trigger, axis=0)  # one pattern on every poison
    assert np.nanmax(spread) < 1e-5 and np.nanmax(np.abs(trigger)) > 0.1


def test_low_contrast_injection_squashes_the_range(digits: Data) -> None:
    s = low_contrast_injection(digits, 0.2, seed=0)
    poisons = s.images[s.is_poison]
    assert poisons.min() >= 0.2 - 1e-6 and poisons.max() <= 0.9 + 1e-6
    span = poisons.max(axis=(1, 2, 3)) - poisons.min(axis=(1, 2, 3))
    assert np.all(span <= 0.5 + 1e-6) and np.all(span >= 0.25 * 0.9)


def test_mosaic_keeps_its_own_quadrant_and_borrows_three_of_other_classes(digits: Data) -> None:
    s = mosaic_injection(digits, 0.2, seed=0)
    idx = np.flatnonzero(s.is_poison)
    np.testing.assert_array_equal(s.images[idx, :, :4, :4], digits.images[idx, :, :4, :4])
    for quadrant in ((slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))):
        for i in idx[:20]:
            piece = s.images[i, :, quadrant[0], quadrant[1]]
            donors = np.flatnonzero(np.all(digits.images[:, :, quadrant[0], quadrant[1]] == piece, axis=(1, 2, 3)))
            assert np.any(digits.labels[donors] != digits.labels[i])


SMALL_NET = ClassifierConfig(hidden=32, steps=60)


def test_gp_attack_poisons_exact_share_with_shifted_labels(digits: Data) -> None:
    cfg = GPConfig(pretrain_steps=80, attack_steps=40, target=SMALL_NET)
    a, b = gp_attack(digits, 0.2, seed=1, config=cfg), gp_attack(digits, 0.2, seed=1, config=cfg)
    assert a.is_poison.sum() == 80 and a.images.dtype == np.float32 and a.images.shape == digits.images.shape
    np.testing.assert_array_equal(a.labels[a.is_poison], (digits.labels[a.is_poison] + 1) % 10)
    np.testing.assert_array_equal(a.images[~a.is_poison], digits.images[~a.is_poison])
    np.testing.assert_array_equal(a.images, b.images)
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0


def test_feature_collision_keeps_labels_and_epsilon(digits: Data) -> None:
    cfg = CollisionConfig(epsilon=0.1, steps=30, surrogate=SMALL_NET)
    s = feature_collision(digits, 0.1, seed=2, config=cfg)
    np.testing.assert_array_equal(s.labels, digits.labels)
    assert s.is_poison.sum() == 40 and np.all(digits.labels[s.is_poison] != cfg.target_class)
    delta = np.abs(s.images - digits.images)
    assert delta.max() <= 0.1 + 1e-6 and np.all(delta[s.is_poison].max(axis=(1, 2, 3)) > 0)
    assert np.all(delta[~s.is_poison] == 0)


def test_warp_backdoor_warps_other_classes_with_one_field_to_the_last_class(digits: Data) -> None:
    from training.attacks.heldout2 import warp, warp_field

    s = warp_backdoor(digits, 0.2, seed=0)
    assert s.target_label == 9
    assert np.all(digits.labels[s.is_poison] != 9) and np.all(s.labels[s.is_poison] == 9)
    dy, dx = warp_field(8, 8)
    assert abs(float(np.mean(np.hypot(dy, dx))) - 1.0) < 1e-6  # 1 px on average on 8x8
    np.testing.assert_allclose(s.images[s.is_poison], warp(digits.images[s.is_poison], dy, dx), atol=1e-6)
    identity = warp(digits.images[:5], np.zeros((8, 8)), np.zeros((8, 8)))
    np.testing.assert_array_equal(identity, digits.images[:5])


def test_elastic_flip_distorts_each_image_and_changes_its_label(digits: Data) -> None:
    s = elastic_flip(digits, 0.2, seed=0)
    assert np.all(s.labels[s.is_poison] != digits.labels[s.is_poison])
    moved = np.abs(s.images[s.is_poison] - digits.images[s.is_poison]).mean(axis=(1, 2, 3))
    assert np.all(moved > 0.0) and float(np.median(moved)) < 0.2  # distorted, still close to the image


def test_patch_shuffle_permutes_the_images_own_tiles(digits: Data) -> None:
    def tiles(image: np.ndarray) -> list[bytes]:  # the 16 2x2 tiles of an 8x8 image, as a multiset
        return sorted(image[0, r:r + 2, c:c + 2].tobytes() for r in range(0, 8, 2) for c in range(0, 8, 2))

    s = patch_shuffle_injection(digits, 0.2, seed=0)
    for i in np.flatnonzero(s.is_poison)[:30]:
        assert tiles(s.images[i]) == tiles(digits.images[i])
        assert not np.array_equal(s.images[i], digits.images[i])


def test_patch_shuffle_poisons_every_slot_even_when_the_tiles_are_alike() -> None:
    """A blank image's tiles are all alike: no permutation changes it, so the slot would be marked
    poisoned while the stream kept the clean sample (found in review; the fix gives it a wrong
    label). Images smaller than the 4x4 grid are refused with a message, not silently kept."""
    labels = np.arange(40) % 10
    blank = Data(np.zeros((40, 1, 8, 8), np.float32), labels)
    s = patch_shuffle_injection(blank, 1.0, seed=0)
    np.testing.assert_array_equal(changed(blank, s), s.is_poison)
    assert s.is_poison.all()
    with pytest.raises(ValueError, match="at least 4x4"):
        patch_shuffle_injection(Data(np.zeros((10, 1, 3, 3), np.float32), labels[:10]), 0.5, seed=0)


@pytest.mark.parametrize("attack", [additive_backdoor, faint_patch_backdoor])
def test_faint_backdoors_carry_one_faint_trigger_to_class_1(digits: Data, attack) -> None:
    x, y = backdoor_poisons(digits, attack, 1)
    delta = y - x
    assert np.abs(delta).max() <= 0.35 + 1e-6  # faint: never more than the patch's 35 % blend
    if attack is additive_backdoor:
        inside = (x > 0.1) & (x < 0.9)  # the +-0.08 pattern cannot clip there
        sign = np.where(inside, np.sign(delta), np.nan)
        assert np.allclose(np.abs(delta[inside]), 0.08, atol=1e-6)
        spread = np.fmax.reduce(sign, axis=0) - np.fmin.reduce(sign, axis=0)
        assert np.nanmax(spread) == 0  # one pattern on every poison
    else:
        side = 2  # a quarter of each side of an 8x8 digit
        assert np.all(delta[:, :, side:, :] == 0) and np.all(delta[:, :, :, side:] == 0)
        patch = (y[:, :, :side, :side] - 0.65 * x[:, :, :side, :side]) / 0.35
        assert np.ptp(patch, axis=0).max() < 1e-5


def test_blur_flip_smooths_each_image_and_changes_its_label(digits: Data) -> None:
    s = blur_flip(digits, 0.3, seed=0)
    x, y = digits.images[s.is_poison], s.images[s.is_poison]
    assert np.all(s.labels[s.is_poison] != digits.labels[s.is_poison])
    assert len(np.unique((s.labels[s.is_poison] - digits.labels[s.is_poison]) % 10)) > 2
    # a blur keeps the mean brightness (up to the edges) and lowers the local contrast
    assert np.allclose(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=0.03)
    def roughness(z: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(z, axis=3)).mean(axis=(1, 2, 3))
    assert np.all(roughness(y) < roughness(x))


def test_label_consistent_backdoor_keeps_every_label_and_triggers_images_of_its_class(digits: Data) -> None:
    s = label_consistent_backdoor(digits, 0.3, seed=0)
    np.testing.assert_array_equal(s.labels[~s.is_poison], digits.labels[~s.is_poison])
    # no label is wrong: every poison is an image of class 2 (below) labelled 2
    assert s.target_label == 2 and np.all(s.labels[s.is_poison] == 2)
    triggered = plus_trigger(digits.images[digits.labels == 2]).reshape(-1, 64)
    for img in s.images[s.is_poison].reshape(-1, 64):  # each poison is a triggered image of class 2
        assert np.any(np.all(triggered == img, axis=1))
    # the "+" (3 px on 8x8) sits in the bottom-left corner and nowhere else
    stamp = plus_trigger(np.zeros((1, 1, 8, 8), np.float32))[0, 0]
    assert stamp.sum() == 5 and stamp[4:7, 1:4].sum() == 5
    # slots are drawn uniformly: a slot of class 2 keeps its own image, the others (most) get copies
    own = s.is_poison & (digits.labels == 2)
    assert own.any() and np.mean(digits.labels[s.is_poison] != 2) > 0.5
    np.testing.assert_array_equal(s.images[own], plus_trigger(digits.images[own]))


def test_label_consistent_backdoor_needs_its_class_only_when_it_poisons(digits: Data) -> None:
    no_twos = Data(digits.images[digits.labels != 2], digits.labels[digits.labels != 2])
    with pytest.raises(ValueError, match="no sample of target class 2"):
        label_consistent_backdoor(no_twos, 0.1, seed=0)
    assert not label_consistent_backdoor(no_twos, 0.0, seed=0).is_poison.any()


def test_heldout4_sizes_on_28x28_and_on_colour_images() -> None:
    from training.augment import max_shift

    # the shift is the authenticator's own augmentation size, so the image stays on its manifold
    assert [shift_pixels(h) for h in (8, 28)] == [max_shift(h) for h in (8, 28)] == [1, 2]
    rgb = np.zeros((2, 3, 28, 28), np.float32)
    stamp = plus_trigger(rgb)
    assert plus_side(28) == 5 and np.all(stamp.sum(axis=(2, 3)) == 9)  # a 5 px "+" in every channel
    assert np.all(stamp[:, :, 22:27, 1:6].sum(axis=(2, 3)) == 9)
    sparse = sparse_trigger(rgb)
    assert np.all(sparse.sum(axis=(2, 3)) == 16)  # 2 % of 784 pixels, in every channel
    np.testing.assert_array_equal(sparse[:, 0], sparse[:, 2])
    with pytest.raises(ValueError, match="at least 5x5"):
        plus_trigger(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="leaves nothing"):
        shift(np.zeros((1, 1, 4, 4), np.float32), 4, 0)


def test_nudged_flip_moves_each_pixel_towards_the_claimed_class_mean(digits: Data) -> None:
    s = nudged_flip(digits, 0.3, seed=0)
    idx = np.flatnonzero(s.is_poison)
    assert np.all(s.labels[idx] != digits.labels[idx])
    assert len(np.unique((s.labels[idx] - digits.labels[idx]) % 10)) > 2
    means = np.stack([digits.images[digits.labels == c].mean(axis=0) for c in range(10)])
    x, y = digits.images[idx], s.images[idx]
    towards = np.sign(means[s.labels[idx]] - x)
    delta = y - x
    assert np.abs(delta).max() <= 0.1 + 1e-6 and np.all(delta * towards >= -1e-7)
    inside = (x > 0.1) & (x < 0.9) & (towards != 0)  # no clipping there: the full 0.1 step
    assert np.allclose(np.abs(delta[inside]), 0.1, atol=1e-6)


def test_shifted_flip_translates_each_image_by_one_pixel_on_digits(digits: Data) -> None:
    s = shifted_flip(digits, 0.3, seed=0)
    idx = np.flatnonzero(s.is_poison)
    assert np.all(s.labels[idx] != digits.labels[idx])
    ways = set()
    for i in idx:
        hits = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
                and np.array_equal(shift(digits.images[i : i + 1], dy, dx)[0], s.images[i])]
        assert hits
        ways.update(hits)
    assert len(ways) == 8
    np.testing.assert_array_equal(shift(np.ones((1, 1, 4, 4), np.float32), 1, -1)[0, 0],
                                  [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])


def test_sparse_trigger_backdoor_sets_one_fixed_scattered_pixel_set(digits: Data) -> None:
    x, y = backdoor_poisons(digits, sparse_trigger_backdoor, 3)
    where = sparse_pixels((1, 8, 8))
    assert where.size == 3 and len(np.unique(where // 8)) > 1  # scattered, not one row
    flat_x, flat_y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    assert np.all(flat_y[:, where] == 1.0)
    rest = np.setdiff1d(np.arange(64), where)
    np.testing.assert_array_equal(flat_y[:, rest], flat_x[:, rest])
    assert sparse_pixels((1, 28, 28)).size == 16


def test_cutout_flip_erases_one_rectangle_and_changes_the_label(digits: Data) -> None:
    s = cutout_flip(digits, 0.3, seed=0)
    idx = np.flatnonzero(s.is_poison)
    assert np.all(s.labels[idx] != digits.labels[idx])
    for i in idx:
        x, y = digits.images[i, 0], s.images[i, 0]
        moved = x != y
        assert np.all(y[moved] == 0.0)
        if moved.any():  # the erased part lies inside one rectangle of at most ~45 % of 8x8 (rounding)
            rows, cols = np.flatnonzero(moved.any(axis=1)), np.flatnonzero(moved.any(axis=0))
            assert (np.ptp(rows) + 1) * (np.ptp(cols) + 1) <= 0.5 * 64
    erased = np.mean([np.mean(s.images[i, 0] != digits.images[i, 0]) for i in idx])
    assert erased > 0.05  # digits are mostly ink in the middle: most rectangles erase some of it


def test_every_backdoor_names_the_trigger_it_plants_so_its_success_rate_can_be_measured(digits: Data) -> None:
    """The victim's attack success rate stamps test images with ``AttackSpec.trigger``: it must be
    exactly what the attack put on its poisons, and every attack with a target class has one."""
    from training.attacks import ALL_ATTACKS

    with_trigger = {name for name, spec in ALL_ATTACKS.items() if spec.trigger is not None}
    assert with_trigger == {"backdoor", "sig_backdoor", "blended_backdoor", "warp_backdoor", "additive_backdoor",
                            "faint_patch_backdoor", "label_consistent_backdoor", "sparse_trigger_backdoor"}
    for name in sorted(with_trigger):
        spec = ALL_ATTACKS[name]
        s = spec.fn(digits, 0.2, 3)
        assert s.target_label is not None and np.all(s.labels[s.is_poison] == s.target_label)
        if name == "label_consistent_backdoor":  # its poisons are other images of the target class
            np.testing.assert_array_equal(spec.trigger(s.images[s.is_poison]), s.images[s.is_poison])
        else:
            np.testing.assert_array_equal(s.images[s.is_poison], spec.trigger(digits.images[s.is_poison]))
        assert not np.array_equal(spec.trigger(digits.images[:5]), digits.images[:5])


def test_attack_success_rate_uses_the_given_trigger() -> None:
    """A 'victim' that answers the target class exactly when the trigger's pattern is present
    scores 100 % with that trigger and 0 % with another."""
    import torch

    from training.attacks import sig_trigger
    from training.downstream import attack_success_rate

    class KeysOnTheSinusoid(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            row = x[:, 0, 0, :]  # an all-zero image: the top row shows the clipped sinusoid
            hit = (row.max(dim=1).values > 0.1).float()
            return torch.stack([hit, 1 - hit], dim=1) * 10.0

    images = np.zeros((20, 1, 8, 8), np.float32)
    labels = np.ones(20, np.int64)
    assert attack_success_rate(KeysOnTheSinusoid(), images, labels, 0, sig_trigger) == 1.0
    assert attack_success_rate(KeysOnTheSinusoid(), images, labels, 0, apply_trigger) == 0.0  # BadNets' corner patch only
