"""Saved hook state across a change of layout: the one policy, used by the Lightning strategy
and by the Accelerate integration.

Policy (world size ``W`` saved, ``W'`` now): every rank starts from the mean of the saved
residuals, ``r' = (1/W) sum_r r_r``. It keeps the pending averaged update unchanged: what the
saved ranks still owed to the model, ``(1/W) sum_r r_r``, is what the new ranks owe,
``(1/W') sum_r' r' = r'``. Step and counters are taken from the first saved rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn

__all__ = ["average_states", "warn_layout_change"]


def average_states(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One state dict whose residuals are the mean over ``per_rank`` of each parameter's saved
    residual (a parameter missing on a rank counts as a zero residual there), summed one rank
    at a time so memory holds one running sum per parameter, not every rank's copy."""
    merged: dict[str, Any] | None = None
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for sd in per_rank:
        if merged is None:
            merged = dict(sd)
        for name, r in sd["residuals"].items():
            if name in sums:
                sums[name].add_(r.to(sums[name]))
            else:
                sums[name] = r.detach().to(torch.float32, copy=True)
        count += 1
    if merged is None:
        raise ValueError("average_states: `per_rank` is empty")
    merged["residuals"] = {name: s.div_(count) for name, s in sums.items()}
    return merged


def warn_layout_change(saved: str, now: str) -> None:
    """Say, once (rank 0), that saved residuals are averaged because the layout changed."""
    rank_zero_warn(
        f"Resuming GaussK state saved with {saved} on {now}: each rank starts from the mean of the saved residuals "
        "(this preserves the pending averaged update)."
    )
