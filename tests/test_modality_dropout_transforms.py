"""Modality dropout (never all, the conditional drop rate) and per-modality transforms."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.modality_dropout import check_dropout_p, drop_probability, modality_dropout
from moekit.data.modality_transforms import build_transform, sample_seed
from moekit.errors import ConfigError


@given(
    st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True, max_size=4),
    st.floats(0.0, 0.95),
    st.integers(0, 2**32 - 1),
)
def test_dropout_keeps_a_nonempty_ordered_subset(present, p, seed):
    kept = modality_dropout(present, p, np.random.default_rng(seed))
    assert list(kept) == [m for m in present if m in kept]
    assert bool(kept) == bool(present)
    if len(present) == 1:
        assert kept == tuple(present)


def _enumerated_drop_probability(p, n):
    """P(modality 0 dropped | not all dropped), by summing over every keep pattern."""
    dropped, total = 0.0, 0.0
    for pattern in range(1, 2**n):  # bit m set: modality m kept; 0 (all dropped) excluded
        keeps = [(pattern >> m) & 1 for m in range(n)]
        weight = np.prod([(1 - p) if k else p for k in keeps])
        total += weight
        dropped += weight * (1 - keeps[0])
    return dropped / total


@pytest.mark.parametrize(("p", "n"), [(0.3, 2), (0.5, 2), (0.5, 3), (0.8, 4)])
def test_drop_rate_is_the_conditional_formula(p, n):
    assert drop_probability(p, n) == pytest.approx(_enumerated_drop_probability(p, n))
    rng = np.random.default_rng(0)
    present = [f"m{i}" for i in range(n)]
    draws = 20_000
    dropped = sum("m0" not in modality_dropout(present, p, rng) for _ in range(draws))
    assert dropped / draws == pytest.approx(drop_probability(p, n), abs=0.02)


def test_dropout_p_is_checked():
    assert check_dropout_p(0, "x") == 0.0
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ConfigError, match="x: modality_dropout"):
            check_dropout_p(bad, "x")
    with pytest.raises(ValueError):
        modality_dropout(["a", "b"], 1.0, np.random.default_rng(0))


def test_volume_transform_moves_every_slice_alike():
    transform = build_transform("volume", True, (16, 12), seed=3)
    rng = np.random.default_rng(0)
    scan = rng.integers(0, 255, (20, 12), dtype=np.uint8)
    volume = np.stack([scan] * 5)
    differs = False
    for seed in range(6):
        transform.set_seed(seed)
        out, masks = transform(volume)
        assert out.shape == (5, 16, 12) and out.dtype == torch.float32 and masks.shape[0] == 0
        assert all(torch.equal(out[0], out[k]) for k in range(1, 5))
        plain = build_transform("volume", False, (16, 12))(volume)[0]
        differs |= not torch.equal(out[0], plain[0])
    assert differs


def test_volume_eval_scales_grey_levels_to_minus_one_one():
    volume = np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)])
    out, _ = build_transform("volume", False, (4, 4))(volume)
    assert out[0].eq(-1).all() and out[1].eq(1).all()


def test_image_transform_moves_image_and_masks_together():
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:26] = 1
    image = np.repeat((mask * 255)[..., None], 3, axis=2)
    transform = build_transform("image", True, (32, 40), seed=1)
    for seed in range(5):
        transform.set_seed(seed)
        out, masks = transform(image, [mask])
        bright = out.mean(0) > 0.5
        agree = (bright == masks[0].bool()).float().mean()
        assert agree > 0.97


def test_grey_images_get_one_channel_normalisation():
    transform = build_transform("image", False, (8, 8), channels=1)
    out, _ = transform(np.full((8, 8, 1), 255, np.uint8))
    assert out.shape == (1, 8, 8) and torch.allclose(out, torch.full_like(out, 2.0))


def test_augment_values_are_checked():
    with pytest.raises(ConfigError, match=r"gamma\.augment\.oct"):
        build_transform("volume", {"rotat": 3}, (8, 8), where="gamma.augment.oct")
    with pytest.raises(ConfigError, match="expected true, false or a mapping"):
        build_transform("image", "yes", (8, 8))


def test_sample_seeds_differ_by_epoch_sample_and_stream():
    seeds = {sample_seed(0, e, i, s) for e in range(3) for i in range(3) for s in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**32 for s in seeds)
