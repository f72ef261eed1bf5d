"""Tests of ``select()``: the contract every method keeps (exactly k distinct in-range int64
indices, ``values == x[indices]`` in x's dtype), the exactness of the CPU refinement behind
"gaussk" and "dgc", randk's reproducibility and uniformity, input validation, and the registry.
"""

import functools
import math
import sys

import pytest
import torch

from lightning_gaussk import available_selectors, get_selector, register_selector, select
from lightning_gaussk.selection.selectors import _lane_size
from test_hook import check_message

SELECT_MODULE = sys.modules["lightning_gaussk.selection.cpu"]  # the CPU lane machinery behind "gaussk" and "dgc"

BUILTIN = ("topk", "gaussk", "dgc", "randk")
EXACT = ("topk", "gaussk", "dgc")  # exact top-k on CPU tensors (up to ties)
FAMILIES = (
    "normal",
    "laplace",
    "student_t3",
    "mixed_scales",
    "uniform",
    "constant",
    "all_zero",
    "mostly_zero",  # fewer nonzeros than k
    "concentrated",  # more nonzeros than k, packed into fewer than k lanes
    "negative_only",
)
# (d, k): small d takes torch.topk directly; 300_007 (not a multiple of 64: a 39-entry tail) takes
# the lane path with 64-entry lanes (k = 300) and 8-entry lanes (k = 3000)
SIZES = ((1_000, 10), (300_007, 300), (300_007, 3_000))


@functools.lru_cache(maxsize=None)
def make(family: str, d: int, seed: int = 0) -> torch.Tensor:
    """A reproducible 1-D fp32 input of the given family (treat as read-only: it is cached)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + d)
    if family == "normal":
        return torch.randn(d, generator=g)
    if family == "laplace":  # inverse CDF of Laplace(0, 1)
        u = torch.rand(d, generator=g, dtype=torch.float64) - 0.5
        return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    if family == "student_t3":  # z / sqrt(chi2_3 / 3)
        z = torch.randn(d, generator=g, dtype=torch.float64)
        chi2 = (torch.randn(3, d, generator=g, dtype=torch.float64) ** 2).sum(0)
        return (z / (chi2 / 3).sqrt()).float()
    if family == "mixed_scales":  # concatenated "layers" of very different scales
        cuts = [0, d // 10, d // 3, d // 2, (3 * d) // 4, d]
        scales = (1.0, 1e-3, 0.1, 1e-2, 0.3)
        return torch.cat([torch.randn(b - a, generator=g) * s for a, b, s in zip(cuts, cuts[1:], scales)])
    if family == "uniform":
        return torch.rand(d, generator=g)
    if family == "constant":
        return torch.full((d,), 0.75)
    if family == "all_zero":
        return torch.zeros(d)
    if family == "mostly_zero":
        x = torch.zeros(d)
        nnz = max(1, d // 50_000)  # 1 or 6: fewer than any k used with it
        x[torch.randperm(d, generator=g)[:nnz]] = torch.randn(nnz, generator=g)
        return x
    if family == "concentrated":
        x = torch.zeros(d)
        x[d // 3 : d // 3 + d // 20] = torch.randn(d // 20, generator=g)
        return x
    if family == "negative_only":
        return -(torch.rand(d, generator=g) + 1e-3)
    raise ValueError(family)


def check_contract(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    assert indices.dtype == torch.int64
    assert indices.shape == (k,) and values.shape == (k,)
    assert values.dtype == x.dtype
    assert int(indices.min()) >= 0 and int(indices.max()) < x.numel()
    assert indices.unique().numel() == k, "indices are not distinct"
    assert torch.equal(values, x[indices])


def check_exact(x: torch.Tensor, k: int, values: torch.Tensor) -> None:
    """The magnitudes picked are those of an exact top-k (ties may pick other positions)."""
    best = torch.topk(x.abs().double(), k).values
    got = values.abs().double().sort(descending=True).values
    total = float((best**2).sum())
    capture = float((got**2).sum()) / total if total > 0 else 1.0
    assert capture >= 0.999, f"squared-norm capture {capture:.6f} < 0.999"
    assert torch.equal(got, best), "magnitudes differ from the exact top-k"


# ------------------------------------------------------------------------- every method, every input
@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", BUILTIN)
def test_every_method_returns_k_distinct_indices_and_matching_values(method, family, d, k):
    x = make(family, d)
    values, indices = select(x, k, method)
    check_contract(x, k, values, indices)


@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_return_the_exact_topk_magnitudes(method, family, d, k):
    x = make(family, d)
    values, _ = select(x, k, method)
    check_exact(x, k, values)


LANE_KS = (1, 5, 300, 900, 1_500, 3_000, 8_000, 15_000, 30_000)


def test_lane_geometries_cover_every_lane_size():
    """The ks of the next test drive every lane size of the CPU refinement, and the fallback."""
    assert {_lane_size(300_007, k) for k in LANE_KS} == {64, 32, 16, 8, 4, 2, None}
    assert _lane_size(1_000, 10) is None  # small d ranks with torch.topk


@pytest.mark.parametrize("k", LANE_KS)
@pytest.mark.parametrize("family", ("normal", "student_t3", "mostly_zero", "concentrated"))
@pytest.mark.parametrize("method", ("gaussk", "dgc"))
def test_refinement_is_exact_for_every_lane_size(method, family, k):
    x = make(family, 300_007, seed=1)
    values, indices = select(x, k, method)
    check_contract(x, k, values, indices)
    check_exact(x, k, values)


@pytest.mark.parametrize("k", (300, 3_000))
def test_gaussian_estimate_brackets_k_in_one_count_on_normal_data(monkeypatch, k):
    """On normal data the paper's estimate is good enough that no second guess is needed; on
    heavy tails it is re-aimed once and the result is exact all the same."""
    calls = []
    real = SELECT_MODULE._aim_lanes
    monkeypatch.setattr(SELECT_MODULE, "_aim_lanes", lambda *a: calls.append(a) or real(*a))
    select(make("normal", 300_007, seed=2), k, "gaussk")
    assert calls == []
    x = make("student_t3", 300_007, seed=2)
    values, _ = select(x, k, "gaussk")
    assert len(calls) == 1
    check_exact(x, k, values)


@pytest.mark.parametrize("method", EXACT)
def test_ties_at_the_boundary_give_the_exact_magnitudes(method):
    g = torch.Generator().manual_seed(7)
    for d, k in ((300_007, 3_000), (300_007, 300), (999, 100)):
        x = torch.randint(-3, 4, (d,), generator=g).float()  # 7 magnitudes: huge tie classes
        values, indices = select(x, k, method)
        check_contract(x, k, values, indices)
        check_exact(x, k, values)


@pytest.mark.parametrize("method", BUILTIN)
def test_k_equals_1_picks_the_largest_magnitude(method):
    for d in (1_000, 300_007):
        x = make("student_t3", d)
        values, indices = select(x, 1, method)
        check_contract(x, 1, values, indices)
        if method != "randk":
            assert int(indices[0]) == int(x.abs().argmax())


@pytest.mark.parametrize("method", BUILTIN)
def test_k_equals_d_returns_everything(method):
    for d in (1, 7, 1_000):
        x = make("normal", d)
        values, indices = select(x, d, method)
        check_contract(x, d, values, indices)
        assert torch.equal(indices.sort().values, torch.arange(d))


@pytest.mark.parametrize("method", BUILTIN)
def test_tiny_buckets_every_k(method):
    for d in (1, 2, 3, 5, 17, 64, 65):
        x = make("laplace", d, seed=d)
        for k in range(1, d + 1):
            values, indices = select(x, k, method)
            check_contract(x, k, values, indices)
            if method != "randk":
                check_exact(x, k, values)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float64))
@pytest.mark.parametrize("method", BUILTIN)
def test_half_and_double_inputs_keep_their_dtype(method, dtype):
    for d, k in ((1_000, 10), (300_007, 300), (300_007, 3_000)):
        x = make("normal", d).to(dtype)
        values, indices = select(x, k, method)
        check_contract(x, k, values, indices)
        if method != "randk":
            check_exact(x, k, values)


@pytest.mark.parametrize("method", BUILTIN)
def test_non_contiguous_input_indexes_the_view(method):
    base = make("laplace", 900_021)
    x = base[::3]
    assert not x.is_contiguous()
    values, indices = select(x, 300, method)
    check_contract(x, 300, values, indices)
    if method != "randk":
        check_exact(x, 300, values)


@pytest.mark.parametrize("method", EXACT)
def test_entries_in_the_tail_are_candidates(method):
    x = make("normal", 300_007).clone()  # 300_007 = 64 * 4687 + 39: the last 39 entries form the tail
    x[-1], x[-39] = 100.0, -50.0
    values, indices = select(x, 300, method)
    assert {300_006, 299_968} <= set(indices.tolist())
    check_exact(x, 300, values)


@pytest.mark.parametrize("k", (300, 3_000))
@pytest.mark.parametrize("method", EXACT)
def test_nan_entries_rank_first_like_torch_topk(method, k):
    x = make("normal", 300_007).clone()
    nan_at = torch.tensor([5, 70_000, 299_999, 300_006])
    x[nan_at] = float("nan")
    x[77] = -float("nan")
    values, indices = select(x, k, method)
    assert indices.shape == (k,) and indices.unique().numel() == k
    torch.testing.assert_close(values, x[indices], rtol=0, atol=0, equal_nan=True)
    assert set(nan_at.tolist()) | {77} <= set(indices.tolist())


def test_gaussk_and_dgc_agree_with_topk_on_a_real_gradient_shape():
    """Concatenated parameters of very different sizes and scales, as a DDP bucket holds them."""
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, generator=g) * s for n, s in ((4096, 0.5), (250_000, 0.01), (64, 3.0), (80_000, 0.002))]
    x = torch.cat(parts)
    k = 334
    _, want = select(x, k, "topk")
    for method in ("gaussk", "dgc"):
        values, indices = select(x, k, method)
        check_contract(x, k, values, indices)
        assert set(indices.tolist()) == set(want.tolist())  # no ties in continuous data


@pytest.mark.parametrize("method", BUILTIN)
def test_input_requiring_grad_gives_differentiable_values(method, recwarn):
    for d, k in ((1_000, 10), (300_007, 300)):
        x = make("normal", d).clone().requires_grad_(True)
        values, indices = select(x, k, method)
        assert values.requires_grad
        values.square().sum().backward()
        assert torch.equal(torch.nonzero(x.grad).squeeze(1).sort().values, indices.sort().values)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


# ------------------------------------------------------------------------- randk
def test_randk_is_reproducible_from_seed_and_step():
    x = make("normal", 10_000)
    a = select(x, 100, "randk", seed=3, step=11)[1]
    assert torch.equal(a, select(x, 100, "randk", seed=3, step=11)[1])
    assert not torch.equal(a, select(x, 100, "randk", seed=3, step=12)[1])
    assert not torch.equal(a, select(x, 100, "randk", seed=4, step=11)[1])


def test_randk_marginals_are_uniform():
    d, k, steps = 1_000, 50, 4_000
    x = torch.zeros(d)
    counts = torch.zeros(d)
    for step in range(steps):
        counts[select(x, k, "randk", seed=0, step=step)[1]] += 1
    mean = steps * k / d  # 200
    sd = math.sqrt(steps * (k / d) * (1 - k / d))
    assert float(counts.min()) > mean - 5 * sd and float(counts.max()) < mean + 5 * sd
    chi2 = float(((counts - mean) ** 2).sum() / (mean * (1 - k / d)))
    assert abs(chi2 - d) < 6 * math.sqrt(2 * d)  # chi-square with ~d degrees of freedom


def test_randk_ignores_the_values():
    a = select(make("normal", 5_000), 40, "randk", seed=1, step=2)[1]
    b = select(make("uniform", 5_000), 40, "randk", seed=1, step=2)[1]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "x,k,method,exc,names",
    [
        (torch.ones(10), 0, "gaussk", ValueError, "`k`"),
        (torch.ones(10), 11, "gaussk", ValueError, "`k`"),
        (torch.ones(10), -1, "topk", ValueError, "`k`"),
        (torch.ones(10), 2.0, "gaussk", TypeError, "`k`"),
        (torch.ones(10), True, "gaussk", TypeError, "`k`"),
        (torch.ones(10), "3", "gaussk", TypeError, "`k`"),
        (torch.ones(10), torch.tensor(3), "gaussk", TypeError, "`k`"),
        (torch.ones(2, 5), 3, "gaussk", ValueError, "`x`"),
        (torch.ones(()), 1, "gaussk", ValueError, "`x`"),
        (torch.ones(10, dtype=torch.int32), 3, "gaussk", TypeError, "`x`"),
        (torch.ones(10, dtype=torch.bool), 3, "topk", TypeError, "`x`"),
        ([1.0, 2.0], 1, "gaussk", TypeError, "`x`"),
        (torch.ones(10), 3, "no_such_method", ValueError, "no_such_method"),
    ],
)
def test_bad_input_raises_naming_the_argument(x, k, method, exc, names):
    with pytest.raises(exc, match=names):
        select(x, k, method)


# ------------------------------------------------------------------------- registry
def test_builtin_selectors_are_registered():
    assert set(BUILTIN) <= set(available_selectors())
    assert available_selectors() == sorted(available_selectors())
    with pytest.raises(ValueError, match="available"):
        get_selector("no_such_method")


def test_user_selector_runs_through_select(registry):
    seen = {}

    @register_selector("first_k")
    def first_k(x, k, *, seed, step):
        seen.update(contiguous=x.is_contiguous(), seed=seed, step=step)
        idx = torch.arange(k)
        return x[idx], idx

    assert "first_k" in available_selectors() and get_selector("first_k") is first_k
    x = make("normal", 3_000)[::2]
    values, indices = select(x, 7, "first_k", seed=5, step=9)
    check_contract(x, 7, values, indices)
    assert torch.equal(indices, torch.arange(7))
    assert seen == {"contiguous": True, "seed": 5, "step": 9}


def test_duplicate_name_raises_unless_override(registry):
    def a(x, k, *, seed, step):
        idx = torch.topk(x.abs(), k).indices
        return x[idx], idx

    def b(x, k, *, seed, step):
        idx = torch.arange(k)
        return x[idx], idx

    register_selector("dup", a)
    register_selector("dup", a)  # the same function again is harmless
    with pytest.raises(ValueError, match="dup"):
        register_selector("dup", b)
    with pytest.raises(ValueError, match="gaussk"):
        register_selector("gaussk", b)
    assert register_selector("dup", b, override=True) is b
    assert get_selector("dup") is b


def test_register_rejects_bad_names_and_non_callables(registry):
    with pytest.raises(TypeError, match="name"):
        register_selector("", lambda x, k, *, seed, step: None)
    with pytest.raises(TypeError, match="name"):
        register_selector(3, lambda x, k, *, seed, step: None)
    with pytest.raises(TypeError, match="callable"):
        register_selector("not_callable", 42)


def test_selector_returning_the_wrong_shape_raises(registry):
    @register_selector("too_few")
    def too_few(x, k, *, seed, step):
        idx = torch.arange(k - 1)
        return x[idx], idx

    with pytest.raises(RuntimeError, match="too_few"):
        select(torch.randn(100), 10, "too_few")


@pytest.mark.parametrize("method", ["gaussk", "topk"])
def test_select_errors_state_the_allowed_range_and_the_value(method):
    for k in (0, 11, -3):
        with pytest.raises(ValueError) as err:
            select(torch.ones(10), k, method)
        check_message(err, ["`k`", "1 <= k <= x.numel() = 10", f"k={k}"])
    with pytest.raises(ValueError) as err:
        select(torch.ones(10), 3, "no_such_method")
    check_message(err, ["'no_such_method'", *available_selectors()])
