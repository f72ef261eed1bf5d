"""Tests of ``accumulate_select``: ``u = residual + grad`` and its top-k in one call.

Its CPU fast path forms ``u`` inside the lane scan and zeroes ``grad`` there; these tests prove it
gives exactly what ``torch.add`` + ``select`` + ``0 * sum(u)`` give (same ``u``, same indices,
same values, same flag), that it is really taken where it should be and not elsewhere, and that
non-finite entries always raise the flag.
"""

import pytest
import torch
from test_select import SELECT_MODULE, make

from lightning_gaussk import register_selector, select
from lightning_gaussk.selection.selectors import accumulate_select

D = 300_007  # not a multiple of 64: a 39-entry tail outside the lane scan


@pytest.fixture
def fused_calls(monkeypatch):
    """Records, per lane scan, whether it was fused with the add."""
    calls: list[bool] = []
    scan = SELECT_MODULE._lane_absmax

    def spy(x, body, s, sign_off, fuse=None):
        calls.append(fuse is not None)
        return scan(x, body, s, sign_off, fuse)

    monkeypatch.setattr(SELECT_MODULE, "_lane_absmax", spy)
    return calls


def _inputs(family: str, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = make(family, d).clone()
    r = make("normal", d, seed=7) * 0.01  # a residual on another scale than the gradient
    if family in ("all_zero", "mostly_zero"):
        r = torch.zeros(d)  # keep u mostly zero too
    return r, g


def _reference(r: torch.Tensor, g: torch.Tensor, k: int, method: str, seed: int = 3, step: int = 11):
    u = r + g
    values, indices = select(u, k, method, seed=seed, step=step)
    return u, values, indices, u.sum() * 0.0


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("zero_grad", [True, False])
@pytest.mark.parametrize("k", [300, 3_000], ids=["64-entry lanes", "8-entry lanes"])
@pytest.mark.parametrize("family", ["normal", "mixed_scales", "student_t3", "mostly_zero", "concentrated", "all_zero"])
@pytest.mark.parametrize("method", ["gaussk", "dgc"])
def test_fused_pass_equals_add_then_select_bit_for_bit(method, family, k, zero_grad, fused_calls):
    r, g = _inputs(family)
    u_ref, v_ref, i_ref, f_ref = _reference(r, g, k, method)
    fused_calls.clear()
    out = torch.full((D,), 123.0)  # stale content must not leak into u
    g_before = g.clone()
    values, indices, flag = accumulate_select(r, g, out, k, method, seed=3, step=11, zero_grad=zero_grad)
    assert fused_calls == [True], "the CPU fast path was not taken"
    assert torch.equal(out, u_ref)
    assert torch.equal(indices, i_ref) and torch.equal(values, v_ref)
    assert torch.equal(values, out[indices])
    assert float(flag) == 0.0 == float(f_ref)
    assert torch.equal(g, torch.zeros(D)) if zero_grad else torch.equal(g, g_before)


@pytest.mark.parametrize("k", [300, 3_000])
@pytest.mark.parametrize(
    "where",
    ["nan in grad", "inf in residual", "-inf in the tail", "more non-finite entries than k"],
)
def test_non_finite_entries_always_raise_the_flag(where, k, fused_calls):
    r, g = _inputs("normal")
    if where == "nan in grad":
        g[12_345] = float("nan")
    elif where == "inf in residual":
        r[200_000] = float("inf")
    elif where == "-inf in the tail":
        g[D - 3] = -float("inf")
    else:
        g[::50] = float("nan")  # 6,001 entries
    u_ref, v_ref, i_ref, f_ref = _reference(r, g, k, "gaussk")
    fused_calls.clear()
    out = torch.empty(D)
    values, indices, flag = accumulate_select(r, g, out, k, "gaussk", seed=3, step=11, zero_grad=True)
    assert fused_calls == [True]
    assert torch.isnan(flag) and torch.isnan(f_ref)
    _assert_same(out, u_ref)
    assert torch.equal(indices, i_ref)
    _assert_same(values, v_ref)
    assert not bool(torch.isfinite(values).all())  # non-finite entries are picked first


def _user_gaussk(x, k, *, seed, step):
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return x[idx], idx


@pytest.mark.parametrize(
    "case",
    ["topk", "randk", "small bucket", "dense k", "bf16 grad", "fp64 out", "user override of gaussk", "strided grad"],
)
def test_other_inputs_take_add_then_select_with_the_same_results(case, fused_calls, registry):
    method, d, k = "gaussk", D, 300
    r, g = _inputs("normal")
    out = torch.empty(d)
    if case in ("topk", "randk"):
        method = case
    elif case == "small bucket":
        d, r, g, out = 1_000, r[:1_000].clone(), g[:1_000].clone(), torch.empty(1_000)
    elif case == "dense k":
        k = D // 2
    elif case == "bf16 grad":
        g = g.bfloat16()
    elif case == "fp64 out":
        out = torch.empty(d, dtype=torch.float64)
    elif case == "user override of gaussk":
        register_selector("gaussk", _user_gaussk, override=True)
    elif case == "strided grad":
        g = torch.stack([g, g], 1)[:, 0]
    g[5] = float("nan")
    u = torch.add(r, g, out=torch.empty_like(out))
    v_ref, i_ref = select(u, k, method, seed=1, step=2)
    fused_calls.clear()
    values, indices, flag = accumulate_select(r, g, out, k, method, seed=1, step=2, zero_grad=True)
    assert True not in fused_calls
    _assert_same(out, u)
    assert torch.equal(indices, i_ref)
    _assert_same(values, v_ref)
    assert torch.isnan(flag)  # 0 * sum(u) sees the NaN wherever it is
    assert int(g.count_nonzero()) == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(10), torch.zeros(11), torch.zeros(10)), "sizes differ: residual 10, grad 11, out 10"),
        ((torch.zeros(10), torch.zeros(10, 1), torch.zeros(10)), "`grad` must be a 1-D tensor"),
        (([0.0] * 10, torch.zeros(10), torch.zeros(10)), "`residual` must be a 1-D tensor"),
    ],
)
def test_bad_input_raises_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        accumulate_select(*args, 3)


@pytest.mark.parametrize("scale", [2.0, torch.ones(2), "2"])
def test_a_scale_that_is_not_a_one_element_tensor_is_refused(scale):
    with pytest.raises(TypeError, match="`scale` must be None or a one-element tensor"):
        accumulate_select(torch.zeros(10), torch.zeros(10), torch.empty(10), 3, scale=scale)


def test_k_out_of_range_raises_like_select():
    with pytest.raises(ValueError, match="1 <= k <= x.numel"):
        accumulate_select(torch.zeros(D), torch.zeros(D), torch.empty(D), 0)
