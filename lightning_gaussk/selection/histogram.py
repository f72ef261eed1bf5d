"""Histogram-refined Gaussian-k selection in plain torch, free of host syncs.

Gaussian-k (Shi et al., 2019) estimates the top-k threshold of a gradient
from its first two moments::

    mu = mean(x),  sigma = std(x),  p = k / (2 d)
    t0 = |mu| + sigma * ndtri(1 - p)          (then t0 = max(t0, 1e-30))

i.e. the |x| quantile that keeps k of d entries if x were N(mu, sigma^2).
Real gradients are not Gaussian, so the count above ``t0`` is only roughly
k. We refine it with one histogram of log-magnitudes around ``t0``::

    key(a) = int32_bits(a) >> 18        (a = |x| in fp32: exponent + top 5
                                         mantissa bits, 32 bins per octave)
    bin(x) = clamp(key(|x|) - key(t0) + 1024, 0, 2047),  bin(0) = 0

``bin`` is monotone in |x|, so with ``count_ge[b] = sum(hist[b:])`` the
boundary bin ``b* = max{b : count_ge[b] >= k}`` splits the input into
``a = count_ge[b* + 1] < k`` elements that are certainly selected (bin > b*)
and a band (bin == b*) from which ``k - a`` are taken. Every selected element
is within one bin (a factor 2^(1/32) ~ 1.022) of the exact k-th magnitude
unless the true threshold lies more than 32 octaves from ``t0``.

Everything is fixed-size and uses no ``.item()``, ``nonzero()``, boolean
indexing or Python branches on tensor values, so nothing stalls a CUDA
stream. ``lightning_gaussk.selection.triton`` implements the same math as fused
Triton kernels; both use :func:`threshold_from_moments` and
:func:`boundary`, and :func:`bin_index` is reproduced bit for bit there.
"""

import torch
from torch import Tensor

__all__ = [
    "NUM_BINS",
    "bin_index",
    "boundary",
    "estimate_threshold",
    "hist_select",
    "histogram",
    "scatter_histogram",
    "threshold_from_moments",
]

NUM_BINS = 2048  # H: +-32 octaves around t0 at 32 bins per octave
CENTER = 1024  # bin of |x| == t0 (up to the 5 mantissa bits kept)
SHIFT = 18  # drop 18 of 23 mantissa bits: keep exponent + top 5 bits
MIN_THRESHOLD = 1e-30  # keeps t0 > 0 (a valid log-scale anchor) on all-zero input


def _check_k(d: int, k: int) -> None:
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= numel, got k={k}, numel={d}")


def threshold_from_moments(s: Tensor, s2: Tensor, d: int, k: int) -> Tensor:
    r"""Gaussian-k threshold from ``s = sum(x)`` and ``s2 = sum(x^2)``.

    ``mu = s / d``, ``sigma^2 = (s2 - s mu) / (d - 1)`` (clamped at 0), and
    ``t0 = max(|mu| + sigma * ndtri(1 - k / (2 d)), 1e-30)``, a 0-dim fp32
    tensor on the device of ``s``.
    """
    s, s2 = s.float(), s2.float()
    mu = s / d
    var = ((s2 - s * mu) / max(d - 1, 1)).clamp_min(0)  # unbiased, like torch.std
    # ndtri(1 - p) == -ndtri(p); fp32 cannot hold 1 - p for tiny p, but can hold p.
    # torch.full fills on device: no host-to-device copy.
    p = torch.full((), k / (2 * d), dtype=torch.float32, device=s.device)
    z = -torch.special.ndtri(p)
    return (mu.abs() + var.sqrt() * z).clamp_min(MIN_THRESHOLD)


def estimate_threshold(x: Tensor, k: int) -> Tensor:
    r"""Gaussian-k threshold ``|mu| + sigma * ndtri(1 - k / (2 d))`` estimated from ``x`` on its device.

    Moments are accumulated in fp32 and the result is a 0-dim fp32 device
    tensor (never read back to the host).
    """
    xf = x.reshape(-1).float()
    _check_k(xf.numel(), k)
    return threshold_from_moments(xf.sum(), torch.dot(xf, xf), xf.numel(), k)


def bin_index(x: Tensor, t0: Tensor) -> Tensor:
    r"""Log-magnitude bin of every element: ``clamp(key(|x|) - key(t0) + 1024, 0, 2047)``.

    ``key(a) = int32_bits(fp32(a)) >> 18``; exact zeros go to bin 0 (tested
    on the bits, as in the Triton kernels). Returns int32, ``x.numel()`` long.
    """
    a = x.reshape(-1).float().abs()  # a fresh fp32 tensor, free to modify in place
    bits = a.view(torch.int32)  # non-negative float bits order like the float
    zero = bits == 0  # exact +0.0, even where denormals get flushed
    key = bits.bitwise_right_shift_(SHIFT)
    kt = t0.reshape(()).float().view(torch.int32) >> SHIFT
    b = key.sub_(kt - CENTER).clamp_(0, NUM_BINS - 1)
    return b.masked_fill_(zero, 0)  # |x| == 0 -> lowest bin, whatever t0 is


def histogram(bins: Tensor) -> Tensor:
    """Counts of each of the ``NUM_BINS`` bins (int64)."""
    if bins.device.type == "cpu":
        return torch.bincount(bins, minlength=NUM_BINS)  # fastest on CPU; bins <= 2047: H long
    return scatter_histogram(bins)


def scatter_histogram(bins: Tensor) -> Tensor:
    """:func:`histogram` by ``scatter_add_``, which (unlike CUDA bincount) never reads max(bins) back."""
    ones = torch.ones((), dtype=torch.int64, device=bins.device).expand(bins.numel())
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=bins.device)
    return hist.scatter_add_(0, bins.long(), ones)


def boundary(hist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""Boundary bin ``b* = max{b : count_ge[b] >= k}`` and ``a = count_ge[b* + 1]``.

    ``count_ge[b] = sum(hist[b:])``; ``a < k`` is the number of elements
    strictly above ``b*`` (0 when ``b* = H - 1``). Both are 0-dim int64 device
    tensors. Requires ``sum(hist) >= k``.
    """
    count_ge = hist.long().flip(0).cumsum(0).flip(0)
    bstar = (count_ge >= k).sum() - 1  # count_ge is non-increasing and count_ge[0] = d >= k
    padded = torch.cat([count_ge, count_ge.new_zeros(1)])  # count_ge[H] = 0
    a = padded.gather(0, (bstar + 1).reshape(1)).reshape(())  # gather: a tensor index, no .item()
    return bstar, a


def hist_select(x: Tensor, k: int, t0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Select k entries of ``x`` of (approximately) largest magnitude.

    All ``a`` elements with ``bin > b*`` are taken, plus the ``k - a``
    lowest-index elements with ``bin == b*`` (see the module docstring).
    The kept mask is compacted without a host sync by a cumsum and a
    ``searchsorted`` of ``1..k`` into it; indices come out ascending.
    ``t0`` overrides the Gaussian-k threshold estimate.

    Returns ``(values, indices)``: ``k`` distinct int64 indices into the
    flattened ``x`` and ``values = x[indices]`` in ``x``'s dtype (callers
    should not rely on the order).
    """
    x = x.reshape(-1).contiguous()
    d = x.numel()
    _check_k(d, k)
    if t0 is None:
        t0 = estimate_threshold(x, k)
    b = bin_index(x, t0)
    bstar, a = boundary(histogram(b), k)

    rank_t = torch.int32 if d < 2**31 else torch.int64  # halves the cumsum traffic
    band = b == bstar
    # Keep everything above b* and the first k - a band elements: exactly k in all.
    keep = (b > bstar) | (band & (band.cumsum(0, dtype=rank_t) <= k - a))
    csum = keep.cumsum(0, dtype=rank_t)
    # The j-th kept element is the first position where csum reaches j (a fixed-size lookup).
    j = torch.arange(1, k + 1, dtype=rank_t, device=x.device)
    idx = torch.searchsorted(csum, j)
    return x.index_select(0, idx), idx
