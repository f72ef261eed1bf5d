"""Exact top-k of CPU tensors by lane maxima, pruned by a threshold guess.

The CPU half of the threshold selectors ("gaussk", "dgc") and of ``accumulate_select``'s fast
path (:mod:`lightning_gaussk.selection.selectors` holds the registry, the threshold estimates and the
selectors themselves; accelerators use :mod:`lightning_gaussk.selection.histogram` / ``kernels``).

``x`` is cut into lanes of ``s`` contiguous entries; one read pass computes every lane's maximum
magnitude (as an integer key), the k-th largest lane maximum ``m_k`` is found from the guess, and
the top-k is taken among the few entries ``>= m_k`` of the lanes that reach it (exact: see
:func:`_cpu_refine`). Optionally the pass first forms ``x := g + scale * r`` chunk by chunk
(``fuse``), so that the error-feedback add and the scan read memory once.

Used by ``selectors``: :func:`_cpu_threshold_select` (the CPU path of "gaussk" and "dgc"),
:func:`_cpu_refine` with ``fuse`` and :func:`_first_guess` (``accumulate_select``), :func:`_lane_size`
(whether the lanes apply), :func:`_exact_topk` ("topk"), :func:`_cpu_topk`, and :func:`_accumulate`,
the one formula of ``u``.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_Sum = tuple[Tensor, Tensor, "Tensor | None"]  # (r, g, scale) standing for g + scale * r (scale None: 1)


def _accumulate(r: Tensor, g: Tensor, scale: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``g + scale * r`` (``r + g`` when ``scale`` is None), the one formula of ``u`` everywhere."""
    if scale is None:
        return torch.add(r, g, out=out) if out is not None else r + g
    return torch.addcmul(g, r, scale, out=out) if out is not None else torch.addcmul(g, r, scale)


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


def _cpu_topk(x: Tensor, k: int, t: float | Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_cpu_refine` of a CPU tensor that may require grad (a detached view is ranked;
    the values stay differentiable, as ``x[indices]`` would be)."""
    if x.requires_grad:
        _, idx = _cpu_refine(x.detach(), k, float(t))
        return x[idx], idx
    return _cpu_refine(x, k, float(t))


_Estimate = Callable[..., float]  # (x or (r, g, scale), k, density, seed, step) -> threshold


def _first_guess(estimate: _Estimate, src: "Tensor | _Sum", k: int, d: int, seed: int, step: int) -> float:
    """The estimate aimed at 1.25 k entries, so that one count usually brackets k."""
    return estimate(src, k, min(1.0, _AIM * k / d), seed, step)


def _cpu_threshold_select(x: Tensor, k: int, estimate: _Estimate, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """CPU path of the threshold selectors: the exact top-k, pruned by ``estimate``'s guess."""
    d = x.numel()
    if _lane_size(d, k) is None or x.dtype not in _KEY:  # ranked exactly: no estimate needed
        return _exact_topk(x, k)
    return _cpu_topk(x, k, _first_guess(estimate, x, k, d, seed, step))
