"""robustkit.saliency.metrics: hand-built maps with analytic values, oracles (Quantus, scipy,
skimage, hand references in numpy), shapes, channel reductions and batch independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from scipy.integrate import trapezoid
from torch import nn

from robustkit.saliency import metrics as M
from robustkit.testing import ConstantModel, TinyCNN

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _checkerboard(h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((-1.0) ** (rows + cols)).to(D)


def _one_hot(n_img, h, w, row, col):
    a = torch.zeros(n_img, h, w, dtype=D)
    a[:, row, col] = 1.0
    return a


# ---------------------------------------------------------------------------------------------
# Shapes, channel reductions, batch independence (every metric)

N, C, H, W = 3, 2, 12, 13
X = torch.rand(N, C, H, W, generator=torch.Generator().manual_seed(5), dtype=D)
BOXES = torch.tensor([[1, 2, 6, 9], [0, 0, 12, 11], [4, 3, 4, 3]])
MAG, SIGNED = "magnitude", "signed"

# name -> (call(a, b, i) with i the sample indices, channel reduction of a 4-D map or None)
CASES = {
    "sparseness": (lambda a, b, i: M.sparseness(a), MAG),
    "complexity": (lambda a, b, i: M.complexity(a), MAG),
    "total_variation": (lambda a, b, i: M.total_variation(a), SIGNED),
    "hfer": (lambda a, b, i: M.hfer(a), SIGNED),
    "adaptgrad_residual": (lambda a, b, i: M.adaptgrad_residual(a, b), None),
    "alignment_cos": (lambda a, b, i: M.alignment_cos(a, X[i]), None),
    "alignment_cos_centred": (lambda a, b, i: M.alignment_cos(a, X[i], center=True), None),
    "edge_spearman": (lambda a, b, i: M.edge_spearman(a, X[i]), MAG),
    "mass_in_box": (lambda a, b, i: M.mass_in_box(a, BOXES[i]), MAG),
    "pointing_game": (lambda a, b, i: M.pointing_game(a, BOXES[i]), MAG),
    "stability_spearman": (lambda a, b, i: M.stability_spearman(a, b), SIGNED),
    "topk_intersection": (lambda a, b, i: M.topk_intersection(a, b, k=0.1), MAG),
    "ssim": (lambda a, b, i: M.ssim(a, b), SIGNED),
    "ssim_signed": (lambda a, b, i: M.ssim(a, b, scale="signed"), SIGNED),
    "stability_cos": (lambda a, b, i: M.stability_cos(a, b), SIGNED),
}


def _reduce(a, how):
    return a.abs().sum(1) if how == MAG else a.sum(1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_reduction_and_batch_independence(name):
    call, how = CASES[name]
    a4, b4 = _rand(N, C, H, W, seed=1), _rand(N, C, H, W, seed=2)
    idx = torch.arange(N)
    out4 = call(a4, b4, idx)
    assert out4.shape == (N,) and out4.dtype == D and torch.isfinite(out4).all()
    singles = torch.cat([call(a4[k : k + 1], b4[k : k + 1], idx[k : k + 1]) for k in range(N)])
    torch.testing.assert_close(out4, singles, rtol=1e-12, atol=1e-12)
    if how is None:  # whole-vector metrics: an (N, H, W) map is also accepted
        a3, b3 = a4[:, 0], b4[:, 0]
        assert call(a3, b3, idx).shape == (N,)
    else:  # a 4-D map is reduced exactly as documented
        out3 = call(_reduce(a4, how), _reduce(b4, how), idx)
        assert out3.shape == (N,)
        torch.testing.assert_close(out4, out3, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(2, 3), torch.zeros(1, 1, 1, 4, 4)])
def test_wrong_rank_is_refused(bad):
    with pytest.raises(ValueError, match="a must be"):
        M.sparseness(bad)
    with pytest.raises(ValueError, match="a must be"):
        M.total_variation(bad)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        M.stability_spearman(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="adaptgrad"):
        M.adaptgrad_residual(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="boxes"):
        M.mass_in_box(torch.ones(2, 4, 4), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="x0 <= x1"):
        M.mass_in_box(torch.ones(1, 4, 4), torch.tensor([[2, 0, 1, 1]]))


# ---------------------------------------------------------------------------------------------
# Sparseness and complexity


def test_sparseness_analytic():
    n = 5 * 6
    torch.testing.assert_close(M.sparseness(torch.ones(2, 5, 6, dtype=D)),
                               torch.zeros(2, dtype=D), rtol=0, atol=1e-15)
    one_hot = _one_hot(1, 5, 6, 2, 3)
    expected = (n - 1) / (n * (1 + n * 1e-7))  # Quantus adds 1e-7 to every |a_i|
    assert M.sparseness(one_hot).item() == pytest.approx(expected, rel=1e-12)
    assert M.sparseness(-3 * one_hot).item() == pytest.approx(
        (n - 1) / (n * (1 + n * 1e-7 / 3)), rel=1e-12)
    # sorted 1, 2, 3, 4: Σ(2k − 5) v_k = 10 + 0·ε; n Σ v = 4 (10 + 4ε); order must not matter
    for values in ([1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 4.0, 2.0], [-3.0, 1.0, -4.0, 2.0]):
        a = torch.tensor(values, dtype=D).view(1, 2, 2)
        assert M.sparseness(a).item() == pytest.approx(10 / (4 * (10 + 4e-7)), rel=1e-12)


def test_complexity_analytic():
    n = 7 * 4
    assert M.complexity(torch.ones(1, 7, 4, dtype=D)).item() == pytest.approx(math.log(n))
    assert M.complexity(_one_hot(1, 7, 4, 0, 0)).item() == pytest.approx(0.0, abs=1e-11)
    two = torch.zeros(1, 7, 4, dtype=D)
    two[0, 1, 1], two[0, 5, 2] = 2.0, -2.0
    assert M.complexity(two).item() == pytest.approx(math.log(2))
    # P = (1, 3) / 4: H = −(¼ log ¼ + ¾ log ¾), independent of the map's scale and sign
    a = torch.tensor([[[1.0, -3.0]]], dtype=D)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    for scale in (1.0, 10.0, -0.01):
        assert M.complexity(scale * a).item() == pytest.approx(h, rel=1e-10)


def test_sparseness_and_complexity_equal_quantus():
    quantus = pytest.importorskip("quantus")
    a = _rand(6, 1, 5, 7, seed=3)
    a[0] = 0
    a[0, 0, 2, 3] = 1.0  # one one-hot map among random signed ones
    a[1] = 1.0
    x, y = np.random.default_rng(0).uniform(size=a.shape), np.zeros(6, dtype=int)
    kw = dict(disable_warnings=True, normalise=False)  # Quantus' abs=True default kept
    q_gini = quantus.Sparseness(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a.numpy().copy())
    q_ent = quantus.Complexity(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a.numpy().copy())
    for maps in (a, a[:, 0]):
        np.testing.assert_allclose(M.sparseness(maps).numpy(), q_gini, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(M.complexity(maps).numpy(), q_ent, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Visual noise


def test_total_variation_analytic():
    h, w = 5, 7
    board = _checkerboard(h, w)[None]
    expected = 2 * ((h - 1) * w + h * (w - 1)) / (h * w)
    assert M.total_variation(board).item() == pytest.approx(expected)
    assert M.total_variation(0.3 * board).item() == pytest.approx(expected)  # / ‖a‖₁
    rows = ((-1.0) ** torch.arange(h, dtype=D)).view(1, h, 1).expand(1, h, w)  # varies along h
    assert M.total_variation(rows).item() == pytest.approx(2 * (h - 1) * w / (h * w))
    cols = ((-1.0) ** torch.arange(w, dtype=D)).view(1, 1, w).expand(1, h, w)  # varies along w
    assert M.total_variation(cols).item() == pytest.approx(2 * h * (w - 1) / (h * w))
    assert M.total_variation(torch.full((1, h, w), 4.0, dtype=D)).item() == 0.0
    # hand example: [[0, 1], [3, 1]]: |3−0| + |1−1| + |1−0| + |1−3| = 6 over 5
    a = torch.tensor([[[0.0, 1.0], [3.0, 1.0]]], dtype=D)
    assert M.total_variation(a).item() == pytest.approx(6 / 5)


def _wave(size, kh, kw, amp=1.0):
    """amp · cos(2π (kh·h + kw·w) / size): all its energy at radial frequency |k| / size."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=D), torch.arange(size, dtype=D),
                                indexing="ij")
    return amp * torch.cos(2 * math.pi * (kh * rows + kw * cols) / size)[None]


def test_hfer_analytic():
    s = 32  # the cutoff is 1/4 of Nyquist: 0.125 cycles/pixel = 4 cycles over 32 pixels
    assert M.hfer(torch.full((1, s, s), 3.0, dtype=D)).item() == pytest.approx(0.0, abs=1e-15)
    assert M.hfer(_checkerboard(s, s)[None]).item() == pytest.approx(1.0)
    assert M.hfer(_checkerboard(9, 14)[None]).item() == pytest.approx(1.0, abs=1e-12)
    assert M.hfer(_wave(s, 0, 3)).item() == pytest.approx(0.0, abs=1e-12)
    assert M.hfer(_wave(s, 0, 4)).item() == pytest.approx(0.0, abs=1e-12)  # at ω_c: low
    assert M.hfer(_wave(s, 0, 5)).item() == pytest.approx(1.0)
    assert M.hfer(_wave(s, 5, 0)).item() == pytest.approx(1.0)
    assert M.hfer(_wave(s, 3, 3)).item() == pytest.approx(1.0)  # radial: √18 > 4
    # energy, not amplitude: amplitudes 1 (low) and 2 (high) give 4 / 5
    assert M.hfer(_wave(s, 1, 0) + _wave(s, 0, 8, amp=2.0)).item() == pytest.approx(0.8)
    # cutoff is a fraction of Nyquist: at 1/2 of Nyquist (8 cycles) the k = 5 wave is low
    assert M.hfer(_wave(s, 0, 5), cutoff=0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_adaptgrad_residual_analytic():
    g = _rand(4, 3, 5, 5, seed=7)
    res = M.adaptgrad_residual
    torch.testing.assert_close(res(g, g), torch.zeros(4, dtype=D))
    torch.testing.assert_close(res(g, torch.zeros_like(g)), torch.ones(4, dtype=D))
    torch.testing.assert_close(res(g, 2 * g), torch.ones(4, dtype=D))
    torch.testing.assert_close(res(g, 0.5 * g), torch.full((4,), 0.5, dtype=D))
    hand = res(torch.tensor([[3.0, 4.0]], dtype=D), torch.tensor([[0.0, 4.0]], dtype=D))
    assert hand.item() == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------------------------
# Perceptual alignment


def test_alignment_cos_analytic():
    x = torch.rand(3, 3, 6, 6, dtype=D, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(3, dtype=D)
    torch.testing.assert_close(M.alignment_cos(x, x), ones)
    torch.testing.assert_close(M.alignment_cos(-2.5 * x, 4 * x), ones)
    orth = _rand(3, 3, 6, 6, seed=9)
    orth = orth - (orth * x).sum((1, 2, 3), keepdim=True) / x.square().sum((1, 2, 3),
                                                                             keepdim=True) * x
    torch.testing.assert_close(M.alignment_cos(orth, x), torch.zeros(3, dtype=D), atol=1e-12,
                               rtol=0)
    a = torch.tensor([[[[1.0, 0.0]]]], dtype=D)
    img = torch.tensor([[[[1.0, 1.0]]]], dtype=D)
    assert M.alignment_cos(a, img).item() == pytest.approx(1 / math.sqrt(2))
    # centred: x = 1..4 and a = x − 2.5 -> 1 centred, 5 / √(30·5) uncentred
    img = torch.arange(1.0, 5.0, dtype=D).view(1, 1, 2, 2)
    a = img - 2.5
    assert M.alignment_cos(a, img).item() == pytest.approx(5 / math.sqrt(150))
    assert M.alignment_cos(a, img, center=True).item() == pytest.approx(1.0)
    # centring is per channel: offsets 0, 1, 2 on one pattern vanish
    pattern = _rand(1, 1, 5, 5, seed=8)
    img = pattern + torch.arange(3, dtype=D).view(1, 3, 1, 1)
    a = (pattern - pattern.mean()).expand(1, 3, 5, 5)
    assert M.alignment_cos(a, img, center=True).item() == pytest.approx(1.0)
    assert M.alignment_cos(a, img).item() < 0.9
    # an (N, H, W) map against an (N, C, H, W) image uses the channel mean
    grey = x.mean(1)
    m = _rand(3, 6, 6, seed=10)
    torch.testing.assert_close(M.alignment_cos(m, x), M.alignment_cos(m, grey))
    torch.testing.assert_close(M.alignment_cos(m, x, center=True),
                               M.alignment_cos(m, grey - grey.mean((1, 2), keepdim=True)))


def _spearman_np(u, v):
    return np.array([scipy.stats.spearmanr(p.ravel(), q.ravel()).statistic
                     for p, q in zip(u, v, strict=True)])


def test_edge_spearman_equals_scipy_sobel_and_spearmanr():
    x = torch.rand(4, 3, 10, 9, dtype=D, generator=torch.Generator().manual_seed(1))
    a = _rand(4, 3, 10, 9, seed=2)
    grey = x.mean(1).numpy()
    # scipy.ndimage.sobel with mode="nearest" (edge replicated): an independent Sobel
    edges = np.stack([np.hypot(scipy.ndimage.sobel(g, 0, mode="nearest"),
                               scipy.ndimage.sobel(g, 1, mode="nearest")) for g in grey])
    mag = a.abs().sum(1).numpy()
    np.testing.assert_allclose(M.edge_spearman(a, x).numpy(), _spearman_np(mag, edges),
                               rtol=1e-10)
    # a map that IS the edge magnitude (any sign) correlates perfectly
    e = torch.from_numpy(edges)
    torch.testing.assert_close(M.edge_spearman(-e, x), torch.ones(4, dtype=D))


def test_edge_spearman_equals_skimage():
    filters = pytest.importorskip("skimage.filters")
    x = torch.rand(3, 1, 12, 12, dtype=D, generator=torch.Generator().manual_seed(4))
    a = _rand(3, 12, 12, seed=5)
    edges = np.stack([filters.sobel(g) for g in x[:, 0].numpy()])
    np.testing.assert_allclose(M.edge_spearman(a, x).numpy(),
                               _spearman_np(a.abs().numpy(), edges), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Localisation

# H = 8 rows, W = 10 columns; box columns x 1..2 and rows y 4..6 (inclusive): not square, so
# swapping x and y moves it.
LOC_BOX = torch.tensor([[1, 4, 2, 6]])


def test_mass_in_box_analytic():
    inside = _one_hot(1, 8, 10, 5, 2)  # row 5, column 2
    assert M.mass_in_box(inside, LOC_BOX).item() == 1.0
    assert M.mass_in_box(inside, [(1, 4, 2, 6)]).item() == 1.0  # a plain sequence works too
    corner = _one_hot(1, 8, 10, 6, 2)  # row y1, column x1: inclusive
    assert M.mass_in_box(corner, LOC_BOX).item() == 1.0
    assert M.mass_in_box(_one_hot(1, 8, 10, 7, 2), LOC_BOX).item() == 0.0  # row y1 + 1
    assert M.mass_in_box(_one_hot(1, 8, 10, 5, 3), LOC_BOX).item() == 0.0  # column x1 + 1
    assert M.mass_in_box(_one_hot(1, 8, 10, 2, 5), LOC_BOX).item() == 0.0  # x/y swapped spot
    split = inside - 3 * _one_hot(1, 8, 10, 0, 9)  # |·|: 1 inside, 3 outside
    assert M.mass_in_box(split, LOC_BOX).item() == pytest.approx(0.25)
    uniform = torch.ones(1, 8, 10, dtype=D)
    area = M.box_area_fraction(LOC_BOX, 8, 10)
    assert area.item() == pytest.approx(2 * 3 / 80)
    assert M.mass_in_box(uniform, LOC_BOX).item() == pytest.approx(area.item())


def test_pointing_game_analytic():
    base = torch.rand(2, 8, 10, dtype=D, generator=torch.Generator().manual_seed(0)) * 0.5
    hit, miss = base.clone(), base.clone()
    hit[0, 4, 1] = 1.0  # row 4, column 1: in the box
    miss[0, 1, 4] = 1.0  # row 1, column 4: the transposed spot
    boxes = LOC_BOX.expand(2, 4)
    hit[1, 6, 2] = -2.0  # magnitude: the arg-max of |a| is at row y1, column x1
    miss[1, 7, 2] = 2.0
    assert M.pointing_game(hit, boxes).tolist() == [1.0, 1.0]
    assert M.pointing_game(miss, boxes).tolist() == [0.0, 0.0]
    tie = torch.zeros(1, 8, 10, dtype=D)
    tie[0, 5, 1], tie[0, 0, 0] = 1.0, 1.0  # one maximum in, one out
    assert M.pointing_game(tie, LOC_BOX).item() == 0.5
    assert M.pointing_game(torch.ones(1, 8, 10), LOC_BOX).item() == pytest.approx(6 / 80)


def test_box_area_fraction():
    boxes = torch.tensor([[0, 0, 31, 63], [0, 0, 63, 63], [10, 10, 10, 10], [60, 60, 70, 70]])
    expected = [0.5, 1.0, 1 / 4096, 16 / 4096]  # the last one is clipped to the image
    assert M.box_area_fraction(boxes, 64, 64).tolist() == pytest.approx(expected)


def test_tinyimagenet_boxes_meet_the_metric(shared_data):
    from robustkit.data.tiny_imagenet import load_tiny_imagenet

    val = load_tiny_imagenet(shared_data, "test", limit=2)
    first = (shared_data / "tiny-imagenet-200/val/val_annotations.txt").read_text().split("\n")[0]
    assert val.boxes[0].tolist() == [int(v) for v in first.split("\t")[2:]]  # 0 32 44 62
    x0, y0, x1, y1 = val.boxes[0].tolist()
    a = torch.zeros(2, 3, 64, 64)
    a[0, :, y0, x1] = 1.0  # row y0, column x1 of image 0: a corner of its box
    a[1] = 1.0
    out = M.mass_in_box(a, val.boxes)
    assert out[0].item() == 1.0
    assert out[1].item() == pytest.approx(M.box_area_fraction(val.boxes, 64, 64)[1].item())


# ---------------------------------------------------------------------------------------------
# Stability


def test_stability_of_identical_maps():
    a = _rand(3, 2, 16, 16, seed=11)
    ones = torch.ones(3, dtype=D)
    torch.testing.assert_close(M.stability_spearman(a, a), ones)
    torch.testing.assert_close(M.topk_intersection(a, a), ones)
    torch.testing.assert_close(M.ssim(a, a), ones)
    torch.testing.assert_close(M.ssim(a, a, scale="signed"), ones)
    torch.testing.assert_close(M.stability_cos(a, a), ones)


def test_stability_known_values():
    a = _rand(2, 10, 10, seed=12)
    torch.testing.assert_close(M.stability_spearman(a, -a), -torch.ones(2, dtype=D))
    torch.testing.assert_close(M.stability_spearman(a, a.pow(3) + 5), torch.ones(2, dtype=D))
    torch.testing.assert_close(M.stability_cos(a, -3 * a), -torch.ones(2, dtype=D))
    u = torch.tensor([[[1.0, 0.0]]], dtype=D)
    assert M.stability_cos(u, torch.tensor([[[1.0, 1.0]]], dtype=D)).item() == pytest.approx(
        1 / math.sqrt(2))
    # top-k by magnitude: a sign flip changes nothing
    torch.testing.assert_close(M.topk_intersection(a, -a), torch.ones(2, dtype=D))
    # 100 pixels, k = 5 %: tops {0..4} and {3..7} share 2 of 5; disjoint tops share none
    ramp = torch.arange(100, 0, -1, dtype=D)
    shifted = torch.roll(ramp, 3)
    shifted[:3] = 0
    disjoint = torch.roll(ramp, 50)
    pa, pb, pc = (t.view(1, 10, 10) for t in (ramp, shifted, disjoint))
    assert M.topk_intersection(pa, pb, k=0.05).item() == pytest.approx(2 / 5)
    assert M.topk_intersection(pa, pc, k=0.05).item() == 0.0
    assert M.topk_intersection(pa, pb, k=0.1).item() == pytest.approx(7 / 10)


def test_stability_spearman_equals_scipy_with_ties():
    a = torch.round(_rand(5, 9, 11, seed=13) * 2)  # few distinct values: many ties
    b = torch.round(_rand(5, 9, 11, seed=14) * 2) + torch.round(a / 2)
    np.testing.assert_allclose(M.stability_spearman(a, b).numpy(),
                               _spearman_np(a.numpy(), b.numpy()), rtol=1e-12)
    assert torch.isnan(M.stability_spearman(torch.ones(1, 4, 4), torch.rand(1, 4, 4))).all()


def _gauss_np(sigma=1.5, radius=5):
    t = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def _ssim_np(p, q, data_range):
    """Wang et al. 2004 with explicit windows: Gaussian σ = 1.5 (11 x 11), valid positions."""
    w = _gauss_np()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(p.shape[0] - 10):
        for j in range(p.shape[1] - 10):
            u, v = p[i : i + 11, j : j + 11], q[i : i + 11, j : j + 11]
            mu, mv = (w * u).sum(), (w * v).sum()
            vu, vv = (w * (u - mu) ** 2).sum(), (w * (v - mv) ** 2).sum()
            cov = (w * (u - mu) * (v - mv)).sum()
            vals.append((2 * mu * mv + c1) * (2 * cov + c2)
                        / ((mu**2 + mv**2 + c1) * (vu + vv + c2)))
    return float(np.mean(vals))


def _display_np(m, scale):
    """The AdaptGrad repo's absscale / noabsscale (utils.py), per map."""
    p99 = abs(np.percentile(m, 99))
    if scale == "abs":
        return np.clip((m - m.min()) / (p99 - m.min()), 0, 1)
    return np.clip(m / (2 * p99), -1, 1)


def test_ssim_equals_hand_reference():
    a = _rand(2, 14, 15, seed=15)
    b = a + 0.7 * _rand(2, 14, 15, seed=16)
    raw = [_ssim_np(p, q, 4.0) for p, q in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(M.ssim(a, b, scale=None, data_range=4.0).numpy(), raw, rtol=1e-10)
    for scale, rng in (("abs", 1.0), ("signed", 2.0)):
        ref = [_ssim_np(_display_np(p, scale), _display_np(q, scale), rng)
               for p, q in zip(a.numpy(), b.numpy(), strict=True)]
        np.testing.assert_allclose(M.ssim(a, b, scale=scale).numpy(), ref, rtol=1e-10)


def test_ssim_equals_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = _rand(3, 20, 17, seed=17).abs()
    b = (a + 0.5 * _rand(3, 20, 17, seed=18)).abs()
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ref = [metrics.structural_similarity(_display_np(p, "abs"), _display_np(q, "abs"),
                                         data_range=1.0, **kw)
           for p, q in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(M.ssim(a, b).numpy(), ref, rtol=1e-10)
    ref = [metrics.structural_similarity(p, q, data_range=3.0, **kw)
           for p, q in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(M.ssim(a, b, scale=None, data_range=3.0).numpy(), ref, rtol=1e-10)


def test_ssim_is_scale_invariant_through_the_display_scaling():
    a = _rand(2, 16, 16, seed=19).abs()
    ones = torch.ones(2, dtype=D)
    torch.testing.assert_close(M.ssim(a, 3 * a), ones)
    torch.testing.assert_close(M.ssim(a, a + 1), ones)  # abs scale subtracts the minimum
    torch.testing.assert_close(M.ssim(a, 0.2 * a, scale="signed"), ones)
    assert (M.ssim(a, 3 * a, scale=None, data_range=1.0) < 0.9).all()
    # degenerate maps: constant ones are identical; two different one-hot maps (p99 = 0, the
    # repo's division by zero) are not declared identical
    const = torch.full((1, 16, 16), 2.0, dtype=D)
    for scale in ("abs", "signed"):
        assert M.ssim(const, const, scale=scale).item() == pytest.approx(1.0)
        hot = M.ssim(_one_hot(1, 16, 16, 3, 3), _one_hot(1, 16, 16, 12, 12), scale=scale)
        assert torch.isfinite(hot).all() and hot.item() < 0.99
        sparse = _one_hot(1, 16, 16, 3, 3)  # and the scale invariance holds for them too
        assert M.ssim(sparse, 0.25 * sparse, scale=scale).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="data_range"):
        M.ssim(a, a, scale=None)
    with pytest.raises(ValueError, match="11 x 11"):
        M.ssim(a[:, :8, :8], a[:, :8, :8])


# ---------------------------------------------------------------------------------------------
# Max-Sensitivity


def _explain_fixed(t):
    w = torch.linspace(-1, 2, t[0].numel(), dtype=t.dtype).view(t.shape[1:])
    return torch.sin(5 * t) * w + t**2


def test_max_sensitivity_hand_reference():
    x = torch.rand(3, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(20))
    out = M.max_sensitivity(_explain_fixed, x, r=0.05, samples=6,
                            generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the documented draws: (2U − 1) r, one per sample
    base = _explain_fixed(x).flatten(1)
    ratios = []
    for _ in range(6):
        d = (2 * torch.rand(x.shape, generator=g, dtype=D) - 1) * 0.05
        assert d.abs().max() <= 0.05
        ratios.append((_explain_fixed(x + d).flatten(1) - base).norm(dim=1) / base.norm(dim=1))
    torch.testing.assert_close(out, torch.stack(ratios).max(0).values)
    assert (out > torch.stack(ratios).mean(0)).all()  # the max, not the mean
    # identity explainer: ‖δ‖ / ‖x‖ ≤ r √d / ‖x‖; a constant explainer: 0
    ident = M.max_sensitivity(lambda t: t, x, r=0.05, samples=4)
    assert (ident <= 0.05 * math.sqrt(32) / x.flatten(1).norm(dim=1)).all()
    assert (M.max_sensitivity(lambda t: torch.ones_like(t), x, samples=3) == 0).all()


def test_max_sensitivity_equals_quantus():
    quantus = pytest.importorskip("quantus")
    x = torch.rand(3, 1, 6, 6, dtype=D, generator=torch.Generator().manual_seed(21))
    mine = M.max_sensitivity(_explain_fixed, x, r=0.1, samples=4,
                             generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    deltas = iter([((2 * torch.rand(x.shape, generator=g, dtype=D) - 1) * 0.1).reshape(3, -1)
                   .numpy() for _ in range(4)])

    def replay(arr, indices, **kwargs):  # Quantus' perturb_func, fed the same noise
        return arr + next(deltas)

    def explain(model, inputs, targets, **kwargs):
        return _explain_fixed(torch.as_tensor(inputs)).numpy()

    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2)).double()
    ref = quantus.MaxSensitivity(nr_samples=4, perturb_func=replay, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=np.zeros(3, dtype=int), a_batch=None,
        explain_func=explain, device="cpu")
    np.testing.assert_allclose(mine.numpy(), ref, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Deletion and insertion


class TwoClassLinear(nn.Module):
    """logits (w·x, 0): p(class 0) = sigmoid(w·x), p(class 1) = 1 − that."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def _expected_auc(w, x, a_pix, steps, baseline, insert, target):
    """numpy: remove / insert pixels (all channels) in descending a_pix order; trapezoid AUC."""
    n = a_pix.size
    order = np.argsort(-a_pix.ravel(), kind="stable")
    probs = []
    for s in range(steps + 1):
        chosen = np.zeros(n, bool)
        chosen[order[: (s * n) // steps]] = True
        chosen = chosen.reshape(a_pix.shape)[None]
        xs = np.where(chosen, x, baseline) if insert else np.where(chosen, baseline, x)
        p0 = 1 / (1 + np.exp(-(w * xs).sum()))
        probs.append(p0 if target == 0 else 1 - p0)
    return trapezoid(probs, dx=1 / steps)


@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("steps", [16, 5])
def test_deletion_insertion_on_a_linear_model(insert, target, steps):
    gen = torch.Generator().manual_seed(22)
    w = torch.randn(2, 4, 4, generator=gen, dtype=D) * 0.8
    x = torch.rand(1, 2, 4, 4, generator=gen, dtype=D)
    model = TwoClassLinear(w)
    a = w * x  # gradient x input, (N, C, H, W): pixels ranked by Σ_c |a_c|
    fn = M.insertion_auc if insert else M.deletion_auc
    for baseline in (0.0, 0.25):
        got = fn(model, x, a, torch.tensor([target]), steps=steps, baseline=baseline)
        ref = _expected_auc(w.numpy(), x[0].numpy(), a.abs().sum(1)[0].numpy(), steps, baseline,
                            insert, target)
        assert got.item() == pytest.approx(ref, rel=1e-12)


def test_deletion_removes_the_top_pixels_first():
    # x = 1 everywhere, w > 0 distinct, map = w: deletion of the top-w pixels drops the score
    # fastest, so the map beats its reverse; insertion the other way round.
    w = torch.arange(1.0, 17.0, dtype=D).view(1, 4, 4) / 8 - 0.9
    w = w.abs() + 0.05
    model, x = TwoClassLinear(w), torch.ones(1, 1, 4, 4, dtype=D)
    good, bad = w.clone(), -w.clone() + w.max() + 1  # bad: ranks reversed, still positive
    del_good, del_bad = (M.deletion_auc(model, x, m, 0, steps=16) for m in (good, bad))
    ins_good, ins_bad = (M.insertion_auc(model, x, m, 0, steps=16) for m in (good, bad))
    assert del_good.item() < del_bad.item() and ins_good.item() > ins_bad.item()
    # one step, baseline 0: curve p(x), p(0) = 1/2: the trapezoid is their mean
    p = torch.sigmoid(w.sum()).item()
    assert M.deletion_auc(model, x, good, 0, steps=1).item() == pytest.approx((p + 0.5) / 2)
    assert M.insertion_auc(model, x, good, 0, steps=1).item() == pytest.approx((p + 0.5) / 2)


def test_deletion_insertion_bounds_modes_and_batches():
    model = TinyCNN().double().train()
    x = torch.rand(4, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(23))
    a, y = _rand(4, 3, 32, 32, seed=24), torch.tensor([0, 3, 5, 9])
    for fn in (M.deletion_auc, M.insertion_auc):
        out = fn(model, x, a, y, steps=8)
        assert out.shape == (4,) and ((out >= 0) & (out <= 1)).all()
        single = torch.cat([fn(model, x[k : k + 1], a[k : k + 1], y[k : k + 1], steps=8)
                            for k in range(4)])
        torch.testing.assert_close(out, single)
        torch.testing.assert_close(out, fn(model, x, a.abs().sum(1), y, steps=8))
    assert model.training and all(m.training for m in model.modules())
    const = ConstantModel(num_classes=10, label=2, sensitivity=0.0).double()
    p = torch.softmax(const.logits, 0)[2].item()
    for fn in (M.deletion_auc, M.insertion_auc):
        assert fn(const, x, a, 2).tolist() == pytest.approx([p] * 4)


# ---------------------------------------------------------------------------------------------
# Cascading randomisation


def _gradient(model, x, target):
    x = x.detach().requires_grad_(True)
    out = model(x).gather(1, target.view(-1, 1)).sum()
    return torch.autograd.grad(out, x)[0]


def test_cascading_randomisation_cascades_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).double().train()
    with torch.no_grad():  # a "trained" BatchNorm: re-initialising it (1, 0) changes it
        model.features[1].weight.uniform_(0.5, 1.5)
        model.features[1].bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(25))
    seen, maps = [], []

    def explain(m, t, c):
        seen.append({k: v.clone() for k, v in m.named_parameters()})
        assert not m.training  # the copy runs in eval mode
        maps.append(-_gradient(m, t, c))
        return maps[-1]

    rng = torch.get_rng_state()
    out = M.cascading_randomisation(model, x, torch.tensor([1, 3]), explain, seed=4)
    assert list(out) == ["original", "fc", "features.1", "features.0"]  # output side first
    torch.testing.assert_close(out["original"], torch.ones(2, dtype=D))
    assert all(v.shape == (2,) for v in out.values())
    assert (out["features.0"] < 0.9).all()
    # each score is scipy's Spearman of the channel-summed |maps| against the first map
    mag = [m.abs().sum(1).numpy() for m in maps]
    for k, name in enumerate(out):
        np.testing.assert_allclose(out[name].numpy(), _spearman_np(mag[0], mag[k + 1]),
                                   rtol=1e-12)
    # the model itself: parameters, buffers, modes and the caller's RNG all untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    # cumulative: after step k, layers 1..k differ from the original and keep step k's values
    layer_params = {"fc": ["fc.weight", "fc.bias"],
                    "features.1": ["features.1.weight", "features.1.bias"],
                    "features.0": ["features.0.weight", "features.0.bias"]}
    assert len(seen) == 5  # reference, original, three steps
    order = list(layer_params)
    for step in range(3):
        params = seen[2 + step]
        for j, layer in enumerate(order):
            for name in layer_params[layer]:
                same_as_original = torch.equal(params[name], before[name])
                if j <= step:
                    assert not same_as_original, (step, name)
                    if j < step:
                        assert torch.equal(params[name], seen[1 + step][name]), (step, name)
                else:
                    assert same_as_original, (step, name)


def test_cascading_randomisation_seeds_a_stochastic_explainer_and_checks_names():
    model = TinyCNN(num_classes=4).double()
    x = torch.rand(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(26))

    def noisy(m, t, c):  # SmoothGrad-like: draws from the global RNG
        return _gradient(m, t + 0.1 * torch.randn_like(t), c)

    out = M.cascading_randomisation(model, x, 1, noisy, layers=["fc"], seed=1)
    assert list(out) == ["original", "fc"]
    torch.testing.assert_close(out["original"], torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="does not have"):
        M.cascading_randomisation(model, x, 1, noisy, layers=["nope"])
    with pytest.raises(ValueError, match="no parameters"):
        M.cascading_randomisation(model, x, 1, noisy, layers=["features.2"])  # the ReLU


def test_cascading_randomisation_randomises_a_named_block_whole():
    model = TinyCNN(num_classes=4).double()
    with torch.no_grad():
        model.features[1].weight.fill_(0.7)  # not the (1, 0) that re-initialising gives
        model.features[1].bias.fill_(0.3)
    x = torch.rand(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(27))
    seen = []

    def explain(m, t, c):
        seen.append({k: v.clone() for k, v in m.named_parameters()})
        return _gradient(m, t, c)

    out = M.cascading_randomisation(model, x, 1, explain, layers=["features"])
    assert list(out) == ["original", "features"]
    after = seen[-1]
    for name, p in model.named_parameters():
        assert torch.equal(after[name], p) == name.startswith("fc."), name
