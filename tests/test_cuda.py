"""GPU-only tests (marker ``cuda``): everything that runs only on a CUDA device.

* compiled Triton kernels against the torch reference path (``_histselect``), bit for bit on
  the selected set where the threshold is the same: fp32, bf16, fp16, d from 1 to 10^8 and past
  2^31 (int64 offsets), k = 1 and k = d; the fused first pass against add + select;
* ``select(..., "gaussk")``, ``accumulate_select`` and the hook body under
  ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation fails;
* ``gaussk_hook`` on CUDA tensors in NCCL groups of one and (with two GPUs) two ranks: density 1
  equals allreduce, conservation, non-finite propagation, loss-scale changes;
* ``Trainer(strategy="gaussk_ddp", accelerator="gpu")`` fits with "16-mixed", "bf16-mixed" and
  "bf16-true".

Without CUDA every test here is skipped with that reason. The kernels must be compiled, so run
with ``TRITON_INTERPRET=0`` (``bash scripts/gpu_check.sh`` does): tests/conftest.py defaults it
to 1 for the CPU suite, and on a CUDA machine with TRITON_INTERPRET=1 this module is skipped,
saying so.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as conftest; the GPU run sets 0 before pytest

import copy
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import free_port
from lightning_gaussk.engine.timing import fold as fold_device_times
from lightning_gaussk import GaussKState, accumulate_select, gaussk_hook, select
from lightning_gaussk.selection.histogram import NUM_BINS, bin_index, boundary, hist_select, histogram, threshold_from_moments
from lightning_gaussk.selection.triton import triton_accumulate_select, triton_available, triton_select
from lightning_gaussk.selection.selectors import _accumulate

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs CUDA: torch.cuda.is_available() is False"),
    pytest.mark.skipif(
        CUDA and INTERPRETED and triton_available(),
        reason="TRITON_INTERPRET=1: the kernels would be interpreted, not compiled; "
        "run `TRITON_INTERPRET=0 pytest -m cuda` (scripts/gpu_check.sh does)",
    ),
]
needs_triton = pytest.mark.skipif(not triton_available(), reason="`import triton` failed: no compiled kernels to test")
needs_two_gpus = pytest.mark.skipif(CUDA and not TWO_GPUS, reason="needs 2 CUDA devices")  # no CUDA: the module says so
FIT_SCRIPT = Path(__file__).parent / "scripts" / "gpu_fit.py"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ==================================================================================== helpers
def device_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The Gaussian-k estimate from torch's moments of ``x`` (0-d fp32 on its device)."""
    xf = x.reshape(-1).float()
    return threshold_from_moments(xf.sum(), torch.dot(xf, xf), xf.numel(), k)


def kernel_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The Gaussian-k estimate as ``triton_select(x, k)`` computes it (its moments kernel)."""
    from lightning_gaussk.selection import triton as kernels

    programs, tiles = kernels._grid(x.numel(), kernels.BLOCK, kernels._MAX_PROGRAMS)
    part = torch.empty(2, programs, dtype=torch.float32, device=x.device)
    kernels._kernels()[0][(programs,)](x, part, x.numel(), tiles, BLOCK=kernels.BLOCK, IS_BF16=x.dtype == torch.bfloat16)
    s, s2 = part.sum(1).unbind(0)
    return threshold_from_moments(s, s2, x.numel(), k)


def student_t3(d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed test data, generated on the GPU (d up to 10^8 in a fraction of a second)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(d, device="cuda", generator=g)
    chi2 = torch.randn(d, device="cuda", generator=g).square_()
    chi2 += torch.randn(d, device="cuda", generator=g).square_()
    chi2 += torch.randn(d, device="cuda", generator=g).square_()
    return z.div_(chi2.div_(3).sqrt_()).to(dtype)


def check_split(x: torch.Tensor, k: int, indices: torch.Tensor, t0: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The selection is every entry with bin > b* and k - a entries of bin b*: return the sorted
    indices above b* and the band count (host reads are fine here: this is the checker)."""
    b = bin_index(x, t0)
    bstar, a = (int(v) for v in boundary(histogram(b), k))
    sel = b[indices]
    above = indices[sel > bstar].sort().values
    assert torch.equal(above, (b > bstar).nonzero().squeeze(1))  # every entry above b* is in
    band = int((sel == bstar).sum())
    assert band == k - a and above.numel() + band == k  # the rest from b*, nothing below it
    return above, band


def assert_valid(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    assert indices.dtype == torch.int64 and indices.shape == (k,) and values.shape == (k,)
    assert indices.unique().numel() == k
    assert 0 <= int(indices.min()) and int(indices.max()) < x.numel()
    torch.testing.assert_close(values, x[indices], rtol=0, atol=0, equal_nan=True)


# ============================================================ compiled kernels vs torch reference
SIZES = [(1, 1), (1000, 1), (1000, 1000), (20_001, 300), ((1 << 20) + 7, 1), ((1 << 20) + 7, 1049),
         ((1 << 20) + 7, (1 << 20) + 7)]


@needs_triton
@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_compiled_kernels_select_the_reference_set_at_the_same_threshold(dtype, d, k):
    x = student_t3(d, DTYPES[dtype], seed=d + k)
    t0 = device_threshold(x, k)
    hist = torch.empty(NUM_BINS, dtype=torch.int32, device="cuda")
    vk, ik = triton_select(x, k, t0, hist=hist)
    vt, it = hist_select(x, k, t0)
    assert torch.equal(hist.long(), histogram(bin_index(x, t0)))  # compiled bins == torch bins
    assert_valid(x, k, vk, ik)
    assert_valid(x, k, vt, it)
    above_k, band_k = check_split(x, k, ik, t0)
    above_t, band_t = check_split(x, k, it, t0)
    assert torch.equal(above_k, above_t) and band_k == band_t


@needs_triton
@pytest.mark.parametrize("dtype,k", [("fp32", 1), ("fp32", 100_000), ("fp32", 10**8), ("bf16", 1), ("bf16", 10**8)])
def test_compiled_kernels_at_d_10_to_the_8(dtype, k):
    d = 10**8
    x = student_t3(d, DTYPES[dtype], seed=k)
    t0 = device_threshold(x, k)
    hist = torch.empty(NUM_BINS, dtype=torch.int32, device="cuda")
    vk, ik = triton_select(x, k, t0, hist=hist)
    assert torch.equal(hist.long(), histogram(bin_index(x, t0)))
    assert_valid(x, k, vk, ik)
    _, it = hist_select(x, k, t0)
    above_k, band_k = check_split(x, k, ik, t0)
    above_t, band_t = check_split(x, k, it, t0)
    assert torch.equal(above_k, above_t) and band_k == band_t


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_compiled_moments_kernel_gives_the_torch_threshold(dtype):
    x = student_t3(10_000_019, DTYPES[dtype], seed=5)
    k = 10_000
    _, ik = triton_select(x, k)  # t0 from the moments kernel
    assert_valid(x, k, x[ik], ik)
    xd = x.double()
    z = float(torch.special.ndtri(torch.tensor(1 - k / (2 * x.numel()), dtype=torch.float64)))
    expect = float(xd.mean().abs() + xd.std() * z)
    assert math.isclose(float(kernel_threshold(x, k)), expect, rel_tol=1e-4)  # the compiled moments
    assert math.isclose(float(device_threshold(x, k)), expect, rel_tol=1e-4)  # torch's


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_int64_offsets_past_2_to_the_31_entries(dtype):
    d = (1 << 31) + (1 << 16) + 3
    need = d * 2 + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory for a {d}-entry tensor")
    x = torch.zeros(d, dtype=DTYPES[dtype], device="cuda")
    planted = torch.tensor([5, (1 << 31) - 1, 1 << 31, d - 1], device="cuda")
    x[planted] = torch.tensor([3.0, -4.0, 5.0, -6.0], device="cuda").to(x.dtype)
    values, indices = triton_select(x, 4)  # moments, histogram and compaction all past 2^31
    assert torch.equal(indices.sort().values, planted)
    assert torch.equal(values, x[indices])


@needs_triton
@pytest.mark.parametrize("scale", [None, 2.0**-5, 0.3], ids=["none", "pow2", "any"])
@pytest.mark.parametrize("gdtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("d,k", [(1000, 1), (20_001, 300), ((1 << 22) + 5, 4200), ((1 << 22) + 5, 1)])
def test_compiled_fused_first_pass_equals_add_then_select(gdtype, scale, d, k):
    r = student_t3(d, torch.float32, seed=1) * 0.01
    g = student_t3(d, DTYPES[gdtype], seed=2)
    s = None if scale is None else torch.tensor(scale, device="cuda")
    u_ref = _accumulate(r, g, s)
    out = torch.full((d,), 7.0, device="cuda")
    hist = torch.empty(NUM_BINS, dtype=torch.int32, device="cuda")
    values, indices, flag = triton_accumulate_select(r, g, out, k, s, hist=hist)
    if scale == 0.3:  # an fma here; torch's addcmul may round twice: at most one rounding apart
        torch.testing.assert_close(out, u_ref, rtol=2**-23, atol=0)
    else:  # power-of-two scale: both exact
        assert torch.equal(out, u_ref)
    # the threshold from the fused moments is that of the moments kernel reading u: same bins
    ref_hist = torch.empty(NUM_BINS, dtype=torch.int32, device="cuda")
    _, i_ref = triton_select(out, k, hist=ref_hist)
    assert torch.equal(hist, ref_hist)
    assert_valid(out, k, values, indices)
    assert float(flag) == 0.0
    t0 = kernel_threshold(out, k)  # the t0 both calls used
    above, band = check_split(out, k, indices, t0)
    above_ref, band_ref = check_split(out, k, i_ref, t0)
    assert torch.equal(above, above_ref) and band == band_ref
    g[d // 2] = float("nan")
    _, _, flag = triton_accumulate_select(r, g, out, k, s, zero_grad=True)
    assert torch.isnan(flag) and int(g.count_nonzero()) == 0


# ===================================================================== no host synchronisation
def run_sync_free(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with every CUDA host synchronisation an error (set_sync_debug_mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is live: a read-back raises
            torch.ones(1, device="cuda").item()
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("d,k", [(1, 1), (5, 2), (20_001, 300), ((1 << 22) + 5, 4200)])
def test_select_gaussk_on_cuda_never_synchronises(dtype, d, k):
    x = student_t3(d, DTYPES[dtype], seed=3)
    values, indices = run_sync_free(lambda: select(x, k, "gaussk"))
    assert_valid(x, k, values, indices)
    values, indices = run_sync_free(lambda: hist_select(x, k))  # the torch fallback path too
    assert_valid(x, k, values, indices)


@pytest.mark.parametrize("gdtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("scale", [None, 4.0], ids=["unscaled", "scaled"])
def test_accumulate_select_on_cuda_never_synchronises(gdtype, scale):
    d, k = (1 << 21) + 3, 2100
    r = student_t3(d, torch.float32, seed=1) * 0.01
    g = student_t3(d, DTYPES[gdtype], seed=2)
    s = None if scale is None else torch.tensor(scale, device="cuda")
    u_ref = _accumulate(r, g, s)
    out = torch.empty(d, device="cuda")
    values, indices, flag = run_sync_free(lambda: accumulate_select(r, g, out, k, "gaussk", scale=s, zero_grad=True))
    assert torch.equal(out, u_ref) and float(flag) == 0.0
    assert_valid(out, k, values, indices)
    assert int(g.count_nonzero()) == 0


# ======================================================================= the hook on NCCL ranks
def _nccl_entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # bitwise-reproducible matmuls
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier(device_ids=[rank])
    finally:
        dist.destroy_process_group()


def run_nccl(fn: Callable[..., Any], *args: Any, world: int = 1) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` NCCL processes, one GPU each."""
    mp.spawn(_nccl_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


WORLDS = [pytest.param(1, id="1rank"), pytest.param(2, id="2ranks", marks=needs_two_gpus)]


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 600), nn.Linear(600, 300), nn.Linear(300, 3)
        self.to(device="cuda", dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def batch(step: int, rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(100 * step + rank)).to("cuda", dtype)


def _gather(obj: Any) -> list[Any]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _density_one(rank: int, world: int) -> None:
    torch.manual_seed(0)
    base = Net()
    plain = DDP(copy.deepcopy(base))
    sparse = DDP(copy.deepcopy(base), bucket_cap_mb=0.5)
    s_state = GaussKState(density=1.0, dense_fallback="never").bind(sparse)
    sparse.register_comm_hook(s_state, gaussk_hook)
    auto = DDP(copy.deepcopy(base), bucket_cap_mb=0.5)
    a_state = GaussKState(density=1.0).bind(auto)
    auto.register_comm_hook(a_state, gaussk_hook)
    models = (plain, sparse, auto)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for step in range(5):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(batch(step, rank)).pow(2).mean().backward()
            opt.step()
    for p, q, r in zip(plain.parameters(), sparse.parameters(), auto.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)
    assert s_state.telemetry["dense_buckets"] == 0 < s_state.telemetry["hook_calls"]
    assert a_state.telemetry["dense_buckets"] == a_state.telemetry["hook_calls"] > 0


def _conservation(rank: int, world: int, dtype_name: str, selector: str, scaled: bool) -> None:
    """u = grad + (S / S_r) residual, sent + residual == u, the mean of what every rank sent arrives."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = Net(dtype)
    ddp = DDP(model, bucket_cap_mb=0.5)  # two buckets: 7.4k and 180k entries
    state = GaussKState(density=0.01, selector=selector).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    names = {p: n for n, p in model.named_parameters()}
    old = {n: torch.zeros(p.numel(), device="cuda") for n, p in model.named_parameters()}
    prev_scale = 1.0
    for step in range(6):
        scale = 2.0 ** (3 + (step % 3) - 2 * (step == 4)) if scaled else 1.0  # up, up, down, ...
        if scaled:
            state.set_loss_scale(scale)
        opt.zero_grad()
        state.capture_next_step()
        (ddp(batch(step, rank, dtype)).pow(2).mean() * scale).backward()
        new = {n: r.clone() for n, r in state.residuals().items()}
        caps = {i: (c["u"].cpu(), c["indices"].cpu(), [names[p] for p in c["parameters"]]) for i, c in state.captured.items()}
        every = _gather(caps)
        for index, c in state.captured.items():
            u, idx, k, params = c["u"], c["indices"], c["k"], caps[index][2]
            d = u.numel()
            assert k == math.ceil(0.01 * d) and idx.unique().numel() == k
            expect = c["grad"] + torch.cat([old[n] for n in params]) * (scale / prev_scale)  # exact: powers of 2
            assert torch.equal(u, expect)
            kept = torch.cat([new[n] for n in params])
            sent = torch.zeros(d, device="cuda").index_put_((idx,), u[idx])
            assert torch.equal(sent + kept, u) and int(kept[idx].count_nonzero()) == 0
            agg = torch.zeros(d)
            for other in every:
                u_r, idx_r, params_r = other[index]
                assert params_r == params
                agg.index_add_(0, idx_r, u_r[idx_r], alpha=1.0 / world)
            grad = torch.cat([p.grad.reshape(-1).float() for p in c["parameters"]]).cpu()
            assert torch.equal(grad, agg.to(dtype).float())
        unscaled = state.state_dict()["residuals"]  # r / S_r: S_r is this step's scale
        for n, r in new.items():
            assert torch.equal(unscaled[n], (r / scale).cpu())
        for p in model.parameters():  # the step itself on unscaled gradients
            p.grad.div_(scale)
        opt.step()
        old, prev_scale = new, scale


def _nonfinite(rank: int, world: int, density: float) -> None:
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.5)
    state = GaussKState(density=density).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(5):
        before = {n: r.clone() for n, r in state.residuals().items()}
        opt.zero_grad()
        x = batch(step, rank)
        if step == 2 and rank == world - 1:
            x[0, 0] = float("nan")  # one rank, one step
        ddp(x).pow(2).mean().backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if step == 2:
            assert not finite  # every rank sees it
            after = state.residuals()
            assert all(torch.equal(after[n], before[n]) for n in before)  # the commit was skipped
            continue
        assert finite and all(bool(torch.isfinite(r).all()) for r in state.residuals().values())
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _grad_scaler_run(rank: int, scaled: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.5)
    state = GaussKState(density=0.01, selector="topk").bind(ddp)  # deterministic selection
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=1) if scaled else None
    for step in range(6):
        x = batch(step, rank)
        if step == 3 and rank == 0:
            x[0, 0] = float("nan")  # a skipped step: GradScaler backs off
        opt.zero_grad()
        loss = ddp(x).pow(2).mean()
        if scaler is None:
            loss.backward()
            if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
                opt.step()
        else:
            state.set_loss_scale(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return [p.detach().clone() for p in model.parameters()]


def _grad_scaler(rank: int, world: int) -> None:
    plain, scaled = _grad_scaler_run(rank, False), _grad_scaler_run(rank, True)
    for p, q in zip(plain, scaled):  # power-of-two scales are exact: the same training, bit for bit
        assert torch.equal(p, q)


class _Bucket:
    """The four methods of ``dist.GradBucket`` that gaussk_hook calls."""

    def __init__(self, params: list[torch.Tensor], last: bool = True) -> None:
        self.params = params
        self.buf = torch.cat([p.reshape(-1) for p in params])
        self.last = last

    def buffer(self) -> torch.Tensor:
        return self.buf

    def index(self) -> int:
        return 0

    def parameters(self) -> list[torch.Tensor]:
        return self.params

    def is_last(self) -> bool:
        return self.last


def _hook_body_sync_free(rank: int, world: int) -> None:
    """gaussk_hook end to end (the decode callback runs inline for NCCL) under sync debug mode."""
    dist.all_reduce(torch.zeros(1, device="cuda"))  # NCCL's communicator is set up outside the check
    torch.cuda.synchronize()
    cases = [(0.01, torch.float32, "allgather"), (0.01, torch.bfloat16, "allgather"), (1.0, torch.float32, "allgather"),
             (0.01, torch.float32, "allreduce")]  # the bounded exchange too (its canonical order built on the device)
    for density, dtype, exchange in cases:
        state = GaussKState(density=density, exchange=exchange)
        params = [torch.zeros(300_000, device="cuda", dtype=dtype), torch.zeros(7, device="cuda", dtype=dtype)]
        for step, scale in enumerate([2.0**10, 2.0**11, 2.0**10]):
            state.set_loss_scale(scale)
            bucket = _Bucket(params)
            bucket.buf.copy_(student_t3(bucket.buf.numel(), dtype, seed=step + rank))
            if step == 1:
                bucket.buf[3] = float("inf")
            before = bucket.buf.clone()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = gaussk_hook(state, bucket).wait()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert result.dtype == dtype and result.numel() == before.numel()
            assert bool(torch.isfinite(result).all()) == (step != 1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fold_device_times(state)  # reading the stage times is sync-free too (incomplete events wait)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        fold_device_times(state)
        # GPU telemetry: every stage timed with CUDA events, folded once the events are complete
        assert state.telemetry["select_ns"] > 0 and state.telemetry["hook_ns"] >= state.telemetry["select_ns"]
        assert state.telemetry["comm_ns"] > 0, state.telemetry


@pytest.mark.parametrize("world", WORLDS)
def test_hook_on_nccl_density_one_equals_allreduce(world):
    run_nccl(_density_one, world=world)


@pytest.mark.parametrize("world", WORLDS)
def test_hook_on_nccl_conserves_every_entry_with_and_without_loss_scale_changes(world):
    run_nccl(_conservation_cases, world=world)


def _conservation_cases(rank: int, world: int) -> None:
    for dtype_name, selector, scaled in [("float32", "gaussk", False), ("float32", "gaussk", True),
                                         ("bfloat16", "gaussk", False), ("float32", "topk", True)]:
        _conservation(rank, world, dtype_name, selector, scaled)


def _nonfinite_cases(rank: int, world: int) -> None:
    _nonfinite(rank, world, 0.01)  # sparse path
    _nonfinite(rank, world, 1.0)  # dense_fallback path


@pytest.mark.parametrize("world", WORLDS)
def test_hook_on_nccl_nonfinite_gradient_reaches_every_rank_and_spares_residuals(world):
    run_nccl(_nonfinite_cases, world=world)


@pytest.mark.parametrize("world", WORLDS)
def test_hook_on_nccl_grad_scaler_changes_train_bit_for_bit_like_unscaled(world):
    run_nccl(_grad_scaler, world=world)


def test_hook_body_on_nccl_never_synchronises():
    run_nccl(_hook_body_sync_free, world=1)


# ============================================================================= Lightning fits
@pytest.mark.parametrize("devices", [pytest.param(1, id="1gpu"), pytest.param(2, id="2gpus", marks=needs_two_gpus)])
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
def test_lightning_fit_with_gaussk_ddp_on_gpus(tmp_path, precision, devices):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(FIT_SCRIPT), "--precision", precision, "--devices", str(devices), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [torch.load(f, weights_only=True) for f in sorted(out.glob("rank*.pt"))]
    assert len(records) == devices
    for rec in records:
        assert rec["world_size"] == devices and rec["device"].startswith("cuda") and rec["finite"]
        assert rec["param_dtype"] == ("torch.bfloat16" if precision == "bf16-true" else "torch.float32")
        tel = rec["telemetry"]
        assert tel["hook_calls"] > 0 and tel["entries_sent"] < tel["entries_total"]  # it sparsified
        losses = rec["losses"]
        assert all(math.isfinite(v) for v in losses[-20:])
        assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10  # it trained
        if precision == "16-mixed":  # the hook was told GradScaler's scale every step
            assert rec["scales"] and all(s == h for s, h in rec["scales"])
        else:
            assert rec["scales"] == []
