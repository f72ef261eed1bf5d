"""The layout vote: every rank proposes a layout, and node mode is used only if all agree.

Node mode needs the same ranks per node ``L`` on every rank and node-contiguous ranks (torchrun's
``GROUP_RANK == rank // L`` where it is set). Each rank's proposal is ``(L, contiguous)``; one
small ``all_gather_object`` compares them. On disagreement ``hierarchy="auto"`` falls back to
flat with a warning (on rank 0) and ``hierarchy="node"`` raises, on every rank alike (each sees
every vote), so no rank is left in a collective the others skip.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from lightning_gaussk.comm.layout import Layout, launcher_ranks_per_node, resolve_layout
from lightning_gaussk.utils.log import rank_zero_warn

__all__ = ["decide_layout", "vote_layout"]


def vote_layout(proposal: Layout, hierarchy: str, group: Any = None) -> Layout:
    """The layout every rank of ``group`` (None: the world) agrees on, starting from this rank's
    ``proposal`` (a collective: call it on every rank at the same point).

    ``hierarchy="flat"`` or one rank: ``proposal`` as is, no communication. Otherwise the ranks
    exchange ``(ranks_per_node, contiguous)``; ``contiguous`` is False when ``GROUP_RANK`` is set
    and differs from ``proposal.node``. All equal and contiguous: ``proposal``; else flat
    (``Layout(world, rank)``) under ``"auto"``.

    Raises:
        ValueError: ``hierarchy="node"`` and the proposals differ or are not node-contiguous.
    """
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if hierarchy == "flat" or world == 1:
        return proposal
    group_rank = os.environ.get("GROUP_RANK")
    contiguous = group_rank is None or proposal.ranks_per_node is None or int(group_rank) == proposal.node
    votes: list[Any] = [None] * world
    dist.all_gather_object(votes, (proposal.ranks_per_node, contiguous), group=group)
    if len(set(votes)) == 1 and all(ok for _, ok in votes):
        return proposal
    detail = f"ranks per node and node-contiguity differ between ranks: {sorted(set(votes), key=str)}"
    if hierarchy == "node":
        raise ValueError(f"GaussKState: `hierarchy` = 'node' cannot be used: {detail}")
    rank_zero_warn(f"GaussK: hierarchy='auto' stays flat: {detail}")
    return Layout(world, rank)


def decide_layout(hierarchy: str, ranks_per_node: int | None, group: Any = None, launcher_rpn: int | None = None) -> tuple[Layout, int | None]:
    """The layout of every engine, by one rule (a collective: call it on every rank at the same point).

    1. no process group: one rank, flat;
    2. this rank's proposal (:func:`~lightning_gaussk.comm.layout.resolve_layout`): an explicit
       ``ranks_per_node`` wins, else ``launcher_rpn`` (ranks per node as the launcher says; None
       reads torchrun's ``LOCAL_WORLD_SIZE``);
    3. the vote (:func:`vote_layout`).

    Returns the layout and the launcher's ranks per node it was read from (for the startup line).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return Layout(1, 0), launcher_rpn
    g = group if group is not None else dist.group.WORLD
    hint = launcher_rpn if launcher_rpn is not None else launcher_ranks_per_node()
    proposal = resolve_layout(hierarchy, ranks_per_node, dist.get_world_size(g), dist.get_rank(g), hint)
    return vote_layout(proposal, hierarchy, group), hint
