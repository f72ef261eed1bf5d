"""Figures of the gradient distribution study, drawn from the monitor's snapshots and history
(matplotlib's object API on an Agg canvas: no pyplot, no global backend change).

:func:`plot_distribution` draws the histogram of ``u`` per group with the fitted normal (the
paper's figure 1); :func:`plot_contraction` the Top-k contraction over training next to its
bounds. :class:`~lightning_gaussk.GradientDistributionMonitor` calls both at the end of fit;
they redraw the figures from saved files as well.
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["plot_contraction", "plot_distribution"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_distribution(groups: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> str:
    """Histogram of ``u`` per group with the fitted normal ``N(mean, std^2)`` (the paper's
    figure 1), from snapshot groups (``load_snapshot(f)["groups"]``). Writes a PNG; returns the path."""
    names = list(groups)
    n = max(len(names), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3.6 * cols, 2.8 * rows + 0.5)
    for i, name in enumerate(names):
        rec = groups[name]
        st = rec["stats"]
        ax = fig.add_subplot(rows, cols, i + 1)
        counts = torch.as_tensor(rec["hist_counts"]).double()
        lo, hi = float(rec["hist_lo"]), float(rec["hist_hi"])
        nb = counts.numel()
        width = (hi - lo) / nb
        edges = torch.linspace(lo, hi, nb + 1, dtype=torch.float64)
        total = float(rec["d"])
        dens = (counts / (total * width)).tolist() if total > 0 and width > 0 else counts.tolist()
        ax.bar(edges[:-1].tolist(), dens, width=width, align="edge", color="#4c72b0", alpha=0.75, label="u")
        mean, std = st["mean"], st["std"]
        if math.isfinite(std) and std > 0:
            x = torch.linspace(lo, hi, 400, dtype=torch.float64)
            pdf = torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
            ax.plot(x.tolist(), pdf.tolist(), color="#dd4444", lw=1.4, label="N(mean, std)")
        thr = st.get("threshold_topk")
        if thr is not None and math.isfinite(thr) and lo < thr < hi:
            for s in (-thr, thr):
                ax.axvline(s, color="black", lw=0.8, ls=":")
        outside = int(rec.get("underflow", 0)) + int(rec.get("overflow", 0))
        ax.set_title(f"{name}  (d={rec['d']}, k={rec['k']})", fontsize=8)
        ax.text(
            0.02,
            0.97,
            f"kurt {st['kurtosis']:.2f}\nskew {st['skewness']:.2f}\nKS {st['ks']:.3f}\noutside {outside}",
            transform=ax.transAxes,
            va="top",
            fontsize=7,
        )
        ax.tick_params(labelsize=6)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        if i == 0:
            ax.legend(fontsize=6, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return os.fspath(path)


def plot_contraction(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> str:
    """Contraction ``||u - topk(u)||^2 / ||u||^2`` over steps per group, next to the Random-k
    bound ``1 - k/d`` and the paper's ``(1 - k/d)^2``; right: the kept energy ``1 -
    contraction`` on a log scale (bounds ``k/d`` and ``1 - (1 - k/d)^2``). Rows as in
    ``monitor.history`` (or ``history_rank{r}.pt``'s ``rows``). Writes a PNG; returns the path."""
    fig = _figure(11, 4.2)
    left = fig.add_subplot(1, 2, 1)
    right = fig.add_subplot(1, 2, 2)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    colors = [f"C{i % 10}" for i in range(len(by_group))]
    for (name, rs), c in zip(by_group.items(), colors):
        rs = sorted(rs, key=lambda r: r["step"])
        steps = [r["step"] for r in rs]
        left.plot(steps, [r["contraction"] for r in rs], "o-", color=c, ms=3, lw=1.2, label=f"{name} top-k")
        right.plot(steps, [1 - r["contraction"] for r in rs], "o-", color=c, ms=3, lw=1.2, label=f"{name} top-k")
        rk = [r["bound_randk"] for r in rs]
        pb = [r["bound_paper"] for r in rs]
        left.plot(steps, rk, "--", color=c, lw=0.9, alpha=0.8)
        left.plot(steps, pb, ":", color=c, lw=1.1, alpha=0.9)
        right.plot(steps, [1 - v for v in rk], "--", color=c, lw=0.9, alpha=0.8)
        right.plot(steps, [1 - v for v in pb], ":", color=c, lw=1.1, alpha=0.9)
    left.plot([], [], "--", color="gray", label="Random-k bound 1 - k/d")
    left.plot([], [], ":", color="gray", label="paper bound (1 - k/d)^2")
    left.set_xlabel("optimizer step")
    left.set_ylabel("||u - topk(u)||^2 / ||u||^2")
    left.set_title("contraction (lower = Top-k keeps more)", fontsize=9)
    left.legend(fontsize=7)
    right.set_yscale("log")
    right.set_xlabel("optimizer step")
    right.set_ylabel("kept energy ||topk(u)||^2 / ||u||^2")
    right.set_title("1 - contraction vs k/d (--) and 2k/d - (k/d)^2 (:)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return os.fspath(path)
