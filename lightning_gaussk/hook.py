"""TopK-SGD as a DDP communication hook: ``GaussKState`` plus the plain hook ``gaussk_hook``.

One bucket, one step (``d`` entries, ``W`` ranks, ``k = ceil(density * d)``)::

    u        = grad + residual                      fp32 work buffer, reused between steps
    idx, val = select(u, k)                         exactly k entries (selector by name)
                                                    (one fused pass on CPU: accumulate_select)
    msg      = [val | idx as int32 bits | flag]     ONE fp32 tensor of 2k + 1 entries
    all_gather(msg)                                 ONE async collective of fixed size
    grad     = scatter_add(idx_r, val_r) / W        duplicate indices across ranks add up
    residual = u with u[idx] := 0                   so sent + residual == u, bit for bit

``flag`` is 0 when ``u`` is finite, NaN otherwise (``0 * sum(u)``, or ``0 * sum(val)`` where
the selection is an exact top-k, which always picks non-finite entries first). The gathered flags are added
to the first entry of the result, so a non-finite gradient on any rank shows up on every rank
(as with plain DDP, letting a GradScaler skip the step), and no rank commits its residual for
that step: one bad step cannot poison the error feedback.

Residuals are kept per parameter (the bucket buffer is the concatenation of
``bucket.parameters()``), so they survive DDP's bucket rebuild after the first iteration,
``static_graph``, ``find_unused_parameters`` and any ``bucket_cap_mb``.
"""

import atexit
import itertools
import math
import os
import threading
import time
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_gaussk import costmodel
from lightning_gaussk.config import DENSE_FALLBACKS, GaussKConfig, bucket_k  # noqa: F401 (DENSE_FALLBACKS: old import path)
from lightning_gaussk.selectors import _accumulate as accumulate  # the one formula of u
from lightning_gaussk.selectors import accumulate_select, select
from lightning_gaussk.topology import Layout, resolve_layout
from lightning_gaussk.topology import launcher_ranks_per_node as launcher_ranks_per_node_env

__all__ = ["GaussKState", "gaussk_hook", "validate_config"]

STATE_FORMAT = "lightning_gaussk.state/1"
# torch >= 2.6 renamed all_gather_into_tensor; the old name warns on every call
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# communication callbacks may complete on a backend thread: their counter updates take this lock
# (module level, so a GaussKState stays picklable/deep-copyable)
_TELEMETRY_LOCK = threading.Lock()
# states whose communication callbacks may not be released yet (see GaussKState.wait_idle)
_LIVE: "weakref.WeakSet[GaussKState]" = weakref.WeakSet()
_PENDING_LOCK = threading.Lock()


class _Pending:
    """Lives exactly as long as one communication callback (it is a default argument of it).

    torch's communication thread releases a ``.then()`` callback just *after* the future the hook
    returned is complete, and it needs the GIL to do so. A process that tears down right then
    (interpreter exit, or a gloo group destroyed while the GIL is held) aborts with "terminate
    called without an active exception" or deadlocks. ``GaussKState.wait_idle`` waits until every
    callback is released; it runs at exit and in the strategy's teardown."""

    __slots__ = ("state",)

    def __init__(self, state: "GaussKState") -> None:
        self.state = state
        with _PENDING_LOCK:
            state._inflight = getattr(state, "_inflight", 0) + 1
        _LIVE.add(state)

    def __del__(self) -> None:
        with _PENDING_LOCK:
            self.state._inflight -= 1


@atexit.register
def _drain_at_exit() -> None:
    for state in list(_LIVE):
        state.wait_idle(timeout=2.0)


def validate_config(
    density: Any,
    selector: Any,
    error_feedback: Any,
    warmup_steps: Any,
    warmup_density: Any,
    seed: Any,
    dense_fallback: Any = "auto",
    link_gbit: Any = None,
    **options: Any,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument, the value and what is allowed
    (the checks of :class:`~lightning_gaussk.config.GaussKConfig`, which own them)."""
    GaussKConfig(
        density=density, selector=selector, error_feedback=error_feedback, warmup_steps=warmup_steps,
        warmup_density=warmup_density, seed=seed, dense_fallback=dense_fallback, link_gbit=link_gbit, **options,
    )  # fmt: skip


class _Slot:
    """Per-bucket buffers, valid while the bucket holds the same parameters in the same order."""

    def __init__(self, key: tuple[int, ...], params: list[Tensor], device: torch.device, d: int) -> None:
        self.key = key
        self.numels = [p.numel() for p in params]
        # where each parameter's residual lives in self.residual: (offset, entries)
        self.places = [(o, n) for o, n in zip(itertools.accumulate([0, *self.numels[:-1]]), self.numels)]
        self.residual = torch.zeros(d, dtype=torch.float32, device=device)
        self.work = torch.empty(d, dtype=torch.float32, device=device)  # u, reused every step
        self.out: Tensor | None = None  # fp32 decode buffer for non-fp32 buckets
        # the loss scale the residual is expressed in (see GaussKState.set_loss_scale)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        # momentum correction (GaussKConfig.momentum_correction): the velocity, in the residual's
        # loss scale, and its next value while a step is in flight (None without momentum correction)
        self.velocity: Tensor | None = None
        self.vel_work: Tensor | None = None
        self.k = -1
        self.msg = self.gathered = torch.empty(0, device=device)
        # The last collective's Work. Holding it means the backend thread never drops the last
        # reference to a Work that owns these Python-created tensors: that drop needs the GIL, and
        # at interpreter exit the main thread holds the GIL while joining that very thread
        # (deadlock seen with gloo). It is released here, on the Python side, at the next step.
        self.handle: Any = None

    def message_buffers(self, k: int, world: int) -> tuple[Tensor, Tensor]:
        if k != self.k:  # only changes during density warm-up
            self.k = k
            self.msg = torch.empty(2 * k + 1, dtype=torch.float32, device=self.residual.device)
            self.gathered = torch.empty(world * (2 * k + 1), dtype=torch.float32, device=self.residual.device)
        return self.msg, self.gathered


class GaussKState:
    """State of :func:`gaussk_hook` on one rank: configuration, residuals, counters.

    Args:
        config: the options (:class:`~lightning_gaussk.config.GaussKConfig`); None builds one
            from ``options``.
        process_group: the group to communicate in (default: the world).
        **options: :class:`~lightning_gaussk.config.GaussKConfig` fields (``density``,
            ``selector``, ``error_feedback``, ``warmup_steps``, ``warmup_density``, ``seed``,
            ``dense_fallback``, ``link_gbit``, ...), applied on top of ``config``.

    The options are readable as attributes (``state.density``, ``state.selector``, ...) and as
    ``state.config``. ``dense_fallback="auto"`` sends a bucket dense (allreduce of
    ``grad + residual``, residual reset) when sparse cannot be cheaper: always under
    :func:`lightning_gaussk.costmodel.byte_rule_dense`, and with ``link_gbit`` also when the
    cost model predicts dense faster.

    ``state_dict()`` holds tensors and plain Python values only (``torch.load(weights_only=True)``
    works); residuals are keyed by parameter name, so call :meth:`bind` with the model first.
    """

    def __init__(
        self,
        config: GaussKConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = GaussKConfig(**options)
        elif not isinstance(config, GaussKConfig):
            raise TypeError(
                f"GaussKState: `config` must be a GaussKConfig or None, got {type(config).__name__} {config!r} "
                "(give options as keywords, e.g. GaussKState(density=0.01))"
            )
        elif options:
            config = config.replace(**options)
        self.config = config
        if process_group is not None and (config.hierarchy == "node" or config.ranks_per_node is not None):
            raise ValueError(
                f"GaussKState: `hierarchy` = {config.hierarchy!r} / `ranks_per_node` = {config.ranks_per_node!r} need the "
                "world group (node mode builds its own groups); leave `process_group` None or use hierarchy='flat'"
            )
        self._dense_cache: dict[tuple[int, int, int, str], bool] = {}
        self.process_group = process_group
        self.layout = Layout(1, 0)  # set by setup_layout (before the first step)
        self._layout_ready = False
        self._intra: Any = None  # node mode: this rank's node (L ranks)
        self._inter: Any = None  # node mode: the ranks with this local rank, one per node (N ranks)
        self._numels: dict[str, int] = {}  # name -> numel of the whole parameter
        self.step = 0  # optimizer steps; set by the owner (set_step) or counted per backward
        self._external_step = False
        self.loss_scale = 1.0  # the loss scale of the gradients of the coming backward
        self._scaled = False  # set_loss_scale was called with a scale other than 1
        self._inflight = 0  # communication callbacks not yet released (see wait_idle)
        self._names: dict[int, str] = {}  # id(parameter) -> name
        self._sizes: dict[str, int] = {}  # name -> numel, to check loaded residuals
        self._slots: dict[int, _Slot] = {}  # bucket index -> buffers
        self._home: dict[int, tuple[_Slot, int, int]] = {}  # id(parameter) -> (slot, offset, numel)
        self._pending: dict[str, Tensor] = {}  # loaded residuals not yet placed in a bucket
        self._pending_velocity: dict[str, Tensor] = {}  # loaded velocities (momentum correction) not yet placed
        # cumulative counters (ints, saved in state_dict); per-step figures are differences, see
        # lightning_gaussk.telemetry. *_ns are host wall times, measured on CPU buckets only.
        self.telemetry: dict[str, int] = {
            "hook_calls": 0,
            "bytes_sent": 0,  # this rank's message bytes (values, indices, flag)
            "bytes_dense": 0,  # bytes of the dense buckets it replaced
            "skipped_buckets": 0,
            "entries_sent": 0,  # sum of k
            "entries_total": 0,  # sum of d
            "select_ns": 0,  # time forming u = grad + residual and selecting (CPU buckets only)
            "comm_ns": 0,  # issue of the all-gather -> its completion callback (CPU buckets only)
            "hook_ns": 0,  # time in the hook body, select included (CPU buckets only)
            "dense_buckets": 0,  # buckets sent dense by dense_fallback
            # node mode (zero in flat mode): bytes this rank sends inside its node (reduce-scatter
            # and all-gather) and to other nodes (its message: = bytes_sent), and host times of
            # the stages (CPU buckets only): intra-node collectives, inter-node all-gather, decode
            "bytes_intra": 0,
            "bytes_inter": 0,
            "intra_ns": 0,
            "inter_ns": 0,
            "decode_ns": 0,
        }
        self._capture_next = False
        self.captured: dict[int, dict[str, Any]] = {}
        self._norms_next = False
        self.norms: dict[int, tuple[Tensor, Tensor]] = {}  # bucket index -> (||residual||, ||grad||)

    def __getattr__(self, name: str) -> Any:
        """The options of ``self.config`` as attributes (``state.density``, ...)."""
        if name != "config" and name in GaussKConfig.__dataclass_fields__ and "config" in self.__dict__:
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---------------------------------------------------------------- configuration and steps
    def bind(self, module: nn.Module) -> "GaussKState":
        """Learn parameter names (for ``state_dict``) from ``module`` (a DDP wrapper is unwrapped)."""
        module = getattr(module, "module", module) if isinstance(module, nn.parallel.DistributedDataParallel) else module
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._numels = {n: p.numel() for n, p in module.named_parameters()}
        self._sizes = {n: self.layout.chunk(numel)[1] - self.layout.chunk(numel)[0] for n, numel in self._numels.items()}
        return self

    def setup_layout(self, launcher_ranks_per_node: int | None = None) -> Layout:
        """Decide flat or node mode (``hierarchy``) and build node mode's groups.

        Call it on every rank at the same point, after ``torch.distributed`` is initialised (the
        Lightning strategy and ``register_gaussk`` do; in raw DDP the hook does it at its first
        call). ``launcher_ranks_per_node``: ranks per node as the launcher says (Lightning's
        devices per node); None reads torchrun's ``LOCAL_WORLD_SIZE``. An explicit
        ``ranks_per_node`` wins. ``"auto"`` picks node mode when the job spans more than one node
        of more than one rank (:func:`~lightning_gaussk.topology.resolve_layout`).

        Unless ``hierarchy="flat"``, the ranks compare their proposals (one small all-gather):
        node mode needs the same ``L`` everywhere and node-contiguous ranks (torchrun's
        ``GROUP_RANK == rank // L`` where it is set); otherwise ``"auto"`` falls back to flat
        with a warning and ``"node"`` raises. The choice is logged once, on rank 0.
        """
        cfg = self.config
        if not (dist.is_available() and dist.is_initialized()):
            self.layout, self._layout_ready = Layout(1, 0), True
            return self.layout
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        hint = launcher_ranks_per_node if launcher_ranks_per_node is not None else launcher_ranks_per_node_env()
        layout = resolve_layout(cfg.hierarchy, cfg.ranks_per_node, world, rank, hint)
        reason = f"hierarchy={cfg.hierarchy!r}"
        if cfg.hierarchy != "flat" and world > 1:
            group_rank = os.environ.get("GROUP_RANK")
            contiguous = group_rank is None or layout.ranks_per_node is None or int(group_rank) == layout.node
            votes: list[Any] = [None] * world
            dist.all_gather_object(votes, (layout.ranks_per_node, contiguous), group=group)
            if len(set(votes)) != 1 or not all(ok for _, ok in votes):
                detail = f"ranks per node and node-contiguity differ between ranks: {sorted(set(votes), key=str)}"
                if cfg.hierarchy == "node":
                    raise ValueError(f"GaussKState: `hierarchy` = 'node' cannot be used: {detail}")
                rank_zero_warn(f"GaussK: hierarchy='auto' stays flat: {detail}")
                layout = Layout(world, rank)
        if layout.mode == "node":
            rpn, nodes = layout.ranks_per_node, layout.nodes
            assert rpn is not None
            self._intra, _ = dist.new_subgroups_by_enumeration([[n * rpn + j for j in range(rpn)] for n in range(nodes)])
            self._inter, _ = dist.new_subgroups_by_enumeration([[n * rpn + j for n in range(nodes)] for j in range(rpn)])
        self.layout, self._layout_ready = layout, True
        self._sizes = {n: layout.chunk(numel)[1] - layout.chunk(numel)[0] for n, numel in self._numels.items()}
        rank_zero_info(f"GaussK: {layout.describe()} ({reason}, ranks per node from the launcher: {hint})")
        return layout

    def set_step(self, step: int) -> None:
        """Tell the hook the current optimizer step (the Lightning strategy does this).

        Without it the hook counts synchronising backward passes, which equals optimizer steps
        for DDP with ``no_sync`` accumulation.
        """
        self.step = int(step)
        self._external_step = True

    def set_loss_scale(self, scale: float) -> None:
        """Tell the hook the loss scale ``S`` of the coming backward (``GradScaler.get_scale()``).

        With a GradScaler the hook sees scaled gradients ``S g``. Each bucket's residual is kept
        in the scale it was committed at, ``S_r``, and brought to the current one when used::

            u = S g + (S / S_r) r

        so a scale change (GradScaler's growth or back-off) never mixes units, and a skipped step
        (non-finite) leaves residual and ``S_r`` untouched. ``state_dict()`` stores residuals
        unscaled (``r / S_r``). ``GaussKDDPStrategy`` and ``register_gaussk`` call this every
        step when a scaler is active; call it yourself before ``backward`` in raw DDP.
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"GaussKState.set_loss_scale: `scale` must be a finite number > 0, got {scale!r}")
        self.loss_scale = float(scale)
        self._scaled = self._scaled or self.loss_scale != 1.0

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until torch's communication threads have released every callback of this hook
        (they need the GIL for it, just after a step's gradients are ready). Call it before
        ``dist.destroy_process_group()`` in a raw-DDP script: tearing a gloo group down while a
        release is pending can deadlock or abort the process. It runs by itself at interpreter
        exit and in ``GaussKDDPStrategy.teardown``. Returns False if ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while getattr(self, "_inflight", 0) > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)  # releases the GIL, so the communication thread can finish
        return True

    def density_at(self, step: int) -> float:
        """The density at optimizer step ``step`` (see :meth:`GaussKConfig.density_at`)."""
        return self.config.density_at(step)

    def k_for(self, d: int) -> int:
        """Entries sent for a bucket of ``d`` entries at the current step (:func:`~lightning_gaussk.config.bucket_k`)."""
        return bucket_k(self.density_at(self.step), d)

    def prefer_dense(self, d: int, k: int, world: int, device_type: str) -> bool:
        """Whether a bucket of ``d`` entries goes dense at ``k`` (see ``dense_fallback``).

        A pure function of configuration and shapes, so every rank takes the same branch (they
        must: the two branches call different collectives)."""
        key = (d, k, world, device_type)
        if key not in self._dense_cache:
            dense = False
            if self.dense_fallback == "auto":
                dense = costmodel.byte_rule_dense(d, k, world)
                if not dense and self.link_gbit is not None:
                    link = costmodel.Link.from_gbit(self.link_gbit)
                    dense = costmodel.prefer_dense(d, k, world, link, costmodel.HostCosts.for_device(device_type))
            self._dense_cache[key] = dense
        return self._dense_cache[key]

    def capture_next_step(self) -> None:
        """Ask the hook to keep a copy of every bucket's ``u`` and selection on the next step:
        ``state.captured[bucket_index] = {"u", "indices", "k", "parameters", "grad"}`` (``grad``:
        the bucket's gradient in fp32, so ``residual = u - grad``). Used by
        :class:`~lightning_gaussk.GradientDistributionMonitor`; costs nothing when not asked."""
        self._capture_next = True
        self.captured = {}

    def measure_norms_next_step(self) -> None:
        """Ask the hook to record, on the next step, ``state.norms[bucket_index] =
        (||residual||, ||grad||)`` as 0-d device tensors (two extra read passes per bucket, no
        host sync); the residual is the one carried into that step (``u = grad + residual``)."""
        self._norms_next = True
        self.norms = {}

    def cancel_requests(self) -> None:
        """Withdraw pending :meth:`capture_next_step` / :meth:`measure_norms_next_step` requests
        and drop what was captured (a monitor calls this at teardown)."""
        self._capture_next = False
        self._norms_next = False
        self.captured = {}
        self.norms = {}

    # ---------------------------------------------------------------- residual store
    def _slot_for(self, index: int, params: list[Tensor], d: int, device: torch.device) -> _Slot:
        key = tuple(id(p) for p in params)
        slot = self._slots.get(index)
        if slot is not None and slot.key == key:
            return slot
        # new or rebuilt bucket: carry each parameter's residual over from wherever it lived
        if self.layout.mode == "node":
            from lightning_gaussk.node_mode import NodeSlot

            new: _Slot = NodeSlot(key, params, device, d, self.layout)
        else:
            new = _Slot(key, params, device, d)
        new.scale.fill_(self.loss_scale)
        if self.config.momentum_correction is not None:  # the velocity lives beside the residual
            new.velocity = torch.zeros_like(new.residual)
            new.vel_work = torch.empty_like(new.residual)
        for p, (offset, n) in zip(params, new.places):
            home = self._home.get(id(p))
            for buf, pending in ((new.residual, self._pending), (new.velocity, self._pending_velocity)):
                if buf is None:
                    continue
                seg = buf[offset : offset + n]
                old_buf = None if home is None else (home[0].residual if buf is new.residual else home[0].velocity)
                if home is not None and old_buf is not None:
                    old, off, _ = home
                    if self._scaled:  # the new slot's buffers are in the current loss scale
                        torch.mul(old_buf[off : off + n], self.loss_scale / old.scale, out=seg)
                    else:
                        seg.copy_(old_buf[off : off + n])
                else:
                    loaded = pending.pop(self._names.get(id(p), ""), None)
                    if loaded is not None:  # saved unscaled
                        torch.mul(loaded.reshape(-1), self.loss_scale, out=seg)
            self._home[id(p)] = (new, offset, n)
        self._slots[index] = new
        return new

    def residuals(self) -> dict[str, Tensor]:
        """This rank's residual per parameter name (views into live buffers; do not modify).

        With a loss scale (:meth:`set_loss_scale`) they are in their bucket's loss scale;
        :meth:`state_dict` holds them unscaled."""
        by_id: dict[int, Tensor] = {pid: slot.residual[off : off + n] for pid, (slot, off, n) in self._home.items()}
        out = {self._names[pid]: r for pid, r in by_id.items() if pid in self._names}
        if len(out) != len(by_id):
            raise RuntimeError("GaussKState: residuals of unnamed parameters; call state.bind(model) first")
        return out

    def velocities(self) -> dict[str, Tensor]:
        """This rank's momentum-correction velocity per parameter name (views into live buffers,
        in the same layout and loss scale as :meth:`residuals`); empty without momentum correction."""
        by_id = {pid: slot.velocity[off : off + n] for pid, (slot, off, n) in self._home.items() if slot.velocity is not None}
        return {self._names[pid]: v for pid, v in by_id.items() if pid in self._names}

    # ---------------------------------------------------------------- (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: config, step, counters and fp32 CPU residuals keyed by parameter name
        (and, with momentum correction, the velocities under ``"velocity"``, in the same layout)."""
        residuals = {n: r.detach().to("cpu", copy=True) for n, r in self.residuals().items()}
        velocity = {n: v.detach().to("cpu", copy=True) for n, v in self.velocities().items()}
        if self._scaled:  # saved unscaled: r / S_r of its bucket
            scales = {self._names[pid]: slot.scale for pid, (slot, _, _) in self._home.items() if pid in self._names}
            residuals = {n: r.div_(scales[n].cpu()) for n, r in residuals.items()}
            velocity = {n: v.div_(scales[n].cpu()) for n, v in velocity.items()}
        for n, r in self._pending.items():  # loaded but not yet placed: still owed to training
            residuals.setdefault(n, r.detach().to("cpu", copy=True))
        for n, v in self._pending_velocity.items():
            velocity.setdefault(n, v.detach().to("cpu", copy=True))
        out = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "layout": self.layout.to_dict(),
            "step": self.step,
            "telemetry": dict(self.telemetry),
            "residuals": residuals,
        }
        if velocity:
            out["velocity"] = velocity
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore residuals, step and counters (configuration stays as constructed).

        Residuals of parameters not yet seen in a bucket are placed when their bucket first runs.
        """
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"GaussKState.load_state_dict: `state_dict` is not a {STATE_FORMAT!r} dict "
                f"(format={state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict).__name__!r})"
            )
        residuals = state_dict["residuals"]
        if not isinstance(residuals, dict):
            raise ValueError("GaussKState.load_state_dict: `residuals` must be a dict of tensors")
        cfg = state_dict.get("config", {})
        if cfg.get("error_feedback", True) and not self.error_feedback and residuals:
            warnings.warn("GaussKState: loading residuals into a state with error_feedback=False; they are dropped")
        for name, tensor in residuals.items():  # validate everything before changing anything
            if not isinstance(tensor, Tensor):
                raise ValueError(f"GaussKState.load_state_dict: residual {name!r} is a {type(tensor).__name__}, not a tensor")
            if name in self._sizes and tensor.numel() != self._sizes[name]:
                raise ValueError(
                    f"GaussKState.load_state_dict: residual {name!r} has {tensor.numel()} entries, parameter has {self._sizes[name]}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"GaussKState.load_state_dict: residual {name!r} has non-finite entries (corrupted state?); "
                    "refusing to resume error feedback from it"
                )
        self.step = int(state_dict["step"])
        self.telemetry.update({k: int(v) for k, v in state_dict.get("telemetry", {}).items()})
        if not self.error_feedback:
            return
        by_name = {n: pid for pid, n in self._names.items()}
        for name, tensor in residuals.items():
            pid = by_name.get(name)
            home = self._home.get(pid) if pid is not None else None
            if home is not None:
                slot, off, n = home
                if tensor.numel() != n:
                    raise ValueError(f"GaussKState.load_state_dict: residual {name!r} has {tensor.numel()} entries, parameter has {n}")
                torch.mul(tensor.reshape(-1).to(slot.residual), slot.scale, out=slot.residual[off : off + n])  # to S_r
            else:
                if self._names and name not in by_name:
                    raise ValueError(f"GaussKState.load_state_dict: no parameter named {name!r} in the bound model")
                self._pending[name] = tensor.detach().float().reshape(-1)
        self._load_velocity(state_dict.get("velocity") or {}, by_name)

    def _load_velocity(self, velocity: dict[str, Any], by_name: dict[str, int]) -> None:
        """Momentum correction's velocities (saved unscaled): into live slots, else kept until the
        parameter's bucket first runs (also when momentum correction is enabled only later, as the
        Lightning strategy does when it adapts the optimizer). A velocity whose size does not fit
        (a checkpoint from another layout) is dropped with a warning: it restarts from zero."""
        for name, tensor in velocity.items():
            if not isinstance(tensor, Tensor) or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"GaussKState.load_state_dict: velocity {name!r} is not a finite tensor")
            pid = by_name.get(name)
            home = self._home.get(pid) if pid is not None else None
            size = home[2] if home is not None else self._sizes.get(name)
            if size is not None and tensor.numel() != size:
                warnings.warn(
                    f"GaussKState: saved velocity {name!r} has {tensor.numel()} entries, this rank keeps {size} "
                    "(another layout): momentum correction's velocity restarts from zero"
                )
                continue
            if home is not None and home[0].velocity is not None:
                slot, off, n = home
                torch.mul(tensor.reshape(-1).to(slot.velocity), slot.scale, out=slot.velocity[off : off + n])
            else:
                self._pending_velocity[name] = tensor.detach().float().reshape(-1)


def gaussk_hook(state: GaussKState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """TopK-SGD with error feedback for one DDP bucket (see the module docstring).

    Register with ``ddp_model.register_comm_hook(state, gaussk_hook)``.
    """
    if not state._layout_ready:  # raw DDP: decided at the first call, the same point on every rank
        state.setup_layout()
    if state.layout.mode == "node":
        from lightning_gaussk.node_mode import node_hook

        return node_hook(state, bucket)
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    d = buf.numel()
    timed = buf.device.type == "cpu"  # host clocks mean nothing for asynchronous device work
    t0 = time.perf_counter_ns() if timed else 0
    slot = state._slot_for(bucket.index(), bucket.parameters(), d, buf.device)
    k = state.k_for(d)
    u = slot.work
    scale = slot.scale.reciprocal().mul_(state.loss_scale) if state._scaled else None  # S / S_r, on the device
    grad = buf if slot.velocity is None else _momentum_grad(state, slot, buf, scale)  # DGC: the residual accumulates velocity
    if state.prefer_dense(d, k, world, buf.device.type):
        if state.error_feedback:
            accumulate(slot.residual, grad, scale, out=u)  # u = grad + (S / S_r) residual, fp32
        else:
            u.copy_(grad)
        return _dense_bucket(state, bucket, slot, buf, group, world)
    monitored = state._capture_next or state._norms_next  # _record reads the gradient: keep it
    # the result overwrites the bucket: an fp32 one can be zeroed now, while it is read anyway
    zeroed = buf.dtype == torch.float32 and not monitored and grad is buf
    t1 = time.perf_counter_ns() if timed else 0
    if state.error_feedback:
        values, indices, flag = accumulate_select(
            slot.residual, grad, u, k, state.selector, seed=state.seed + bucket.index(), step=state.step,
            zero_grad=zeroed, scale=scale,
        )  # u = grad + (S / S_r) residual and its top-k (fused on CPU), flag = 0 or NaN
    else:
        u.copy_(grad)
        zeroed = False
        values, indices = select(u, k, state.selector, seed=state.seed + bucket.index(), step=state.step)
        flag = u.sum() * 0.0
    t2 = time.perf_counter_ns() if timed else 0

    msg, gathered = slot.message_buffers(k, world)
    msg[:k].copy_(values)
    msg[k : 2 * k].view(torch.int32).copy_(indices)  # int32 bits ride in the fp32 message
    msg[2 * k].copy_(flag)  # 0 if u is finite, NaN otherwise
    if monitored:  # only on steps a monitor asked for
        _record(state, bucket, slot, buf, u, indices, k)
    tel = state.telemetry
    tel["hook_calls"] += 1
    tel["bytes_sent"] += msg.numel() * 4
    tel["bytes_dense"] += d * buf.element_size()
    tel["entries_sent"] += k
    tel["entries_total"] += d
    _end_bucket(state, bucket)

    t3 = time.perf_counter_ns() if timed else 0
    slot.handle = _all_gather(gathered, msg, group=group, async_op=True)  # see _Slot.handle
    fut = slot.handle.get_future()
    if timed:
        with _TELEMETRY_LOCK:
            tel["select_ns"] += t2 - t1
            tel["hook_ns"] += time.perf_counter_ns() - t0

    def decode(fut: torch.futures.Future[Any], _pending: _Pending = _Pending(state)) -> Tensor:
        if timed:
            dt = time.perf_counter_ns() - t3
            with _TELEMETRY_LOCK:
                tel["comm_ns"] += dt
        fut.value()  # re-raises a failed all-gather (peer died, timeout): never decode a stale buffer
        rows = gathered.view(world, 2 * k + 1)
        vals = rows[:, :k].reshape(-1)
        idx = rows[:, k : 2 * k].reshape(-1).view(torch.int32)
        flag = rows[:, 2 * k].sum()  # NaN if any rank's u was non-finite
        out = buf if buf.dtype == torch.float32 else _fp32_out(slot, d)
        if not zeroed:
            out.zero_()
        out.index_add_(0, idx, vals, alpha=1.0 / world)  # accumulating: duplicates add up
        out[:1].add_(flag)  # propagate non-finiteness to every rank, no host sync
        if out is not buf:
            buf.copy_(out)
        if state.error_feedback:
            _commit_residual(state, slot, indices, flag)
        elif slot.velocity is not None:
            _commit_velocity(state, slot, indices, flag)
        return buf

    return fut.then(decode)


def _end_bucket(state: GaussKState, bucket: dist.GradBucket) -> None:
    """After the last bucket of a backward pass: requests are served, one more optimizer step."""
    if bucket.is_last():
        state._capture_next = False
        state._norms_next = False
        if not state._external_step:
            state.step += 1


def _dense_bucket(
    state: GaussKState, bucket: dist.GradBucket, slot: _Slot, buf: Tensor, group: Any, world: int
) -> torch.futures.Future[Tensor]:
    """``dense_fallback``: allreduce ``u = grad + residual`` (in ``slot.work``); on success the
    residual is all sent, so it becomes zero; a non-finite result (any rank) leaves it untouched."""
    d = buf.numel()
    tel = state.telemetry
    tel["hook_calls"] += 1
    tel["dense_buckets"] += 1
    tel["bytes_sent"] += d * 4
    tel["bytes_dense"] += d * buf.element_size()
    tel["entries_sent"] += d
    tel["entries_total"] += d
    _end_bucket(state, bucket)
    u = slot.work
    slot.handle = dist.all_reduce(u, group=group, async_op=True)  # see _Slot.handle
    fut = slot.handle.get_future()

    def finish(fut: torch.futures.Future[Any], _pending: _Pending = _Pending(state)) -> Tensor:
        fut.value()  # re-raises a failed allreduce
        buf.copy_(u.div_(world))
        if state.error_feedback:
            _clear_residual(state, slot, u.sum())  # one pass: NaN/inf anywhere in the averaged bucket
        elif slot.velocity is not None:
            _commit_velocity(state, slot, None, u.sum())
        return buf

    return fut.then(finish)


def _record(state: GaussKState, bucket: dist.GradBucket, slot: _Slot, buf: Tensor, u: Tensor, indices: Tensor, k: int) -> None:
    """What a monitor asked for on this step: norms (0-d tensors) and/or copies of the bucket."""
    index = bucket.index()
    if state._norms_next:
        state.norms[index] = (
            torch.linalg.vector_norm(slot.residual) if state.error_feedback else torch.zeros((), device=u.device),
            torch.linalg.vector_norm(buf, dtype=torch.float32),
        )
    if state._capture_next:
        state.captured[index] = {
            "u": u.clone(),
            "indices": indices.clone(),
            "k": k,
            "parameters": list(bucket.parameters()),
            "grad": buf.to(torch.float32, copy=True),  # u = grad + residual (residual = u - grad)
        }


def _momentum_grad(state: GaussKState, slot: _Slot, grad: Tensor, scale: Tensor | None) -> Tensor:
    """Momentum correction (DGC): ``vel_work = m (S / S_r) velocity + grad``, what the residual
    accumulates instead of the gradient (``u = vel_work + (S / S_r) residual``). The velocity
    itself changes only when the step is committed (:func:`_commit_residual`)."""
    assert slot.velocity is not None and slot.vel_work is not None
    m = state.config.momentum_correction
    if scale is None:
        torch.mul(slot.velocity, m, out=slot.vel_work)
    else:
        torch.mul(slot.velocity, scale * m, out=slot.vel_work)
    return slot.vel_work.add_(grad)


def _fp32_out(slot: _Slot, d: int) -> Tensor:
    if slot.out is None:
        slot.out = torch.empty(d, dtype=torch.float32, device=slot.residual.device)
    return slot.out


def _commit_residual(state: GaussKState, slot: _Slot, indices: Tensor, flag: Tensor) -> None:
    """residual := u with the sent entries zeroed, unless any rank saw a non-finite ``u``.

    With momentum correction the velocity becomes ``vel_work`` with the sent entries zeroed too
    (DGC's momentum factor masking), under the same condition (:func:`_commit_velocity`)."""
    u = slot.work
    if u.device.type == "cpu":
        if bool(torch.isfinite(flag)):  # a host value already: no sync to avoid
            u.index_fill_(0, indices, 0.0)
            slot.residual, slot.work = u, slot.residual  # swap instead of copying d entries
            slot.scale.fill_(state.loss_scale)
        else:
            state.telemetry["skipped_buckets"] += 1
    else:
        u.index_fill_(0, indices, 0.0)
        ok = torch.isfinite(flag)
        torch.where(ok, u, slot.residual, out=slot.residual)  # stays on the device
        if state._scaled:
            torch.where(ok, state.loss_scale, slot.scale, out=slot.scale)


    if slot.velocity is not None:
        _commit_velocity(state, slot, indices, flag)


def _commit_velocity(state: GaussKState, slot: _Slot, indices: Tensor | None, flag: Tensor) -> None:
    """Momentum correction: velocity := ``vel_work`` with the sent entries zeroed (``indices``;
    None after a dense send, or ``momentum_masking=False``: nothing masked), unless any rank saw a non-finite ``u``; the
    velocity is then in the current loss scale, like the residual."""
    vw = slot.vel_work
    assert slot.velocity is not None and vw is not None
    if vw.device.type == "cpu":
        if bool(torch.isfinite(flag)):
            if indices is not None and state.config.momentum_masking:
                vw.index_fill_(0, indices, 0.0)
            slot.velocity, slot.vel_work = vw, slot.velocity
            slot.scale.fill_(state.loss_scale)
        elif not state.error_feedback:  # else counted with the residual
            state.telemetry["skipped_buckets"] += 1
    else:
        if indices is not None and state.config.momentum_masking:
            vw.index_fill_(0, indices, 0.0)
        ok = torch.isfinite(flag)
        torch.where(ok, vw, slot.velocity, out=slot.velocity)
        torch.where(ok, state.loss_scale, slot.scale, out=slot.scale)


def _clear_residual(state: GaussKState, slot: _Slot, flag: Tensor) -> None:
    """After a dense send (all of ``u`` went out): residual := 0, unless ``flag`` (a sum over
    what every rank sent) is non-finite, when the step is skipped and the residual kept.

    With momentum correction the velocity becomes ``vel_work`` unmasked: a bucket sent dense is
    momentum SGD exactly (masking every entry would drop momentum altogether)."""
    ok = torch.isfinite(flag)
    if slot.residual.device.type == "cpu":
        if bool(ok):
            slot.residual.zero_()
        else:
            state.telemetry["skipped_buckets"] += 1
    else:
        torch.where(ok, 0.0, slot.residual, out=slot.residual)  # no host sync
    if slot.velocity is not None:
        _commit_velocity(state, slot, None, flag)
