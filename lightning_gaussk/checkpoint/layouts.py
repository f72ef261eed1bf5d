"""The layout a save was made in and the layout it loads into.

Every shard file and manifest records the saved layout ``{"world_size": W, "rank": r,
"ranks_per_node": L or None}``. What decides how residuals are laid out is ``(W, L)``, with
``L = 1`` equal to flat (a node of one rank sums one residual): :func:`residual_layout`. Two
layouts with the same ``(W, L)`` load each rank's own shard exactly; any other pair goes through a
reshard policy (:mod:`lightning_gaussk.checkpoint.reshard`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_gaussk.comm.layout import Layout

__all__ = ["describe_layout", "layout_of", "residual_layout", "target_layout"]


def target_layout(state: Any, world_size: int, rank: int) -> Layout:
    """The layout a live state loads into: ``state.layout`` when it describes this world and rank
    (set up by the hook, the strategy or ``register_gaussk``), else flat on ``world_size`` ranks."""
    layout = getattr(state, "layout", None)
    if isinstance(layout, Layout) and (layout.world_size, layout.rank) == (world_size, rank):
        return layout
    return Layout(world_size, rank)


def layout_of(state_dict: Mapping[str, Any], world_size: int, rank: int) -> Layout:
    """The layout a state dict was saved in: its ``"layout"`` when that describes ``world_size``
    and ``rank``, else flat on ``world_size`` ranks (state dicts from before node mode, or of a
    state whose layout was never set up: their residuals are whole parameters)."""
    raw = state_dict.get("layout")
    if isinstance(raw, Mapping):
        layout = Layout.from_dict(raw)
        if (layout.world_size, layout.rank) == (world_size, rank):
            return layout  # else a state that was never set up (its default layout): flat residuals
    return Layout(world_size, rank)


def residual_layout(layout: Layout) -> tuple[int, int | None]:
    """What decides residual semantics: ``(W, L)``, with ``L = 1`` equal to flat (None)."""
    rpn = layout.ranks_per_node
    return layout.world_size, None if rpn in (None, 1) else rpn


def describe_layout(layout: Layout) -> str:
    """``"world size 4"`` (flat) or ``"world size 4 in node mode (2 nodes x 2 ranks)"``."""
    ws, rpn = residual_layout(layout)
    if rpn is None:
        return f"world size {ws}"
    return f"world size {ws} in node mode ({ws // rpn} nodes x {rpn} ranks)"
