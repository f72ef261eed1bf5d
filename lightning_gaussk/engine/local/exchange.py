"""How a fragment syncs: the node topology, the selection and the exchange, launched and finished apart.

Per fragment and outer step (every rank issues the same collectives in the same order; every size
is fixed by ``(k, m, P)``)::

    enter     node mode: reduce-scatter of Delta inside the node -> this rank's shard (flat: Delta)
    launch    sparse: exactly k of u (chunk-wise exact top-k, or a whole-tensor selector) and the
              exchange's collectives; dense: the all-reduce of the pseudo-gradients
    finish    wait, decode into the update; every rank's flag summed; node mode: all-gather of the
              shards' updates and flags (the update back in model order, in ``delta``)

:meth:`OuterExchange.launch` returns a :class:`PendingSync` and :meth:`OuterExchange.finish`
waits on it, so a driver may run work in between (an overlapped outer step); today's driver
calls them back to back.

The exchange itself is chosen once, at construction, by :func:`outer_exchange` (the engines' one policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.comm.exchange import (
    Delivery,
    Exchange,
    Launched,
    Route,
    Selection,
)
from lightning_gaussk.comm.quant import QuantAllGather
from lightning_gaussk.comm.registry import get_exchange
from lightning_gaussk.comm.sparse_allreduce import _Done
from lightning_gaussk.comm.topology import Topology
from lightning_gaussk.config import LocalSGDConfig
from lightning_gaussk.costs.policy import pick_exchange
from lightning_gaussk.engine.local.fragment import Fragment, Sizes
from lightning_gaussk.selection.chunkwise import ChunkwiseTopK
from lightning_gaussk.selection.selectors import select

__all__ = ["OuterExchange", "PendingSync", "outer_exchange"]


def outer_exchange(config: LocalSGDConfig, sizes: Sizes, route: Route) -> Exchange:
    """The exchange of an outer step, by the engines' one policy
    (:func:`~lightning_gaussk.costs.policy.pick_exchange`): dense for ``outer="dense"``; otherwise
    the sparse one (``exchange``, or the quantised all-gather), or dense when it would not move
    fewer bytes (``dense_fallback="auto"``; with one peer there is nothing to save, so it stays
    sparse). A pure function of ``(config, k, m, P)``: the same choice on every rank. One process
    without a process group: :class:`_Alone`."""
    if not (dist.is_available() and dist.is_initialized()):
        return _Alone()  # one process, no process group: the mean of one rank is its own u
    if config.outer == "dense":
        return get_exchange("dense")
    sparse: Exchange | str = (
        QuantAllGather(config.quantize, sizes.chunk or sizes.m, sizes.kc) if config.quantize is not None else config.exchange
    )
    fallback = "never" if route.peers == 1 else config.dense_fallback
    return pick_exchange(sizes.m, sizes.k, route.peers, exchange=sparse, dense_fallback=fallback).exchange


@dataclass
class PendingSync:
    """A fragment's outer exchange in flight: what :meth:`OuterExchange.finish` needs.

    ``local``: where the update lands (this rank's entries: ``delta`` in flat mode, its shard in
    node mode); ``selection``: what this rank offered (None: all of it, dense); ``entries``: how
    many entries of ``u`` it offered."""

    fragment: Fragment
    local: Tensor
    selection: Selection | None
    launched: Launched
    entries: int


class OuterExchange:
    """The selection, exchange and topology of one fragment's outer step.

    Args:
        config: the options (``selector``, ``seed``, ``exchange``, ``quantize``, ...).
        topology: the layout's topology.
        fragment: the fragment it serves (its sizes fix every buffer, allocated once).
    """

    def __init__(self, config: LocalSGDConfig, topology: Topology, fragment: Fragment) -> None:
        self.topology, self.route = topology, topology.route
        self.sizes = sizes = fragment.sizes
        self.selector, self.seed = config.selector, config.seed
        self.exchange = outer_exchange(config, sizes, self.route)
        self._cache: dict[str, Tensor] = {}
        self._chunkwise: ChunkwiseTopK | None = None
        if fragment.e is not None and self.exchange.sparse and sizes.chunk is not None:
            self._chunkwise = ChunkwiseTopK(sizes.n_chunks, sizes.chunk, sizes.kc, fragment.theta.device)

    @property
    def sparse(self) -> bool:
        """Whether the exchange takes a selection (False: dense)."""
        return self.exchange.sparse

    @property
    def message_bytes(self) -> int:
        """Bytes of this rank's message(s) per outer step (fixed by ``(k, m, P)``)."""
        return self.exchange.message_bytes(self.sizes.k, self.sizes.m, self.route.peers)

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank puts on the wire per outer step (ring algorithms; node mode: between nodes)."""
        return self.exchange.wire_bytes(self.sizes.k, self.sizes.m, self.route.peers)

    def intra_bytes(self, fragment: Fragment) -> int:
        """Node mode: bytes this rank sends inside its node per outer step (0 in flat mode)."""
        return self.topology.intra_bytes(fragment.slot) if fragment.slot is not None else 0

    # ---------------------------------------------------------------- the sync
    def enter(self, fragment: Fragment, delta: Tensor) -> Tensor:
        """This rank's entries of ``delta``: itself (flat), or its node-summed shard (node mode,
        a reduce-scatter inside the node, waited on)."""
        return self.topology.enter(fragment.slot, delta) if fragment.slot is not None else delta

    def launch(self, fragment: Fragment, local: Tensor, step: int) -> PendingSync:
        """Select (sparse outer step: from ``fragment.u``) and issue the exchange's collectives.
        ``step``: the outer step's number (randomised selectors)."""
        route, sizes = self.route, self.sizes
        sel: Selection | None = None
        if fragment.u is not None:
            u = fragment.u
            sel = self._select(u, fragment.flags[0], step) if self.exchange.sparse else None
            out = fragment.update.zero_() if sel is not None else fragment.update
            launched = self.exchange.launch(u, sel, out, route, self._cache)
            entries = sizes.k if sel is not None else sizes.m
        else:
            launched = self.exchange.launch(local, None, local, route, self._cache)
            entries = sizes.d_local
        return PendingSync(fragment, local, sel, launched, entries)

    def finish(self, pending: PendingSync) -> Delivery:
        """Wait for the exchange and decode it; the update into ``fragment.delta`` (model order)
        and every rank's flag into ``fragment.flags[1]`` (node mode: through the intra-node
        all-gather, waited on). Returns the exchange's :class:`Delivery`."""
        fragment, local, flags = pending.fragment, pending.local, pending.fragment.flags
        pending.launched.work.wait()
        delivery = pending.launched.finish()
        if fragment.u is not None:
            local.copy_(fragment.update[: self.sizes.d_local])
        torch.add(delivery.flag, flags[0], out=flags[1])  # this rank's flag also where a dense sum hides it
        if fragment.slot is not None:
            self.topology.leave(fragment.slot, local, flags[1]).wait()
            flags[1].copy_(self.topology.arrive(fragment.slot, fragment.delta, local, flags[1]))
        return delivery

    def _select(self, u: Tensor, flag: Tensor, step: int) -> Selection:
        """Exactly ``k`` entries of ``u``: ``kc`` per chunk (:class:`ChunkwiseTopK`), or a
        whole-tensor selection by ``selector``."""
        if self._chunkwise is not None:
            values, indices = self._chunkwise(u)
        else:
            values, indices = select(u, self.sizes.k, self.selector, seed=self.seed, step=step)
            values = values.to(torch.float32)
        return Selection(values, indices, flag, self.sizes.m)


class _Alone(Exchange):
    """One process without a process group: the update is this rank's whole ``u``."""

    name = "alone"
    sparse = False

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        if out is not u:
            out.copy_(u)
        return Launched(_Done(out), lambda: Delivery(out.sum() * 0.0, everything=True))

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        return 0

    def wire_bytes(self, k: int, d: int, peers: int) -> int:
        return 0
