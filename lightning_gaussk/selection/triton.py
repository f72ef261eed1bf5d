"""Fused Triton kernels for histogram-refined Gaussian-k selection.

Same math as :mod:`lightning_gaussk.selection.histogram` (see its docstring), in
three passes over ``x`` with no host sync:

1. moments: per-program fp32 partial ``sum(x)`` and ``sum(x^2)`` written to a
   partials buffer, reduced by torch; ``t0`` from
   :func:`~lightning_gaussk.selection.histogram.threshold_from_moments`.
2. histogram: per-program ``tl.histogram`` of ``bin(x)`` over all its tiles,
   added once with ``tl.atomic_add`` into the global 2048-bin histogram;
   ``b*`` and ``a`` by :func:`~lightning_gaussk.selection.histogram.boundary` on the
   device.
3. compaction: per tile, elements with ``bin > b*`` reserve slots in
   ``[0, a)`` from atomic counter 0, elements with ``bin == b*`` reserve
   ``a + slot`` from atomic counter 1 and are written only if
   ``a + slot < k``.

:func:`triton_accumulate_select` is the error-feedback step ``u = g + s r``
with its selection: its first pass reads ``r`` and ``g``, writes ``u`` and
accumulates the moments of ``u`` (and a non-finite count) in the same loop,
so the separate ``u = g + r`` pass of :func:`torch.add` disappears; passes 2
and 3 are the histogram and compaction above, on ``u``.

Triton is imported on first use, so this module imports without it, and
``TRITON_INTERPRET`` (read when kernels are decorated) may be set any time
before the first :func:`triton_select` call.
"""

import functools
from typing import Any

import torch
from torch import Tensor

from lightning_gaussk.selection.histogram import (
    CENTER,
    NUM_BINS,
    SHIFT,
    _check_k,
    boundary,
    threshold_from_moments,
)

__all__ = ["fusable", "triton_accumulate_select", "triton_available", "triton_select"]

BLOCK = 1024  # elements per tile on a GPU
INTERPRET_BLOCK = 8192  # the interpreter pays per op, not per element: fewer, larger tiles
_MAX_PROGRAMS = 1024  # tiles are split into at most this many contiguous chunks


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (kernels still need a GPU or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


@functools.cache
def _kernels():
    """Define the kernels on first use; returns ``(moments, hist, compact, accumulate)``."""
    global triton, tl, _to_f32, _bin_of  # jit resolves names in module globals
    import triton
    import triton.language as tl

    @triton.jit
    def _to_f32(xv, IS_BF16: tl.constexpr):
        # bf16 -> fp32 by moving its bits up: exact, also for subnormals (which the
        # interpreter's bf16 upcast mangles); int16 sign extension is shifted out.
        if IS_BF16:
            return (xv.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            return xv.to(tl.float32)

    @triton.jit
    def _bin_of(v, kt, H: tl.constexpr, CENTER: tl.constexpr, SHIFT: tl.constexpr):
        # Bit-identical to _histselect.bin_index: v is fp32, kt = key(t0).
        bits = tl.abs(v).to(tl.int32, bitcast=True)
        b = tl.minimum(tl.maximum((bits >> SHIFT) - kt + CENTER, 0), H - 1)
        return tl.where(bits == 0, 0, b)  # integer test: immune to denormal flushing

    @triton.jit
    def moments_kernel(x_ptr, part_ptr, d, tiles, BLOCK: tl.constexpr, IS_BF16: tl.constexpr):
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * tiles * BLOCK  # int64: d may exceed 2^31 / BLOCK tiles
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        for t in range(tiles):
            o = start + t * BLOCK + offs
            v = _to_f32(tl.load(x_ptr + o, mask=o < d, other=0.0), IS_BF16)
            acc += v
            acc2 += v * v
        tl.store(part_ptr + pid, tl.sum(acc, 0))
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(acc2, 0))

    @triton.jit
    def hist_kernel(x_ptr, t0_ptr, hist_ptr, d, tiles, BLOCK: tl.constexpr, IS_BF16: tl.constexpr,
                    H: tl.constexpr, CENTER: tl.constexpr, SHIFT: tl.constexpr):
        pid = tl.program_id(0)
        kt = tl.load(t0_ptr).to(tl.int32, bitcast=True) >> SHIFT
        start = pid.to(tl.int64) * tiles * BLOCK
        offs = tl.arange(0, BLOCK)
        local = tl.zeros([H], tl.int32)
        for t in range(tiles):
            o = start + t * BLOCK + offs
            m = o < d
            v = _to_f32(tl.load(x_ptr + o, mask=m, other=0.0), IS_BF16)
            local += tl.histogram(_bin_of(v, kt, H, CENTER, SHIFT), H, mask=m)
        tl.atomic_add(hist_ptr + tl.arange(0, H), local, sem="relaxed")  # one flush per program

    @triton.jit
    def compact_kernel(x_ptr, t0_ptr, bstar_ptr, a_ptr, cnt_ptr, val_ptr, idx_ptr, d, k, tiles,
                       BLOCK: tl.constexpr, IS_BF16: tl.constexpr, H: tl.constexpr,
                       CENTER: tl.constexpr, SHIFT: tl.constexpr):
        pid = tl.program_id(0)
        kt = tl.load(t0_ptr).to(tl.int32, bitcast=True) >> SHIFT
        bstar = tl.load(bstar_ptr).to(tl.int32)
        a = tl.load(a_ptr)  # int64: number of elements above b*
        start = pid.to(tl.int64) * tiles * BLOCK
        offs = tl.arange(0, BLOCK)
        for t in range(tiles):
            o = start + t * BLOCK + offs
            m = o < d
            xv = tl.load(x_ptr + o, mask=m, other=0.0)
            b = _bin_of(_to_f32(xv, IS_BF16), kt, H, CENTER, SHIFT)
            above = (m & (b > bstar)).to(tl.int32)
            band = (m & (b == bstar)).to(tl.int32)
            # One atomic per tile and counter reserves a contiguous run of slots;
            # the counters order nothing else, so relaxed is enough.
            base_a = tl.atomic_add(cnt_ptr, tl.sum(above, 0), sem="relaxed")
            base_b = tl.atomic_add(cnt_ptr + 1, tl.sum(band, 0), sem="relaxed")
            pa = base_a + tl.cumsum(above, 0) - 1  # < a by construction of the histogram
            pb = a + base_b + tl.cumsum(band, 0) - 1
            keep = (above != 0) | ((band != 0) & (pb < k))  # band slots past k are dropped
            pos = tl.where(above != 0, pa.to(tl.int64), pb)
            tl.store(idx_ptr + pos, o, mask=keep)
            tl.store(val_ptr + pos, xv, mask=keep)

    @triton.jit
    def accumulate_kernel(r_ptr, g_ptr, s_ptr, u_ptr, part_ptr, d, tiles, BLOCK: tl.constexpr,
                          G_BF16: tl.constexpr, HAS_SCALE: tl.constexpr, ZERO_G: tl.constexpr):
        # u = g + s * r (one rounding: an fma, as torch.addcmul on CPU) or g + r, stored as fp32;
        # the moments of u exactly as moments_kernel would accumulate them reading u back;
        # a count of non-finite u; and, with ZERO_G, g := 0 while it is in registers.
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * tiles * BLOCK
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        bad = tl.zeros([BLOCK], tl.int32)
        if HAS_SCALE:
            s = tl.load(s_ptr).to(tl.float32)
        for t in range(tiles):
            o = start + t * BLOCK + offs
            m = o < d
            rv = tl.load(r_ptr + o, mask=m, other=0.0)
            gv = tl.load(g_ptr + o, mask=m, other=0.0)
            if HAS_SCALE:
                v = tl.fma(rv, s, _to_f32(gv, G_BF16))
            else:
                v = rv + _to_f32(gv, G_BF16)
            tl.store(u_ptr + o, v, mask=m)
            if ZERO_G:
                tl.store(g_ptr + o, tl.zeros([BLOCK], dtype=gv.dtype), mask=m)
            acc += v
            acc2 += v * v
            bad += (~(tl.abs(v) <= 3.4028234663852886e38)).to(tl.int32)  # NaN compares false
        tl.store(part_ptr + pid, tl.sum(acc, 0))
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(acc2, 0))
        nbad = tl.sum(bad, 0)
        tl.store(part_ptr + 2 * tl.num_programs(0) + pid, tl.where(nbad > 0, float("nan"), 0.0))

    return moments_kernel, hist_kernel, compact_kernel, accumulate_kernel


def _interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _launch_grid(caller: str, kernel: Any, dev: torch.device, d: int, block: int | None,
                 max_programs: int) -> tuple[int, int, int]:  # fmt: skip
    """``(block, programs, tiles)`` for a launch over ``d`` entries on ``dev``; CPU tensors need
    the interpreter."""
    if dev.type == "cpu" and not _interpreted(kernel):
        raise RuntimeError(f"{caller} on CPU tensors needs TRITON_INTERPRET=1 set before its first call")
    if block is None:
        block = INTERPRET_BLOCK if dev.type == "cpu" else BLOCK
    return (block, *_grid(d, block, max_programs))


def _grid(d: int, block: int, max_programs: int) -> tuple[int, int]:
    """``(programs, tiles_per_program)`` covering ``d`` elements."""
    n_tiles = -(-d // block)
    tiles = -(-n_tiles // min(n_tiles, max_programs))
    return -(-n_tiles // tiles), tiles


def triton_select(
    x: Tensor,
    k: int,
    t0: Tensor | None = None,
    *,
    hist: Tensor | None = None,
    counters: Tensor | None = None,
    block: int | None = None,
    max_programs: int = _MAX_PROGRAMS,
) -> tuple[Tensor, Tensor]:
    r"""Fused-kernel version of :func:`~lightning_gaussk.selection.histogram.hist_select`.

    Selects all ``a`` elements with ``bin > b*`` and ``k - a`` elements with
    ``bin == b*`` (whichever win the atomic counter). ``t0`` overrides the
    Gaussian-k estimate. ``hist`` (int32, 2048) and ``counters`` (int32, 2)
    are optional reusable buffers on ``x``'s device; they are zeroed here.
    ``block`` (a power of two) is the tile size, by default ``BLOCK`` on a
    GPU and ``INTERPRET_BLOCK`` on CPU tensors (the interpreter).

    Returns ``(values, indices)``: ``k`` distinct int64 indices into the
    flattened ``x`` and ``values = x[indices]`` in ``x``'s dtype. Works on
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if not triton_available():
        raise RuntimeError("triton_select needs triton, which is not installed")
    moments_kernel, hist_kernel, compact_kernel, _ = _kernels()
    x = x.reshape(-1).contiguous()
    d = x.numel()
    _check_k(d, k)
    dev = x.device
    block, programs, tiles = _launch_grid("triton_select", moments_kernel, dev, d, block, max_programs)
    is_bf16 = x.dtype == torch.bfloat16

    if t0 is None:
        part = torch.empty(2, programs, dtype=torch.float32, device=dev)
        moments_kernel[(programs,)](x, part, d, tiles, BLOCK=block, IS_BF16=is_bf16)
        s, s2 = part.sum(1).unbind(0)  # stays on the device
        t0 = threshold_from_moments(s, s2, d, k)
    t0 = t0.reshape(()).to(device=dev, dtype=torch.float32).contiguous()

    if hist is None:
        hist = torch.empty(NUM_BINS, dtype=torch.int32, device=dev)
    hist.zero_()
    consts = dict(BLOCK=block, IS_BF16=is_bf16, H=NUM_BINS, CENTER=CENTER, SHIFT=SHIFT)
    hist_kernel[(programs,)](x, t0, hist, d, tiles, **consts)
    bstar, a = boundary(hist, k)

    if counters is None:
        counters = torch.empty(2, dtype=torch.int32, device=dev)
    counters.zero_()
    values = torch.empty(k, dtype=x.dtype, device=dev)
    indices = torch.empty(k, dtype=torch.int64, device=dev)
    compact_kernel[(programs,)](x, t0, bstar, a, counters, values, indices, d, k, tiles, **consts)
    return values, indices


_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fusable(residual: Tensor, grad: Tensor, out: Tensor, k: int) -> bool:
    """Whether :func:`triton_accumulate_select` applies: Triton importable, CUDA tensors, 1-D
    contiguous, ``residual`` and ``out`` fp32, ``grad`` fp32/bf16/fp16, ``1 <= k < d``.

    ``lightning_gaussk.accumulate_select`` takes the fused kernels for "gaussk" exactly when this
    is true (and the "gaussk" selector is the built-in one).
    """
    d = out.numel()
    return (
        triton_available()
        and out.device.type == "cuda"
        and residual.device == grad.device == out.device
        and residual.dtype == out.dtype == torch.float32
        and grad.dtype in _GRAD_DTYPES
        and residual.dim() == grad.dim() == out.dim() == 1
        and residual.numel() == grad.numel() == d
        and residual.is_contiguous() and grad.is_contiguous() and out.is_contiguous()
        and isinstance(k, int) and not isinstance(k, bool) and 1 <= k < d
    )


def triton_accumulate_select(
    residual: Tensor,
    grad: Tensor,
    out: Tensor,
    k: int,
    scale: Tensor | None = None,
    *,
    zero_grad: bool = False,
    hist: Tensor | None = None,
    counters: Tensor | None = None,
    block: int | None = None,
    max_programs: int = _MAX_PROGRAMS,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``out := grad + scale * residual``, its Gaussian-k selection and a non-finite flag, fused.

    With ``u = out``, in fp32 (``grad`` upcast exactly from bf16/fp16)::

        u = g + r                       (scale None)
        u = fma(r, scale, g)            (one rounding, as torch.addcmul on CPU; exact for a
                                         power-of-two scale, as GradScaler's ratios are)

    The first kernel reads ``r`` and ``g`` once, writes ``u`` once and accumulates
    ``sum(u)``, ``sum(u^2)`` per program (the same per-lane order as the moments kernel reading
    ``u``, so ``t0 = threshold_from_moments(...)`` is bit for bit that of ``triton_select(u, k)``)
    and a count of non-finite entries; ``zero_grad`` also stores ``g := 0`` in the same loop.
    Then the histogram and compaction kernels of :func:`triton_select` run on ``u``. Memory
    traffic: read ``r``, ``g``, write ``u``, read ``u`` twice (and write ``g`` with
    ``zero_grad``), against one more read-and-write pass for ``torch.add`` and two more reads
    for ``gaussian_threshold`` in the unfused path.

    Args:
        residual, out: 1-D contiguous fp32 tensors of ``d`` entries (``out`` aliases neither input).
        grad: 1-D contiguous fp32, bf16 or fp16, ``d`` entries.
        k: ``1 <= k <= d``.
        scale: None or a one-element tensor on the same device (read as fp32 on the device).
        zero_grad, hist, counters, block, max_programs: as in :func:`triton_select`.

    Returns:
        ``(values, indices, flag)``: ``triton_select(u, k)``'s ``k`` distinct int64 indices and
        ``values = u[indices]`` (fp32), and a 0-d fp32 tensor that is 0 when every ``u`` is
        finite and NaN otherwise. No host synchronisation.
    """
    if not triton_available():
        raise RuntimeError("triton_accumulate_select needs triton, which is not installed")
    accumulate_kernel = _kernels()[3]
    for name, t in (("residual", residual), ("grad", grad), ("out", out)):
        if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"triton_accumulate_select: `{name}` must be a 1-D contiguous tensor")
    d = out.numel()
    if not residual.numel() == grad.numel() == d:
        raise ValueError(f"triton_accumulate_select: sizes differ: {residual.numel()}, {grad.numel()}, {d}")
    if residual.dtype != torch.float32 or out.dtype != torch.float32 or grad.dtype not in _GRAD_DTYPES:
        raise TypeError(
            "triton_accumulate_select: needs fp32 `residual` and `out` and fp32/bf16/fp16 `grad`, got "
            f"{residual.dtype}, {out.dtype}, {grad.dtype}"
        )
    if not residual.device == grad.device == out.device:
        raise ValueError("triton_accumulate_select: tensors on different devices")
    _check_k(d, k)
    dev = out.device
    block, programs, tiles = _launch_grid("triton_accumulate_select", accumulate_kernel, dev, d, block, max_programs)
    part = torch.empty(3, programs, dtype=torch.float32, device=dev)
    s = part if scale is None else scale.reshape(()).to(device=dev, dtype=torch.float32).contiguous()
    accumulate_kernel[(programs,)](
        residual, grad, s, out, part, d, tiles, BLOCK=block, G_BF16=grad.dtype == torch.bfloat16,
        HAS_SCALE=scale is not None, ZERO_G=bool(zero_grad),
    )
    s1, s2 = part[:2].sum(1).unbind(0)  # the (2, programs) reduction of triton_select: the same t0
    flag = part[2].sum()  # NaN if any program saw a non-finite u
    t0 = threshold_from_moments(s1, s2, d, k)
    values, indices = triton_select(out, k, t0, hist=hist, counters=counters, block=block, max_programs=max_programs)
    return values, indices, flag
