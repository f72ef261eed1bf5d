"""FSDP2 shard checkpoints: every rank saves its own residual shards; a save on another ``(N, L)``
is resumed by the row policy (the pending averaged update on each new rank's rows)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.checkpoint import shards as ckpt
from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.comm.topology import dim0_shard
from lightning_gaussk.engine.fsdp import SHARDING, GaussKFSDPState
from lightning_gaussk.utils.log import rank_zero_warn

__all__ = ["reshard_state", "restore_fsdp_shards", "save_fsdp_shards"]


# ------------------------------------------------------------------------------- checkpoints
def save_fsdp_shards(state: GaussKFSDPState, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Every rank writes its own shard ``folder/rank{r}.pt``; returns the manifest (a collective:
    call it on every rank; see :func:`lightning_gaussk.checkpoint.shards.save_shards`)."""
    return ckpt.save_shards(state, folder, rank=dist.get_rank(), world_size=dist.get_world_size())


def restore_fsdp_shards(state: GaussKFSDPState, open_saved: Callable[[], ckpt.SavedState | None]) -> bool:
    """Load this rank's saved state (a collective): its own shard on the same ``(N, L)``, else the
    policy of the module docstring, with a warning. Returns False when nothing was saved."""
    return ckpt.restore_state(
        state, lambda: _Resharded.wrap(open_saved()), rank=dist.get_rank(), world_size=dist.get_world_size()
    )


class _Resharded:
    """A saved FSDP2 state, converted for a target layout by the rows of each parameter."""

    def __init__(self, saved: ckpt.SavedState) -> None:
        self.saved = saved

    @classmethod
    def wrap(cls, saved: ckpt.SavedState | None) -> _Resharded | None:
        return None if saved is None else cls(saved)

    def state_for(self, target: Layout) -> dict[str, Any]:
        saved = self.saved.layout
        if (saved.world_size, saved.ranks_per_node) == (target.world_size, target.ranks_per_node):
            return dict(self.saved.read(target.rank))
        rank_zero_warn(
            f"Resuming GaussK FSDP2 state saved on {saved.nodes} nodes x {saved.ranks_per_node} ranks on "
            f"{target.nodes} nodes x {target.ranks_per_node} ranks: each new rank starts from the pending averaged update "
            "P = (1/N) sum_n r_{n,l} on its rows (velocities alike); see docs/fsdp.md"
        )
        return reshard_state(self.saved.read, saved, target)


def reshard_state(read_rank: Callable[[int], Mapping[str, Any]], saved: Layout, target: Layout) -> dict[str, Any]:
    """Rank ``target.rank``'s state dict from a save on another ``(N, L)``: per parameter the pending
    update ``P = (1/N) sum_n r_{n,l}`` (each saved shard added at its rows, one file at a time), and
    ``r' = P`` on the target rank's rows; the same for velocities. Step and counters: saved rank 0."""
    first = dict(read_rank(0))
    shapes = {n: tuple(s) for n, s in first.get("shapes", {}).items()}
    pending: dict[str, dict[str, Tensor]] = {"residuals": {}, "velocity": {}}
    for r in range(saved.world_size):
        sd = first if r == 0 else read_rank(r)
        at = Layout(saved.world_size, r, saved.ranks_per_node)
        for kind, acc in pending.items():
            for name, tensor in (sd.get(kind) or {}).items():
                start, stop = _rows(shapes, name, at)
                full = acc.setdefault(name, torch.zeros(math.prod(shapes[name]), dtype=torch.float32))
                full[start:stop].add_(tensor.reshape(-1).float(), alpha=1.0 / saved.nodes)
    out = {k: v for k, v in first.items() if k not in ("residuals", "velocity")}
    out["layout"] = {**target.to_dict(), "sharding": SHARDING}
    for kind, acc in pending.items():
        if acc or kind == "residuals":
            out[kind] = {name: full[slice(*_rows(shapes, name, target))].clone() for name, full in acc.items()}
    return out


def _rows(shapes: Mapping[str, tuple[int, ...]], name: str, layout: Layout) -> tuple[int, int]:
    """Flat ``[start, stop)`` of ``layout``'s rank's dim-0 shard of parameter ``name``."""
    start, stop, _ = dim0_shard(shapes[name], layout)
    return start, stop
