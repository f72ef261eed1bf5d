"""The statistics of the gradient distribution study (Shi et al. 2019, sections 3-4): plain
functions of tensors, float64 arithmetic, any device, no Lightning.

:func:`group_statistics` computes every figure that
:class:`~lightning_gaussk.GradientDistributionMonitor` logs for one vector ``u``; the others are
its parts: :func:`moments`, :func:`ks_normal` (distance to the fitted normal),
:func:`topk_threshold`, :func:`contraction` with the bounds :func:`random_k_bound` and
:func:`paper_bound`, :func:`selection_quality` and :func:`histogram`.
"""

import math

import torch
from torch import Tensor

from lightning_gaussk.selection.selectors import gaussian_threshold

__all__ = [
    "contraction",
    "group_statistics",
    "histogram",
    "ks_normal",
    "moments",
    "paper_bound",
    "random_k_bound",
    "selection_quality",
    "topk_threshold",
]


def moments(x: Tensor) -> dict[str, float]:
    """Mean, unbiased std, skewness and excess kurtosis of the entries of ``x``.

    ``skewness = m3 / m2^1.5`` and ``kurtosis = m4 / m2^2 - 3`` with the central moments
    ``m_j = mean((x - mean)^j)``: the same (biased) estimators as ``scipy.stats.skew`` and
    ``scipy.stats.kurtosis`` with their defaults. A normal sample has both near 0; Laplace has
    kurtosis 3. ``std`` is the unbiased one, as Gaussian-k uses it.
    """
    x = x.detach().reshape(-1).double()
    n = x.numel()
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "skewness": nan, "kurtosis": nan}
    mean = x.mean()
    c = x - mean
    c2 = c * c
    m2 = c2.mean()
    m3 = (c2 * c).mean()
    m4 = (c2 * c2).mean()
    out = torch.stack([mean, m2, m3, m4]).tolist()  # one host transfer
    mean_f, m2_f, m3_f, m4_f = out
    std = math.sqrt(m2_f * n / (n - 1)) if n > 1 else float("nan")
    skew = m3_f / m2_f**1.5 if m2_f > 0 else float("nan")
    kurt = m4_f / m2_f**2 - 3.0 if m2_f > 0 else float("nan")
    return {"mean": mean_f, "std": std, "skewness": skew, "kurtosis": kurt}


def ks_normal(x: Tensor, mean: float, std: float) -> float:
    """Kolmogorov-Smirnov distance ``sup_t |F_n(t) - Phi((t - mean) / std)|`` between the
    empirical distribution of ``x`` and ``N(mean, std^2)`` (``scipy.stats.kstest(x, "norm",
    args=(mean, std)).statistic``). Sorts ``x``: pass a sample for large tensors."""
    x = x.detach().reshape(-1).double()
    n = x.numel()
    if n == 0 or not std > 0 or not math.isfinite(std):
        return float("nan")
    s, _ = torch.sort(x)
    cdf = torch.special.ndtr((s - mean) / std)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=s.device)
    d_plus = (i / n - cdf).max()
    d_minus = (cdf - (i - 1) / n).max()
    return float(torch.maximum(d_plus, d_minus))


def topk_threshold(u: Tensor, k: int) -> float:
    """The exact top-k threshold: the ``k``-th largest ``|u|``."""
    return float(torch.topk(u.detach().reshape(-1).abs(), k, sorted=False).values.min())


def contraction(u: Tensor, k: int) -> float:
    """``||u - topk(u)||^2 / ||u||^2``: the fraction of ``u``'s energy the exact Top-k operator
    leaves behind (0 = all kept). NaN for ``u == 0``."""
    u = u.detach().reshape(-1)
    total = u.double().square().sum()
    kept = torch.topk(u.abs(), k, sorted=False).values.double().square().sum()
    total_f, kept_f = torch.stack([total, kept]).tolist()
    return (total_f - kept_f) / total_f if total_f > 0 else float("nan")


def random_k_bound(k: int, d: int) -> float:
    """``1 - k/d``: Random-k's contraction in expectation, the classical bound for Top-k."""
    return 1.0 - k / d


def paper_bound(k: int, d: int) -> float:
    """``(1 - k/d)^2``: Shi et al.'s bound for Top-k on bell-shaped ``u``."""
    return (1.0 - k / d) ** 2


def selection_quality(u: Tensor, indices: Tensor, k: int) -> tuple[float, float]:
    """``(overlap, norm_capture)`` of a selection ``indices`` against the exact top-k ``T`` of
    ``|u|``: ``|S & T| / k`` and ``||u_S||^2 / ||u_T||^2`` (1 and 1 for an exact top-k, up to ties)."""
    u = u.detach().reshape(-1)
    top = torch.topk(u.abs(), k, sorted=False).indices
    mask = torch.zeros(u.numel(), dtype=torch.bool, device=u.device)
    mask[top] = True
    indices = indices.to(device=u.device, dtype=torch.long)
    hit = mask[indices].sum()
    num = u[indices].double().square().sum()
    den = u[top].double().square().sum()
    hit_f, num_f, den_f = torch.stack([hit.double(), num, den]).tolist()
    return hit_f / max(indices.numel(), 1), (num_f / den_f if den_f > 0 else float("nan"))


def histogram(x: Tensor, bins: int, lo: float, hi: float) -> tuple[Tensor, int, int]:
    """``(counts, underflow, overflow)``: ``bins`` equal bins on ``[lo, hi]`` (int64 CPU counts,
    as ``numpy.histogram(x, bins, (lo, hi))``) and the numbers of entries below ``lo`` / above ``hi``."""
    x = x.detach().reshape(-1).float()
    counts = torch.histc(x, bins=bins, min=lo, max=hi).to("cpu", torch.int64)
    under, over = torch.stack([(x < lo).sum(), (x > hi).sum()]).tolist()
    return counts, int(under), int(over)


def group_statistics(
    u: Tensor,
    k: int,
    *,
    selected: Tensor | None = None,
    grad: Tensor | None = None,
    ks_sample: Tensor | None = None,
) -> dict[str, float]:
    """Every figure the monitor logs for one vector ``u`` (``d`` entries, ``k`` to keep).

    Keys: ``density`` (k/d), ``mean``, ``std``, ``skewness``, ``kurtosis`` (:func:`moments`),
    ``ks`` (:func:`ks_normal` against ``N(mean, std^2)``, on ``ks_sample`` if given),
    ``threshold_topk`` (:func:`topk_threshold`), ``threshold_gauss`` (the Gaussian-k threshold
    ``|mean| + std * PPF(1 - k/(2d))``), ``frac_above_gauss`` (fraction of ``|u|`` above it, to
    compare with ``density``), ``contraction`` with ``bound_randk`` and ``bound_paper``; with
    ``selected``: ``overlap`` and ``norm_capture`` (:func:`selection_quality`); with ``grad``
    (``u = grad + residual``): ``residual_ratio = ||u - grad|| / ||grad||``.
    """
    u = u.detach().reshape(-1)
    d = u.numel()
    if not 1 <= k <= d:
        raise ValueError(f"group_statistics: `k` must satisfy 1 <= k <= d = {d}, got {k}")
    out: dict[str, float] = {"density": k / d}
    out.update(moments(u))
    out["ks"] = ks_normal(u if ks_sample is None else ks_sample, out["mean"], out["std"])
    mags = u.abs()
    top = torch.topk(mags, k, sorted=False)
    std = out["std"] if math.isfinite(out["std"]) else 0.0
    t_gauss = gaussian_threshold(out["mean"], std, k / d)
    total = u.double().square().sum()
    kept = top.values.double().square().sum()
    above = (mags > t_gauss).sum()
    t_top, total_f, kept_f, above_f = torch.stack([top.values.min().double(), total, kept, above.double()]).tolist()
    out["threshold_topk"] = t_top
    out["threshold_gauss"] = t_gauss
    out["frac_above_gauss"] = above_f / d
    out["contraction"] = (total_f - kept_f) / total_f if total_f > 0 else float("nan")
    out["bound_randk"] = random_k_bound(k, d)
    out["bound_paper"] = paper_bound(k, d)
    if selected is not None:
        out["overlap"], out["norm_capture"] = selection_quality(u, selected, k)
    if grad is not None:
        g = grad.detach().reshape(-1)
        r2, g2 = torch.stack([(u.double() - g.double()).square().sum(), g.double().square().sum()]).tolist()
        out["residual_ratio"] = math.sqrt(r2 / g2) if g2 > 0 else float("nan")
    return out
