"""Fault tolerance with torchft: :class:`~lightning_gaussk.SparseLocalSGD`'s outer step across the
live replica groups of a ``torchft.Manager`` (``SparseLocalSGD(..., manager=manager)``).

A replica group is one process, or ``L`` ranks under one process group (node mode inside the
group); the groups come and go, and torchft's lighthouse forms a quorum of the live ones at every
outer step. Per outer step ``t``, with ``P = manager.num_participants()`` the replica groups of
the quorum, ``theta`` the global model and ``theta_r`` group ``r``'s parameters (``L = 1``)::

    quorum           manager.start_quorum(allow_heal=True): who takes part; a group behind the
                     others heals here (below), before it sends anything
    pseudo-gradient  Delta_r = theta - theta_r

    outer="sparse"   u_r = beta e_r + Delta_r;  S_r = exactly k entries of u_r (kc per chunk)
                     quantize=None: s_r = u_r on S_r, 0 elsewhere; all-gather of every group's
                       [values | indices | flag] (2k + 1 words) over the manager's process group
                     quantize=b (2 or 8): per chunk c, m_c = max_{i in S_r, c} |u_r[i]| and
                       s_r[i] = Q_b(u_r[i]; m_c) = m_c (2 j_i - (2^b - 1)) / (2^b - 1),
                       j_i = round(((2^b - 1) u_r[i] / m_c + 2^b - 1) / 2)  (0 where m_c = 0);
                       all-gather of QuantAllGather's message [b-bit codes | int16 offsets |
                       m_c per chunk | flag] over the manager's process group
                     g = (1/P) sum_r s_r   (what every group decodes: the dequantised values)
    outer="dense"    g = (1/P) sum_r Delta_r               manager.allreduce (DiLoCo)

    vote             ok = manager.should_commit()        (its own replica group's decision)
    commit (ok)      sparse: e_r <- u_r - s_r;  theta <- theta - alpha g
                       (quantize=b: the rounding error u_r[i] - Q_b(u_r[i]) stays in e_r, so
                        e_r + s_r = u_r exactly: nothing selected is lost to the rounding)
                     dense:  m <- mu m + g;  theta <- theta - alpha (g + mu m)
    no commit        theta, e_r and m stay as they were (bit for bit), and the model goes back to theta
    apply            the model := theta

With ``L`` ranks per group, ``Delta`` is summed inside the group first (a reduce-scatter: rank
``l`` holds its ``1/L`` shard and the error feedback of that shard), rank ``l`` of each group
exchanges its shard with rank ``l`` of the others (torchft's process group of group rank ``l``),
the group all-gathers the shards, and the mean is over the ``P L`` ranks.

The rules:

- **Quorum.** Every outer step runs under a quorum: ``start_quorum`` at the outer step (as torchft's
  DiLoCo does), never between outer steps. The manager must be synchronous
  (``use_async_quorum=False``), so a healing group has its state before the exchange.
- **Mean over the participants.** The update divides by ``manager.num_participants()`` (times
  ``L``). A group that is in the quorum but not participating (a spare under
  ``WorldSizeMode.FIXED_WITH_SPARES``) sends zeros and keeps all of its ``u`` in its error feedback.
- **The vote gates the commit.** ``theta``, the error feedback and the outer momentum change only
  when ``manager.should_commit()`` says so (and every pseudo-gradient was finite, the engine's own
  rule); otherwise all three are left as they were and the model goes back to ``theta``. The vote
  is per replica group: torchft lets the other groups commit, and the group that did not is then
  one step behind and heals at the next quorum.
- **Healing.** ``theta``, the outer momentum and the step (the manager's, and the window's
  position: ``inner_step``, ``window_start``) are shared: a group that joins late, or fell behind,
  takes them from a live peer through the state-dict functions registered with
  ``manager.register_state_dict_fn`` (key :data:`FT_STATE_KEY`; the user's ``Manager`` is built with
  ``load_state_dict=None, state_dict=None``). It goes on from ``theta``: its own window is discarded
  (it sends a zero pseudo-gradient at that outer step) and its error feedback starts at zero. With
  torchft's ``init_sync=True`` (the default) every group but one heals at the first outer step, so
  all start from the same ``theta``. With ``L`` ranks per group torchft heals rank ``l`` from rank
  ``l`` of a peer; a group with a healed rank heals as a whole, each rank keeping shard ``l`` of
  ``theta`` and of the momentum from rank ``l`` (:meth:`ManagedOuterStep._heal_group`).
- **The error feedback is per group.** It never travels: a healing group starts at zero, the
  others keep theirs through any other group's failure.
- **Errors.** A collective that fails (a peer died, a timeout) is reported to the manager
  (``manager.report_error``) instead of raised, so the vote says no; an outer step after an error in
  its quorum issues no collective (as ``manager.allreduce`` does).
- **Quantised values** (``quantize`` = 2 or 8, the default 2): the message is the one the
  non-torchft path sends (:class:`~lightning_gaussk.comm.quant.QuantAllGather`'s format, of
  :func:`~lightning_gaussk.comm.quant.message_bytes` bytes), all-gathered as ``uint8`` over the
  manager's process group (:class:`ManagerQuantAllGather`). The selection's values are replaced by
  their dequantised form before the commit, so ``e_r = u_r - s_r`` holds exactly with ``s_r`` what
  the peers decoded. A group not participating sends zero scales (every value decodes to 0) and
  keeps all of ``u_r``.

Not supported with a manager (a ``ValueError`` naming the option): ``overlap_steps > 0``,
``fragments > 1``, another sparse ``exchange`` than ``"allgather"``; ``dense_fallback`` does not
apply (the sparse step always sends ``k`` entries). Why not the bounded all-reduce
(``exchange="allreduce"``): its two stages (an all-to-all to the owner of each region, chosen by
the group rank, then an all-gather of the owners' top entries) run through ``torch.distributed``'s
functions on a registered c10d group (``dist.get_rank(group)``, ``dist.all_to_all_single``), and
torchft's process group is reconfigured at every quorum outside that registry; a quorum change
between its stages would also leave a region without its owner. Carrying it would be a second
implementation of the exchange on the manager's process group, with a guard per stage; until then
the all-gather (fp32 or quantised) is the sparse exchange under torchft.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.comm import codec, quant
from lightning_gaussk.comm.exchange import AllGather, Delivery, DenseAllReduce, Launched, Route, Selection, all_gather, buffer
from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.comm.quant import QuantAllGather
from lightning_gaussk.comm.topology import Flat, Node, Topology
from lightning_gaussk.config import LocalSGDConfig
from lightning_gaussk.engine.local.exchange import OuterExchange
from lightning_gaussk.engine.local.fragment import Fragment
from lightning_gaussk.selection.chunkwise import ChunkwiseTopK

__all__ = [
    "FT_STATE_KEY",
    "ManagedOuterStep",
    "ManagerAllGather",
    "ManagerAllReduce",
    "ManagerQuantAllGather",
    "ReplicaExchange",
    "check_manager",
    "replica_topology",
]

#: the key of SparseLocalSGD's state in ``manager.register_state_dict_fn``
FT_STATE_KEY = "lightning_gaussk.local_sgd"

_NEEDS = ("start_quorum", "should_commit", "num_participants", "is_participating", "register_state_dict_fn",
          "report_error", "errored", "allreduce", "current_step")  # fmt: skip


def check_manager(config: LocalSGDConfig, manager: Any) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``manager`` (and the option) when ``manager``
    cannot drive the outer step under ``config``."""
    missing = [m for m in _NEEDS if not callable(getattr(manager, m, None))]
    if missing or getattr(manager, "_pg", None) is None:
        raise TypeError(
            f"SparseLocalSGD: `manager` must be a torchft.Manager (built with a process group), got {type(manager).__name__}"
            + (f" (missing {missing})" if missing else "")
        )
    if getattr(manager, "_use_async_quorum", False):
        raise ValueError(
            "SparseLocalSGD: `manager` must be built with use_async_quorum=False: the outer step runs its quorum "
            "synchronously, so that a healing replica group has theta before it sends (as torchft's DiLoCo requires)"
        )
    if config.overlap_steps:
        raise ValueError(
            f"SparseLocalSGD: `overlap_steps` = {config.overlap_steps} cannot be used with `manager`: an exchange in "
            "flight across a quorum change is not supported; use overlap_steps=0 with a torchft manager"
        )
    if config.fragments != 1:
        raise ValueError(
            f"SparseLocalSGD: `fragments` = {config.fragments} cannot be used with `manager` (streaming across replica "
            "groups is not supported); use fragments=1"
        )
    if config.outer == "sparse" and config.exchange != "allgather":
        raise ValueError(
            f"SparseLocalSGD: `exchange`={config.exchange!r} cannot be used with `manager`: across torchft replica "
            "groups the sparse outer step is the all-gather of k entries over the manager's process group (fp32, or "
            "quantize=2/8 bits); the bounded all-reduce's stages need a torch.distributed group that stays the same "
            "across quorums. Use exchange='allgather'"
        )


def replica_topology(process_group: Any) -> Topology:
    """The topology inside this replica group: flat for one process (no process group, or a group of
    one), or node mode over the ``L`` ranks of ``process_group`` (None: the world) as one node: the
    pseudo-gradient reduce-scattered in the group, each rank's shard exchanged across groups."""
    if not (dist.is_available() and dist.is_initialized()):
        return Flat(Layout(1, 0), None)
    group = process_group if process_group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return Flat(Layout(1, 0), process_group)
    return Node(Layout(size, rank, size), process_group, None)


# -------------------------------------------------------------------------------- the exchanges
class _Guarded:
    """A collective's work whose failure is reported to the manager instead of raised."""

    def __init__(self, work: Any, manager: Any) -> None:
        self.work, self.manager, self.failed = work, manager, work is None

    def wait(self, timeout: object = None) -> bool:
        if self.work is not None and not self.failed:
            try:
                self.work.wait()
            except Exception as err:  # a peer died, a timeout: the vote says no
                self.manager.report_error(err)
                self.failed = True
        return not self.failed

    def is_completed(self) -> bool:
        try:
            return self.work is None or bool(self.work.is_completed())
        except Exception:
            return True


def _gather(manager: Any, route: Route, msg: Tensor, gathered: Tensor) -> _Guarded:
    """Issue the all-gather of ``msg`` into ``gathered`` (``route.peers`` rows) over the manager's
    process group (``ProcessGroupGloo.allgather``); nothing after an error in this quorum, and a
    failure to issue it reported to the manager."""
    from torch.distributed.distributed_c10d import AllgatherOptions

    work: Any = None
    if manager.errored() is None:
        try:
            rows = list(gathered.view(route.peers, msg.numel()).unbind(0))
            work = route.group.allgather([rows], [msg], AllgatherOptions())
        except Exception as err:
            manager.report_error(err)
    return _Guarded(work, manager)


class ManagerAllGather(AllGather):
    """The all-gather of every replica group's ``[values | indices | flag]`` (``2k + 1`` words) over
    the manager's process group (``ProcessGroupGloo.allgather``, ``route.peers`` rows);
    ``out = (1 / route.divisor) sum_r scatter(idx_r, val_r)``. A group not participating sends zero
    values and nothing of its selection is delivered. A failed collective is reported to the
    manager and nothing is decoded (the vote then says no)."""

    name = "torchft-allgather"

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        assert sel is not None
        manager, k, words = self.manager, sel.k, codec.message_words(sel.k)
        msg = codec.pack(buffer(cache, "msg", words, out.device), sel.values, sel.indices, sel.flag)
        participating = bool(manager.is_participating())
        if not participating:
            msg[:k].zero_()
        gathered = buffer(cache, "gathered", route.peers * words, out.device)
        guarded = _gather(manager, route, msg, gathered)

        def finish() -> Delivery:
            nothing = torch.zeros(k, dtype=torch.bool, device=out.device)
            if guarded.failed:
                return Delivery(torch.zeros((), device=out.device), delivered=nothing)
            values, indices, flags = codec.unpack(gathered, k)
            out.index_add_(0, indices, values, alpha=1.0 / route.divisor)
            return Delivery(flags.sum(), delivered=None if participating else nothing)

        return Launched(guarded, finish)


class ManagerQuantAllGather(QuantAllGather):
    """:class:`~lightning_gaussk.comm.quant.QuantAllGather` across replica groups: the same message
    (``bits``-bit codes, int16 offsets in the chunk, one fp32 scale per chunk, the flag; one
    ``uint8`` tensor of :func:`~lightning_gaussk.comm.quant.message_bytes` bytes) all-gathered over
    the manager's process group; ``out = (1 / route.divisor) sum_r dequantised_r`` at the selected
    indices. ``sel.values`` is overwritten by its dequantised values (what the peers decode), so
    the commit's ``e = u - sent`` keeps the rounding error. A group not participating sends zero
    scales (its values decode to 0) and nothing of its selection is delivered; a failed
    collective is reported to the manager and nothing is decoded (the vote then says no)."""

    name = "torchft-quant_allgather"

    def __init__(self, manager: Any, bits: int, chunk: int, per_chunk: int) -> None:
        super().__init__(bits, chunk, per_chunk)
        self.manager = manager

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        assert sel is not None
        manager, kc, C, bits, dev = self.manager, self.per_chunk, self.chunk, self.bits, out.device
        k = sel.k
        n = k // kc
        cb, ob, total = quant._sizes(n, kc, bits)
        codes = buffer(cache, "q_codes", n * kc, dev, torch.uint8)
        scales = buffer(cache, "q_scales", n, dev)
        deq = buffer(cache, "q_deq", n * kc, dev)
        quant.quantize(sel.values.view(n, kc), bits, codes.view(n, kc), scales, deq.view(n, kc))
        sel.values.copy_(deq)  # what was sent, for the commit (e = u - sent)
        msg = buffer(cache, "q_msg", total, dev, torch.uint8)
        msg[:cb].zero_()
        quant.pack_codes(codes, bits, msg[:cb])
        msg[cb : cb + ob].view(torch.int16)[: n * kc].copy_(sel.indices.remainder(C))
        tail = msg[cb + ob :].view(torch.float32)
        tail[:n].copy_(scales)
        tail[n].copy_(sel.flag)
        participating = bool(manager.is_participating())
        if not participating:
            tail[:n].zero_()  # zero scales: every value decodes to 0
        gathered = buffer(cache, "q_gathered", route.peers * total, dev, torch.uint8)
        guarded = _gather(manager, route, msg, gathered)

        def finish() -> Delivery:
            nothing = torch.zeros(k, dtype=torch.bool, device=dev)
            if guarded.failed:
                return Delivery(torch.zeros((), device=dev), delivered=nothing)
            rows = gathered.view(route.peers, total)
            got = quant.unpack_codes(rows[:, :cb], n * kc, bits).view(route.peers, n, kc)
            offsets = rows[:, cb : cb + ob].contiguous().view(torch.int16)[:, : n * kc].to(torch.int64)
            tails = rows[:, cb + ob :].contiguous().view(torch.float32)
            values = quant.dequantize(got, tails[:, :n], bits).reshape(-1)
            base = torch.arange(n, device=dev).repeat_interleave(kc).mul_(C)
            out.index_add_(0, (offsets + base).reshape(-1), values, alpha=1.0 / route.divisor)
            return Delivery(tails[:, n].sum(), delivered=None if participating else nothing)

        return Launched(guarded, finish)


class ManagerAllReduce(DenseAllReduce):
    """DiLoCo's exchange: ``manager.allreduce`` (a sum over the live replica groups; zeros from a
    group not participating; a failure reported to the manager, not raised), divided by
    ``route.divisor``."""

    name = "torchft-allreduce"

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        work = self.manager.allreduce(u, reduce_op=dist.ReduceOp.SUM)

        def finish() -> Delivery:
            torch.div(u, route.divisor, out=out)
            return Delivery(out.sum() * 0.0, everything=True)

        return Launched(work, finish)


class ReplicaExchange(OuterExchange):
    """One fragment's outer exchange across the replica groups of ``manager``: the selection as in
    :class:`~lightning_gaussk.engine.local.exchange.OuterExchange`, the exchange
    :class:`ManagerAllGather` (sparse, fp32), :class:`ManagerQuantAllGather` (sparse, ``quantize``)
    or :class:`ManagerAllReduce` (dense), on the route of the
    current quorum (:meth:`join`)."""

    def __init__(self, config: LocalSGDConfig, topology: Topology, fragment: Fragment, manager: Any) -> None:
        super().__init__(config, topology, fragment)
        self.manager = manager
        sizes = self.sizes
        if config.outer == "dense":
            self.exchange = ManagerAllReduce(manager)
        elif config.quantize is not None:  # chunk-wise (the config demands chunk): kc entries per chunk
            self.exchange = ManagerQuantAllGather(manager, config.quantize, sizes.chunk or sizes.m, sizes.kc)
        else:
            self.exchange = ManagerAllGather(manager)
        if fragment.e is not None and sizes.chunk is not None and self._chunkwise is None:
            self._chunkwise = ChunkwiseTopK(sizes.n_chunks, sizes.chunk, sizes.kc, fragment.theta.device)
        self.ranks = topology.layout.world_size  # L, the ranks of this replica group
        self.route = Route(None, 1, self.ranks)  # until the first quorum

    def join(self) -> None:
        """After a quorum: the route among its replica groups (the manager's process group, of
        ``pg.size()`` peers; the mean over ``num_participants() L`` ranks)."""
        pg = self.manager._pg
        self.route = Route(pg, int(pg.size()), max(1, int(self.manager.num_participants())) * self.ranks)


# -------------------------------------------------------------------------------- the glue
class ManagedOuterStep:
    """The outer step of one :class:`~lightning_gaussk.SparseLocalSGD` under a ``torchft.Manager``
    (the module docstring has the math and the rules): the quorum at each outer step
    (:meth:`start`), the vote (:meth:`should_commit`), and the state a healing replica group takes
    from a live one (registered with ``manager.register_state_dict_fn`` under :data:`FT_STATE_KEY`).

    Counters: ``quorums`` (outer steps run under a quorum), ``heals`` (times this group took the
    shared state from a peer), ``uncommitted`` (outer steps the vote discarded), ``participants``
    (``num_participants()`` of the last quorum).
    """

    def __init__(self, manager: Any, local: Any) -> None:
        self.manager, self.local = manager, local
        self.quorums = self.heals = self.uncommitted = self.participants = 0
        manager.register_state_dict_fn(FT_STATE_KEY, self.load_state_dict, self.state_dict)

    def describe(self) -> str:
        """The startup line: what each outer step sends across replica groups."""
        local, cfg = self.local, self.local.config
        group = "one process" if local.world_size == 1 else f"{local.world_size} ranks (reduced inside the group first)"
        if cfg.outer == "dense":
            what = f"dense: manager.allreduce of {local.d} fp32 entries ({4 * local.d} B)"
        else:
            bits = f" at {cfg.quantize}-bit values" if cfg.quantize is not None else ""
            what = f"sparse: all-gather of k={local.k} of d={local.d} entries{bits} ({local.outer_bytes} B per message)"
        return (
            f"SparseLocalSGD under torchft: every {cfg.sync_every} optimizer steps an outer step under the manager's "
            f"quorum across replica groups of {group}; {what}; the mean over manager.num_participants(); committed only "
            "when manager.should_commit(); a healing group takes theta, the outer momentum and the step from a peer."
        )

    # ---------------------------------------------------------------- the outer step
    def start(self) -> None:
        """The quorum of this outer step (may heal this group: :meth:`load_state_dict` runs inside),
        then every exchange's route among its groups."""
        heals = self.heals
        self.manager.start_quorum(allow_heal=True)
        if isinstance(self.local.topology, Node):
            self._heal_group(self.heals > heals)
        self.quorums += 1
        self.participants = int(self.manager.num_participants())
        for way in self.local.exchanges:
            way.join()

    def should_commit(self) -> bool:
        """The manager's vote (once per outer step, on every rank of every group)."""
        ok = bool(self.manager.should_commit())
        if not ok:
            self.uncommitted += 1
        return ok

    # ---------------------------------------------------------------- healing
    def _heal_group(self, healed: bool) -> None:
        """A group of ``L`` ranks: torchft heals rank ``l`` from rank ``l`` of a peer, and at the first
        quorum (``init_sync``) the ranks of one group may take different peers, each replica the
        primary of its own ranks. So the group agrees (one all-reduce of three numbers): if any of
        its ranks healed, every rank takes shard ``l`` of ``theta`` and of the outer state from rank
        ``l`` (an all-gather inside the group), and the whole group goes on from ``theta`` with zero
        error feedback and the same counters. Every replica then holds the same ``theta``: shard
        ``l`` is rank ``l``'s primary's everywhere."""
        local, topo = self.local, self.local.topology
        info = torch.tensor([float(healed), local.inner_step, local.window_start], dtype=torch.float64)
        dist.all_reduce(info, op=dist.ReduceOp.MAX, group=topo.intra)
        if not bool(info[0]):
            return
        with torch.no_grad():
            for f in local.fragments:
                for flat in (f.theta, *f.outer.state_dict().values()):
                    _own_shards(f.slot, flat, topo)
                if f.e is not None:
                    f.e.zero_()
                f.last = (None, None, None)
                f.scatter_params(f.theta)
        local.inner_step, local.window_start = int(info[1]), int(info[2])
        if not healed:
            self.heals += 1

    def state_dict(self) -> dict[str, Any]:
        """What a healing group takes: ``theta`` and the outer optimizer's state per fragment (CPU
        copies), the window's counters and the sizes they must fit. No error feedback."""
        local = self.local
        cpu = lambda t: t.detach().to("cpu", copy=True)
        return {
            "d": local.d,
            "outer": local.config.outer,
            "theta": [cpu(f.theta) for f in local.fragments],
            "outer_state": [{key: cpu(t) for key, t in f.outer.state_dict().items()} for f in local.fragments],
            "inner_step": local.inner_step,
            "window_start": local.window_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Heal: ``theta``, the outer optimizer's state and the window's counters from a peer; the
        error feedback starts at zero and the model goes to ``theta`` (this group's window is
        discarded: its pseudo-gradient at this outer step is zero)."""
        local = self.local
        if state.get("d") != local.d or state.get("outer") != local.config.outer or len(state["theta"]) != len(local.fragments):
            raise ValueError(
                f"SparseLocalSGD: the state a torchft peer sent (d={state.get('d')}, outer={state.get('outer')!r}) does not "
                f"fit this replica group (d={local.d}, outer={local.config.outer!r}): every group must build the same model "
                "and options"
            )
        with torch.no_grad():
            for f, theta, outer in zip(local.fragments, state["theta"], state["outer_state"]):
                f.theta.copy_(theta)
                f.outer.load_state_dict({key: t.to(f.theta.device) for key, t in outer.items()})
                if f.e is not None:
                    f.e.zero_()
                f.last = (None, None, None)
                f.scatter_params(f.theta)
        local.inner_step = int(state["inner_step"])
        local.window_start = int(state["window_start"])
        self.heals += 1


def _own_shards(slot: Any, flat: Tensor, topo: Node) -> None:
    """``flat`` (``d`` entries, model order) := every rank's own shard of it, gathered inside the
    group (rank ``l``'s chunk ``l`` of every parameter)."""
    L, s = topo.layout.ranks_per_node, slot.s
    slot.to_chunks(flat)
    slot.shard_out[:s].copy_(slot.full.view(L, s)[topo.layout.local_rank])
    all_gather(slot.node_out, slot.shard_out, group=topo.intra)
    slot.from_chunks(flat)
