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
    refined until exactly ``k`` entries are selected (see ``_cpu_refine`` for CPU tensors and
    ``_histselect`` / ``kernels`` for accelerators, where no host synchronisation is allowed).
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

__all__ = [
    "Selector",
    "available_selectors",
    "get_selector",
    "gaussian_threshold",
    "register_selector",
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


# --------------------------------------------------------------------------------------------
# threshold estimates
# --------------------------------------------------------------------------------------------
def gaussian_threshold(mean: float, std: float, density: float) -> float:
    """``|mean| + std * PPF(1 - density / 2)``: the magnitude a fraction ``density`` of
    ``N(mean, std^2)`` exceeds (the paper's Gaussian-k threshold)."""
    q = torch.special.ndtri(torch.tensor(1.0 - min(max(density, 1e-300), 1.0) / 2, dtype=torch.float64))
    return abs(mean) + std * float(q)


_SAMPLE_ROW = 4096  # contiguous run length of the sample: whole cache lines, vectorised reductions
_SAMPLE_ROWS = 64  # 64 evenly spaced runs = 262,144 entries


def _sample(x: Tensor) -> Tensor:
    """A systematic sample of ``x``: evenly spaced contiguous runs (the whole ``x`` if small)."""
    d = x.numel()
    if d <= 4 * _SAMPLE_ROW * _SAMPLE_ROWS:
        return x
    rows = x[: (d // _SAMPLE_ROW) * _SAMPLE_ROW].view(-1, _SAMPLE_ROW)
    return rows[:: rows.shape[0] // _SAMPLE_ROWS][:_SAMPLE_ROWS]


def _gaussk_estimate(x: Tensor, k: int, density: float) -> float:
    """Gaussian-k threshold from the sample's mean and unbiased std (fp32 accumulation)."""
    s = _sample(x).float()
    n = s.numel()
    total = float(s.sum())
    sumsq = float(torch.linalg.vector_norm(s)) ** 2
    mean = total / n
    var = max(sumsq - n * mean * mean, 0.0) / max(n - 1, 1)
    return gaussian_threshold(mean, math.sqrt(var), density)


def _dgc_estimate(x: Tensor, k: int, density: float, seed: int, step: int) -> float:
    """DGC: the ``ceil(density * s)``-th largest magnitude of a uniform random sample."""
    d = x.numel()
    s = min(d, max(1024, d // 100))
    g = torch.Generator(device=x.device).manual_seed(_mix(seed, step))
    idx = torch.randint(0, d, (s,), generator=g, device=x.device)
    m = max(1, math.ceil(density * s))
    return float(torch.topk(x[idx].abs().float(), m, sorted=False).values.min())


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from ``(seed, step)`` (distinct steps give unrelated streams)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


# --------------------------------------------------------------------------------------------
# exact-k refinement on CPU tensors
# --------------------------------------------------------------------------------------------
_CHUNK = 1 << 18  # 1 MiB of fp32: |x| of a chunk stays in cache between abs and amax


def _block_absmax(body: Tensor) -> Tensor:
    """``max |x|`` of every row of ``body`` (nb, B), one read of ``body`` in cache-sized chunks."""
    nb, b = body.shape
    out = torch.empty(nb, dtype=body.dtype)
    rows = max(1, _CHUNK // b)
    scratch = torch.empty(rows, b, dtype=body.dtype)
    for r in range(0, nb, rows):
        part = body[r : r + rows]
        a = torch.abs(part, out=scratch[: part.shape[0]])
        torch.amax(a, 1, out=out[r : r + part.shape[0]])
    return out


def _probit_step(t: float, c: int, n: int, target: float) -> float:
    """Next threshold guess: fit ``count(t) = 2 n (1 - Phi(t / s))`` through ``(t, c)``, solve for
    ``count = target`` (a secant step in probit space; exact for zero-mean normal data)."""
    if c <= 0:
        return t / 2
    if c >= n or t <= 0:
        return 2 * t if t > 0 else 1e-30
    z_now = float(torch.special.ndtri(torch.tensor(1.0 - c / (2 * n), dtype=torch.float64)))
    z_target = float(torch.special.ndtri(torch.tensor(1.0 - min(target, n - 1) / (2 * n), dtype=torch.float64)))
    if z_now <= 0:
        return 2 * t
    return t * z_target / z_now


def _cpu_refine(x: Tensor, k: int, t: float) -> tuple[Tensor, Tensor]:
    """Exact top-k of a CPU tensor, starting from the threshold guess ``t``.

    Why it is exact: with ``B``-sized blocks and ``bmax`` their max magnitudes, if
    ``count(bmax > t) >= k`` then at least ``k`` entries exceed ``t``, so the k-th largest
    magnitude ``v_k > t`` and every top-k entry lies in a block with ``bmax > t``. Only those
    blocks (about ``k`` of ``d / B``) are gathered and ranked exactly.

    Cost: one read of ``x`` (block maxima), a few counts over the ``d / B`` maxima while ``t``
    is refined, and work proportional to the candidates.
    """
    d = x.numel()
    # blocks small enough that d / B >= 8 k, large enough to keep amax vectorised
    b = 64
    while b > 4 and d // b < 8 * k:
        b //= 2
    nb = d // b
    if d < 65536 or nb < 4 * k:
        return _exact_topk(x, k)
    body = x[: nb * b].view(nb, b)
    bmax = _block_absmax(body)
    tail = x[nb * b :]  # fewer than B entries: always candidates
    tail_abs = tail.abs()

    def count(th: float) -> int:
        return int(torch.count_nonzero(bmax > th)) + int(torch.count_nonzero(tail_abs > th))

    lo: float | None = None  # count(lo) >= k
    hi: float | None = None  # count(hi) < k
    target = 2.0 * k
    for _ in range(12):
        c = count(t)
        if k <= c <= 4 * k:
            lo = t
            break
        if c < k:
            hi = t
        else:
            lo = t
        t_next = _probit_step(t, c, nb, target)
        if (lo is not None and t_next <= lo) or (hi is not None and t_next >= hi) or not math.isfinite(t_next):
            if lo is not None and hi is not None:
                t_next = (lo + hi) / 2
            elif lo is not None:
                t_next = 2 * lo if lo > 0 else 1e-30
            else:
                t_next = hi / 2  # type: ignore[operator]
        if t_next == t:
            break
        t = t_next
    if lo is None or lo < 0:
        return _ties_or_exact(x, k, count)
    blocks = torch.nonzero(bmax > lo).squeeze(1)
    cand = body.index_select(0, blocks)  # (G, B)
    cand_abs = cand.abs()
    rows, cols = torch.nonzero(cand_abs > lo, as_tuple=True)
    idx = blocks[rows] * b + cols
    mags = cand_abs[rows, cols]
    if tail.numel():
        tail_idx = torch.nonzero(tail_abs > lo).squeeze(1)
        idx = torch.cat([idx, tail_idx + nb * b])
        mags = torch.cat([mags, tail_abs[tail_idx]])
    top = torch.topk(mags, k, sorted=False).indices
    idx = idx[top]
    return x[idx], idx


def _ties_or_exact(x: Tensor, k: int, count: Callable[[float], int]) -> tuple[Tensor, Tensor]:
    """Fallback when no threshold separates about ``k`` blocks (ties at the boundary).

    The common case is mostly-zero input with fewer than ``k`` nonzeros: take every nonzero and
    fill with zeros (all of which tie for the last places). Otherwise rank exactly.
    """
    if count(0.0) < k:
        nz = torch.nonzero(x).squeeze(1)
        need = k - nz.numel()
        zeros = torch.nonzero(x == 0).squeeze(1)[:need]
        idx = torch.cat([nz, zeros])
        return x[idx], idx
    return _exact_topk(x, k)


def _exact_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return x[idx], idx


def _refine(x: Tensor, k: int, t0: float | Tensor) -> tuple[Tensor, Tensor]:
    """Exactly k from a threshold estimate: host-driven on CPU, sync-free on accelerators."""
    if x.device.type == "cpu":
        return _cpu_refine(x, k, float(t0))
    from lightning_gaussk import kernels  # lazy: Triton is optional
    from lightning_gaussk._histselect import hist_select

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
    d = x.numel()
    if x.device.type == "cpu":
        # aim the first guess at 2k so that one count usually brackets k
        return _refine(x, k, _gaussk_estimate(x, k, min(1.0, 2.0 * k / d)))
    from lightning_gaussk._histselect import gaussian_threshold as device_threshold

    return _refine(x, k, device_threshold(x, k))  # stays on the device: no sync


@register_selector("dgc")
def dgc_selector(x: Tensor, k: int, *, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Deep Gradient Compression's sampled threshold, refined to exactly ``k``."""
    d = x.numel()
    if x.device.type == "cpu":
        return _refine(x, k, _dgc_estimate(x, k, min(1.0, 2.0 * k / d), seed, step))
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
