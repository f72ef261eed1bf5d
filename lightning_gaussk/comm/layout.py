"""Where ranks live: the layout of a job (flat, or nodes of ``L`` ranks) and how each parameter is
cut into per-node-rank chunks in node mode.

Node mode (``hierarchy="node"``) assumes node-contiguous global ranks, as Lightning, torchrun and
Accelerate number them: rank ``r`` is local rank ``l = r mod L`` of node ``n = r // L``, with
``N = W / L`` nodes. Inside a node the ranks reduce-scatter the bucket, so local rank ``l`` owns
chunk ``l`` of every parameter of ``n_p`` entries::

    c_p = ceil(n_p / L)          chunk l = entries [l c_p, min((l + 1) c_p, n_p))

Chunks follow parameters, not buckets, so a rank's residual entries survive DDP's bucket rebuild
without communication, and a checkpoint shard is a set of per-parameter chunks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Layout", "chunk_bounds", "launcher_ranks_per_node", "resolve_layout"]


@dataclass(frozen=True)
class Layout:
    """A job's layout as one rank sees it: ``world_size`` ranks, this ``rank``, and
    ``ranks_per_node`` (``L``) in node mode or None in flat mode."""

    world_size: int
    rank: int
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        w, r, rpn = self.world_size, self.rank, self.ranks_per_node
        if not (isinstance(w, int) and w >= 1 and isinstance(r, int) and 0 <= r < w):
            raise ValueError(f"Layout: needs 0 <= rank < world_size, got rank={r!r}, world_size={w!r}")
        if rpn is not None and (not isinstance(rpn, int) or rpn < 1 or w % rpn):
            raise ValueError(f"Layout: `ranks_per_node` must divide the world size {w}, got {rpn!r}")

    @property
    def mode(self) -> str:
        """``"node"`` or ``"flat"``."""
        return "flat" if self.ranks_per_node is None else "node"

    @property
    def nodes(self) -> int:
        """``N``: the number of nodes (``W`` in flat mode, where every rank exchanges on its own)."""
        return self.world_size if self.ranks_per_node is None else self.world_size // self.ranks_per_node

    @property
    def node(self) -> int:
        return self.rank if self.ranks_per_node is None else self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return 0 if self.ranks_per_node is None else self.rank % self.ranks_per_node

    def parts(self) -> int:
        """How many chunks each parameter is cut into: ``L`` in node mode, 1 in flat mode."""
        return 1 if self.ranks_per_node is None else self.ranks_per_node

    def chunk(self, numel: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of a parameter of ``numel`` entries (all of it in flat mode)."""
        return chunk_bounds(numel, self.parts(), self.local_rank)

    def describe(self) -> str:
        if self.ranks_per_node is None:
            return f"flat, {self.world_size} ranks"
        return f"node mode, {self.nodes} nodes x {self.ranks_per_node} ranks"

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "rank": self.rank, "ranks_per_node": self.ranks_per_node}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layout:
        return cls(int(data["world_size"]), int(data["rank"]), data.get("ranks_per_node"))


def chunk_bounds(numel: int, parts: int, index: int) -> tuple[int, int]:
    """Entries ``[start, stop)`` of chunk ``index`` of ``parts`` of a parameter of ``numel``
    entries: ``c = ceil(numel / parts)``, ``start = min(index c, numel)``, ``stop = min(start + c, numel)``."""
    c = math.ceil(numel / parts)
    start = min(index * c, numel)
    return start, min(start + c, numel)


def launcher_ranks_per_node(environ: Mapping[str, str] | None = None) -> int | None:
    """Ranks per node as torchrun (and Accelerate's launcher, which uses it) says:
    ``LOCAL_WORLD_SIZE``; None when it is not set."""
    environ = os.environ if environ is None else environ
    raw = environ.get("LOCAL_WORLD_SIZE")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        raise ValueError(f"environment variable LOCAL_WORLD_SIZE={raw!r} is not an int") from None


def resolve_layout(hierarchy: str, ranks_per_node: int | None, world_size: int, rank: int,
                   launcher_rpn: int | None = None) -> Layout:  # fmt: skip
    """This rank's proposal of the layout (the hook makes every rank agree before using it).

    - An explicit ``ranks_per_node`` must divide ``world_size`` (``ValueError`` naming it);
      otherwise the launcher's figure ``launcher_rpn`` is used.
    - ``"flat"``: flat. ``"node"``: node mode with that ``L`` (``ValueError`` if neither says it).
    - ``"auto"``: node mode when the job spans more than one node of more than one rank
      (``1 < L < W``); flat otherwise.
    """
    if ranks_per_node is not None and world_size % ranks_per_node:
        raise ValueError(
            f"`ranks_per_node` = {ranks_per_node} must divide the world size {world_size} (nodes of equal size, "
            "node-contiguous ranks)"
        )
    rpn = ranks_per_node if ranks_per_node is not None else launcher_rpn
    if rpn is not None and (rpn < 1 or world_size % rpn):
        rpn = None  # the launcher's figure does not describe this world (e.g. a subgroup): no hierarchy from it
    if hierarchy == "flat":
        return Layout(world_size, rank)
    if hierarchy == "node":
        if rpn is None:
            raise ValueError(
                "`hierarchy` = 'node' needs the number of ranks per node: pass `ranks_per_node` (GAUSSK_RANKS_PER_NODE) "
                "or launch with torchrun/Accelerate (LOCAL_WORLD_SIZE) or Lightning (devices, num_nodes)"
            )
        return Layout(world_size, rank, rpn)
    if rpn is not None and 1 < rpn < world_size:
        return Layout(world_size, rank, rpn)
    return Layout(world_size, rank)
