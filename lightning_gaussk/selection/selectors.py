"""Top-k selection: ``select(x, k, method)`` and the registry of selection methods.

Every method returns exactly ``k`` distinct indices into the 1-D tensor ``x`` together with
``values == x[indices]``: fixed-size messages, so nothing is ever dropped in the all-gather.

Built-in methods
----------------
``"topk"``
    Exact reference: ``torch.topk(|x|, k)``.
``"gaussk"``
    Gaussian-k (Shi et al. 2019). The starting estimate of the threshold assumes
    ``x ~ N(mu, sigma^2)``::

        t0 = |mu| + sigma * PPF(1 - rho / 2),     rho = k / d,

    i.e. the magnitude that a fraction ``rho`` of a normal sample exceeds. The estimate is then
    refined until exactly ``k`` entries are selected. On CPU tensors the refinement is exact (the
    result is a top-k of ``|x|``) and costs about three read passes over ``x`` (``_cputopk``);
    on accelerators it is ``_histselect`` / ``kernels``, where no host synchronisation is allowed.
``"dgc"``
    Deep Gradient Compression's estimate: ``t0`` is the ``ceil(rho * s)``-th largest magnitude of a
    random sample of ``s`` entries; refined to exactly ``k`` the same way.
``"randk"``
    Stratified uniform Random-k (the paper's baseline): ``[0, d)`` is cut into ``k`` strata of
    (almost) equal size and one index is drawn uniformly in each, so indices are distinct without
    any rejection loop. Reproducible from ``(seed, step)``.

Users add their own method with :func:`register_selector`.
"""

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lightning_gaussk.selection.cpu import (
    _Estimate,
    _Sum,
    _accumulate,
    _cpu_refine,
    _cpu_threshold_select,
    _cpu_topk,
    _exact_topk,
    _first_guess,
    _lane_size,
)

__all__ = [
    "Selector",
    "available_selectors",
    "get_selector",
    "gaussian_threshold",
    "register_selector",
    "accumulate_select",
    "select",
]


class Selector(Protocol):
    """A selection method: ``fn(x, k, *, seed, step) -> (values, indices)``.

    ``x`` is 1-D and contiguous, ``1 <= k < x.numel()``. The method must return exactly ``k``
    distinct int64 indices and ``values == x[indices]`` (``x``'s dtype). ``seed`` and ``step``
    (the optimizer step) make randomised methods reproducible; deterministic ones ignore them.
    """

    def __call__(self, x: Tensor, k: int, *, seed: int, step: int) -> tuple[Tensor, Tensor]: ...


_SELECTORS: dict[str, Selector] = {}


def register_selector(
    name: str, fn: Selector | None = None, *, override: bool = False
) -> Callable[[Selector], Selector] | Selector:
    """Register a selection method under ``name`` (usable as a decorator).

    Example::

        @register_selector("my_topk")
        def my_topk(x, k, *, seed, step):
            idx = torch.topk(x.abs(), k, sorted=False).indices
            return x[idx], idx

    Raises ``ValueError`` if ``name`` is taken and ``override`` is false.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_selector: `name` must be a non-empty str, got {name!r}")

    def _register(f: Selector) -> Selector:
        if not callable(f):
            raise TypeError(f"register_selector: selector for {name!r} must be callable, got {f!r}")
        if name in _SELECTORS and not override and _SELECTORS[name] is not f:
            raise ValueError(f"register_selector: a selector named {name!r} already exists; pass override=True")
        _SELECTORS[name] = f
        return f

    return _register if fn is None else _register(fn)


def available_selectors() -> list[str]:
    """Names accepted by ``select(method=...)`` and by ``selector=`` on the state and strategy."""
    return sorted(_SELECTORS)


def get_selector(name: str) -> Selector:
    """The selector registered as ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return _SELECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selector {name!r}; available: {available_selectors()}") from None


def select(x: Tensor, k: int, method: str = "gaussk", *, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Select exactly ``k`` entries of largest magnitude (or as the method defines) from ``x``.

    Args:
        x: 1-D floating tensor (any layout; made contiguous).
        k: number of entries, ``1 <= k <= x.numel()``.
        method: a registered selector name (:func:`available_selectors`).
        seed, step: make randomised methods reproducible.

    Returns:
        ``(values, indices)``: ``indices`` int64 of shape ``(k,)``, distinct, in range;
        ``values == x[indices]`` in ``x``'s dtype.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"select: `x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"select: `x` must be 1-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"select: `x` must be a floating tensor, got dtype {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"select: `k` must be an int, got {type(k).__name__} {k!r}")
    d = x.numel()
    if not 1 <= k <= d:
        raise ValueError(f"select: `k` must satisfy 1 <= k <= x.numel() = {d}, got k={k}")
    fn = get_selector(method)
    x = x.contiguous()
    if k == d:  # everything is selected; no method can do otherwise
        return x.clone(), torch.arange(d, device=x.device)
    values, indices = fn(x, k, seed=seed, step=step)
    if values.shape != (k,) or indices.shape != (k,):  # metadata only: no device sync
        raise RuntimeError(
            f"selector {method!r} returned shapes {tuple(values.shape)} and {tuple(indices.shape)}, expected ({k},)"
        )
    return values, indices


def accumulate_select(
    residual: Tensor,
    grad: Tensor,
    out: Tensor,
    k: int,
    method: str = "gaussk",
    *,
    seed: int = 0,
    step: int = 0,
    zero_grad: bool = False,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``out := grad + scale * residual``, then ``select(out, k, method)``, and a non-finite flag.

    The error-feedback step of TopK-SGD, ``u = g + r`` and the top-k of ``u``, as one call so
    that it can be one pass over memory.

    Args:
        residual, grad, out: 1-D tensors of the same size on the same device; ``out`` (fp32 or
            ``residual``'s dtype) receives ``u = residual + grad`` and may not alias either.
        k, method, seed, step: as in :func:`select`.
        zero_grad: also set ``grad`` to zero (the DDP hook overwrites the bucket with the decoded
            result, so zeroing it here, while it is in cache, saves a write pass later).
        scale: None (``u = residual + grad``) or a 0-d fp32 tensor on the tensors' device, the
            factor that brings the residual to the gradient's loss scale (``u`` is then
            ``torch.addcmul(grad, residual, scale)``; with a power-of-two ratio, as GradScaler's,
            the rescaling is exact).

    Returns:
        ``(values, indices, flag)``: ``select(out, k, method)`` and a 0-d fp32 tensor that is 0
        when every entry of ``u`` is finite and NaN otherwise (on the tensors' device: no sync).

    Fast path (CPU, fp32, the built-in ``"gaussk"`` or ``"dgc"``, lane refinement applicable): the
    threshold estimate samples ``residual + grad`` directly, and the lane scan forms ``u`` chunk
    by chunk, reducing each chunk while it is in L2 cache and zeroing ``grad``'s chunk with it:
    read ``r`` and ``g`` once, write ``u`` once. Its selection is an exact top-k of magnitude keys,
    which rank inf and NaN above every finite value, so ``u`` has a non-finite entry exactly when
    the selected values do: the flag is ``0 * sum(values)``, over ``k`` entries instead of ``d``.
    Otherwise: ``torch.add``, :func:`select`, and ``0 * sum(u)``. Both give the same results.
    """
    for name, t in (("residual", residual), ("grad", grad), ("out", out)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"accumulate_select: `{name}` must be a 1-D tensor, got {t!r:.60}")
    if not residual.numel() == grad.numel() == out.numel():
        raise ValueError(
            f"accumulate_select: sizes differ: residual {residual.numel()}, grad {grad.numel()}, out {out.numel()}"
        )
    if scale is not None and not (isinstance(scale, Tensor) and scale.numel() == 1 and scale.device == out.device):
        raise TypeError(
            f"accumulate_select: `scale` must be None or a one-element tensor on {out.device}, got {scale!r:.60}"
        )
    d = out.numel()
    fast = (
        out.device.type == "cpu"
        and out.dtype == residual.dtype == grad.dtype == torch.float32
        and out.is_contiguous() and residual.is_contiguous() and grad.is_contiguous()
        and isinstance(k, int) and not isinstance(k, bool) and 1 <= k < d
        and _lane_size(d, k) is not None
        and _FUSABLE.get(method, (None,))[0] is _SELECTORS.get(method)  # a user override is called as is
    )
    if out.device.type == "cuda" and method == "gaussk" and _SELECTORS.get(method) is gaussk_selector:
        from lightning_gaussk.selection import triton as kernels  # lazy: Triton is optional

        if kernels.fusable(residual, grad, out, k):  # u = g + scale * r inside the kernels' first pass
            return kernels.triton_accumulate_select(residual, grad, out, k, scale, zero_grad=zero_grad)
    if not fast:
        _accumulate(residual, grad, scale, out=out)
        if zero_grad:
            grad.zero_()
        values, indices = select(out, k, method, seed=seed, step=step)
        return values, indices, out.sum(dtype=torch.float32) * 0.0
    t = _first_guess(_FUSABLE[method][1], (residual, grad, scale), k, d, seed, step)
    values, indices = _cpu_refine(out, k, t, fuse=(residual, grad, scale, zero_grad))
    return values, indices, values.sum() * 0.0


# --------------------------------------------------------------------------------------------
# threshold estimates
# --------------------------------------------------------------------------------------------
def gaussian_threshold(mean: float, std: float, density: float) -> float:
    """``|mean| + std * PPF(1 - density / 2)``: the magnitude a fraction ``density`` of
    ``N(mean, std^2)`` exceeds (the paper's Gaussian-k threshold)."""
    q = torch.special.ndtri(torch.tensor(1.0 - min(max(density, 1e-300), 1.0) / 2, dtype=torch.float64))
    return abs(mean) + std * float(q)


_SAMPLE_ROW = 2048  # contiguous run length of the sample: whole cache lines, vectorised reductions
_SAMPLE_ROWS = 64  # 64 evenly spaced runs = 131,072 entries: std known to ~0.2%


def _take(src: "Tensor | _Sum", pick: Callable[[Tensor], Tensor]) -> Tensor:
    """``pick(x)``, where ``src`` is ``x`` or ``(r, g, scale)`` standing for ``x = g + scale * r``
    (the same fp32 arithmetic as ``pick(x)``, without forming ``x``)."""
    return pick(src) if isinstance(src, Tensor) else _accumulate(pick(src[0]), pick(src[1]), src[2])


def _sample(x: Tensor) -> Tensor:
    """A systematic sample of ``x``: evenly spaced contiguous runs (the whole ``x`` if small)."""
    d = x.numel()
    if d <= 4 * _SAMPLE_ROW * _SAMPLE_ROWS:
        return x
    rows = x[: (d // _SAMPLE_ROW) * _SAMPLE_ROW].view(-1, _SAMPLE_ROW)
    return rows[:: rows.shape[0] // _SAMPLE_ROWS][:_SAMPLE_ROWS]


def _gaussk_estimate(x: "Tensor | _Sum", k: int, density: float, seed: int = 0, step: int = 0) -> float:
    """Gaussian-k threshold from the sample's mean and unbiased std (fp32 accumulation);
    ``x`` may be ``(r, g, scale)`` standing for ``g + scale * r``; deterministic (``seed`` and
    ``step`` only match :func:`_dgc_estimate`'s signature)."""
    s = _take(x, lambda t: _sample(t.detach())).float()
    n = s.numel()
    total = float(s.sum())
    sumsq = float(torch.linalg.vector_norm(s, dim=-1).square().sum())  # per row: 6x faster on a 2-D view
    mean = total / n
    var = max(sumsq - n * mean * mean, 0.0) / max(n - 1, 1)
    return gaussian_threshold(mean, math.sqrt(var), density)


def _dgc_estimate(x: "Tensor | _Sum", k: int, density: float, seed: int, step: int) -> float:
    """DGC: the ``ceil(density * s)``-th largest magnitude of a uniform random sample; ``x`` may
    be ``(r, g, scale)`` standing for ``g + scale * r``."""
    ref = x if isinstance(x, Tensor) else x[0]
    d = ref.numel()
    s = min(d, max(1024, d // 100))
    g = torch.Generator(device=ref.device).manual_seed(_mix(seed, step))
    idx = torch.randint(0, d, (s,), generator=g, device=ref.device)
    m = max(1, math.ceil(density * s))
    return float(torch.topk(_take(x, lambda t: t.detach()[idx]).abs().float(), m, sorted=False).values.min())


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from ``(seed, step)`` (distinct steps give unrelated streams)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def _refine(x: Tensor, k: int, t0: float | Tensor) -> tuple[Tensor, Tensor]:
    """Exactly k from a threshold estimate: host-driven on CPU, sync-free on accelerators."""
    if x.device.type == "cpu":
        return _cpu_topk(x, k, t0)
    from lightning_gaussk.selection import triton as kernels  # lazy: Triton is optional
    from lightning_gaussk.selection.histogram import hist_select

    t = t0 if isinstance(t0, Tensor) else torch.tensor(t0, dtype=torch.float32, device=x.device)
    if kernels.triton_available():
        return kernels.triton_select(x, k, t)
    return hist_select(x, k, t)


# --------------------------------------------------------------------------------------------
# the built-in selectors
# --------------------------------------------------------------------------------------------
@register_selector("topk")
def topk_selector(x: Tensor, k: int, *, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Exact top-k by magnitude (``torch.topk`` on ``|x|``)."""
    return _exact_topk(x, k)


@register_selector("gaussk")
def gaussk_selector(x: Tensor, k: int, *, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian-k: the paper's normal-quantile threshold, refined to exactly ``k``."""
    if x.device.type == "cpu":
        return _cpu_threshold_select(x, k, _gaussk_estimate, seed, step)
    from lightning_gaussk.selection.histogram import estimate_threshold

    return _refine(x, k, estimate_threshold(x, k))  # stays on the device: no sync


@register_selector("dgc")
def dgc_selector(x: Tensor, k: int, *, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Deep Gradient Compression's sampled threshold, refined to exactly ``k``."""
    if x.device.type == "cpu":
        return _cpu_threshold_select(x, k, _dgc_estimate, seed, step)
    d = x.numel()
    s = min(d, max(1024, d // 100))
    g = torch.Generator(device=x.device).manual_seed(_mix(seed, step))
    sample = x[torch.randint(0, d, (s,), generator=g, device=x.device)].abs().float()
    m = max(1, math.ceil(k / d * s))
    return _refine(x, k, torch.topk(sample, m, sorted=False).values.min())


@register_selector("randk")
def randk_selector(x: Tensor, k: int, *, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified Random-k: one uniform index in each of ``k`` near-equal strata of ``[0, d)``.

    Every index is chosen with probability ``1 / |stratum|`` (``k / d`` up to rounding);
    strata are disjoint, so indices are distinct. Reproducible from ``(seed, step)``.
    """
    d = x.numel()
    g = torch.Generator(device=x.device).manual_seed(_mix(seed, step))
    edges = torch.arange(k + 1, device=x.device, dtype=torch.int64) * d // k
    width = edges[1:] - edges[:-1]
    u = torch.rand(k, generator=g, device=x.device, dtype=torch.float64)
    idx = edges[:-1] + (u * width).long().minimum(width - 1)  # u < 1, but guard the rounding
    return x[idx], idx


# the selectors accumulate_select fuses with the add, and their threshold estimates
_FUSABLE: dict[str, tuple[Selector, _Estimate]] = {
    "gaussk": (gaussk_selector, _gaussk_estimate),
    "dgc": (dgc_selector, _dgc_estimate),
}
