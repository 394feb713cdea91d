"""The digits bench's second yardstick (issue 21) on known cases: FD in the data's own 8x8 pixel space, KID in both
spaces, k-NN precision/recall, and the side-by-side grid written with every bench run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdiff.digits.classifier import load_classifier
from fastdiff.digits.data import load_split
from fastdiff.eval import bench_quality
from fastdiff.eval.manifold import kid, knn_radii, mmd2_unbiased, poly_kernel, precision_recall
from fastdiff.eval.metrics import BASIC_KEYS, METRIC_KEYS, DigitsEvaluator, fd_pixels, pixel_features


@pytest.fixture(scope="module")
def held_out():
    x, y = load_split("test")
    return (x + 1) / 2, y


@pytest.fixture(scope="module")
def real():
    """500 real digits the reference has not seen (the train split)."""
    x, y = load_split("train")
    return (x[:500] + 1) / 2, y[:500]


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator(load_classifier(), all_metrics=True)


def blur(x, sigma):
    k = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    g = x.reshape(-1, 1, *x.shape[-2:])
    g = F.conv2d(F.conv2d(g, k.view(1, 1, 1, 9), padding=(0, 4)), k.view(1, 1, 9, 1), padding=(4, 0))
    return g.reshape(x.shape)


def shift(x, pixels):
    """Moved right by ``pixels`` (of 32), the strokes that leave on the right coming back on the left."""
    return torch.roll(x, pixels, dims=-1)


# ------------------------------------------------------------------------------------------ pixel space


def test_pixel_features_give_back_the_datas_own_8x8_digits(held_out):
    from sklearn.datasets import load_digits

    x, _ = held_out
    f = pixel_features(x)
    assert f.shape == (len(x), 64) and f.dtype == torch.float64
    original = torch.from_numpy(load_digits().images.reshape(-1, 64) / 16.0)
    assert torch.cdist(f, original).min(1).values.max() < 1e-4  # each is a scikit-learn digit / 16
    back = F.interpolate(f.float().view(-1, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(back, x[:, :1], atol=1e-4)  # ... the one the 32x32 image was made from
    assert torch.allclose(pixel_features(x[:, :1]), f)  # grey in = RGB in
    big = F.interpolate(x[:5], size=(64, 64), mode="bilinear", align_corners=False)
    assert (pixel_features(big) - f[:5]).abs().mean() < 0.02  # other sizes go through 32x32
    assert fd_pixels(x) < 1e-8  # against the held-out split by default


def test_identical_sets_score_zero(evaluator, held_out):
    r = evaluator(*held_out)
    assert list(r) == list(METRIC_KEYS)
    basic = DigitsEvaluator(evaluator.classifier)(*held_out)  # the default: the four metrics of before
    assert list(basic) == list(BASIC_KEYS) and all(basic[k] == r[k] for k in BASIC_KEYS)
    assert r["fd_digits"] < 1e-6 and r["fd_pixels"] < 1e-8
    assert r["precision"] == 1.0 and r["recall"] == 1.0


# ------------------------------------------------------------------------------------------------ KID


def test_kid_is_unbiased_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    # one set against itself, subsets = the whole set: the estimator's exact O(1/m) offset (module docstring)
    k = poly_kernel(a.double(), a.double())
    offset = -2 * (k.diagonal().mean() - (k.sum() - k.diagonal().sum()) / (400 * 399)) / 400
    assert kid(a, a, subsets=3, subset_size=400)[0] == pytest.approx(float(offset), rel=1e-9)
    # two samples of one distribution: ~0 within the subsets' spread
    same, same_std = kid(a, b, subset_size=200)
    assert abs(same) < 3 * same_std
    values = [kid(a + s, b, subset_size=200)[0] for s in (0.1, 0.3, 1.0)]
    assert same < values[0] < values[1] < values[2]
    assert abs(same) < values[1] / 10
    assert kid(a, b, seed=1) == kid(a, b, seed=1)  # its own seeded generator: reproducible
    assert all(math.isnan(v) for v in kid(a[:1], b))


def test_kid_is_torchmetrics_estimator():
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(50, 8, generator=g).double(), torch.rand(50, 8, generator=g).double() + 0.1
    assert mmd2_unbiased(a, b) == pytest.approx(float(kid_module.poly_mmd(a, b)), rel=1e-9)


def test_kid_on_digits_orders_blur_and_shift(evaluator, real):
    x, y = real
    base = evaluator(x, y)
    blurred = [evaluator(blur(x, s), y) for s in (1.0, 2.0)]
    shifted = [evaluator(shift(x, d), y) for d in (1, 2, 4)]
    for key in ("kid_digits", "kid_pixels"):
        assert abs(base[key]) < 3 * base[f"{key}_std"]  # real digits vs the held-out ones: ~0
        assert base[key] < blurred[0][key] < blurred[1][key], key
        assert base[key] < shifted[0][key] < shifted[1][key] < shifted[2][key], key
    for key in ("fd_digits", "fd_pixels"):
        assert base[key] < blurred[0][key] < blurred[1][key], key
        assert base[key] < shifted[0][key] < shifted[1][key] < shifted[2][key], key


# ----------------------------------------------------------------------------------------- precision/recall


def test_precision_recall_on_gaussians():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(500, 4, generator=g)
    gen = torch.randn(500, 4, generator=g)
    p, r = precision_recall(gen, ref)
    assert p > 0.9 and r > 0.9
    off = gen.clone()
    off[:250] += 20  # half the samples far off the data
    p_off, r_off = precision_recall(off, ref)
    assert p_off == pytest.approx(p / 2, abs=0.05) and r_off > 0.8
    two = torch.cat([ref[:250], ref[250:] + 20])  # a reference with two modes, samples of only one
    p_one, r_one = precision_recall(gen, two)
    assert p_one > 0.85 and r_one == pytest.approx(0.5, abs=0.05)
    assert torch.equal(knn_radii(ref), torch.cdist(ref.double(), ref.double()).sort(1).values[:, 3])
    assert precision_recall(gen, ref, b_radii=knn_radii(ref)) == (p, r)
    assert math.isnan(precision_recall(gen[:3], ref)[1])  # recall needs more than k generated points


def test_precision_drops_off_manifold_and_recall_drops_for_missing_digits(evaluator, real):
    x, y = real
    base = evaluator(x, y)
    assert base["precision"] > 0.8 and base["recall"] > 0.6
    train, labels = load_split("train")
    half = labels < 5  # only the digits 0-4
    dropped = evaluator((train[half][:500] + 1) / 2, labels[half][:500])
    assert dropped["recall"] < base["recall"] - 0.2 and dropped["precision"] > base["precision"] - 0.05
    noisy = x.clone()
    noisy[:250] = torch.rand(250, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    off = evaluator(noisy, y)
    assert off["precision"] < base["precision"] - 0.2 and off["recall"] > base["recall"] - 0.15


# -------------------------------------------------------------------------------------------- side by side


def test_side_by_side_has_one_tile_per_system_per_prompt():
    p = 5
    images = {
        name: torch.stack([torch.full((3, 16, 16), (10 * s + j) / 255) for j in range(p)])
        for s, name in enumerate(["teacher-25", "dmd2-1", "sid-1"])
    }
    grid = np.asarray(bench_quality.side_by_side(images, label_width=30))
    tile = 64  # 16x16 tiles enlarged 4x to min_tile
    assert grid.shape == (3 * tile, 30 + p * tile, 3)
    for s in range(3):
        for j in range(p):
            block = grid[s * tile : (s + 1) * tile, 30 + j * tile : 30 + (j + 1) * tile]
            assert (block == 10 * s + j).all(), (s, j)
    assert grid[:, :30].any()  # the names
    plain = np.asarray(bench_quality.side_by_side(images, label_width=0, min_tile=0))
    assert plain.shape == (48, 80, 3)
    assert bench_quality.side_by_side_indices(torch.arange(100) % 10).tolist() == [
        i + 10 * k for i in range(10) for k in range(4)
    ]
    with pytest.raises(ValueError, match="same prompts"):
        bench_quality.side_by_side({"a": images["sid-1"], "b": images["sid-1"][:2]})


def test_bench_run_writes_the_grid_and_every_metric(tiny_teachers, tmp_path):
    """Two rows of one sampler under different names get identical grid rows: the same prompts and seeds."""
    same = [bench_quality.System(n, "teacher", tiny_teachers["sdxl"], 1, 2.0, scheduler="ddim") for n in "ab"]
    other = bench_quality.teacher_systems(tiny_teachers["sdxl"], 2.0, steps=(2,))
    rows = bench_quality.run([*same, *other], tmp_path, n=20, batch=10)
    for row in json.loads((tmp_path / "bench.json").read_text()):
        assert set(METRIC_KEYS) <= row.keys()
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["fd_pixels"] >= 0
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "grids" / "side_by_side.png"))
    tile = 64  # the tiny teacher's 32x32 images, enlarged 2x
    assert grid.shape[0] == 3 * tile and (grid.shape[1] - 20 * tile) > 0  # 2 prompts per digit at n = 20
    label = grid.shape[1] - 20 * tile
    assert np.array_equal(grid[:tile, label:], grid[tile : 2 * tile, label:])
    assert not np.array_equal(grid[:tile, label:], grid[2 * tile :, label:])
    text = (tmp_path / "bench.md").read_text()
    header = text.splitlines()[0]
    for key in ("fd_digits", "fd_pixels", "kid_digits", "kid_pixels", "precision", "recall"):
        assert key in header and f"- `{key}`:" in text
    assert "grids/side_by_side.png" in text
    assert [r["system"] for r in rows] == ["a", "b", "teacher-2"]
