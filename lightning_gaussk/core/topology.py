"""Topologies: where a rank's ``u`` comes from and where the update goes (steps 2 and 6 of the
pipeline), and the :class:`~lightning_gaussk.core.exchange.Route` the exchange runs on.

- :class:`Flat`: the identity. Every rank exchanges its whole tensor among all ``W`` ranks.
- :class:`Node`: ``W = N L`` ranks in ``N`` nodes of ``L`` (node-contiguous,
  :mod:`lightning_gaussk.topology`). The tensor is laid out in chunk order (``L`` shards of
  ``s = sum_p ceil(n_p / L)`` entries, shard ``j`` = chunk ``j`` of every parameter, zero
  padded), reduce-scattered inside the node (rank ``l`` holds the node's sum of shard ``l``), the
  exchange runs among the ``N`` ranks with the same local rank (one per node: the only traffic on
  the slow links), and an intra-node all-gather of ``[shard | flag]`` gives every rank of the node
  the whole update and the sum of all ``W`` flags.

Flat is not built as node mode with ``L = 1``: that would cost a chunk-order copy and two
collectives on one-rank groups per bucket, for nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.core.exchange import Route, all_gather, buffer
from lightning_gaussk.core.store import Slot
from lightning_gaussk.topology import Layout

__all__ = ["Flat", "Node", "NodeSlot", "Topology", "build_topology"]

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Topology:
    """Steps 2 (``enter``) and 6 (``leave``/``arrive``) of the pipeline, for one layout."""

    layout: Layout
    route: Route
    gathers = False  # True: the update comes back through a collective of its own (leave)

    def make_slot(self, ids: tuple[int, ...], params: list[Tensor], device: torch.device, d: int) -> Slot:
        raise NotImplementedError

    def enter(self, slot: Slot, grad: Tensor) -> Tensor:
        """The tensor this rank sparsifies (issues and waits for any collective it needs)."""
        raise NotImplementedError

    def target(self, slot: Slot, grad: Tensor, local: Tensor) -> Tensor:
        """The fp32 tensor the exchange writes the update into."""
        raise NotImplementedError

    def leave(self, slot: Slot, target: Tensor, flag: Tensor) -> Any:
        """Issue the collective that brings the update back to every rank (None: none needed)."""
        return None

    def arrive(self, slot: Slot, grad: Tensor, target: Tensor, flag: Tensor) -> Tensor:
        """Write the update into ``grad``; return the flag summed over every rank."""
        raise NotImplementedError

    def intra_bytes(self, slot: Slot) -> int:
        """Bytes this rank sends inside its node per bucket (0 in flat mode)."""
        return 0


class Flat(Topology):
    """Every rank exchanges its whole bucket: ``u`` is read from the gradient itself."""

    def __init__(self, layout: Layout, group: Any) -> None:
        self.layout = layout
        self.route = Route(group, layout.world_size, layout.world_size)

    def make_slot(self, ids: tuple[int, ...], params: list[Tensor], device: torch.device, d: int) -> Slot:
        return Slot(ids, params, device, d)

    def enter(self, slot: Slot, grad: Tensor) -> Tensor:
        return grad

    def target(self, slot: Slot, grad: Tensor, local: Tensor) -> Tensor:
        return grad if grad.dtype == torch.float32 else buffer(slot.cache, "out", grad.numel(), grad.device)

    def arrive(self, slot: Slot, grad: Tensor, target: Tensor, flag: Tensor) -> Tensor:
        if target is not grad:
            grad.copy_(target)
        return flag


class NodeSlot(Slot):
    """Buffers of one bucket in node mode: ``residual`` and ``work`` hold ``s`` entries, chunk
    ``l`` of each parameter, at ``places[p] = (offset in the shard, chunk length)``."""

    def __init__(self, key: tuple[int, ...], params: list[Tensor], device: torch.device, d: int, layout: Layout) -> None:
        rpn = layout.ranks_per_node
        assert rpn is not None
        self.ranks_per_node = rpn
        chunks = [math.ceil(p.numel() / rpn) for p in params]
        self.s = s = sum(chunks)
        # per parameter: (bucket offset, numel, shard offset, chunk size)
        self.copies: list[tuple[int, int, int, int]] = []
        bucket_off = shard_off = 0
        for p, c in zip(params, chunks):
            self.copies.append((bucket_off, p.numel(), shard_off, c))
            bucket_off += p.numel()
            shard_off += c
        super().__init__(key, params, device, s)  # residual, work: s entries
        self.places = [(so, layout.chunk(n)[1] - layout.chunk(n)[0]) for _, n, so, _ in self.copies]
        self.full = torch.zeros(rpn * s, dtype=torch.float32, device=device)  # padding stays zero
        self.shard_out = torch.empty(s + 1, dtype=torch.float32, device=device)  # [shard | flag]
        self.node_out = torch.empty(rpn * (s + 1), dtype=torch.float32, device=device)

    def to_chunks(self, buf: Tensor) -> None:
        """``full`` := the bucket in chunk order: one strided copy per parameter (two when its
        last chunk is short), no index tensors."""
        grid = self.full.view(self.ranks_per_node, self.s)
        for off, n, so, c in self.copies:
            if n == 0:
                continue
            rows, rest = divmod(n, c)
            grid[:rows, so : so + c].copy_(buf[off : off + rows * c].view(rows, c))
            if rest:
                grid[rows, so : so + rest].copy_(buf[off + rows * c : off + n])

    def from_chunks(self, buf: Tensor) -> None:
        """The bucket := the gathered shards back in parameter order."""
        grid = self.node_out.view(self.ranks_per_node, self.s + 1)
        for off, n, so, c in self.copies:
            if n == 0:
                continue
            rows, rest = divmod(n, c)
            buf[off : off + rows * c].view(rows, c).copy_(grid[:rows, so : so + c])
            if rest:
                buf[off + rows * c : off + n].copy_(grid[rows, so : so + rest])


class Node(Topology):
    """Dense inside a node (reduce-scatter in, all-gather out), the exchange between nodes."""

    gathers = True

    def __init__(self, layout: Layout, intra: Any, inter: Any) -> None:
        assert layout.ranks_per_node is not None
        self.layout, self.intra = layout, intra
        self.route = Route(inter, layout.nodes, layout.world_size)

    def make_slot(self, ids: tuple[int, ...], params: list[Tensor], device: torch.device, d: int) -> Slot:
        return NodeSlot(ids, params, device, d, self.layout)

    def enter(self, slot: Slot, grad: Tensor) -> Tensor:
        assert isinstance(slot, NodeSlot)
        shard = slot.shard_out[: slot.s]
        slot.to_chunks(grad)
        _reduce_scatter(shard, slot.full, group=self.intra, async_op=True).wait()
        return shard

    def target(self, slot: Slot, grad: Tensor, local: Tensor) -> Tensor:
        return local  # the shard: decoded in place, then gathered with its flag

    def leave(self, slot: Slot, target: Tensor, flag: Tensor) -> Any:
        assert isinstance(slot, NodeSlot)
        slot.shard_out[slot.s :].copy_(flag)
        return all_gather(slot.node_out, slot.shard_out, group=self.intra, async_op=True)

    def arrive(self, slot: Slot, grad: Tensor, target: Tensor, flag: Tensor) -> Tensor:
        assert isinstance(slot, NodeSlot)
        flag_all = slot.node_out.view(slot.ranks_per_node, slot.s + 1)[:, slot.s].sum()  # NaN if any rank saw non-finite
        slot.from_chunks(grad)
        return flag_all

    def intra_bytes(self, slot: Slot) -> int:
        assert isinstance(slot, NodeSlot)
        return 4 * (slot.ranks_per_node - 1) * (2 * slot.s + 1)  # reduce-scatter s, all-gather s + 1 (per peer)


def build_topology(layout: Layout, group: Any) -> Topology:
    """The topology of ``layout``: flat over ``group`` (None: the world), or node mode with its
    intra-node and inter-node groups (built here, on every rank at the same point: each
    ``new_subgroups_by_enumeration`` is a collective over the world)."""
    if layout.mode == "flat":
        return Flat(layout, group)
    rpn, nodes = layout.ranks_per_node, layout.nodes
    assert rpn is not None
    intra, _ = dist.new_subgroups_by_enumeration([[n * rpn + j for j in range(rpn)] for n in range(nodes)])
    inter, _ = dist.new_subgroups_by_enumeration([[n * rpn + j for n in range(nodes)] for j in range(rpn)])
    return Node(layout, intra, inter)
