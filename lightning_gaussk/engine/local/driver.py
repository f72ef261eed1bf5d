"""Sparse local SGD: ``H`` local optimizer steps, then one outer step through the same engine.

:class:`SparseLocalSGD` hooks a plain (not DDP-wrapped) model's optimizer. Every rank trains on
its own for ``sync_every = H`` optimizer steps; after every ``H``-th step the ranks agree on a
new global model ``theta`` and every rank continues from it. The inner optimizer's states stay
local. Per outer step ``t``, with ``theta_r`` rank ``r``'s parameters and ``P`` the ranks::

    pseudo-gradient   Delta_r = theta - theta_r

    outer="sparse"    (SparseLoCo, Sarfi et al. 2025)
        e_r <- beta e_r + Delta_r                      error feedback, decayed (ef_decay = beta)
        s_r  = exactly k entries of e_r                chunk-wise (``chunk``) or whole-tensor
               (optionally 2- or 8-bit values with a per-chunk scale)
        theta <- theta - alpha (1/P) sum_r s_r         the project's exchanges (outer_lr = alpha)
        e_r <- e_r - s_r                               sent + residual == u, bit for bit

    outer="dense"     (DiLoCo)
        m <- mu m + (1/P) sum_r Delta_r                one all-reduce of the pseudo-gradients
        theta <- theta - alpha ((1/P) sum_r Delta_r + mu m)     Nesterov (mu = outer_momentum)

With ``H = 1``, ``density = 1``, ``alpha = 1``, ``beta = 0`` and SGD inside, ``Delta_r = lr g_r``
and ``theta - mean(Delta) = theta - lr mean(g)``: data-parallel SGD (what the tests check).

Streaming and overlap (Streaming DiLoCo, Douillard et al. 2025; eager updates, Kale et al. 2025):
``fragments = F`` cuts the model at module boundaries into ``F`` fragments balanced by size, and
fragment ``f`` syncs at its own offset ``(f H) // F`` of the window, so each sync moves about
``1/F`` of the model; ``theta``, ``e`` and the outer momentum are kept per fragment.
``overlap_steps = tau`` launches a fragment's exchange at its sync point and lands the update
``tau`` optimizer steps later, keeping each rank's progress since the launch
(:mod:`lightning_gaussk.engine.local.landing` has the math)::

    launch (t0)     snapshot_r = x_r(t0);  the sparse step above up to the exchange, issued, not waited
    land (t0+tau)   wait; commit e_r and theta';  x_r := theta' + (x_r(t0 + tau) - snapshot_r)

``tau = 0, F = 1`` is the blocking outer step, bit for bit.

Fault tolerance (``manager``, a ``torchft.Manager``): each outer step runs under the manager's
quorum across the live replica groups, the mean is over ``manager.num_participants()``, and
``manager.should_commit()`` gates the commit; a group that joins late or falls behind heals
``theta``, the outer momentum and the step from a peer (:mod:`lightning_gaussk.engine.local.ft`).

The driver runs the parts of :mod:`lightning_gaussk.engine.local`: the schedule (when), the
fragments (what), the outer optimizer and the outer exchange (how), the landing (overlap),
and the per-step engine's commit and non-finite skip (:mod:`lightning_gaussk.engine.commit`):
``k`` from :func:`~lightning_gaussk.config.bucket_k`; chunk-wise exact top-k
(:class:`~lightning_gaussk.selection.chunkwise.ChunkwiseTopK`) or the registered selectors; the
exchanges of :mod:`lightning_gaussk.comm.exchange` or the quantised all-gather of
:mod:`lightning_gaussk.comm.quant`; the byte rule of :mod:`lightning_gaussk.costs.model`; node
mode (the pseudo-gradient summed inside each node, each rank keeping the error feedback of its
``1/L`` shard, only the outer exchange crossing nodes).

Collectives: the outer step issues the same collectives in the same order on every rank (node
mode: reduce-scatter, exchange, all-gather); every size is fixed by ``(k, d, P)`` at
construction. Buffers are allocated once. One scalar pair is read from the device per outer step
(at its landing: the only point where a rank waits on the host for the exchange):
this rank's flag and the sum of every rank's (each message carries its rank's), the latter the
same on every rank. Non-finite anywhere skips the outer step on every rank (``theta``, ``e`` and
the momentum kept, every rank back on ``theta``, the diverged rank's inner optimizer state reset).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gaussk.comm.exchange import Delivery, Selection
from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.comm.topology import Flat, Topology, build_topology
from lightning_gaussk.comm.vote import decide_layout
from lightning_gaussk.config import LocalSGDConfig
from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.engine.commit import agreed, commit
from lightning_gaussk.engine.counters import LOCAL_SGD_COUNTERS
from lightning_gaussk.engine.describe import local_startup_line
from lightning_gaussk.engine.local.exchange import OuterExchange
from lightning_gaussk.engine.local.fragment import Fragment, split_fragments
from lightning_gaussk.engine.local.ft import ManagedOuterStep, ReplicaExchange, check_manager, replica_topology
from lightning_gaussk.engine.local.landing import InFlight
from lightning_gaussk.engine.local.outer import OuterNesterov, OuterOptimizer, OuterSGD
from lightning_gaussk.engine.local.schedule import SyncSchedule
from lightning_gaussk.utils.log import rank_zero_info, rank_zero_warn

__all__ = ["LOCAL_SGD_FORMAT", "SparseLocalSGD", "make_outer"]

LOCAL_SGD_FORMAT = "lightning_gaussk.local_sgd/1"


def make_outer(config: LocalSGDConfig, numel: int, device: torch.device) -> OuterOptimizer:
    """The outer optimizer of ``config``: :class:`OuterNesterov` for ``outer="dense"`` (DiLoCo),
    :class:`OuterSGD` for the sparse step."""
    if config.outer == "dense":
        return OuterNesterov(config.outer_lr, config.outer_momentum, numel, device)
    return OuterSGD(config.outer_lr)


class SparseLocalSGD:
    """Local SGD with a sparse (SparseLoCo) or dense (DiLoCo) outer step, hooked on ``optimizer``.

    The user's loop does not change: the outer step runs from a post-step hook of the optimizer
    (``optimizer.register_step_post_hook``) after every ``sync_every``-th ``optimizer.step()``.
    Construction broadcasts rank 0's parameters (every rank starts from the same ``theta``) and
    logs, on rank 0, what the outer step will do and send
    (:func:`~lightning_gaussk.engine.describe.local_startup_line`); with one rank (no process
    group, or a group of one) it warns that nothing is exchanged.

    Args:
        model: the plain module (not wrapped in DDP); its trainable parameters are averaged.
            Buffers (batch-norm statistics) stay local.
        optimizer: the inner optimizer over ``model``'s parameters (its state stays local).
        sync_every: ``H``, optimizer steps between outer steps (>= 1).
        density: fraction of the entries sent per outer step, ``k = ceil(density * d)`` (per
            chunk with ``chunk``), in (0, 1]. Ignored by ``outer="dense"``.
        outer_lr: ``alpha``, the outer learning rate (> 0); the default 1.5 and ``quantize=2`` are
            the measured best of benchmarks/local_defaults.py (docs/local-sgd.md).
        ef_decay: ``beta``, the decay of the error-feedback buffer, in [0, 1] (sparse only).
        outer: ``"sparse"`` (SparseLoCo) or ``"dense"`` (DiLoCo, outer Nesterov momentum).
        chunk: entries per chunk of a chunk-wise exact top-k (None: one whole-tensor selection
            by ``selector``); at most 32768 with ``quantize``.
        quantize: 2 (the default), 8, or None (fp32 values): bits per sent value, one fp32 scale
            per chunk (needs ``chunk`` and ``exchange="allgather"``: pass ``quantize=None`` with
            another exchange or ``chunk=None``); the rounding error stays in the buffer. Ignored
            by ``outer="dense"``.
        selector: the whole-tensor selection method (``chunk=None``): a registered selector.
        exchange: ``"allgather"``, the bounded ``"allreduce"``, or another registered sparse exchange.
        dense_fallback: ``"auto"``: the byte rule sends the step dense when sparse cannot move
            fewer bytes (everything delivered, the buffer emptied); ``"never"``.
        outer_momentum: ``mu`` of ``outer="dense"`` (Nesterov), in [0, 1).
        hierarchy, ranks_per_node: node mode, as for :class:`~lightning_gaussk.GaussKState`.
        seed: seed of randomised selectors.
        process_group: the group to average over (None: the world; flat mode only).
        launcher_ranks_per_node: ranks per node as the launcher says (node mode under
            ``hierarchy="auto"``; None reads torchrun's ``LOCAL_WORLD_SIZE``).
        overlap_steps: ``tau``, optimizer steps an exchange runs in the background before its
            update lands (0: the blocking outer step), in ``[0, sync_every)``.
        fragments: ``F``, fragments syncing at their own offsets in the window (streaming), cut at
            module boundaries and balanced by size, in ``[1, sync_every]``.
        end_on_theta: what :meth:`finish` does at the end of training: a last outer step over the
            partial window (True), or only land the exchanges in flight (False).
        config: the options as a :class:`~lightning_gaussk.config.LocalSGDConfig`; option
            keywords that differ from their defaults are applied on top of it.
        manager: a ``torchft.Manager`` (built with ``use_async_quorum=False`` and
            ``load_state_dict=None, state_dict=None``): every outer step runs under its quorum
            across the live replica groups (this process, or the ranks of ``process_group``, is
            one group) and commits only when ``manager.should_commit()``; the state a healing
            group needs is registered with ``manager.register_state_dict_fn``
            (:mod:`lightning_gaussk.engine.local.ft`; :attr:`ft` keeps its counters). Not with
            ``overlap_steps > 0``, ``fragments > 1`` or ``exchange="allreduce"``.

    Raises:
        TypeError / ValueError: for an invalid argument, naming it.

    Example::

        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        local = SparseLocalSGD(model, opt, sync_every=16, density=0.02, ef_decay=0.95, chunk=4096, quantize=2)
        for x, y in loader:                       # unchanged
            loss_fn(model(x), y).backward()
            opt.step()                            # every 16th step also runs the outer step
            opt.zero_grad()
        local.finish()                            # every rank ends on theta
        print(local.bytes_per_inner_step)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sync_every: int = 16,
        density: float = 0.02,
        outer_lr: float = 1.5,
        ef_decay: float = 0.95,
        outer: Literal["sparse", "dense"] = "sparse",
        *,
        chunk: int | None = 4096,
        quantize: int | None = 2,
        selector: str = "gaussk",
        exchange: str = "allgather",
        dense_fallback: Literal["auto", "never"] = "auto",
        outer_momentum: float = 0.9,
        hierarchy: Literal["auto", "flat", "node"] = "auto",
        ranks_per_node: int | None = None,
        process_group: Any = None,
        seed: int = 0,
        launcher_ranks_per_node: int | None = None,
        overlap_steps: int = 0,
        fragments: int = 1,
        end_on_theta: bool = True,
        config: LocalSGDConfig | None = None,
        manager: Any = None,
    ) -> None:
        _check_modules(model, optimizer)
        given = {
            "sync_every": sync_every, "density": density, "outer_lr": outer_lr, "ef_decay": ef_decay, "outer": outer,
            "chunk": chunk, "quantize": quantize, "selector": selector, "exchange": exchange,
            "dense_fallback": dense_fallback, "outer_momentum": outer_momentum, "hierarchy": hierarchy,
            "ranks_per_node": ranks_per_node, "seed": seed, "overlap_steps": overlap_steps, "fragments": fragments,
            "end_on_theta": end_on_theta,
        }  # fmt: skip
        self.config = cfg = _build_config(config, given)
        if manager is not None:
            check_manager(cfg, manager)
        self.model, self.optimizer, self.process_group = model, optimizer, process_group
        # the layout (flat or node mode) by the engine's one rule, on every rank at the same point;
        # under torchft: this replica group's own (one process, or its ranks as one node)
        self.topology = (
            replica_topology(process_group) if manager is not None else _layout_topology(cfg, process_group, launcher_ranks_per_node)
        )
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # the parts: when (schedule), what (fragments, each with its outer optimizer), how (exchange)
        self.schedule = SyncSchedule(cfg.sync_every, cfg.fragments)
        parts = split_fragments(self.named, cfg.fragments)
        self.fragments = [Fragment(named, self.topology, cfg, index=i) for i, named in enumerate(parts)]
        for frag in self.fragments:
            frag.outer = make_outer(cfg, frag.d, frag.theta.device)
        if manager is None:
            self.exchanges: list[OuterExchange] = [OuterExchange(cfg, self.topology, frag) for frag in self.fragments]
        else:
            self.exchanges = [ReplicaExchange(cfg, self.topology, frag, manager) for frag in self.fragments]
        self.inner_step = 0  # optimizer steps so far
        self.window_start = 0  # the step the schedule counts from (a manual outer step restarts the window)
        self._on_theta_at = 0  # the last step after which every rank held theta
        self._inflight: dict[int, InFlight] = {}  # by fragment, in launch order
        self.telemetry: dict[str, int] = dict.fromkeys(LOCAL_SGD_COUNTERS, 0)
        self._pending_local: dict[str, Any] | None = None
        #: the torchft glue (its counters: quorums, heals, uncommitted, participants); None without a manager
        self.ft = ManagedOuterStep(manager, self) if manager is not None else None
        self._broadcast_start()
        self._handle = optimizer.register_step_post_hook(self._after_step)
        self._announce()

    def _announce(self) -> None:
        """The startup line on rank 0; with one rank, the warning that nothing is exchanged (under
        torchft: the line of :meth:`~lightning_gaussk.engine.local.ft.ManagedOuterStep.describe`)."""
        if self.ft is not None:
            rank_zero_info(self.ft.describe())
            return
        sizes = self.fragments[0].sizes
        rank_zero_info(
            local_startup_line(
                self.config, self.layout, d=self.d, d_local=sum(f.d_local for f in self.fragments), k=self.k,
                chunk=sizes.chunk if self.config.outer == "sparse" else None, sparse=self.sparse or self.world_size == 1,
                outer_bytes=self.outer_bytes, dense_bytes=self.dense_bytes_per_step,
            )
        )  # fmt: skip
        if self.world_size == 1:
            rank_zero_warn(
                "SparseLocalSGD: one rank (no process group, or a group of one): nothing is exchanged; every outer step "
                "applies this rank's own pseudo-gradient (bytes_wire stays 0). Run it on several processes to average "
                "the models.",
                stacklevel=3,
            )

    def _broadcast_start(self) -> None:
        """theta := rank 0's parameters, on every rank (as DDP does at construction)."""
        for frag in self.fragments:
            frag.gather_params(frag.theta)
            if self.world_size > 1:
                src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
                dist.broadcast(frag.theta, src=src, group=self.process_group)
            frag.scatter_params(frag.theta)

    # ---------------------------------------------------------------- read API
    @property
    def sync_every(self) -> int:
        """``H``, optimizer steps between outer steps."""
        return self.config.sync_every

    @property
    def layout(self) -> Layout:
        """This rank's layout (flat, or nodes of ``L`` ranks)."""
        return self.topology.layout

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def d(self) -> int:
        """Entries of the model's trainable parameters."""
        return sum(f.d for f in self.fragments)

    @property
    def k(self) -> int:
        """Entries this rank offers per outer step (``d_local`` when dense)."""
        return sum(f.sizes.k for f in self.fragments)

    @property
    def sparse(self) -> bool:
        """Whether the outer exchange is sparse (False: DiLoCo, or the byte rule chose dense)."""
        return all(x.sparse for x in self.exchanges)

    @property
    def overlap_steps(self) -> int:
        """``tau``, optimizer steps between an exchange's launch and its landing (0: blocking)."""
        return self.config.overlap_steps

    @property
    def window_position(self) -> int:
        """Optimizer steps taken in the current ``H``-step window (0 right after fragment 0's outer
        step, or a manual :meth:`outer_step`)."""
        return self.schedule.position(self.inner_step - self.window_start)

    @property
    def on_theta(self) -> bool:
        """Whether every rank holds ``theta`` now: no exchange in flight, and every fragment synced
        after the last optimizer step (right after construction, a manual :meth:`outer_step`, or,
        with one fragment and no overlap, its outer step)."""
        return not self._inflight and self._on_theta_at == self.inner_step

    @property
    def in_flight(self) -> int:
        """Fragments whose exchange has been launched and has not landed."""
        return len(self._inflight)

    def global_params(self) -> Tensor:
        """``theta`` (fp32, the parameters concatenated in model order): a copy."""
        return torch.cat([f.theta for f in self.fragments])

    def error_feedback(self) -> Tensor:
        """This rank's error-feedback buffer ``e`` (its local entries: the whole model in flat
        mode, its shard in node mode): a copy; zeros for ``outer="dense"``."""
        return torch.cat([torch.zeros(f.d_local) if f.e is None else f.e[: f.d_local].clone() for f in self.fragments])

    def last_sent(self) -> Tensor:
        """What this rank contributed in the last outer step, as a dense vector of its local
        entries (``u`` where delivered, dequantised values with ``quantize``): a new tensor."""
        parts = []
        for f in self.fragments:
            out = torch.zeros(f.sizes.m, dtype=torch.float32, device=f.update.device)
            idx, vals, delivered = f.last
            if idx is not None and vals is not None:
                out.index_add_(0, idx, vals if delivered is None else torch.where(delivered, vals, 0.0))
            parts.append(out[: f.d_local])
        return torch.cat(parts)

    @property
    def outer_bytes(self) -> int:
        """Bytes of this rank's message(s) per outer step (fixed by ``(k, d, P)``)."""
        return sum(x.message_bytes for x in self.exchanges)

    @property
    def outer_wire_bytes(self) -> int:
        """Bytes this rank puts on the wire per outer step (ring algorithms; node mode: between nodes)."""
        return sum(x.wire_bytes for x in self.exchanges)

    @property
    def dense_bytes_per_step(self) -> int:
        """Bytes of the gradients dense DDP would all-reduce per optimizer step (every trainable
        parameter, in its dtype): the reference :attr:`bytes_per_inner_step` saves against."""
        return sum(p.numel() * p.element_size() for _, p in self.named)

    @property
    def bytes_per_inner_step(self) -> float:
        """Message bytes per optimizer step on average: :attr:`outer_bytes` ``/ sync_every``."""
        return self.outer_bytes / self.sync_every

    @property
    def outer_seconds(self) -> float:
        """Mean host wall time of an outer step so far (0.0 before the first)."""
        n = self.telemetry["outer_steps"]
        return self.telemetry["outer_ns"] * 1e-9 / n if n else 0.0

    def predicted_outer_time(self, link: costmodel.Link) -> float:
        """Communication seconds of one outer step on ``link`` by the cost model (the exchange
        among its peers; host work excluded). In node mode the ``L`` ranks of a node cross
        ``link`` at once, each with its shard, so the link is priced shared ``L`` ways
        (``Pricing.on(link, share=L)``), as :func:`~lightning_gaussk.costs.planning.local_outer_cost`
        prices it; the node's own reduce-scatter and all-gather are not counted."""
        return sum(self._predicted_time(x, link) for x in self.exchanges)

    def _predicted_time(self, x: OuterExchange, link: costmodel.Link) -> float:
        """The exchange's own time model without host work (``costmodel.COMM_ONLY``)."""
        if x.route.peers == 1 or x.message_bytes == 0:
            return 0.0
        pricing = costmodel.Pricing.on(link, costmodel.COMM_ONLY, share=self.layout.ranks_per_node or 1)
        return x.exchange.time(x.sizes.k, x.sizes.m, x.route.peers, pricing)

    # ---------------------------------------------------------------- the hook
    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.inner_step += 1
        self.telemetry["inner_steps"] += 1
        landing: list[int] = []
        for x in self._inflight.values():
            if x.land_at == self.inner_step:
                landing.append(x.index)
            else:
                x.observe()  # telemetry: when the exchange completed, without waiting
        due = self.schedule.due(self.inner_step - self.window_start)
        if due or landing:
            self._step_timed(due, landing)

    def remove(self) -> None:
        """Unhook from the optimizer (the model keeps its current parameters)."""
        self._handle.remove()

    def outer_step(self) -> None:
        """One outer step now, of every fragment, blocking (a collective: every rank calls it alike):
        the exchanges in flight land first, then every fragment syncs (:meth:`sync`). Afterwards
        every rank holds ``theta`` and a new window starts (``window_position`` is 0)."""
        t0 = time.perf_counter_ns()
        for index in list(self._inflight):
            self._land(index)
        for f in range(len(self.fragments)):
            self.sync(f)
        self.telemetry["outer_steps"] += 1
        self.telemetry["outer_ns"] += time.perf_counter_ns() - t0
        self.window_start = self._on_theta_at = self.inner_step

    def finish(self) -> bool:
        """End of training (a collective): with ``end_on_theta`` (the default) and a rank off
        ``theta``, a last :meth:`outer_step` over the partial window, so every rank ends on
        ``theta``; otherwise only the exchanges in flight land. Returns whether an outer step ran."""
        if self.config.end_on_theta and not self.on_theta:
            self.outer_step()
            return True
        for index in list(self._inflight):
            self._land(index)
        return False

    def _step_timed(self, due: Sequence[int], landing: Sequence[int]) -> None:
        """After an optimizer step: the updates due land, then the fragments due sync (blocking),
        or launch (``overlap_steps > 0``)."""
        t0 = time.perf_counter_ns()
        for index in landing:
            self._land(index)
        for f in due:
            if self.overlap_steps:
                self._inflight[f] = self._launch(f, overlapped=True)
            else:
                self.sync(f)
        if due:
            self.telemetry["outer_steps"] += 1
            if not self.overlap_steps and len(due) == len(self.fragments):
                self._on_theta_at = self.inner_step
        self.telemetry["outer_ns"] += time.perf_counter_ns() - t0

    def sync(self, index: int) -> None:
        """The outer step of fragment ``index``, blocking (a collective; every rank calls it alike).

        1. prepare: the pseudo-gradient ``Delta = theta - theta_r`` and this rank's flag (0, or
           NaN if ``Delta`` is non-finite); node mode: summed in the node, this rank's shard;
           sparse: ``u = beta e + Delta``; overlapped: the parameters kept as the snapshot
        2. launch: select ``k`` of ``u`` and issue the exchange (dense: the all-reduce of ``Delta``)
        3. finish: wait and decode the update; node mode: all-gather of the shards' updates and flags
        4. agree: the flags of every rank, summed, read once on the host with this rank's own
        5. commit or skip. Finite everywhere: ``e = u - sent`` (0 when the byte rule sent it
           dense) and the outer optimizer moves ``theta``. Non-finite anywhere: the step is
           skipped on every rank (``theta``, ``e`` and the outer momentum stay as they were), and
           a rank whose own ``Delta`` was non-finite resets its inner optimizer's state (counted in
           ``skipped_outer_steps``, with a warning)
        6. apply: every rank copies ``theta`` into its model; overlapped (steps 3-6 ``tau``
           optimizer steps after 1-2): ``theta`` plus this rank's progress since the snapshot

        Steps 1-2 are :meth:`_launch`, 3-5 :meth:`_finish` and 6 :meth:`_apply`. With a torchft
        ``manager``, step 1 starts with the quorum (a healing group takes ``theta`` there) and step 5
        commits only when ``manager.should_commit()`` (:mod:`lightning_gaussk.engine.local.ft`).
        """
        x = self._launch(index, overlapped=False)
        self._finish(x)
        self._apply(x, overlapped=False)

    def _launch(self, index: int, overlapped: bool) -> InFlight:
        """Steps 1-2 of :meth:`sync`."""
        frag, way, tel = self.fragments[index], self.exchanges[index], self.telemetry
        if self.ft is not None:  # the quorum of this outer step (a healing group takes theta here)
            self.ft.start()
        # Step 1: prepare
        local = way.enter(frag, frag.pseudo_gradient(snapshot=overlapped))
        if frag.e is not None:
            frag.accumulate(local, self.config.ef_decay)
        # Step 2: launch
        pending = way.launch(frag, local, step=tel["outer_steps"])
        land_at = self.inner_step + (self.overlap_steps if overlapped else 0)
        return InFlight(index, land_at, tel["outer_steps"] + 1, pending, overlapped, launched_ns=time.perf_counter_ns())

    def _finish(self, x: InFlight) -> None:
        """Steps 3-5 of :meth:`sync` (the landing's effects on the model and the inner optimizer
        wait for :meth:`_apply`); nothing if already finished (early, by a checkpoint)."""
        if x.pending is None:
            return
        frag, way, tel, pending = self.fragments[x.index], self.exchanges[x.index], self.telemetry, x.pending
        t0 = time.perf_counter_ns()
        x.observe()
        # Step 3: finish
        delivery = way.finish(pending)
        tel["entries_sent"] += pending.entries
        tel["bytes_sent"] += way.message_bytes
        tel["bytes_wire"] += way.wire_bytes
        tel["bytes_intra"] += way.intra_bytes(frag)
        # Step 4: agree (the one host read of the step: the sum is the same on every rank)
        own_ok, ok = agreed(frag.flags).tolist()
        # torchft: the manager's vote, on every rank; no commit leaves theta, e and the momentum as they were
        committed = self.ft.should_commit() if self.ft is not None else True
        # Step 5: commit or skip
        if ok and committed:
            self._commit(frag, way, pending.selection, delivery)
        else:
            frag.last = (None, None, None)
        x.own_ok, x.ok, x.pending = bool(own_ok), bool(ok), None
        now = time.perf_counter_ns()
        tel["outer_exposed_ns"] += now - t0
        if x.overlapped:  # the exchange's time before the wait was hidden behind inner steps
            tel["outer_hidden_ns"] += x.hidden_ns(t0)

    def _apply(self, x: InFlight, overlapped: bool) -> None:
        """Step 6 of :meth:`sync`, and the skip's effects on this rank."""
        frag = self.fragments[x.index]
        if not x.ok:
            self._skip(x)
        if overlapped and x.own_ok:
            frag.keep_progress()
        else:
            frag.scatter_params(frag.theta)

    def _land(self, index: int) -> None:
        """Fragment ``index``'s overlapped update lands now (steps 3-6)."""
        x = self._inflight.pop(index)
        self._finish(x)
        self._apply(x, overlapped=True)

    def _commit(self, frag: Fragment, way: OuterExchange, sel: Selection | None, delivery: Delivery) -> None:
        """Step 5, every rank finite: the error feedback keeps what was not sent, ``theta`` moves."""
        if frag.e is not None and frag.u is not None:
            indices, sent = (None, None) if sel is None else (sel.indices, sel.values)
            frag.e, frag.u = commit(frag.e, frag.u, indices, delivery.delivered, True, sent=sent, everything=sel is None)
            frag.e[frag.d_local :].zero_()  # padding stays 0 (a quantised 0 is not 0)
            frag.last = (indices, sent, delivery.delivered if sel is not None else None)
        if not way.sparse:
            self.telemetry["dense_outer_steps"] += 1
        frag.outer.step(frag.theta, frag.delta)

    def _skip(self, x: InFlight) -> None:
        """Step 5, a non-finite pseudo-gradient somewhere: nothing of this step is kept."""
        self.telemetry["skipped_outer_steps"] += 1
        t = x.number
        if not x.own_ok:
            self.optimizer.state.clear()  # its moments may be non-finite: it starts afresh from theta
            warnings.warn(  # stacklevel: the caller of optimizer.step()
                f"SparseLocalSGD: rank {self.layout.rank}'s pseudo-gradient is non-finite at outer step {t}: the outer "
                "step is skipped on every rank (theta, error feedback and outer momentum unchanged), this rank restarts "
                "from theta, and its inner optimizer state was reset.",
                RuntimeWarning,
                stacklevel=7,
            )
        else:
            rank_zero_warn(f"SparseLocalSGD: outer step {t} skipped on every rank: another rank's pseudo-gradient is non-finite.", RuntimeWarning)

    # ---------------------------------------------------------------- checkpoints
    def _per_name(self, part: str) -> dict[str, Tensor]:
        """Live views per parameter name of ``part``: ``"residuals"`` (the error feedback, in this
        rank's layout), ``"global"`` (``theta``), or a key of the outer optimizer's state
        (``"momentum"``; model order)."""
        out: dict[str, Tensor] = {}
        for f in self.fragments:
            flat = {"residuals": f.e, "global": f.theta}[part] if part in ("residuals", "global") else f.outer.state_dict().get(part)
            if flat is not None:
                out.update(f.per_name(flat, local_layout=part == "residuals"))
        return out

    def _outer_keys(self) -> list[str]:
        """The outer optimizers' state keys (``["momentum"]`` for DiLoCo, none for the sparse step)."""
        return sorted({key for f in self.fragments for key in f.outer.state_dict()})

    def state_dict(self, *, shared: bool = True, local: bool = True) -> dict[str, Any]:
        """What resumes the outer loop exactly (plain values and CPU tensors, ``weights_only``-safe).

        - always: the format, the layout, the configuration, ``inner_step`` and ``window_start``
          (so a resume in the middle of a window continues it), the telemetry, this rank's
          error-feedback buffer ``"residuals"`` (per parameter name; node mode: this rank's
          chunk) and the landings still owed (``"in_flight"``: each with this rank's snapshot);
        - ``shared``: ``"global"`` (``theta``) and ``"momentum"`` (DiLoCo), the same on every rank;
        - ``local``: this rank's ``"local"`` parameters and inner ``"optimizer"`` state (they
          differ between ranks inside a window).

        With exchanges in flight it is a collective: it waits for them (their ``theta`` and ``e``
        committed) and records their landings, which a resume applies at the same step as the
        uninterrupted run. Save it on every rank (one file per rank); load it with
        :meth:`load_state_dict`."""
        cpu = lambda t: t.detach().to("cpu", copy=True)
        for x in self._inflight.values():
            self._finish(x)
        sd: dict[str, Any] = {
            "format": LOCAL_SGD_FORMAT,
            "layout": self.layout.to_dict(),
            "config": self._saved_config(),
            "inner_step": self.inner_step,
            "window_start": self.window_start,
            "on_theta_at": self._on_theta_at,
            "telemetry": dict(self.telemetry),
            "residuals": {n: cpu(t) for n, t in self._per_name("residuals").items()},
            "in_flight": [self._saved_landing(x) for x in self._inflight.values()],
        }
        if shared:
            sd["global"] = {n: cpu(t) for n, t in self._per_name("global").items()}
            for key in self._outer_keys():
                sd[key] = {n: cpu(t) for n, t in self._per_name(key).items()}
        if local:
            sd["local"] = {n: cpu(p) for n, p in self.named}
            sd["optimizer"] = self.optimizer.state_dict()
        return sd

    def _saved_landing(self, x: InFlight) -> dict[str, Any]:
        frag = self.fragments[x.index]
        assert frag.snapshot is not None
        snapshot = {n: t.detach().to("cpu", copy=True) for n, t in frag.per_name(frag.snapshot, local_layout=False).items()}
        return {**x.to_state(), "snapshot": snapshot}

    def _saved_config(self) -> dict[str, Any]:
        """The settings a resume must match (``chunk``: the effective chunk of a sparse step)."""
        cfg, sizes = self.config, self.fragments[0].sizes
        return {
            "sync_every": cfg.sync_every, "density": cfg.density, "outer": cfg.outer, "chunk": sizes.chunk,
            "quantize": cfg.quantize, "exchange": cfg.exchange, "d": self.d, "fragments": cfg.fragments,
            "overlap_steps": cfg.overlap_steps,
        }  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any], *, defer_local: bool = False) -> None:
        """Restore :meth:`state_dict` (saved on the same layout, with the same outer settings), or a
        state resharded for this rank from a save on another layout
        (:func:`~lightning_gaussk.checkpoint.reshard.local_sgd_state_for_layout`: it has
        ``"resharded_from"`` and no local parts; every rank starts from ``theta`` and a new window,
        and a partial window saved is lost, with a warning).

        ``defer_local``: keep the ``"local"`` parameters and ``"optimizer"`` state until
        :meth:`apply_local` (integrations whose framework loads rank 0's model and optimizer after
        this call). Raises ``ValueError`` naming what does not fit, before anything changes."""
        self._validate_state(state_dict)
        with torch.no_grad():
            for part in ("residuals", "global"):
                if part in state_dict:
                    for name, t in self._per_name(part).items():
                        t.copy_(state_dict[part][name].reshape(-1))
            for f in self.fragments:  # the outer optimizers' state, through their own load_state_dict
                saved = {key: state_dict[key] for key in f.outer.state_dict() if key in state_dict}
                f.outer.load_state_dict({key: torch.cat([per[n].reshape(-1) for n, _ in f.named]) for key, per in saved.items()})
        self.inner_step = int(state_dict["inner_step"])
        self.window_start = int(state_dict.get("window_start", 0))
        self._on_theta_at = int(state_dict.get("on_theta_at", self.inner_step if self.window_position == 0 else -1))
        self._inflight = {}
        for saved in state_dict.get("in_flight", []):
            x = InFlight.from_state(saved)
            frag = self.fragments[x.index]
            assert frag.snapshot is not None
            with torch.no_grad():
                for name, t in frag.per_name(frag.snapshot, local_layout=False).items():
                    t.copy_(saved["snapshot"][name].reshape(-1))
            self._inflight[x.index] = x
        self.telemetry.update({k: int(v) for k, v in state_dict.get("telemetry", {}).items() if k in self.telemetry})
        local = {k: state_dict[k] for k in ("local", "optimizer") if k in state_dict}
        if not local and "global" in state_dict:  # no local state: start from theta (as after an outer step)
            for f in self.fragments:
                f.scatter_params(f.theta)
            self._inflight, self._on_theta_at = {}, self.inner_step  # no local progress to keep
        self._pending_local = local or None
        if "resharded_from" in state_dict:
            origin = state_dict["resharded_from"]
            self._resharded(Layout.from_dict(origin), had_flight=bool(origin.get("in_flight")))
        if not defer_local:
            self.apply_local()

    def _resharded(self, saved: Layout, had_flight: bool) -> None:
        """A save of another layout was loaded: a new window from ``theta`` (said on rank 0)."""
        lost = self.window_position
        self.window_start = self._on_theta_at = self.inner_step
        what = (
            f"the partial window of {lost} optimizer steps since the last outer step is lost (each rank's local model "
            "does not carry over)" if lost or had_flight else "the save was on theta: nothing is lost"
        )  # fmt: skip
        rank_zero_warn(
            f"SparseLocalSGD: resuming a save of {saved.describe()} on {self.layout.describe()}: theta and the outer "
            "momentum as saved, the error feedback resharded so that the owed update (1/P) sum_r e_r is kept, every rank "
            f"restarts from theta at optimizer step {self.inner_step}; {what}."
        )

    def apply_local(self) -> None:
        """Load the deferred ``"local"`` parameters and inner ``"optimizer"`` state (if any)."""
        pending, self._pending_local = self._pending_local, None
        if not pending:
            return
        if "local" in pending:
            with torch.no_grad():
                for name, p in self.named:
                    p.copy_(pending["local"][name].view_as(p))
        if "optimizer" in pending:
            self.optimizer.load_state_dict(pending["optimizer"])

    def _validate_state(self, sd: Mapping[str, Any]) -> None:
        if not isinstance(sd, Mapping) or sd.get("format") != LOCAL_SGD_FORMAT:
            raise ValueError(f"SparseLocalSGD.load_state_dict: `state_dict` is not a {LOCAL_SGD_FORMAT!r} state dict")
        saved = Layout.from_dict(sd["layout"])
        if (saved.world_size, saved.ranks_per_node) != (self.world_size, self.layout.ranks_per_node):
            raise ValueError(
                f"SparseLocalSGD.load_state_dict: saved on {saved.describe()}, this run is {self.layout.describe()}; "
                "one rank's state loads on the same layout only (error feedback and local models are per rank); to resume "
                "on another layout, save with lightning_gaussk.local_sgd.save_local_sgd and load with restore_local_sgd "
                "(or a Lightning / Accelerate checkpoint), which reshard it"
            )
        mine = self._saved_config()
        theirs = {"fragments": 1, "overlap_steps": 0, **sd.get("config", {})}  # saves from before streaming
        differ = [k for k in ("d", "outer", "chunk", "fragments") if theirs.get(k) != mine[k]]
        if sd.get("in_flight") and theirs["overlap_steps"] != mine["overlap_steps"]:
            differ.append("overlap_steps")  # a landing still owed needs the same overlap
        if differ:
            raise ValueError(f"SparseLocalSGD.load_state_dict: saved with {[(k, theirs.get(k)) for k in differ]}, now {[(k, mine[k]) for k in differ]}")
        for part in ("residuals", "global", *self._outer_keys()):
            if part not in sd:
                continue
            for name, t in self._per_name(part).items():
                got = sd[part].get(name)
                if not isinstance(got, Tensor) or got.numel() != t.numel():
                    raise ValueError(f"SparseLocalSGD.load_state_dict: {part} {name!r} is missing or has the wrong size")
        for saved in sd.get("in_flight", []):
            f = int(saved.get("fragment", -1))
            if not 0 <= f < len(self.fragments) or set(saved.get("snapshot", {})) != {n for n, _ in self.fragments[f].named}:
                raise ValueError(f"SparseLocalSGD.load_state_dict: a landing in flight of fragment {f} does not fit this model")
        if "local" in sd:
            for name, p in self.named:
                got = sd["local"].get(name)
                if not isinstance(got, Tensor) or got.numel() != p.numel():
                    raise ValueError(f"SparseLocalSGD.load_state_dict: local parameter {name!r} is missing or has the wrong size")


# -------------------------------------------------------------------------------- construction helpers
def _build_config(config: LocalSGDConfig | None, given: dict[str, Any]) -> LocalSGDConfig:
    """``config`` (or the defaults) with the keywords that differ from their defaults applied;
    an invalid option raises naming it."""
    if config is not None and not isinstance(config, LocalSGDConfig):
        raise TypeError(f"SparseLocalSGD: `config` must be a LocalSGDConfig or None, got {type(config).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(LocalSGDConfig)}
    try:
        if config is None:
            return LocalSGDConfig(**given)
        return config.replace(**{k: v for k, v in given.items() if v != defaults[k]})
    except (TypeError, ValueError) as err:
        raise type(err)(f"SparseLocalSGD: {err}") from None


def _layout_topology(cfg: LocalSGDConfig, process_group: Any, launcher_ranks_per_node: int | None) -> Topology:
    """Flat or node mode by the engines' one layout rule (:func:`~lightning_gaussk.comm.vote.decide_layout`),
    on every rank at the same point."""
    layout, _ = decide_layout(cfg.hierarchy, cfg.ranks_per_node, process_group, launcher_ranks_per_node)
    if not (dist.is_available() and dist.is_initialized()):
        return Flat(layout, process_group)
    return build_topology(layout, process_group)


def _check_modules(model: Any, optimizer: Any) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("SparseLocalSGD: `model` must be the plain module, not a DistributedDataParallel wrapper (pass ddp.module)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"SparseLocalSGD: `model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"SparseLocalSGD: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("SparseLocalSGD: `model` has no trainable parameters")
    if len({p.device for p in params}) != 1:
        raise ValueError("SparseLocalSGD: `model`'s parameters must all live on one device")
