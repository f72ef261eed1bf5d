"""Topologies: where a rank's ``u`` comes from and where the update goes (steps 2 and 6 of the
pipeline), and the :class:`~lightning_gaussk.comm.exchange.Route` the exchange runs on.

- :class:`Flat`: the identity. Every rank exchanges its whole tensor among all ``W`` ranks.
- :class:`Node`: ``W = N L`` ranks in ``N`` nodes of ``L`` (node-contiguous,
  :mod:`lightning_gaussk.comm.layout`). The tensor is laid out in chunk order (``L`` shards of
  ``s = sum_p ceil(n_p / L)`` entries, shard ``j`` = chunk ``j`` of every parameter, zero
  padded), reduce-scattered inside the node (rank ``l`` holds the node's sum of shard ``l``), the
  exchange runs among the ``N`` ranks with the same local rank (one per node: the only traffic on
  the slow links), and an intra-node all-gather of ``[shard | flag]`` gives every rank of the node
  the whole update and the sum of all ``W`` flags.
- :class:`Replicas`: FSDP2 across nodes ("custom HSDP", :mod:`lightning_gaussk.engine.fsdp`). FSDP
  itself reduce-scatters each unit's gradient inside the node (a mean over the node's ``L``
  ranks) before the pipeline is called, so rank ``l`` of a node already holds its dim-0 shard of
  every parameter of the unit (rows ``[l c, (l + 1) c)``, ``c = ceil(rows / L)``, zero padded as
  FSDP pads). The exchange runs among the ``N`` replicas of that shard (the ranks with local rank
  ``l``), dividing by ``N``, so the update is the mean over all ``W = N L`` ranks; the
  parameters and optimizer states stay sharded, so no intra-node all-gather of the update is
  needed, only a one-word all-reduce of the flag inside the node (every rank of the job agrees on
  a non-finite step).

Flat is not built as node mode with ``L = 1``: that would cost a chunk-order copy and two
collectives on one-rank groups per bucket, for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.comm.exchange import Route, all_gather, buffer
from lightning_gaussk.comm.slot import Slot
from lightning_gaussk.comm.layout import Layout, chunk_bounds

__all__ = ["Flat", "Node", "NodeSlot", "Replicas", "ShardSlot", "Topology", "build_topology", "dim0_shard", "shard_places"]

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


class ShardSlot(Slot):
    """Buffers of one FSDP2 unit on local rank ``l`` of ``L``: its reduce-scatter output of ``d``
    entries, this rank's dim-0 shard of every parameter in parameter order, each padded to
    ``c = ceil(rows / L)`` rows as FSDP pads; ``places[p] = (offset, the shard's real entries)``
    (padding entries hold zero gradients and are never exported)."""

    def __init__(self, key: tuple[int, ...], params: list[Tensor], device: torch.device, d: int, layout: Layout) -> None:
        super().__init__(key, params, device, d)
        self.places = shard_places(params, layout)
        self.numels = [n for _, n in self.places]
        end = sum(dim0_shard(p.shape, layout)[2] for p in params)
        if end != d:
            raise ValueError(
                f"GaussK (FSDP2): a reduce-scatter output of {d} entries does not hold this rank's dim-0 shards of its "
                f"{len(params)} parameters ({end} entries, padded); only dim-0 sharding (FSDP2's default) is supported"
            )
        self.elem = 4  # bytes per entry of the reduce dtype (set by Replicas.enter)


def dim0_shard(shape: Sequence[int], layout: Layout) -> tuple[int, int, int]:
    """Local rank ``l``'s dim-0 shard of a parameter of ``shape`` as FSDP2 cuts it, in flat
    entries: ``(start, stop, padded)``, rows ``[l c, (l + 1) c)`` clipped to the parameter,
    ``c = ceil(rows / L)``; ``padded`` = ``c`` rows, the size FSDP gives every rank's shard."""
    rows, row = (shape[0] if len(shape) else 1), math.prod(shape[1:])
    start, stop = chunk_bounds(rows, layout.parts(), layout.local_rank)
    return start * row, stop * row, math.ceil(rows / layout.parts()) * row


def shard_places(params: list[Tensor], layout: Layout) -> list[tuple[int, int]]:
    """``(offset, entries)`` of local rank ``l``'s real dim-0 shard of each parameter in a unit's
    reduce-scatter output (offsets advance by the padded shard, ``c`` rows)."""
    out, off = [], 0
    for p in params:
        start, stop, padded = dim0_shard(p.shape, layout)
        out.append((off, stop - start))
        off += padded
    return out


class Replicas(Topology):
    """FSDP2 across nodes: FSDP's reduce-scatter inside the node has run; the exchange among the
    ``N`` replicas of this shard (``inter``), the flag summed inside the node (``intra``)."""

    gathers = True  # the flag comes back through a collective of its own

    def __init__(self, layout: Layout, intra: Any, inter: Any) -> None:
        assert layout.ranks_per_node is not None
        self.layout, self.intra = layout, intra
        self.route = Route(inter, layout.nodes, layout.nodes)  # the input is a node mean: / N gives the mean over W

    def make_slot(self, ids: tuple[int, ...], params: list[Tensor], device: torch.device, d: int) -> Slot:
        return ShardSlot(ids, params, device, d, self.layout)

    def enter(self, slot: Slot, grad: Tensor) -> Tensor:
        assert isinstance(slot, ShardSlot)
        slot.elem = grad.element_size()
        return grad

    def target(self, slot: Slot, grad: Tensor, local: Tensor) -> Tensor:
        return grad if grad.dtype == torch.float32 else buffer(slot.cache, "out", grad.numel(), grad.device)

    def leave(self, slot: Slot, target: Tensor, flag: Tensor) -> Any:
        box = buffer(slot.cache, "flag", 1, target.device)
        box.copy_(flag.reshape(1))
        return dist.all_reduce(box, group=self.intra, async_op=True)

    def arrive(self, slot: Slot, grad: Tensor, target: Tensor, flag: Tensor) -> Tensor:
        if target is not grad:
            grad.copy_(target)
        return slot.cache["flag"][0]  # the sum of all W flags: NaN if any rank saw non-finite

    def intra_bytes(self, slot: Slot) -> int:
        assert isinstance(slot, ShardSlot)
        L = self.layout.parts()
        return (L - 1) * slot.size * slot.elem + 4 * (L - 1)  # FSDP's reduce-scatter (ring), the flag


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
