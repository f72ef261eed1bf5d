"""``kernels.triton_accumulate_select``: ``u = g + s r`` fused into the kernels' first pass.

Under TRITON_INTERPRET=1 on CPU tensors (tests/test_cuda.py runs the compiled kernels on a GPU).
The reference is the unfused path: ``u = _accumulate(r, g, s)`` (torch.add / torch.addcmul),
then ``triton_select(u, k)`` with the same tiling, and ``0 * sum(u)``. Programs run one after
another in the interpreter, so even the band (the atomic counters' order) must agree bit for bit.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import importlib.util
import sys

import pytest
import torch

from lightning_gaussk.selection import triton as kernels
from lightning_gaussk.selection.histogram import NUM_BINS
from lightning_gaussk.selection.triton import fusable, triton_accumulate_select, triton_available, triton_select
from lightning_gaussk.selection.selectors import _accumulate

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="`import triton` failed: the Triton kernels cannot run here"
)

D = 20_011  # not a multiple of any block: a masked last tile
BLOCK, PROGRAMS = 1024, 7  # 20 tiles over 7 programs: several tiles per program, a short last one


def _inputs(gdtype: torch.dtype, family: str, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=gen) * 0.01
    if family == "normal":
        g = torch.randn(d, generator=gen)
    elif family == "mixed_scales":
        g = torch.randn(d, generator=gen) * torch.logspace(-3, 0, 4)[torch.arange(d) * 4 // d]
    elif family == "zeros":
        g, r = torch.zeros(d), torch.zeros(d)
    else:
        raise ValueError(family)
    return r, g.to(gdtype)


def _reference(r, g, k, scale):
    u = _accumulate(r, g, scale)
    hist = torch.empty(NUM_BINS, dtype=torch.int32)
    values, indices = triton_select(u, k, hist=hist, block=BLOCK, max_programs=PROGRAMS)
    return u, values, indices, hist, u.sum() * 0.0


SCALES = {"none": None, "pow2": 2.0**-3, "any": 0.3}  # 0.3: r * s is inexact, u rounds once (fma)


@pytest.mark.parametrize("zero_grad", [False, True])
@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", ["normal", "mixed_scales", "zeros"])
@pytest.mark.parametrize("k", [1, 200, D])
def test_fused_first_pass_equals_add_then_triton_select_bit_for_bit(family, gdtype, scale, zero_grad, k):
    r, g = _inputs(gdtype, family)
    s = None if SCALES[scale] is None else torch.tensor(SCALES[scale])
    u_ref, v_ref, i_ref, h_ref, f_ref = _reference(r, g, k, s)
    out = torch.full((D,), 123.0)  # stale content must not leak into u
    g_before, r_before = g.clone(), r.clone()
    hist = torch.empty(NUM_BINS, dtype=torch.int32)
    values, indices, flag = triton_accumulate_select(
        r, g, out, k, s, zero_grad=zero_grad, hist=hist, block=BLOCK, max_programs=PROGRAMS
    )
    assert torch.equal(out, u_ref)  # u, bit for bit (fp32, whatever the grad dtype)
    assert torch.equal(hist, h_ref)  # same threshold t0, hence the same bins
    assert torch.equal(indices, i_ref) and torch.equal(values, v_ref)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert flag.dim() == 0 and flag.dtype == torch.float32 and float(flag) == 0.0 == float(f_ref)
    assert torch.equal(r, r_before)
    assert torch.equal(g, torch.zeros_like(g)) if zero_grad else torch.equal(g, g_before)


@pytest.mark.parametrize("where", [0, 1023, 1024, D - 1], ids=["first", "end_of_tile", "next_tile", "last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("into", ["grad", "residual"])
def test_any_non_finite_entry_raises_the_flag_and_finite_input_never_does(where, bad, into):
    r, g = _inputs(torch.float32, "normal")
    (g if into == "grad" else r)[where] = bad
    out = torch.empty(D)
    values, indices, flag = triton_accumulate_select(r, g, out, 50, block=BLOCK, max_programs=PROGRAMS)
    assert torch.isnan(flag)
    assert indices.unique().numel() == 50
    torch.testing.assert_close(values, out[indices], rtol=0, atol=0, equal_nan=True)
    # a huge but finite u is no alarm (0 * sum(u) would overflow to NaN here; the count does not)
    r, g = _inputs(torch.float32, "normal")
    g[:4] = 3e38
    _, _, flag = triton_accumulate_select(r, g, torch.empty(D), 50, block=BLOCK, max_programs=PROGRAMS)
    assert float(flag) == 0.0


def test_default_tiling_matches_the_unfused_default_tiling():
    r, g = _inputs(torch.float32, "mixed_scales", d=300_007, seed=3)  # many interpreter tiles
    out = torch.empty_like(r)
    values, indices, _ = triton_accumulate_select(r, g, out, 3000)
    v_ref, i_ref = triton_select(r + g, 3000)
    assert torch.equal(out, r + g) and torch.equal(indices, i_ref) and torch.equal(values, v_ref)


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda r, g, o: (r.double(), g, o), TypeError),
        (lambda r, g, o: (r, g.double(), o), TypeError),
        (lambda r, g, o: (r, g, o.half()), TypeError),
        (lambda r, g, o: (r[:-1], g, o), ValueError),
        (lambda r, g, o: (r, torch.randn(2 * D)[::2], o), ValueError),
        (lambda r, g, o: (r.view(1, -1), g, o), ValueError),
    ],
    ids=["fp64_residual", "fp64_grad", "fp16_out", "sizes", "noncontiguous", "2d"],
)
def test_bad_inputs_are_refused_naming_the_problem(change, error):
    r, g = _inputs(torch.float32, "normal")
    with pytest.raises(error):
        triton_accumulate_select(*change(r, g, torch.empty(D)), 10)
    with pytest.raises(ValueError, match="k"):
        triton_accumulate_select(r, g, torch.empty(D), D + 1)


def test_fusable_is_false_off_cuda_and_for_what_the_kernels_do_not_take():
    r, g = _inputs(torch.float32, "normal")
    out = torch.empty(D)
    assert not fusable(r, g, out, 10)  # CPU tensors: accumulate_select keeps its CPU paths
    meta = [t.to("meta") for t in (r, g, out)]
    assert not fusable(*meta, 10)


def test_kernels_module_without_triton_refuses_the_fused_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_kernels_without_triton_fused", kernels.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = torch.zeros(8)
    assert mod.fusable(r, r.clone(), r.clone(), 1) is False
    with pytest.raises(RuntimeError, match="triton"):
        mod.triton_accumulate_select(r, r.clone(), r.clone(), 1)
