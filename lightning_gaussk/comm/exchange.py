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

A new exchange is one subclass and one :func:`register_exchange` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

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
    "Route",
    "Selection",
    "available_exchanges",
    "buffer",
    "get_exchange",
    "register_exchange",
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


class Exchange:
    """One scheme of exchanging selections (subclass it and :func:`register_exchange` it).

    ``sparse``: whether it takes a selection (``launch(sel=...)``) or the whole ``u`` (dense);
    ``positional``: whether it needs the canonical order of positions (:class:`Selection`)."""

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

    def wire_bytes(self, k: int, d: int, peers: int) -> int:
        """Bytes this rank puts on the wire per bucket, as the collectives' algorithms send them
        (ring all-gather: ``(P - 1)`` messages; ring all-reduce: ``2 (P - 1) / P`` of the data)."""
        raise NotImplementedError

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

    def wire_bytes(self, k: int, d: int, peers: int) -> int:
        return 4 * codec.message_words(k) * (peers - 1)


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

    def wire_bytes(self, k: int, d: int, peers: int) -> int:
        return math.ceil(8 * d * (peers - 1) / peers)

    def entries(self, k: int, d: int) -> int:
        return d


_EXCHANGES: dict[str, type[Exchange]] = {}


def register_exchange(cls: type[Exchange], name: str | None = None) -> type[Exchange]:
    """Make ``cls`` available under ``name`` (default ``cls.name``); usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Exchange)):
        raise TypeError(f"register_exchange: `cls` must be an Exchange subclass, got {cls!r}")
    key = name if name is not None else getattr(cls, "name", None)
    if not isinstance(key, str) or not key:
        raise ValueError(f"register_exchange: `name` must be a non-empty str, got {key!r}")
    _EXCHANGES[key] = cls
    return cls


def get_exchange(name: str) -> Exchange:
    """A new instance of the exchange registered as ``name`` (``ValueError`` listing the choices)."""
    try:
        return _EXCHANGES[name]()
    except KeyError:
        raise ValueError(f"`exchange` must be one of {available_exchanges()}, got {name!r}") from None


def available_exchanges() -> list[str]:
    """The registered exchange names, sorted (``"dense"`` is the dense fallback's)."""
    return sorted(_EXCHANGES)


register_exchange(AllGather)
register_exchange(DenseAllReduce)
