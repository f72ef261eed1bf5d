"""Exchanges: how every rank's selection becomes the averaged update, and what each rank delivered.

An exchange runs among ``P`` peers (the world in flat mode, one rank per node in node mode) and
writes the update ``out = (1 / D) sum_r delivered_r`` (``D``: the divisor, the world size, so the
update is the mean over all ranks). It reports, per rank, which of its selected entries went into
the update: the pipeline's commit then keeps exactly the rest, ``residual = u - delivered``, so
error feedback is exact for an exchange that drops part of a selection as well as for one that
delivers all of it. Every exchange also sums every peer's non-finite flag, so that no rank
commits a step that any rank saw as non-finite.

Rules every exchange keeps:

- message sizes are functions of ``(k, d, P)`` only: no collective needs a host read of a size;
- all of a bucket's collectives are issued from :meth:`Exchange.launch`, in program order (an
  earlier stage is waited on before the next is issued); only the last may still be in flight
  when ``launch`` returns, and :meth:`Launched.finish` issues none;
- buffers live in the slot's ``cache`` and are reused between steps.

Every exchange also states what it costs, so that the cost model (:mod:`lightning_gaussk.costs`)
prices it, ``dense_fallback="auto"`` judges it and ``exchange="auto"`` can choose it:

- :meth:`Exchange.volume_bytes` ``V``: the bytes of the buffers its collectives gather or reduce,
  summed over its stages; a ring moves ``(P - 1) / P`` of each through every rank, so
  :meth:`Exchange.wire_bytes` is ``ceil((P - 1) V / P)``, and the byte rule compares ``V`` (equal
  to comparing wire bytes for ``P > 1``, and still defined for one peer);
- :meth:`Exchange.time`: its alpha-beta time on the :class:`Pricing` the cost model hands it.

A new exchange is one subclass and one
:func:`~lightning_gaussk.comm.registry.register_exchange` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.comm import codec

__all__ = [
    "AllGather",
    "DenseAllReduce",
    "Delivery",
    "Exchange",
    "Launched",
    "Pricing",
    "Route",
    "Selection",
    "buffer",
]

# torch >= 2.6 renamed all_gather_into_tensor; the old name warns on every call
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Route:
    """Where an exchange runs: ``group`` (None: the world) of ``peers`` ranks; the update is the
    sum of what was delivered divided by ``divisor`` (the world size: a mean over all ranks)."""

    group: Any
    peers: int
    divisor: int


@dataclass
class Selection:
    """One rank's selection from its ``u`` of ``d`` entries: ``k`` ``values`` at ``indices``, and
    ``flag`` (0-d fp32): 0 when ``u`` is finite, NaN otherwise.

    ``order`` / ``order_inv`` (int64, ``d``; given to exchanges with ``positional = True``): entry
    ``i`` of ``u`` is entry ``order[i]`` of the canonical layout (the parameters in model order,
    whatever order the bucket holds them in), and ``order_inv`` is the inverse permutation. An
    exchange whose result depends on positions works in canonical positions, so the same gradients
    laid out differently (DDP's bucket rebuild, the first step after a resume) give the same update."""

    values: Tensor
    indices: Tensor
    flag: Tensor
    d: int
    order: Tensor | None = None
    order_inv: Tensor | None = None

    @property
    def k(self) -> int:
        return self.values.numel()


@dataclass
class Delivery:
    """What an exchange reports once its collectives are complete.

    - ``flag``: the sum of every peer's flag (0-d; NaN if any rank's ``u`` was non-finite);
    - ``delivered``: which of this rank's ``k`` selected entries are in the update (bool, ``k``),
      or None when all of them are;
    - ``everything``: True when the whole of ``u`` was delivered (a dense exchange)."""

    flag: Tensor
    delivered: Tensor | None = None
    everything: bool = False


@dataclass
class Launched:
    """An exchange in flight: ``work``, the last collective (possibly not yet complete), and
    ``finish``, to call once it is: it writes the update into ``out`` and returns the
    :class:`Delivery`. ``finish`` issues no collective."""

    work: Any
    finish: Callable[[], Delivery]


def buffer(cache: dict[str, Tensor], name: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """``cache[name]``, reallocated only when its size changes (density warm-up)."""
    buf = cache.get(name)
    if buf is None or buf.numel() != numel or buf.dtype != dtype:
        buf = cache[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf


class Pricing(Protocol):
    """The cost model as an exchange's time model reads it
    (:class:`lightning_gaussk.costs.model.Pricing` provides it; this layer imports no cost model).

    ``alpha``: seconds per message hop; ``beta``: seconds per byte on this exchange's share of the
    link (node mode: ``G`` exchanges share a node's NIC); ``host``: the host costs
    (:class:`~lightning_gaussk.costs.model.HostCosts`: ``pass_s``, ``select_passes``,
    ``select_per_k_s``, ``scatter_s``, ...)."""

    @property
    def alpha(self) -> float: ...

    @property
    def beta(self) -> float: ...

    @property
    def host(self) -> Any: ...

    def sparse_host(self, d: int, k: int, peers: int) -> float:
        """Host seconds of the sparse pipeline around any sparse exchange (``H_s``)."""
        ...

    def dense_host(self, d: int) -> float:
        """Host seconds of a dense all-reduce's reduction (``H_d``)."""
        ...

    def allreduce(self, nbytes: float, peers: int) -> float:
        """Seconds of a ring all-reduce of ``nbytes`` per rank among ``peers``."""
        ...


class Exchange:
    """One scheme of exchanging selections (subclass it and register it with
    :func:`~lightning_gaussk.comm.registry.register_exchange`).

    ``sparse``: whether it takes a selection (``launch(sel=...)``) or the whole ``u`` (dense);
    ``positional``: whether it needs the canonical order of positions (:class:`Selection`).

    A subclass implements :meth:`launch`, :meth:`message_bytes` and :meth:`volume_bytes`; the
    default :meth:`time` prices a sparse exchange of ring collectives issued one after another
    (override :meth:`hops`, or :meth:`time` itself for other algorithms)."""

    name: ClassVar[str]
    sparse: ClassVar[bool] = True
    positional: ClassVar[bool] = False  # True: wants Selection.order (its result depends on positions)

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        """Issue this bucket's collectives. ``out`` (fp32, ``d`` entries) holds zeros for a sparse
        exchange (the pipeline zeroes it, fused with the selection pass where it can); a dense
        exchange overwrites it. ``u`` is this rank's ``u`` (read by dense exchanges only)."""
        raise NotImplementedError

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        """Bytes of this rank's own message(s) per bucket (what telemetry's ``bytes_sent`` adds)."""
        raise NotImplementedError

    def volume_bytes(self, k: int, d: int, peers: int) -> int:
        """``V``: bytes of the buffers this exchange's collectives gather or reduce, summed over its
        stages (an all-gather: the ``P`` messages; a ring all-reduce of ``n`` bytes: ``2 n``, its
        reduce-scatter and its all-gather; an all-to-all: one rank's send buffer). The byte rule
        (:mod:`lightning_gaussk.costs.policy`) compares it with the dense all-reduce's ``8 d``."""
        raise NotImplementedError

    def wire_bytes(self, k: int, d: int, peers: int) -> int:
        """Bytes this rank puts on the wire per bucket, as ring algorithms send them:
        ``ceil((P - 1) V / P)`` with ``V`` = :meth:`volume_bytes` (ring all-gather: ``P - 1``
        messages; ring all-reduce: ``2 (P - 1) / P`` of the data)."""
        return -(-(peers - 1) * self.volume_bytes(k, d, peers) // peers)

    def hops(self, peers: int) -> int:
        """Message hops of its collectives, one stage after another (one ring all-gather: ``P - 1``)."""
        return peers - 1

    def time(self, k: int, d: int, peers: int, price: Pricing) -> float:
        """Predicted seconds of one bucket through this exchange, host work included::

            T = H_s + hops alpha + wire_bytes beta

        (``H_s``: the sparse pipeline's host work, :meth:`Pricing.sparse_host`). Exact for
        collectives issued one after another whose hops each carry ``1 / hops`` of the bytes."""
        return price.sparse_host(d, k, peers) + self.hops(peers) * price.alpha + self.wire_bytes(k, d, peers) * price.beta

    def entries(self, k: int, d: int) -> int:
        """Entries of ``u`` this rank offers per bucket (``k``; ``d`` for a dense exchange)."""
        return k


class AllGather(Exchange):
    """Every peer's message ``[values | indices | flag]`` (``2k + 1`` words) to every peer in one
    all-gather; ``out = (1 / D) sum_r scatter(idx_r, val_r)`` (duplicate indices add up). All of
    a rank's selection is delivered. Traffic per rank: ``(P - 1)(2k + 1)`` words, growing with P."""

    name = "allgather"

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        assert sel is not None
        k = sel.k
        msg = codec.pack(buffer(cache, "msg", codec.message_words(k), out.device), sel.values, sel.indices, sel.flag)
        gathered = buffer(cache, "gathered", route.peers * codec.message_words(k), out.device)
        work = all_gather(gathered, msg, group=route.group, async_op=True)

        def finish() -> Delivery:
            values, indices, flags = codec.unpack(gathered, k)
            flag = flags.sum()  # NaN if any rank's u was non-finite
            out.index_add_(0, indices, values, alpha=1.0 / route.divisor)  # accumulating: duplicates add up
            return Delivery(flag)

        return Launched(work, finish)

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        return 4 * codec.message_words(k)

    def volume_bytes(self, k: int, d: int, peers: int) -> int:
        """``4 P (2k + 1)``: the gathered messages (so the wire carries ``(P - 1) 4 (2k + 1)``)."""
        return 4 * codec.message_words(k) * peers


class DenseAllReduce(Exchange):
    """The dense fallback: all-reduce the whole ``u``; ``out = (1 / D) sum_r u_r``. All of ``u`` is
    delivered (the residual becomes zero). Traffic per rank: ``2 (P - 1) / P d`` words (ring)."""

    name = "dense"
    sparse = False

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        work = dist.all_reduce(u, group=route.group, async_op=True)

        def finish() -> Delivery:
            torch.div(u, route.divisor, out=out)
            return Delivery(out.sum() * 0.0, everything=True)  # 0, or NaN if any rank's u was non-finite

        return Launched(work, finish)

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        return 4 * d

    def volume_bytes(self, k: int, d: int, peers: int) -> int:
        """``8 d``: a ring all-reduce reduce-scatters, then all-gathers, the ``4 d`` bytes of ``u``."""
        return 8 * d

    def time(self, k: int, d: int, peers: int, price: Pricing) -> float:
        """``H_d + 2 (P-1) alpha + 2 (P-1)/P 4d beta`` (:meth:`Pricing.allreduce` of ``4 d`` bytes)."""
        return price.dense_host(d) + price.allreduce(4 * d, peers)

    def entries(self, k: int, d: int) -> int:
        return d
