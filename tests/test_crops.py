"""Crop sampling: same distribution as torchvision's RandomResizedCrop.get_params, exact fallbacks."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from fkd_dali.crops import from_normalized, normalized, sample_crops

DRAWS = 100_000


def torchvision_boxes(h: int, w: int, n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    torch.manual_seed(0)
    img = Image.new("RGB", (w, h))
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def ours(h: int, w: int, n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    # n crops spread over 100 rows of the same size: exercises the per-row generators too.
    rows = 100
    boxes, _ = sample_crops(7, range(rows), np.tile([h, w], (rows, 1)), n // rows, scale, ratio)
    return boxes.reshape(-1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("h,w", [(375, 500), (500, 333)])
def test_distribution_matches_torchvision_ks(h, w):
    tv = torchvision_boxes(h, w, DRAWS)
    me = ours(h, w, DRAWS)
    assert me.shape == (DRAWS, 4)
    for name, f in {
        "area fraction": lambda b: b[:, 2] * b[:, 3] / (h * w),
        "log aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
        "relative top": lambda b: (b[:, 0] + 0.5) / (h - b[:, 2] + 1),
        "relative left": lambda b: (b[:, 1] + 0.5) / (w - b[:, 3] + 1),
    }.items():
        res = ks_2samp(f(tv), f(me))
        assert res.pvalue > 1e-3, f"{name}: KS statistic {res.statistic:.4f}, p = {res.pvalue:.2e}"
    # Every box lies inside the image.
    assert (me[:, 0] >= 0).all() and (me[:, 0] + me[:, 2] <= h).all()
    assert (me[:, 1] >= 0).all() and (me[:, 1] + me[:, 3] <= w).all()


def test_ks_detects_a_different_scale():
    """The KS check above can fail: a wrong scale range is caught."""
    h, w = 375, 500
    tv = torchvision_boxes(h, w, 20_000)
    me = ours(h, w, 20_000, scale=(0.1, 1.0))
    res = ks_2samp(tv[:, 2] * tv[:, 3], me[:, 2] * me[:, 3])
    assert res.pvalue < 1e-3


@pytest.mark.parametrize("h,w", [(1, 1000), (1000, 1)])
def test_fallback_on_extreme_sizes_is_exactly_torchvision(h, w):
    tv = torchvision_boxes(h, w, 200)
    me = ours(h, w, 200)
    assert len(np.unique(tv, axis=0)) == 1  # every attempt fails: central crop
    np.testing.assert_array_equal(me, tv)


@pytest.mark.parametrize("h,w,scale", [(7, 7, (0.08, 1.0)), (7, 7, (0.9, 1.0)), (5, 9, (0.5, 1.0))])
def test_small_images_match_torchvision_outcome_frequencies(h, w, scale):
    n = 20_000
    tv = torchvision_boxes(h, w, n, scale=scale)
    me = ours(h, w, n, scale=scale)
    outcomes = sorted(set(map(tuple, tv[:, 2:])) | set(map(tuple, me[:, 2:])))
    f_tv = np.array([np.mean((tv[:, 2] == a) & (tv[:, 3] == b)) for a, b in outcomes])
    f_me = np.array([np.mean((me[:, 2] == a) & (me[:, 3] == b)) for a, b in outcomes])
    assert 0.5 * np.abs(f_tv - f_me).sum() < 0.02, list(zip(outcomes, f_tv, f_me))


def test_row_crops_do_not_depend_on_the_block():
    sizes = np.array([[100 + i, 120 + 2 * i] for i in range(10)])
    all_boxes, all_flips = sample_crops(3, range(10), sizes, 16)
    one_boxes, one_flips = sample_crops(3, [5], sizes[5:6], 16)
    np.testing.assert_array_equal(all_boxes[5], one_boxes[0])
    np.testing.assert_array_equal(all_flips[5], one_flips[0])
    other, _ = sample_crops(4, [5], sizes[5:6], 16)
    assert not np.array_equal(other[0], one_boxes[0])


def test_flip_probability_is_one_half():
    _, flips = sample_crops(0, range(200), np.tile([64, 64], (200, 1)), 100)
    assert abs(flips.mean() - 0.5) < 0.01


def test_normalized_round_trip_is_exact_in_float32():
    sizes = np.array([[375, 500], [4000, 3000], [60000, 7]])
    boxes, _ = sample_crops(1, range(3), sizes, 500)
    coords = normalized(boxes, sizes)
    assert coords.dtype == np.float32
    back, rounding = from_normalized(coords, sizes)
    np.testing.assert_array_equal(back, boxes)
    assert rounding < 0.05


def test_float16_coordinates_report_their_rounding():
    sizes = np.array([[375, 500]] * 20)
    boxes, _ = sample_crops(2, range(20), sizes, 500)
    coords16 = normalized(boxes, sizes).astype(np.float16)
    back, rounding = from_normalized(coords16, sizes)
    assert 0.05 < rounding < 0.5
    # As FKD's replay on PIL: crop (round(j), round(i), round(j + w), round(i + h)).
    c = coords16.astype(np.float64)
    i, j = c[..., 0] * 375, c[..., 1] * 500
    assert np.array_equal(back[..., 0], np.round(i)) and np.array_equal(back[..., 1], np.round(j))
    assert np.array_equal(back[..., 1] + back[..., 3], np.round(j + c[..., 3] * 500))
    assert np.abs(back - boxes).max() <= 1  # at most one pixel off


def test_invalid_scale_is_refused():
    with pytest.raises(ValueError, match="invalid scale"):
        sample_crops(0, [0], [[10, 10]], 4, scale=(0.5, 0.2))
