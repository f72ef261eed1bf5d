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

The engine is the one of the per-step hook: ``k`` from :func:`~lightning_gaussk.config.bucket_k`;
whole-tensor selection by the registered selectors (``selector``, exact-k); the exchanges of
:mod:`lightning_gaussk.comm.exchange` (``"allgather"``, the bounded ``"allreduce"``) or the
quantised all-gather of :mod:`lightning_gaussk.comm.quant`; the byte rule of
:mod:`lightning_gaussk.costs.model` (dense when sparse would not move fewer bytes); node mode
(:meth:`~lightning_gaussk.engine.state.GaussKState.setup_layout`: the pseudo-gradient is summed
inside each node, each rank keeps the error feedback of its ``1/L`` shard, and only the outer
exchange crosses nodes).

Collectives: the outer step issues the same collectives in the same order on every rank (node
mode: reduce-scatter, exchange, all-gather); every size is fixed by ``(k, d, P)`` at
construction. Buffers are allocated once. One scalar is read from the device per outer step: the
sum of every rank's non-finite flag (each message carries its rank's), the same on every rank.
Non-finite anywhere skips the outer step on every rank (``theta``, ``e`` and the momentum kept,
every rank back on ``theta``, the diverged rank's inner optimizer state reset).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.config import GaussKConfig, bucket_k
from lightning_gaussk.comm.exchange import Delivery, Exchange, Launched, Route, Selection, get_exchange
from lightning_gaussk.utils.log import rank_zero_warn
from lightning_gaussk.comm.quant import BITS, MAX_CHUNK, QuantAllGather
from lightning_gaussk.comm.sparse_allreduce import _Done
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.comm.topology import Node, NodeSlot
from lightning_gaussk.selection.selectors import available_selectors, select
from lightning_gaussk.comm.layout import Layout

__all__ = ["LOCAL_SGD_COUNTERS", "LOCAL_SGD_FORMAT", "SparseLocalSGD", "local_grad_hook"]

LOCAL_SGD_FORMAT = "lightning_gaussk.engine.local_sgd/1"
OUTERS = ("sparse", "dense")
EXCHANGES = ("allgather", "allreduce")
#: cumulative counters of :attr:`SparseLocalSGD.telemetry` (ints)
LOCAL_SGD_COUNTERS = (
    "inner_steps",  # optimizer steps seen
    "outer_steps",  # outer steps run (skipped ones included)
    "skipped_outer_steps",  # outer steps skipped on every rank: a rank's pseudo-gradient was non-finite
    "dense_outer_steps",  # outer steps sent dense (outer="dense", or the byte rule)
    "bytes_sent",  # this rank's message bytes of the outer exchange
    "bytes_wire",  # bytes this rank puts on the wire in it (ring algorithms)
    "bytes_intra",  # node mode: bytes sent inside the node (reduce-scatter, all-gather)
    "entries_sent",  # entries of u offered per outer step, summed
    "outer_ns",  # host wall time in outer steps
)


class SparseLocalSGD:
    """Local SGD with a sparse (SparseLoCo) or dense (DiLoCo) outer step, hooked on ``optimizer``.

    The user's loop does not change: the outer step runs from a post-step hook of the optimizer
    (``optimizer.register_step_post_hook``) after every ``sync_every``-th ``optimizer.step()``.
    Construction broadcasts rank 0's parameters (every rank starts from the same ``theta``).

    Args:
        model: the plain module (not wrapped in DDP); its trainable parameters are averaged.
            Buffers (batch-norm statistics) stay local.
        optimizer: the inner optimizer over ``model``'s parameters (its state stays local).
        sync_every: ``H``, optimizer steps between outer steps (>= 1).
        density: fraction of the entries sent per outer step, ``k = ceil(density * d)`` (per
            chunk with ``chunk``), in (0, 1]. Ignored by ``outer="dense"``.
        outer_lr: ``alpha``, the outer learning rate (> 0).
        ef_decay: ``beta``, the decay of the error-feedback buffer, in [0, 1] (sparse only).
        outer: ``"sparse"`` (SparseLoCo) or ``"dense"`` (DiLoCo, outer Nesterov momentum).
        chunk: entries per chunk of a chunk-wise exact top-k (None: one whole-tensor selection
            by ``selector``); at most 32768 with ``quantize``.
        quantize: None, 2 or 8: bits per sent value, one fp32 scale per chunk (needs ``chunk``
            and ``exchange="allgather"``); the rounding error stays in the buffer.
        selector: the whole-tensor selection method (``chunk=None``): a registered selector.
        exchange: ``"allgather"`` or the bounded ``"allreduce"``.
        dense_fallback: ``"auto"``: the byte rule sends the step dense when sparse cannot move
            fewer bytes (everything delivered, the buffer emptied); ``"never"``.
        outer_momentum: ``mu`` of ``outer="dense"`` (Nesterov), in [0, 1).
        hierarchy, ranks_per_node: node mode, as for :class:`~lightning_gaussk.GaussKState`.
        process_group: the group to average over (None: the world; flat mode only).
        seed: seed of randomised selectors.
        launcher_ranks_per_node: ranks per node as the launcher says (node mode under
            ``hierarchy="auto"``; None reads torchrun's ``LOCAL_WORLD_SIZE``).

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
        print(local.bytes_per_inner_step)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sync_every: int = 16,
        density: float = 0.02,
        outer_lr: float = 1.0,
        ef_decay: float = 0.95,
        outer: Literal["sparse", "dense"] = "sparse",
        *,
        chunk: int | None = 4096,
        quantize: int | None = None,
        selector: str = "gaussk",
        exchange: str = "allgather",
        dense_fallback: Literal["auto", "never"] = "auto",
        outer_momentum: float = 0.9,
        hierarchy: Literal["auto", "flat", "node"] = "auto",
        ranks_per_node: int | None = None,
        process_group: Any = None,
        seed: int = 0,
        launcher_ranks_per_node: int | None = None,
    ) -> None:
        _check_modules(model, optimizer)
        _check_numbers(sync_every, density, outer_lr, ef_decay, outer_momentum)
        _check_choices(outer, chunk, quantize, selector, exchange, dense_fallback)
        self.model, self.optimizer = model, optimizer
        self.sync_every, self.density, self.outer_lr, self.ef_decay = int(sync_every), float(density), float(outer_lr), float(ef_decay)
        self.outer, self.chunk, self.quantize, self.selector = outer, chunk, quantize, selector
        self.exchange_name, self.dense_fallback, self.outer_momentum = exchange, dense_fallback, float(outer_momentum)
        self.seed = seed
        # the layout (flat or node mode) by the engine's one rule, on every rank at the same point
        self._engine = GaussKState(
            GaussKConfig(density=density, selector=selector, exchange=exchange, hierarchy=hierarchy,
                         ranks_per_node=ranks_per_node, seed=seed, dense_fallback=dense_fallback),
            process_group=process_group,
        )  # fmt: skip
        self._engine.setup_layout(launcher_ranks_per_node)
        self.topology = self._engine.topology
        self.process_group = process_group
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self._build_buffers()
        self.inner_step = 0  # optimizer steps so far (the window position is inner_step % sync_every)
        self.telemetry: dict[str, int] = dict.fromkeys(LOCAL_SGD_COUNTERS, 0)
        self._pending_local: dict[str, Any] | None = None
        self._broadcast_start()
        self._handle = optimizer.register_step_post_hook(self._after_step)

    # ---------------------------------------------------------------- construction
    def _build_buffers(self) -> None:
        """Every buffer of the outer step, once: theta, the pseudo-gradient, the error feedback
        (padded to whole chunks), the update, Nesterov's momentum; the exchange and its sizes."""
        dev = self.params[0].device
        self.d = d = sum(p.numel() for p in self.params)
        self._theta = torch.empty(d, dtype=torch.float32, device=dev)
        self._delta = torch.empty(d, dtype=torch.float32, device=dev)
        self._slot: NodeSlot | None = None
        if isinstance(self.topology, Node):
            slot = self.topology.make_slot(tuple(id(p) for p in self.params), self.params, dev, d)
            assert isinstance(slot, NodeSlot)
            self._slot = slot
        self.d_local = self._slot.s if self._slot is not None else d
        route = self.topology.route
        C = self.chunk
        if self.outer == "dense":
            self.m, self.n_chunks, self.k = self.d_local, 1, self.d_local
            self._exchange: Exchange = get_exchange("dense")
        else:
            if C is None:
                self.m, self.n_chunks = self.d_local, 1
                self.k = bucket_k(self.density, self.m)
                self.kc = self.k
            else:
                C = min(C, self.d_local)
                self.chunk = C
                self.n_chunks = -(-self.d_local // C)
                self.m = self.n_chunks * C
                self.kc = bucket_k(self.density, C)
                self.k = self.n_chunks * self.kc
            self._exchange = self._pick_exchange(route)
        self._cache: dict[str, Tensor] = {}
        self._momentum = torch.zeros(d, dtype=torch.float32, device=dev) if self.outer == "dense" else None
        self._e = torch.zeros(self.m, dtype=torch.float32, device=dev) if self.outer == "sparse" else None
        self._update = torch.zeros(self.m, dtype=torch.float32, device=dev)
        self._u = torch.zeros(self.m, dtype=torch.float32, device=dev) if self.outer == "sparse" else None  # beta e + Delta
        self._flags = torch.zeros(2, dtype=torch.float32, device=dev)  # [this rank's, every rank's]: 0 or NaN
        if self.outer == "sparse" and self._exchange.sparse and C is not None:
            n, kc = self.n_chunks, self.kc
            self._absbuf = torch.empty(n, C, dtype=torch.float32, device=dev)
            self._topv = torch.empty(n, kc, dtype=torch.float32, device=dev)
            self._topi = torch.empty(n, kc, dtype=torch.int64, device=dev)
            self._vals = torch.empty(n * kc, dtype=torch.float32, device=dev)
            self._base = torch.arange(n, device=dev).mul_(C).unsqueeze(1)
            self._idx = torch.empty(n, kc, dtype=torch.int64, device=dev)
        self._last: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)
        self._offsets: list[int] = []
        off = 0
        for p in self.params:
            self._offsets.append(off)
            off += p.numel()

    def _pick_exchange(self, route: Route) -> Exchange:
        """The sparse exchange, or dense by the byte rule (a pure function of ``(k, m, P)``: the
        same choice on every rank)."""
        if self.quantize is not None:
            sparse: Exchange = QuantAllGather(self.quantize, self.chunk or self.m, self.kc)
        else:
            sparse = get_exchange(self.exchange_name)
        if not (dist.is_available() and dist.is_initialized()):
            return _Alone()  # one process, no process group: the mean of one rank is its own u
        if self.dense_fallback == "never" or route.peers == 1:
            return sparse
        if self.quantize is not None:
            dense = sparse.wire_bytes(self.k, self.m, route.peers) >= costmodel.exchange_bytes("dense", self.m, 1, route.peers)
        else:
            dense = costmodel.dense_wins(self.m, self.k, route.peers, exchange=self.exchange_name)
        return get_exchange("dense") if dense else sparse

    def _broadcast_start(self) -> None:
        """theta := rank 0's parameters, on every rank (as DDP does at construction)."""
        self._gather_params(self._theta)
        if self.world_size > 1:
            src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
            dist.broadcast(self._theta, src=src, group=self.process_group)
        self._scatter_params(self._theta)

    # ---------------------------------------------------------------- read API
    @property
    def layout(self) -> Layout:
        """This rank's layout (flat, or nodes of ``L`` ranks)."""
        return self.topology.layout

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def sparse(self) -> bool:
        """Whether the outer exchange is sparse (False: DiLoCo, or the byte rule chose dense)."""
        return self._exchange.sparse

    @property
    def window_position(self) -> int:
        """Optimizer steps taken in the current ``H``-step window (0 right after an outer step)."""
        return self.inner_step % self.sync_every

    def global_params(self) -> Tensor:
        """``theta`` (fp32, the parameters concatenated in model order): a copy."""
        return self._theta.clone()

    def error_feedback(self) -> Tensor:
        """This rank's error-feedback buffer ``e`` (its local entries: the whole model in flat
        mode, its shard in node mode): a copy; zeros for ``outer="dense"``."""
        if self._e is None:
            return torch.zeros(self.d_local)
        return self._e[: self.d_local].clone()

    def last_sent(self) -> Tensor:
        """What this rank contributed in the last outer step, as a dense vector of its local
        entries (``u`` where delivered, dequantised values with ``quantize``): a new tensor."""
        out = torch.zeros(self.m, dtype=torch.float32, device=self._update.device)
        idx, vals, delivered = self._last
        if idx is not None and vals is not None:
            v = vals if delivered is None else torch.where(delivered, vals, 0.0)
            out.index_add_(0, idx, v)
        return out[: self.d_local]

    @property
    def outer_bytes(self) -> int:
        """Bytes of this rank's message(s) per outer step (fixed by ``(k, d, P)``)."""
        return self._exchange.message_bytes(self.k, self.m, self.topology.route.peers)

    @property
    def outer_wire_bytes(self) -> int:
        """Bytes this rank puts on the wire per outer step (ring algorithms; node mode: between nodes)."""
        return self._exchange.wire_bytes(self.k, self.m, self.topology.route.peers)

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
        among its peers; host work excluded)."""
        peers = self.topology.route.peers
        if peers == 1 or self.outer_bytes == 0:
            return 0.0
        if not self._exchange.sparse:
            return costmodel.allreduce_time(4 * self.m, peers, link)
        if self.exchange_name == "allreduce" and self.quantize is None:  # an all-to-all, then an all-gather
            return 2 * (peers - 1) * link.alpha + self.outer_wire_bytes * link.beta
        return costmodel.allgather_time(self.outer_bytes, peers, link)

    # ---------------------------------------------------------------- the hook
    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.inner_step += 1
        self.telemetry["inner_steps"] += 1
        if self.inner_step % self.sync_every == 0:
            self.outer_step()

    def remove(self) -> None:
        """Unhook from the optimizer (the model keeps its current parameters)."""
        self._handle.remove()

    def outer_step(self) -> None:
        """One outer step now (the hook calls it every ``sync_every`` optimizer steps; a collective).

        1. pseudo-gradient  ``Delta = theta - theta_r`` (node mode: summed in the node, this rank's
           shard); this rank's flag, 0 or NaN if its ``Delta`` is non-finite
        2. sparse: ``u = beta e + Delta``; select ``k`` of ``u``; exchange (with the flag);
           dense: all-reduce mean of ``Delta``
        3. node mode: all-gather of the shards' updates and flags
        4. agreement: the flags of every rank, summed (read once on the host). Finite:
           ``e = u - sent`` (0 when the byte rule sent it dense), ``theta -= alpha update``
           (dense: Nesterov). Non-finite anywhere: the step is skipped on every rank: ``theta``,
           ``e`` and the outer momentum stay as they were, and a rank whose own ``Delta`` was
           non-finite resets its inner optimizer's state (counted in ``skipped_outer_steps``,
           with a warning)
        5. every rank copies ``theta`` into its model
        """
        t0 = time.perf_counter_ns()
        topo, route = self.topology, self.topology.route
        flags = self._flags  # [this rank's flag, every rank's]
        # Step 1: the pseudo-gradient and this rank's flag
        delta = self._delta
        self._gather_params(delta)
        torch.sub(self._theta, delta, out=delta)
        torch.mul(delta.sum(), 0.0, out=flags[0])
        local = topo.enter(self._slot, delta) if self._slot is not None else delta  # type: ignore[arg-type]
        # Step 2: the exchange
        tel, dl = self.telemetry, self.d_local
        sel: Selection | None = None
        if self._e is not None:
            u = self._u
            assert u is not None
            torch.mul(self._e[:dl], self.ef_decay, out=u[:dl]).add_(local)  # padding stays 0
            sel = self._select(u) if self._exchange.sparse else None
            launched = self._exchange.launch(u, sel, self._update.zero_() if sel is not None else self._update, route, self._cache)
            launched.work.wait()
            delivery = launched.finish()
            local.copy_(self._update[:dl])
            tel["entries_sent"] += self.k if sel is not None else self.m
        else:
            launched = self._exchange.launch(local, None, local, route, self._cache)
            launched.work.wait()
            delivery = launched.finish()
            tel["entries_sent"] += dl
        tel["bytes_sent"] += self.outer_bytes
        tel["bytes_wire"] += self.outer_wire_bytes
        torch.add(delivery.flag, flags[0], out=flags[1])  # this rank's flag also where a dense sum hides it
        # Step 3: topology out (node mode)
        if self._slot is not None:
            work = topo.leave(self._slot, local, flags[1])
            work.wait()
            flags[1].copy_(topo.arrive(self._slot, delta, local, flags[1]))
            tel["bytes_intra"] += topo.intra_bytes(self._slot)
        # Step 4: agreement, then commit or skip
        own, everywhere = flags.tolist()  # the one host read of the outer step: the same sum on every rank
        if math.isfinite(everywhere):
            self._commit(sel, delivery, delta)
        else:
            self._skip(math.isfinite(own))
        # Step 5: theta into every rank's model
        self._scatter_params(self._theta)
        tel["outer_steps"] += 1
        tel["outer_ns"] += time.perf_counter_ns() - t0

    def _commit(self, sel: Selection | None, delivery: Delivery, update: Tensor) -> None:
        """Step 4, every rank finite: the error feedback keeps what was not sent, ``theta`` moves."""
        if self._e is not None:
            if sel is not None:  # e := u - sent (exactly 0 where the exact value was delivered)
                sent = sel.values if delivery.delivered is None else torch.where(delivery.delivered, sel.values, 0.0)
                self._u.index_add_(0, sel.indices, sent, alpha=-1.0)
                self._e, self._u = self._u, self._e
                self._e[self.d_local :].zero_()  # padding stays 0 (a quantised 0 is not 0)
                self._last = (sel.indices, sel.values, delivery.delivered)
            else:  # the byte rule sent everything, dense
                self._e.zero_()
                self._last = (None, None, None)
        if not self._exchange.sparse:
            self.telemetry["dense_outer_steps"] += 1
        if self._momentum is not None:
            mu = self.outer_momentum
            self._momentum.mul_(mu).add_(update)
            update.add_(self._momentum, alpha=mu)  # Nesterov: g + mu m
        self._theta.sub_(update, alpha=self.outer_lr)

    def _skip(self, own_finite: bool) -> None:
        """Step 4, a non-finite pseudo-gradient somewhere: nothing of this step is kept."""
        self._last = (None, None, None)
        self.telemetry["skipped_outer_steps"] += 1
        t = self.telemetry["outer_steps"] + 1
        if not own_finite:
            self.optimizer.state.clear()  # its moments may be non-finite: it starts afresh from theta
            warnings.warn(
                f"SparseLocalSGD: rank {self.layout.rank}'s pseudo-gradient is non-finite at outer step {t}: the outer "
                "step is skipped on every rank (theta, error feedback and outer momentum unchanged), every rank restarts "
                "from theta, and this rank's inner optimizer state was reset.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            rank_zero_warn(f"SparseLocalSGD: outer step {t} skipped on every rank: another rank's pseudo-gradient is non-finite.", RuntimeWarning)

    def _select(self, e: Tensor) -> Selection:
        """Exactly ``k`` entries of ``e``: ``kc`` per chunk (exact top-k of ``|e|`` per chunk, in
        chunk order), or a whole-tensor selection by ``selector``."""
        if self.chunk is None:
            values, indices = select(e, self.k, self.selector, seed=self.seed, step=self.telemetry["outer_steps"])
            return Selection(values.to(torch.float32), indices, self._flags[0], self.m)
        grid = e.view(self.n_chunks, self.chunk)
        torch.abs(grid, out=self._absbuf)
        torch.topk(self._absbuf, self.kc, dim=1, sorted=False, out=(self._topv, self._topi))
        torch.gather(grid, 1, self._topi, out=self._vals.view(self.n_chunks, self.kc))
        torch.add(self._topi, self._base, out=self._idx)
        return Selection(self._vals, self._idx.view(-1), self._flags[0], self.m)

    def _gather_params(self, out: Tensor) -> None:
        with torch.no_grad():
            for p, off in zip(self.params, self._offsets):
                out[off : off + p.numel()].copy_(p.reshape(-1))

    def _scatter_params(self, src: Tensor) -> None:
        with torch.no_grad():
            for p, off in zip(self.params, self._offsets):
                p.copy_(src[off : off + p.numel()].view_as(p))

    # ---------------------------------------------------------------- checkpoints
    def _per_name(self, flat: Tensor, local_layout: bool) -> dict[str, Tensor]:
        """``flat`` cut per parameter name: in model order (``local_layout=False``, ``d`` entries),
        or in this rank's error-feedback layout (its shard's places in node mode)."""
        out: dict[str, Tensor] = {}
        for i, ((name, p), off) in enumerate(zip(self.named, self._offsets)):
            if local_layout and self._slot is not None:
                so, n = self._slot.places[i]
                out[name] = flat[so : so + n]
            else:
                out[name] = flat[off : off + p.numel()]
        return out

    def state_dict(self, *, shared: bool = True, local: bool = True) -> dict[str, Any]:
        """What resumes the outer loop exactly (plain values and CPU tensors, ``weights_only``-safe).

        - always: the format, the layout, the configuration, ``inner_step`` (so a resume in the
          middle of a window continues it), the telemetry and this rank's error-feedback
          buffer ``"residuals"`` (per parameter name; node mode: this rank's chunk);
        - ``shared``: ``"global"`` (``theta``) and ``"momentum"`` (DiLoCo), the same on every rank;
        - ``local``: this rank's ``"local"`` parameters and inner ``"optimizer"`` state (they
          differ between ranks inside a window).

        Save it on every rank (one file per rank); load it with :meth:`load_state_dict`."""
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        sd: dict[str, Any] = {
            "format": LOCAL_SGD_FORMAT,
            "layout": self.layout.to_dict(),
            "config": self._config(),
            "inner_step": self.inner_step,
            "telemetry": dict(self.telemetry),
            "residuals": {} if self._e is None else {n: cpu(t) for n, t in self._per_name(self._e, True).items()},
        }
        if shared:
            sd["global"] = {n: cpu(t) for n, t in self._per_name(self._theta, False).items()}
            if self._momentum is not None:
                sd["momentum"] = {n: cpu(t) for n, t in self._per_name(self._momentum, False).items()}
        if local:
            sd["local"] = {n: cpu(p) for n, p in self.named}
            sd["optimizer"] = self.optimizer.state_dict()
        return sd

    def _config(self) -> dict[str, Any]:
        return {
            "sync_every": self.sync_every, "density": self.density, "outer": self.outer, "chunk": self.chunk,
            "quantize": self.quantize, "exchange": self.exchange_name, "d": self.d,
        }  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any], *, defer_local: bool = False) -> None:
        """Restore :meth:`state_dict` (saved on the same layout, with the same outer settings).

        ``defer_local``: keep the ``"local"`` parameters and ``"optimizer"`` state until
        :meth:`apply_local` (integrations whose framework loads rank 0's model and optimizer after
        this call). Raises ``ValueError`` naming what does not fit, before anything changes."""
        self._validate_state(state_dict)
        with torch.no_grad():
            if self._e is not None:
                for name, t in self._per_name(self._e, True).items():
                    t.copy_(state_dict["residuals"][name].reshape(-1))
            if "global" in state_dict:
                for name, t in self._per_name(self._theta, False).items():
                    t.copy_(state_dict["global"][name].reshape(-1))
            if self._momentum is not None and "momentum" in state_dict:
                for name, t in self._per_name(self._momentum, False).items():
                    t.copy_(state_dict["momentum"][name].reshape(-1))
        self.inner_step = int(state_dict["inner_step"])
        self.telemetry.update({k: int(v) for k, v in state_dict.get("telemetry", {}).items() if k in self.telemetry})
        local = {k: state_dict[k] for k in ("local", "optimizer") if k in state_dict}
        if not local and "global" in state_dict:  # no local state: start from theta (as after an outer step)
            self._scatter_params(self._theta)
        self._pending_local = local or None
        if not defer_local:
            self.apply_local()

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
                "local SGD state resumes on the same layout only (error feedback and local models are per rank)"
            )
        mine = self._config()
        theirs = sd.get("config", {})
        differ = [k for k in ("d", "outer", "chunk") if theirs.get(k) != mine[k]]
        if differ:
            raise ValueError(f"SparseLocalSGD.load_state_dict: saved with {[(k, theirs.get(k)) for k in differ]}, now {[(k, mine[k]) for k in differ]}")
        for key, tensors, local_layout in (("residuals", self._e, True), ("global", self._theta, False), ("momentum", self._momentum, False)):
            if tensors is None or key not in sd:
                continue
            for name, t in self._per_name(tensors, local_layout).items():
                got = sd[key].get(name)
                if not isinstance(got, Tensor) or got.numel() != t.numel():
                    raise ValueError(f"SparseLocalSGD.load_state_dict: {key} {name!r} is missing or has the wrong size")
        if "local" in sd:
            for name, p in self.named:
                got = sd["local"].get(name)
                if not isinstance(got, Tensor) or got.numel() != p.numel():
                    raise ValueError(f"SparseLocalSGD.load_state_dict: local parameter {name!r} is missing or has the wrong size")


def local_grad_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """A DDP comm hook that communicates nothing: every rank keeps its own gradient (local SGD
    averages models every ``sync_every`` steps instead of gradients every step).

    Example::

        ddp.register_comm_hook(None, local_grad_hook)
    """
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# DDP checks the hook's annotations against the real classes (this module's are strings)
local_grad_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


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


# -------------------------------------------------------------------------------- argument checks
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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_numbers(sync_every: Any, density: Any, outer_lr: Any, ef_decay: Any, outer_momentum: Any) -> None:
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"SparseLocalSGD: `sync_every` must be an int >= 1, got {sync_every!r}")
    if not _is_number(density) or not 0 < density <= 1:
        raise ValueError(f"SparseLocalSGD: `density` must be a number in (0, 1], got {density!r}")
    if not _is_number(outer_lr) or not outer_lr > 0:
        raise ValueError(f"SparseLocalSGD: `outer_lr` must be a number > 0, got {outer_lr!r}")
    if not _is_number(ef_decay) or not 0 <= ef_decay <= 1:
        raise ValueError(f"SparseLocalSGD: `ef_decay` must be a number in [0, 1], got {ef_decay!r}")
    if not _is_number(outer_momentum) or not 0 <= outer_momentum < 1:
        raise ValueError(f"SparseLocalSGD: `outer_momentum` must be a number in [0, 1), got {outer_momentum!r}")


def _check_choices(outer: Any, chunk: Any, quantize: Any, selector: Any, exchange: Any, dense_fallback: Any) -> None:
    if outer not in OUTERS:
        raise ValueError(f"SparseLocalSGD: `outer` must be one of {OUTERS}, got {outer!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"SparseLocalSGD: `chunk` must be an int >= 1 or None, got {chunk!r}")
    if quantize is not None:
        if quantize not in BITS or isinstance(quantize, bool):
            raise ValueError(f"SparseLocalSGD: `quantize` must be None or one of {BITS} (bits per value), got {quantize!r}")
        if chunk is None or chunk > MAX_CHUNK:
            raise ValueError(f"SparseLocalSGD: `quantize` needs `chunk` in [1, {MAX_CHUNK}] (one scale per chunk), got chunk={chunk!r}")
        if exchange != "allgather":
            raise ValueError(f"SparseLocalSGD: `quantize` works with exchange='allgather' only, got exchange={exchange!r}")
    if selector not in available_selectors():
        raise ValueError(f"SparseLocalSGD: `selector` must be one of {available_selectors()}, got {selector!r}")
    if exchange not in EXCHANGES:
        raise ValueError(f"SparseLocalSGD: `exchange` must be one of {EXCHANGES}, got {exchange!r}")
    if dense_fallback not in ("auto", "never"):
        raise ValueError(f"SparseLocalSGD: `dense_fallback` must be 'auto' or 'never', got {dense_fallback!r}")
