"""What syncs: a fragment, a set of parameters with its own buffers.

A fragment of ``d`` entries (its parameters concatenated in model order) holds, allocated once:

- ``theta``: the global copy (fp32, ``d``), the same on every rank;
- ``delta``: the pseudo-gradient ``Delta_r = theta - theta_r`` (fp32, ``d``), and after the
  exchange the averaged update, in model order;
- node mode: its ``slot`` (:class:`~lightning_gaussk.comm.topology.NodeSlot`): this rank keeps
  ``d_local = s`` entries, its chunk of every parameter; flat: ``d_local = d``;
- sparse outer step: the error feedback ``e`` and its next value ``u = beta e + Delta``, padded
  to ``m`` entries (whole chunks; the padding stays 0); the ``update`` the exchange decodes into;
- ``flags``: ``[this rank's flag, every rank's]``, 0 or NaN;
- ``snapshot`` (an overlapped outer step, ``overlap_steps > 0``): this rank's parameters when its
  exchange was launched (fp32, ``d``), the base of the progress kept when the update lands;
- ``outer``: its outer optimizer (:mod:`~lightning_gaussk.engine.local.outer`);
- ``last``: what it contributed in its last outer step.

:meth:`Fragment.per_name` cuts any of these flat buffers per parameter name (the checkpoint form).
:func:`split_fragments` cuts a model into ``F`` fragments at module boundaries, balanced by size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gaussk.comm.topology import Node, NodeSlot, Topology
from lightning_gaussk.config import LocalSGDConfig, bucket_k

__all__ = ["Fragment", "Sizes", "split_fragments"]


def split_fragments(named: list[tuple[str, nn.Parameter]], fragments: int) -> list[list[tuple[str, nn.Parameter]]]:
    """``named`` (model order) cut into ``fragments`` contiguous groups at module boundaries,
    balanced by size.

    The parameters of one module (the same name up to its last dot) stay together. Among the cuts
    into exactly ``F`` non-empty runs of modules, it takes one whose largest run is smallest: the
    smallest cap ``c`` for which a greedy pass fits every run in ``c`` (binary search on ``c``),
    then a greedy pass that closes a run before it would pass ``c``, or when each later module
    must start a run of its own. With ``F = 1``: one fragment, the whole model.

    Raises:
        ValueError: ``fragments`` is not in ``[1, number of modules]``, naming it.
    """
    groups: list[list[tuple[str, nn.Parameter]]] = []
    owner = None
    for name, p in named:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if not groups or module != owner:
            groups.append([])
            owner = module
        groups[-1].append((name, p))
    if isinstance(fragments, bool) or not isinstance(fragments, int) or not 1 <= fragments <= len(groups):
        raise ValueError(
            f"`fragments` must be an int in [1, {len(groups)}] (the modules with trainable parameters), got {fragments!r}"
        )
    sizes = [sum(p.numel() for _, p in g) for g in groups]

    def runs(cap: int) -> int:  # greedy: runs needed when none may pass cap
        n, load = 1, 0
        for s in sizes:
            if load and load + s > cap:
                n, load = n + 1, 0
            load += s
        return n

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) <= fragments else (mid + 1, hi)
    out: list[list[tuple[str, nn.Parameter]]] = [[]]
    load = 0
    for i, (g, s) in enumerate(zip(groups, sizes)):
        left_runs = fragments - len(out)  # runs still to open after the current one
        if out[-1] and (load + s > lo or len(groups) - i == left_runs):
            out.append([])
            load = 0
        out[-1].extend(g)
        load += s
    return out


@dataclass(frozen=True)
class Sizes:
    """The sizes of a fragment's outer step, fixed at construction (the same on every rank).

    ``d_local`` entries of this rank, padded to ``m = n_chunks * chunk``; ``kc`` selected per
    chunk, ``k = n_chunks * kc`` in all. Whole-tensor selection: one chunk of ``m = d_local``;
    dense (``outer="dense"``): ``k = m = d_local``. ``chunk`` is the effective chunk (at most
    ``d_local``), or the configured one where there are no chunks."""

    d_local: int
    m: int
    n_chunks: int
    chunk: int | None
    kc: int
    k: int

    @classmethod
    def of(cls, config: LocalSGDConfig, d_local: int) -> Sizes:
        """The sizes for ``d_local`` entries under ``config`` (``k`` by :func:`~lightning_gaussk.config.bucket_k`)."""
        if config.outer == "dense":
            return cls(d_local, d_local, 1, config.chunk, d_local, d_local)
        if config.chunk is None:
            k = bucket_k(config.density, d_local)
            return cls(d_local, d_local, 1, None, k, k)
        C = min(config.chunk, d_local)
        n = -(-d_local // C)
        kc = bucket_k(config.density, C)
        return cls(d_local, n * C, n, C, kc, n * kc)


class Fragment:
    """A set of parameters that syncs together, and its buffers (module docstring).

    Args:
        named: ``(name, parameter)`` pairs, in model order, all on one device.
        topology: the layout's topology (node mode gives the fragment a slot).
        config: the options (sizes, and whether there is error feedback).
        index: the fragment's number ``f`` (its offset in the schedule; its slot's key).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], topology: Topology, config: LocalSGDConfig, index: int = 0) -> None:
        self.index = index
        self.named = named
        self.params = [p for _, p in named]
        dev = self.params[0].device
        self.d = d = sum(p.numel() for p in self.params)
        self.offsets: list[int] = []
        off = 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.theta = torch.empty(d, dtype=torch.float32, device=dev)
        self.delta = torch.empty(d, dtype=torch.float32, device=dev)
        self.slot: NodeSlot | None = None
        if isinstance(topology, Node):
            slot = topology.make_slot(tuple(id(p) for p in self.params), self.params, dev, d)
            assert isinstance(slot, NodeSlot)
            self.slot = slot
        self.sizes = sizes = Sizes.of(config, self.slot.s if self.slot is not None else d)
        sparse = config.outer == "sparse"
        self.e: Tensor | None = torch.zeros(sizes.m, dtype=torch.float32, device=dev) if sparse else None
        self.update = torch.zeros(sizes.m, dtype=torch.float32, device=dev)
        self.u: Tensor | None = torch.zeros(sizes.m, dtype=torch.float32, device=dev) if sparse else None
        self.flags = torch.zeros(2, dtype=torch.float32, device=dev)  # [this rank's, every rank's]: 0 or NaN
        self.snapshot: Tensor | None = torch.empty(d, dtype=torch.float32, device=dev) if config.overlap_steps else None
        self.outer: Any = None  # its OuterOptimizer, set by the driver
        self.last: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)  # indices, sent, delivered

    @property
    def d_local(self) -> int:
        """Entries this rank keeps: ``d``, or its shard's ``s`` in node mode."""
        return self.sizes.d_local

    # ---------------------------------------------------------------- the steps of a sync
    def pseudo_gradient(self, snapshot: bool = False) -> Tensor:
        """``delta := theta - theta_r`` and this rank's flag ``flags[0]`` (0, or NaN when ``delta``
        is non-finite); returns ``delta``. ``snapshot``: the parameters are read into
        :attr:`snapshot` on the way (the same one pass; ``delta`` is the same bit for bit)."""
        delta = self.delta
        if snapshot:
            assert self.snapshot is not None
            self.gather_params(self.snapshot)
            torch.sub(self.theta, self.snapshot, out=delta)
        else:
            self.gather_params(delta)
            torch.sub(self.theta, delta, out=delta)
        torch.mul(delta.sum(), 0.0, out=self.flags[0])
        return delta

    def accumulate(self, local: Tensor, decay: float) -> Tensor:
        """Sparse outer step: ``u := decay * e + local`` (this rank's ``d_local`` entries; the
        padding stays 0); returns ``u``."""
        assert self.e is not None and self.u is not None
        dl = self.d_local
        torch.mul(self.e[:dl], decay, out=self.u[:dl]).add_(local)
        return self.u

    def keep_progress(self) -> None:
        """An overlapped update lands: ``the parameters := theta + (theta_r - snapshot)``, the new
        ``theta`` plus this rank's own progress since the launch (``delta`` is the scratch: the
        update in it has been applied)."""
        assert self.snapshot is not None
        buf = self.delta
        self.gather_params(buf)
        buf.sub_(self.snapshot).add_(self.theta)
        self.scatter_params(buf)

    # ---------------------------------------------------------------- parameters <-> flat
    def gather_params(self, out: Tensor) -> None:
        """``out := the parameters``, concatenated in model order."""
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                out[off : off + p.numel()].copy_(p.reshape(-1))

    def scatter_params(self, src: Tensor) -> None:
        """``the parameters := src`` (model order)."""
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                p.copy_(src[off : off + p.numel()].view_as(p))

    def per_name(self, flat: Tensor, local_layout: bool) -> dict[str, Tensor]:
        """``flat`` cut per parameter name (views): in model order (``local_layout=False``, ``d``
        entries), or in this rank's error-feedback layout (its shard's places in node mode)."""
        out: dict[str, Tensor] = {}
        for i, ((name, p), off) in enumerate(zip(self.named, self.offsets)):
            if local_layout and self.slot is not None:
                so, n = self.slot.places[i]
                out[name] = flat[so : so + n]
            else:
                out[name] = flat[off : off + p.numel()]
        return out
