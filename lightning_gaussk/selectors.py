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
    result is a top-k of ``|x|``) and costs about three read passes over ``x`` (``_cpu_refine``);
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
import torch.nn.functional as F
from torch import Tensor

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
        from lightning_gaussk import kernels  # lazy: Triton is optional

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


_Sum = tuple[Tensor, Tensor, "Tensor | None"]  # (r, g, scale) standing for g + scale * r (scale None: 1)


def _accumulate(r: Tensor, g: Tensor, scale: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``g + scale * r`` (``r + g`` when ``scale`` is None), the one formula of ``u`` everywhere."""
    if scale is None:
        return torch.add(r, g, out=out) if out is not None else r + g
    return torch.addcmul(g, r, scale, out=out) if out is not None else torch.addcmul(g, r, scale)


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


# --------------------------------------------------------------------------------------------
# exact-k refinement on CPU tensors
# --------------------------------------------------------------------------------------------
# Magnitudes as integers. For IEEE floats, clearing the sign bit and reading the bits as a signed
# integer of the same width preserves the order of |x| (NaN above inf, as torch.topk ranks it).
# Integer max and compare are cheaper than their float versions (no NaN handling), and the
# threshold then becomes an integer "key".
_KEY = {
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
}
# Layout. ``x`` is cut into 64-entry blocks (the last ``d % 64`` entries form the "tail") and each
# block into ``64 / s`` contiguous *lanes* of ``s`` entries; lane ``l`` holds ``x[l*s : (l+1)*s]``.
_BLOCK = 64
_CHUNK_BLOCKS = 2048  # 2048 x 64 x 4 B = 512 KiB per chunk: stays in L2 between abs and max
_LANE_LOAD = 1 / 8  # largest rho * s: at most ~1/8 of the lanes then hold a top-k entry
_MIN_D = 1 << 17  # below this torch.topk is as fast as the lane machinery (measured)
_AIM = 1.25  # threshold estimates aim at 1.25 k entries: one count almost always brackets k
_MAX_OVER = 2  # a guess that selects more than 2 k lanes is re-aimed (cheaper than ranking them)
_SUBSAMPLE = 1 << 15  # lane maxima looked at when re-aiming a guess


def _lane_size(d: int, k: int) -> int | None:
    """The lane size ``s`` (64, 32, ..., 2) for ``k`` of ``d``, or ``None`` to rank exactly.

    Largest ``s`` with ``s * k / d <= 1/8``: the ``k`` lanes that end up gathered hold
    ``k * s <= d / 8`` entries, and about ``k`` of them (not ``k * s``) clear the threshold.
    """
    if d < _MIN_D:
        return None
    s = _BLOCK
    while s > 1 and s * k > _LANE_LOAD * d:
        s //= 2
    return s if s >= 2 else None


def _to_key(t: float, dtype: torch.dtype) -> int:
    """The integer key of the magnitude ``|t|`` rounded to ``dtype`` (0 for NaN)."""
    if math.isnan(t):
        return 0
    key_dtype, _ = _KEY[dtype]
    return int(torch.tensor(abs(t), dtype=dtype).view(key_dtype))


def _halve_to(a: Tensor, width: int) -> Tensor:
    """Fold the columns of ``a`` (rows, w) by ``max(left half, right half)`` down to ``width``.

    Column ``j`` of the result is the max over the columns ``j, j + width, j + 2 width, ...`` of
    ``a``: each fold is one vectorised elementwise op on contiguous half-rows.
    """
    w = a.shape[1]
    while w > width:
        w //= 2
        a = torch.maximum(a[:, :w], a[:, w : 2 * w])
    return a


def _lane_absmax(
    x: Tensor, body: Tensor, s: int, sign_off: int, fuse: "tuple[Tensor, Tensor, Tensor | None, bool] | None" = None
) -> Tensor:
    """Key of ``max |x|`` of every lane, ``(nb * 64 / s,)``; ``body`` is the (nb, 64) integer view
    of ``x``.

    One read of ``x`` in L2-sized chunks: ``|x|`` goes into a scratch buffer that is reduced while
    it is still in cache. Long lanes (``s >= 32``) use an integer ``amax``; short ones
    ``max_pool1d`` on floats (torch's reductions over short rows are several times slower).
    The keys of the float maxima are their bits, as ``|x| >= 0``.

    ``fuse = (r, g, scale, zero_g)``: first write ``x := g + scale * r`` chunk by chunk in the same loop, so the
    scan reads each chunk of ``x`` from cache rather than memory, and with ``zero_g`` zero each
    chunk of ``g`` while it is cached (the caller overwrites ``g`` later). Covers the first
    ``nb * 64`` entries; the caller does the tail.
    """
    nb = body.shape[0]
    n = _BLOCK // s
    out = torch.empty(nb, n, dtype=body.dtype)
    rows = min(_CHUNK_BLOCKS, nb)
    # chunk views from one split() call and a 0-d mask tensor: per-chunk Python slicing and scalar
    # wrapping cost as much as a fifth of the scan
    xs = x[: nb * _BLOCK].view(nb, _BLOCK).split(rows)
    if fuse is None:
        adds: list[tuple[Tensor, Tensor]] = []
    else:
        r, g, scale, zero_g = fuse
        adds = list(zip(r[: nb * _BLOCK].view(nb, _BLOCK).split(rows), g[: nb * _BLOCK].view(nb, _BLOCK).split(rows)))
    if s >= 32:
        scratch = torch.empty(rows, _BLOCK, dtype=body.dtype)  # reused: no allocation per chunk
        mask = torch.tensor(sign_off, dtype=body.dtype)
        for i, (part, o) in enumerate(zip(body.split(rows), out.split(rows))):
            if adds:
                _accumulate(*adds[i], scale, out=xs[i])
                if zero_g:
                    adds[i][1].zero_()
            a = torch.bitwise_and(part, mask, out=scratch if len(part) == rows else scratch[: len(part)])
            torch.amax(a.view(-1, n, s), 2, out=o)
    else:
        scratch = torch.empty(rows, _BLOCK, dtype=x.dtype)
        for i, (part, o) in enumerate(zip(xs, out.view(x.dtype).split(rows))):
            if adds:
                _accumulate(*adds[i], scale, out=part)
                if zero_g:
                    adds[i][1].zero_()
            a = torch.abs(part, out=scratch if len(part) == rows else scratch[: len(part)])
            o.copy_(F.max_pool1d(a.view(1, 1, -1), s).view(-1, n))
    return out.view(-1)


def _lane_positions(lanes: Tensor, s: int) -> Tensor:
    """Positions in ``x`` of the entries of ``lanes``: ``(len(lanes), s)`` int64."""
    return (lanes * s).unsqueeze(1) + torch.arange(s)


def _aim_lanes(lane_max: Tensor, target: float) -> int:
    """A key that about ``target`` lane maxima reach: the matching order statistic of an evenly
    strided subsample of at most ``_SUBSAMPLE`` lane maxima (its count is off by a few
    ``sqrt(target * stride)``, whatever the distribution of ``x``)."""
    n = lane_max.numel()
    sub = lane_max[:: max(1, n // _SUBSAMPLE)]
    m = math.ceil(target * sub.numel() / n)
    if m >= sub.numel():
        return 0
    return int(torch.topk(sub, m, sorted=False).values.min())


def _kth_lane(lane_max: Tensor, k: int, t: int) -> tuple[int, Tensor]:
    """``m_k``, the exact k-th largest lane maximum, and the lanes whose maximum is ``>= m_k``.

    ``t`` is a guess (a key). A guess is usable when ``k <= count(lane_max >= t) <= 2 k``: then
    ``m_k >= t`` and ranking the few selected maxima gives ``m_k``. The first guess is ``t``; the
    second comes from a subsample of the lane maxima (robust to any shape of the data); if both
    miss, all lane maxima are ranked.
    """
    n = lane_max.numel()
    for attempt in range(2):
        mask = lane_max >= t
        c = int(torch.count_nonzero(mask))
        if k <= c <= _MAX_OVER * k:
            lanes = torch.nonzero(mask).squeeze(1)
            vals = lane_max[lanes]
            break
        if attempt == 0:  # re-aim at k plus ~4 standard deviations of the subsample's count
            t = _aim_lanes(lane_max, 1.1 * k + 4 * math.sqrt(k * max(1, n // _SUBSAMPLE)))
    else:
        vals, lanes = torch.topk(lane_max, k, sorted=False)
        c = k
    if c > k:  # the k-th largest is the (c - k + 1)-th smallest: rank the shorter side
        if c - k + 1 < k:
            mk = int(torch.topk(vals, c - k + 1, largest=False, sorted=False).values.max())
        else:
            mk = int(torch.topk(vals, k, sorted=False).values.min())
        return mk, lanes[vals >= mk]  # ties at m_k keep all their lanes
    return int(vals.min()), lanes


def _entries_above(
    body: Tensor, lanes: Tensor, s: int, t: int, sign_off: int, strict: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Positions, magnitude keys and raw bits of the entries with key ``>= t`` (``> t`` if
    ``strict``) in ``lanes``; ``body`` is the (nb, 64) integer view of ``x``.

    Lanes of 32 or 64 entries are first folded to 8 strided sub-lanes, so that the comparisons run
    on ``8 + s/8`` rather than ``s`` entries per lane (about one entry per lane clears ``t``).
    """
    above = torch.gt if strict else torch.ge
    if s <= 16:
        raw = body.view(-1, s).index_select(0, lanes).view(-1)  # n * s bits: the values come from here
        rows = raw & sign_off
        f = torch.nonzero(above(rows, t)).squeeze(1)  # flat offsets a * s + i: 1-D indexing is cheaper
        pos = (lanes * s).index_select(0, f >> (s.bit_length() - 1)) + (f & (s - 1))
        return pos, rows.index_select(0, f), raw.index_select(0, f)
    rows = body.view(-1, s).index_select(0, lanes).bitwise_and_(sign_off)  # (n, s) keys
    hit = torch.nonzero(above(_halve_to(rows, 8), t).view(-1)).squeeze(1)  # sub-lane r * 8 + j
    r, j = hit >> 3, hit & 7
    sub = rows.view(-1, s // 8, 8)[r, :, j]  # (h, s / 8): columns j, j + 8, ... of row r
    a, i = torch.nonzero(above(sub, t), as_tuple=True)
    pos = lanes[r[a]] * s + 8 * i + j[a]
    return pos, sub[a, i], body.view(-1)[pos]


def _keep_largest(k: int, pos: Tensor, mags: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
    """The ``k`` of the candidates ``(pos, mags, bits)`` with the largest ``mags``."""
    c = pos.numel()
    if c <= k:
        return pos, bits
    if c - k < k:  # drop the c - k smallest: the shorter side to rank
        keep = torch.ones(c, dtype=torch.bool)
        keep[torch.topk(mags, c - k, largest=False, sorted=False).indices] = False
        kept = torch.nonzero(keep).squeeze(1)
        return pos.index_select(0, kept), bits.index_select(0, kept)
    top = torch.topk(mags, k, sorted=False).indices
    return pos[top], bits[top]


def _cpu_refine(
    x: Tensor, k: int, t: float, fuse: "tuple[Tensor, Tensor, Tensor | None, bool] | None" = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k of a contiguous 1-D CPU tensor, using the threshold guess ``t`` to prune.

    Why it is exact: let ``M_l`` be the max magnitude of lane ``l`` and ``m_k`` the k-th largest
    ``M_l``. The ``k`` lanes with ``M_l >= m_k`` hold ``k`` distinct entries ``>= m_k``, so the k-th
    largest magnitude ``v_k >= m_k``. Every entry with ``|x| >= v_k`` therefore lies in a lane with
    ``M_l >= m_k`` (or in the tail), and has ``|x| >= m_k``: the top-k of those candidates (about
    ``k`` of them) is a top-k of ``x``. Ties at ``v_k`` are broken arbitrarily.

    Cost: one read of ``x`` for the lane maxima (about twice ``torch.dot(x, x)``), then a count
    and a nonzero over the ``d / s`` lane maxima and work on about ``k`` lanes.

    ``fuse = (r, g, scale, zero_g)`` (see :func:`_lane_absmax`): ``x := g + scale * r`` is formed
    during the scan, and ``g`` zeroed if ``zero_g``; the caller checked that the lanes apply.
    """
    d = x.numel()
    s = _lane_size(d, k)
    if s is None or x.dtype not in _KEY:
        return _exact_topk(x, k)
    key_dtype, sign_off = _KEY[x.dtype]
    keys = x.view(key_dtype)
    nb = d // _BLOCK
    body = keys[: nb * _BLOCK].view(nb, _BLOCK)
    if fuse is not None and nb * _BLOCK < d:  # the tail the scan does not cover
        r, g, scale, zero_g = fuse
        _accumulate(r[nb * _BLOCK :], g[nb * _BLOCK :], scale, out=x[nb * _BLOCK :])
        if zero_g:
            g[nb * _BLOCK :].zero_()
    lane_max = _lane_absmax(x, body, s, sign_off, fuse)
    mk, lanes = _kth_lane(lane_max, k, _to_key(t, x.dtype))
    if mk == 0:  # fewer than k lanes hold a nonzero
        return _mostly_zero(x, k, keys, body, lane_max, s, sign_off)
    pos, mags, bits = _entries_above(body, lanes, s, mk, sign_off, strict=False)
    tail = keys[nb * _BLOCK :]  # fewer than 64 entries: always candidates
    if tail.numel():
        hit = torch.nonzero((tail & sign_off) >= mk).squeeze(1)
        pos = torch.cat([pos, hit + nb * _BLOCK])
        mags, bits = torch.cat([mags, tail[hit] & sign_off]), torch.cat([bits, tail[hit]])
    pos, bits = _keep_largest(k, pos, mags, bits)
    return bits.view(x.dtype), pos


def _mostly_zero(
    x: Tensor, k: int, keys: Tensor, body: Tensor, lane_max: Tensor, s: int, sign_off: int
) -> tuple[Tensor, Tensor]:
    """Top-k when fewer than ``k`` lanes hold a nonzero: every nonzero is a candidate; if there are
    fewer than ``k`` of them, they are all taken and zeros (which all tie for the last places) from
    all-zero lanes fill the rest (there are plenty: more than ``d / s - k``, and ``d / s >= 8 k``)."""
    nb = body.shape[0]
    pos, mags, _ = _entries_above(body, torch.nonzero(lane_max).squeeze(1), s, 0, sign_off, strict=True)
    tail = keys[nb * _BLOCK :] & sign_off
    hit = torch.nonzero(tail).squeeze(1)
    pos, mags = torch.cat([pos, hit + nb * _BLOCK]), torch.cat([mags, tail[hit]])
    if pos.numel() >= k:
        pos = pos[torch.topk(mags, k, sorted=False).indices]
    else:
        need = k - pos.numel()
        zero_lanes = torch.nonzero(lane_max == 0).squeeze(1)[: math.ceil(need / s)]
        pos = torch.cat([pos, _lane_positions(zero_lanes, s).view(-1)[:need]])
    return x[pos], pos


def _exact_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return x[idx], idx


def _refine(x: Tensor, k: int, t0: float | Tensor) -> tuple[Tensor, Tensor]:
    """Exactly k from a threshold estimate: host-driven on CPU, sync-free on accelerators."""
    if x.device.type == "cpu":
        if x.requires_grad:  # rank a detached view; values stay differentiable, as x[indices] would be
            _, idx = _cpu_refine(x.detach(), k, float(t0))
            return x[idx], idx
        return _cpu_refine(x, k, float(t0))
    from lightning_gaussk import kernels  # lazy: Triton is optional
    from lightning_gaussk._histselect import hist_select

    t = t0 if isinstance(t0, Tensor) else torch.tensor(t0, dtype=torch.float32, device=x.device)
    if kernels.triton_available():
        return kernels.triton_select(x, k, t)
    return hist_select(x, k, t)


_Estimate = Callable[..., float]  # (x or (r, g, scale), k, density, seed, step) -> threshold


def _first_guess(estimate: _Estimate, src: "Tensor | _Sum", k: int, d: int, seed: int, step: int) -> float:
    """The estimate aimed at 1.25 k entries, so that one count usually brackets k."""
    return estimate(src, k, min(1.0, _AIM * k / d), seed, step)


def _cpu_threshold_select(x: Tensor, k: int, estimate: _Estimate, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """CPU path of the threshold selectors: the exact top-k, pruned by ``estimate``'s guess."""
    d = x.numel()
    if _lane_size(d, k) is None or x.dtype not in _KEY:  # ranked exactly: no estimate needed
        return _exact_topk(x, k)
    return _refine(x, k, _first_guess(estimate, x, k, d, seed, step))


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
    from lightning_gaussk._histselect import gaussian_threshold as device_threshold

    return _refine(x, k, device_threshold(x, k))  # stays on the device: no sync


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
