"""Tests of histogram-refined Gaussian-k selection: torch path and Triton path.

The Triton kernels run on CPU tensors through the Triton interpreter, so
TRITON_INTERPRET must be set before triton decorates them.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import importlib.util
import math
import struct
import sys

import numpy as np
import pytest
import torch

from lightning_gaussk.selection import histogram as _histselect
from lightning_gaussk.selection import triton as kernels
from lightning_gaussk.selection.histogram import (
    CENTER,
    NUM_BINS,
    bin_index,
    boundary,
    estimate_threshold,
    hist_select,
    histogram,
    scatter_histogram,
    threshold_from_moments,
)
from lightning_gaussk.selection.triton import triton_available, triton_select

needs_triton = pytest.mark.skipif(
    not triton_available(), reason="`import triton` failed: the Triton kernels cannot run here"
)

# ---------------------------------------------------------------- inputs


def make(family: str, d: int, seed: int = 0) -> torch.Tensor:
    """A 1-D test input of ``d`` elements; ``family`` may end in @bf16 / @fp16 / @noncontig."""
    g = torch.Generator().manual_seed(seed)
    base, _, variant = family.partition("@")
    n = 2 * d if variant == "noncontig" else d
    if base == "normal":
        x = torch.randn(n, generator=g)
    elif base == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        x = -u.sign() * torch.log1p(-2 * u.abs())
    elif base == "student_t3":  # z / sqrt(chi2_3 / 3): heavy tails, only 2 moments
        z = torch.randn(n, generator=g)
        x = z / (torch.randn(3, n, generator=g).pow(2).sum(0) / 3).sqrt()
    elif base == "mixed_scales":  # 4 contiguous segments, std 1e-3 .. 1
        scales = torch.logspace(-3, 0, 4)
        x = torch.randn(n, generator=g) * scales[torch.arange(n) * 4 // n]
    elif base == "uniform":
        x = torch.rand(n, generator=g)
    elif base == "negative":  # the large magnitudes are all negative
        x = torch.randn(n, generator=g)
        x = torch.where(x < 0, 3 * x, 0.1 * x)
    elif base == "constant":
        x = torch.full((n,), 0.7)
    elif base == "zeros":
        x = torch.zeros(n)
    elif base == "sparse":  # ~2% nonzeros: fewer than k for large k
        x = torch.zeros(n)
        nnz = max(1, n // 50)
        x[torch.randperm(n, generator=g)[:nnz]] = torch.randn(nnz, generator=g)
    else:
        raise ValueError(family)
    if variant == "bf16":
        x = x.bfloat16()
    elif variant == "fp16":
        x = x.half()
    elif variant == "noncontig":
        x = x[::2]
        assert d == 1 or not x.is_contiguous()
    return x


FAMILIES = [
    "normal", "laplace", "student_t3", "mixed_scales", "uniform", "negative", "constant",
    "zeros", "sparse", "normal@bf16", "normal@fp16", "student_t3@bf16", "normal@noncontig",
]
SIZES = [(1, 1), (5, 1), (5, 3), (5, 5), (1000, 1), (1000, 1000), (3001, 7), (3001, 150),
         (20_000, 200)]


# ---------------------------------------------------------------- checks


def assert_valid(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """k distinct in-range int64 indices and values == x[indices] exactly."""
    flat = x.reshape(-1)
    assert indices.dtype == torch.int64 and indices.shape == (k,)
    assert values.dtype == x.dtype and values.shape == (k,)
    assert 0 <= int(indices.min()) and int(indices.max()) < flat.numel()
    assert indices.unique().numel() == k
    assert torch.equal(values, flat[indices])


def split(x: torch.Tensor, k: int, indices: torch.Tensor, t0: torch.Tensor):
    """Check the selected set against the definition of b*; return (above, band) sorted."""
    b = bin_index(x, t0)
    # Independently of boundary(): the largest b with count(bin >= b) >= k is the k-th largest bin.
    bstar = int(b.sort(descending=True).values[k - 1])
    a = int((b > bstar).sum())
    assert a < k <= int((b >= bstar).sum())
    got_b, got_a = boundary(histogram(b), k)
    assert (int(got_b), int(got_a)) == (bstar, a)

    sel_bins = b[indices]
    above = indices[sel_bins > bstar].sort().values
    band = indices[sel_bins == bstar].sort().values
    assert torch.equal(above, (b > bstar).nonzero().squeeze(1))  # every element above b* is in
    assert band.numel() == k - a  # the rest come from bin b* ...
    assert above.numel() + band.numel() == k  # ... and nothing from below it
    return above, band


def energy_ratio(x: torch.Tensor, values: torch.Tensor, k: int) -> float:
    """Selected squared norm over the exact top-k squared norm."""
    best = torch.topk(x.float().abs(), k).values.double().pow(2).sum()
    return float(values.double().pow(2).sum() / best)


# ---------------------------------------------------------------- threshold and bins


def test_gaussian_threshold_matches_formula():
    for d, k in [(100_000, 100), (1000, 1000), (5, 1), (1, 1)]:
        x = make("laplace", d, seed=1) * 3 + 0.5
        xd = x.double()
        std = xd.std() if d > 1 else torch.zeros((), dtype=torch.float64)
        z = torch.special.ndtri(torch.tensor(1 - k / (2 * d), dtype=torch.float64))
        expect = float(xd.mean().abs() + std * z)
        t0 = estimate_threshold(x, k)
        assert t0.dtype == torch.float32 and t0.dim() == 0
        assert math.isclose(float(t0), expect, rel_tol=1e-4)


def test_gaussian_threshold_is_positive_on_zero_input():
    assert float(estimate_threshold(torch.zeros(1000), 10)) == pytest.approx(1e-30)
    assert float(estimate_threshold(torch.zeros(1), 1)) > 0


def test_gaussian_threshold_finite_for_tiny_k_over_d():
    # 1 - k/(2d) rounds to 1 in fp32; the estimate must still be finite.
    t0 = estimate_threshold(torch.randn(10_000_000), 1)
    assert math.isfinite(float(t0)) and 5 < float(t0) < 6


@pytest.mark.parametrize("t0", [0.37, 1e-30, 1e-45])
def test_bin_index_bits_match_reference_formula(t0):
    x = make("mixed_scales", 10_000, seed=2)
    x[:4] = torch.tensor([0.0, -0.0, 1e-40, -3e-39])  # zeros and denormals
    kt = struct.unpack("<i", struct.pack("<f", t0))[0] >> 18
    t0 = torch.tensor(t0)
    key = np.abs(x.numpy()).view(np.int32) >> 18
    ref = np.where(np.abs(x.numpy()) == 0, 0, np.clip(key - kt + CENTER, 0, NUM_BINS - 1))
    got = bin_index(x, t0)
    assert got.dtype == torch.int32
    assert np.array_equal(got.numpy(), ref)


def test_bin_index_is_monotone_in_magnitude_with_32_bins_per_octave():
    t0 = torch.tensor(1.5)
    x = torch.tensor([0.0, 1e-40, 1e-12, 0.75, -1.5, 1.5, 3.0, -3.0, 1e12, float("inf")])
    b = bin_index(x, t0).tolist()
    assert b[0] == 0 and b[4] == b[5] == CENTER
    assert b[3] == CENTER - 32 and b[6] == b[7] == CENTER + 32  # one octave = 32 bins
    assert b[-2] == b[-1] == NUM_BINS - 1 and b[2] == 0  # edge bins absorb the rest
    mags = torch.sort(make("student_t3", 50_000).abs()).values
    assert (bin_index(mags, t0).diff() >= 0).all()
    # t0 = 1e-30 < 2^-95: key(0) - key(t0) + 1024 > 0, yet zeros still take bin 0
    b = bin_index(torch.tensor([0.0, -0.0, 1e-38, 1e-30]), torch.tensor(1e-30)).tolist()
    assert b[:2] == [0, 0] and 0 < b[2] < b[3] == CENTER


def test_boundary_on_hand_made_histogram():
    hist = torch.zeros(NUM_BINS, dtype=torch.int64)
    hist[[3, 10, 2047]] = torch.tensor([5, 4, 2])
    cases = {1: (2047, 0), 2: (2047, 0), 3: (10, 2), 6: (10, 2), 7: (3, 6), 11: (3, 6)}
    for k, (bstar, a) in cases.items():
        got_b, got_a = boundary(hist, k)
        assert (int(got_b), int(got_a)) == (bstar, a), k


def test_scatter_histogram_matches_bincount():
    b = bin_index(make("student_t3", 50_000), torch.tensor(0.5))
    h = scatter_histogram(b)
    assert h.dtype == torch.int64 and torch.equal(h, torch.bincount(b, minlength=NUM_BINS))


# ---------------------------------------------------------------- validity on all families


@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_hist_select_returns_k_distinct_indices_and_exact_values(family, d, k):
    x = make(family, d)
    values, indices = hist_select(x, k)
    assert_valid(x, k, values, indices)
    split(x, k, indices, estimate_threshold(x, k))


@needs_triton
@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_select_returns_k_distinct_indices_and_exact_values(family, d, k):
    x = make(family, d)
    values, indices = triton_select(x, k)
    assert_valid(x, k, values, indices)


def test_hist_select_rejects_bad_k():
    for k in (0, 6):
        with pytest.raises(ValueError):
            hist_select(torch.randn(5), k)


def test_hist_select_takes_all_nonzeros_when_fewer_than_k():
    x = torch.zeros(1000)
    x[[7, 500, 999]] = torch.tensor([-2.0, 1e-3, 5.0])
    _, indices = hist_select(x, 10)
    assert {7, 500, 999} <= set(indices.tolist())


def test_hist_select_ranks_by_magnitude_not_sign():
    x = -torch.arange(1, 1001, dtype=torch.float32)  # largest magnitudes are the most negative
    x[::2] *= -1e-3
    values, indices = hist_select(x, 50)
    assert (values < -800).all()
    assert energy_ratio(x, values, 50) > 0.99


def test_hist_select_band_takes_lowest_indices():
    x = torch.full((100,), 0.7)
    x[[10, 20]] = 5.0
    _, indices = hist_select(x, 5)
    assert sorted(indices.tolist()) == [0, 1, 2, 10, 20]


# ---------------------------------------------------------------- same set from both paths


@needs_triton
@pytest.mark.parametrize("t0_scale", [1.0, 1e-15, 1e15])
@pytest.mark.parametrize("d,k", [(5, 2), (3001, 1500), (20_000, 200), (20_000, 20_000)])
@pytest.mark.parametrize("family", FAMILIES)
def test_above_part_bit_identical_and_band_from_boundary_bin(family, d, k, t0_scale):
    x = make(family, d, seed=3)
    t0 = estimate_threshold(x, k) * t0_scale  # 1e+-15: everything lands in an edge bin
    vt, it = hist_select(x, k, t0)
    vk, ik = triton_select(x, k, t0)
    assert_valid(x, k, vt, it)
    assert_valid(x, k, vk, ik)
    above_t, band_t = split(x, k, it, t0)
    above_k, band_k = split(x, k, ik, t0)
    assert torch.equal(above_t, above_k)
    assert band_t.numel() == band_k.numel()


@needs_triton
@pytest.mark.parametrize("family", ["normal", "student_t3@bf16", "mixed_scales@fp16", "constant"])
@pytest.mark.parametrize("block,max_programs", [(1024, 4), (1024, 1024), (512, 7)])
def test_triton_many_programs_and_tiles_agree_with_torch(family, block, max_programs):
    x = make(family, 20_001, seed=4)  # not a multiple of any block
    k = 300
    t0 = estimate_threshold(x, k)
    hist = torch.empty(NUM_BINS, dtype=torch.int32)
    _, ik = triton_select(x, k, t0, hist=hist, block=block, max_programs=max_programs)
    assert torch.equal(hist.long(), histogram(bin_index(x, t0)))  # Triton bins == torch bins
    _, it = hist_select(x, k, t0)
    assert torch.equal(split(x, k, ik, t0)[0], split(x, k, it, t0)[0])


@needs_triton
@pytest.mark.parametrize("t0", [1e-45, 1e-30, 0.37, 1e30])
def test_triton_bins_match_torch_bit_for_bit(t0):
    x = make("sparse", 10_000, seed=7) * 1e-20
    x[:6] = torch.tensor([-0.0, 1e-40, -3e38, float("inf"), -1e-6, 3e-8])  # subnormal in bf16/fp16
    for xx in (x, x.bfloat16(), x.half()):
        hist = torch.empty(NUM_BINS, dtype=torch.int32)
        triton_select(xx, 50, torch.tensor(t0), hist=hist)
        assert torch.equal(hist.long(), histogram(bin_index(xx, torch.tensor(t0))))


@needs_triton
def test_triton_reuses_buffers():
    hist = torch.full((NUM_BINS,), 123, dtype=torch.int32)  # garbage: must be zeroed
    counters = torch.full((2,), 99, dtype=torch.int32)
    for seed in range(3):
        x = make("laplace", 30_000, seed=seed)
        t0 = estimate_threshold(x, 100)
        values, indices = triton_select(x, 100, t0, hist=hist, counters=counters)
        assert_valid(x, 100, values, indices)
        assert torch.equal(hist.long(), histogram(bin_index(x, t0)))
        assert int(counters[0]) < 100 <= int(counters.sum())  # a above, >= k - a in the band


@needs_triton
def test_triton_moments_kernel_threshold_matches_torch():
    x = make("student_t3", 100_003, seed=5)
    part = torch.empty(2, 13)
    moments_kernel = kernels._kernels()[0]
    tiles = -(-x.numel() // (13 * 1024))
    moments_kernel[(13,)](x, part, x.numel(), tiles, BLOCK=1024, IS_BF16=False)
    s, s2 = part.double().sum(1)
    assert math.isclose(float(s), float(x.double().sum()), rel_tol=1e-4, abs_tol=1e-2)
    assert math.isclose(float(s2), float(x.double().pow(2).sum()), rel_tol=1e-5)
    t0 = threshold_from_moments(s.float(), s2.float(), x.numel(), 100)
    assert math.isclose(float(t0), float(estimate_threshold(x, 100)), rel_tol=1e-4)


# ---------------------------------------------------------------- quality


@pytest.mark.parametrize("k", [200, 2000])
@pytest.mark.parametrize("family", ["normal", "laplace", "student_t3", "mixed_scales"])
def test_hist_select_keeps_99_percent_of_top_k_energy(family, k):
    x = make(family, 200_000, seed=6)
    values, _ = hist_select(x, k)
    assert energy_ratio(x, values, k) >= 0.99


@needs_triton
@pytest.mark.parametrize("k", [200, 2000])
@pytest.mark.parametrize("family", ["normal", "laplace", "student_t3", "mixed_scales"])
def test_triton_select_keeps_99_percent_of_top_k_energy(family, k):
    x = make(family, 200_000, seed=6)
    values, indices = triton_select(x, k)
    assert_valid(x, k, values, indices)
    assert energy_ratio(x, values, k) >= 0.99


# ---------------------------------------------------------------- no host syncs


def _raise(*args, **kwargs):
    raise AssertionError("host sync in the select path")


@pytest.mark.parametrize("scatter", [False, True], ids=["cpu_bincount", "cuda_scatter_add"])
@pytest.mark.parametrize("family,d,k", [("normal", 10_000, 100), ("zeros", 5, 2), ("constant", 1, 1),
                                        ("student_t3@bf16", 3001, 3001), ("sparse", 3001, 1000)])
def test_hist_select_is_sync_free(monkeypatch, family, d, k, scatter):
    x = make(family, d)
    if scatter:  # the histogram path non-CPU devices take
        monkeypatch.setattr(_histselect, "histogram", scatter_histogram)
    for name in ("item", "tolist", "nonzero", "numpy", "cpu", "__bool__", "__int__", "__float__",
                 "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    with pytest.raises(AssertionError, match="host sync"):
        bool(x.sum())  # the patch is live
    values, indices = hist_select(x, k)
    t0 = estimate_threshold(x, k)
    values2, indices2 = hist_select(x, k, t0)
    monkeypatch.undo()
    assert_valid(x, k, values, indices)
    assert torch.equal(indices, indices2)


# ---------------------------------------------------------------- optional triton


def test_kernels_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_kernels_without_triton", kernels.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.triton_available() is False
    with pytest.raises(RuntimeError, match="triton"):
        mod.triton_select(torch.ones(3), 1)
