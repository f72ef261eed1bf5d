"""A slot: the buffers of one key (a DDP bucket, an FSDP2 shard, a local SGD fragment) on this
rank, laid out as its topology keeps them: ``residual`` and ``work`` (``u``), fp32, and each
parameter's entries at ``places[p] = (offset, entries)``. Topologies make slots of their own kind
(:class:`~lightning_gaussk.comm.topology.NodeSlot`: this rank's chunk of every parameter); the
engine's store keeps them and commits into them."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

__all__ = ["Slot"]


class Slot:
    """The buffers of one key, valid while it holds the same parameters in the same order."""

    def __init__(self, key: tuple[int, ...], params: list[Tensor], device: torch.device, d: int) -> None:
        self.key = key
        self.numels = [p.numel() for p in params]
        # where each parameter's residual lives in self.residual: (offset, entries)
        self.places = [(o, n) for o, n in zip(itertools.accumulate([0, *self.numels[:-1]]), self.numels)]
        self.residual = torch.zeros(d, dtype=torch.float32, device=device)
        self.work = torch.empty(d, dtype=torch.float32, device=device)  # u, reused every step
        self.scale = torch.ones((), dtype=torch.float32, device=device)  # S_r of residual and velocity
        self.velocity: Tensor | None = None  # momentum correction: v, and its next value in flight
        self.vel_work: Tensor | None = None
        self.cache: dict[str, Tensor] = {}  # the exchange's and topology's reusable buffers
        # The last collective's Work. Holding it means the backend thread never drops the last
        # reference to a Work that owns these Python-created tensors: that drop needs the GIL, and
        # at interpreter exit the main thread holds the GIL while joining that very thread
        # (deadlock seen with gloo). It is released here, on the Python side, at the next step.
        self.handle: Any = None

    def canonical_order(self, rank_of: dict[int, int]) -> tuple[Tensor, Tensor]:
        """``(order, order_inv)``: entry ``i`` of this slot is entry ``order[i]`` of the canonical
        layout, its parameters sorted by ``rank_of[id(p)]`` (model order; unknown ones last, in
        slot order), each parameter's entries kept together; padding entries (node mode's short
        chunks) come last. Computed once per slot, on first use."""
        cached = self.cache.get("order")
        if cached is not None:
            return cached, self.cache["order_inv"]
        d, device = self.size, self.residual.device
        order = torch.empty(d, dtype=torch.int64, device=device)  # filled on the device: no host copy
        pos, covered = 0, []
        seq = sorted(range(len(self.key)), key=lambda i: (rank_of.get(self.key[i], len(rank_of) + i), i))
        for i in seq:
            off, n = self.places[i]
            order[off : off + n] = torch.arange(pos, pos + n, device=device)
            covered.append((off, n))
            pos += n
        start = 0
        for off, n in sorted(covered) + [(d, 0)]:  # the gaps (padding) in slot order, last
            if off > start:
                order[start:off] = torch.arange(pos, pos + off - start, device=device)
                pos += off - start
            start = max(start, off + n)
        self.cache["order"], self.cache["order_inv"] = order, torch.argsort(order)
        return order, self.cache["order_inv"]

    @property
    def size(self) -> int:
        return self.residual.numel()

    def nbytes(self) -> int:
        """Bytes held by this slot's tensors (its buffers and the exchange's, each counted once)."""
        tensors = [t for t in (*vars(self).values(), *self.cache.values()) if isinstance(t, Tensor)]
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())
