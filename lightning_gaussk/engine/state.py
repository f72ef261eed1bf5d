"""``GaussKState``: the state of the core pipeline on one rank.

It owns the parts and the clocks, and little else:

- ``config`` (:class:`~lightning_gaussk.config.GaussKConfig`), whose options also read as
  attributes (``state.density``);
- ``topology`` (:mod:`lightning_gaussk.comm.topology`), resolved once by :meth:`setup_layout`;
- ``store`` (:class:`~lightning_gaussk.engine.store.ResidualStore`): residuals and velocities;
- the clocks: the optimizer ``step`` (density warm-up, randomised selectors) and the loss scale;
- the choice of exchange per bucket (:meth:`exchange_for`: a cached call of the one policy,
  :func:`lightning_gaussk.costs.policy.pick_exchange`);
- monitor requests (capture, norms) and telemetry counters, which the pipeline fills.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch.distributed as dist
from torch import Tensor, nn

from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.config import GaussKConfig, bucket_k
from lightning_gaussk.comm import inflight
from lightning_gaussk.comm.exchange import Exchange
from lightning_gaussk.comm.vote import decide_layout
from lightning_gaussk.costs.policy import pick_exchange
from lightning_gaussk.costs.probe import measure_link
from lightning_gaussk.engine.describe import startup_line
from lightning_gaussk.utils.log import rank_zero_info
from lightning_gaussk.engine.counters import TELEMETRY_COUNTERS
from lightning_gaussk.engine.store import ResidualStore
from lightning_gaussk.comm.topology import Flat, Topology, build_topology
from lightning_gaussk.comm.layout import Layout

__all__ = ["STATE_FORMAT", "GaussKState"]

STATE_FORMAT = "lightning_gaussk.state/1"


class GaussKState:
    """State of the TopK-SGD pipeline (and of :func:`~lightning_gaussk.gaussk_hook`) on one rank.

    Args:
        config: the options (:class:`~lightning_gaussk.config.GaussKConfig`); None builds one
            from ``options``.
        process_group: the group to communicate in (default: the world).
        **options: :class:`~lightning_gaussk.config.GaussKConfig` fields (``density``,
            ``selector``, ``error_feedback``, ``warmup_steps``, ``warmup_density``, ``seed``,
            ``dense_fallback``, ``link_gbit``, ...), applied on top of ``config``.

    The options are readable as attributes (``state.density``, ``state.selector``, ...) and as
    ``state.config``. ``dense_fallback="auto"`` sends a bucket dense (allreduce of
    ``grad + residual``, residual reset) when sparse cannot be cheaper: always under the byte rule
    (:func:`lightning_gaussk.costs.policy.byte_rule`), and with ``link_gbit`` also when the cost
    model predicts dense faster.

    ``state_dict()`` holds tensors and plain Python values only (``torch.load(weights_only=True)``
    works); residuals are keyed by parameter name, so call :meth:`bind` with the model first.
    """

    #: the marker its saved layout carries (None: per-parameter residuals; see lightning_gaussk.checkpoint.reshard)
    sharding: ClassVar[str | None] = None

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
        # parts
        self.process_group = process_group
        self.topology: Topology = Flat(Layout(1, 0), process_group)  # set by setup_layout (before the first step)
        self._layout_ready = False
        self.store = ResidualStore()
        self._numels: dict[str, int] = {}  # name -> numel of the whole parameter
        self._choices: dict[tuple[int, int, int, str, str], Exchange] = {}  # exchange per bucket shape
        self._logged: set[tuple[int, int, str]] = set()
        # the link of the cost model: from link_gbit, or measured by setup_layout (link_gbit="measure")
        self.link: costmodel.Link | None = (
            costmodel.Link.from_gbit(config.link_gbit) if isinstance(config.link_gbit, float) else None
        )
        # clocks
        self.step = 0  # optimizer steps; set by the owner (set_step) or counted per backward
        self._external_step = False
        self.loss_scale = 1.0  # the loss scale of the gradients of the coming backward
        self._scaled = False  # set_loss_scale was called with a scale other than 1
        # observation: counters, and what a monitor asked for
        self._inflight = 0  # communication callbacks not yet released (see wait_idle)
        self.telemetry: dict[str, int] = dict.fromkeys(TELEMETRY_COUNTERS, 0)
        self._capture_next = False
        self.captured: dict[int, dict[str, Any]] = {}
        self._norms_next = False
        self.norms: dict[int, tuple[Tensor, Tensor]] = {}  # bucket index -> (||residual||, ||grad||)

    def __getattr__(self, name: str) -> Any:
        """The options of ``self.config`` as attributes (``state.density``, ...)."""
        if name != "config" and name in GaussKConfig.__dataclass_fields__ and "config" in self.__dict__:
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def layout(self) -> Layout:
        """The job's layout as this rank sees it (flat, or nodes of ``L`` ranks)."""
        return self.topology.layout

    # ---------------------------------------------------------------- configuration and steps
    def bind(self, module: nn.Module) -> GaussKState:
        """Learn parameter names (for ``state_dict``) from ``module`` (a DDP wrapper is unwrapped)."""
        module = getattr(module, "module", module) if isinstance(module, nn.parallel.DistributedDataParallel) else module
        self._numels = {n: p.numel() for n, p in module.named_parameters()}
        self.store.names = {id(p): n for n, p in module.named_parameters()}
        self._resize()
        return self

    def _resize(self) -> None:
        """What each parameter keeps on this rank under the current layout (its chunk in node mode)."""
        chunk = self.layout.chunk
        self.store.sizes = {n: chunk(numel)[1] - chunk(numel)[0] for n, numel in self._numels.items()}

    def setup_layout(self, launcher_ranks_per_node: int | None = None) -> Layout:
        """Decide flat or node mode (``hierarchy``) and build node mode's groups.

        Call it on every rank at the same point, after ``torch.distributed`` is initialised (the
        Lightning strategy and ``register_gaussk`` do; in raw DDP the hook does it at its first
        call). ``launcher_ranks_per_node``: ranks per node as the launcher says (Lightning's
        devices per node); None reads torchrun's ``LOCAL_WORLD_SIZE``. An explicit
        ``ranks_per_node`` wins. ``"auto"`` picks node mode when the job spans more than one node
        of more than one rank (:func:`~lightning_gaussk.comm.layout.resolve_layout`).

        Unless ``hierarchy="flat"``, the ranks vote (:func:`~lightning_gaussk.comm.vote.vote_layout`):
        node mode needs the same ``L`` everywhere and node-contiguous ranks; otherwise ``"auto"``
        falls back to flat with a warning and ``"node"`` raises. The choice is logged once, on
        rank 0 (:func:`~lightning_gaussk.engine.describe.startup_line`).
        """
        cfg = self.config
        layout, hint = decide_layout(cfg.hierarchy, cfg.ranks_per_node, self.process_group, launcher_ranks_per_node)
        if not (dist.is_available() and dist.is_initialized()):
            self.topology, self._layout_ready = Flat(layout, self.process_group), True
            return self.layout
        self.topology = build_topology(layout, self.process_group)
        self._layout_ready = True
        self._resize()
        rank_zero_info(startup_line(cfg, layout, hint))
        if cfg.link_gbit == "measure":
            self._measure_link()
        return layout

    def _measure_link(self) -> None:
        """``link_gbit="measure"``: time the link the exchange runs on (node mode: between nodes),
        once, on every rank; rank 0's fit is broadcast, so every rank prices buckets alike."""
        self.link = measure_link(self.topology)
        self._choices.clear()
        if self.link is None:
            rank_zero_info("GaussK: link_gbit='measure': one rank or one node, no link to measure (byte rule only)")
        else:
            rank_zero_info(
                f"GaussK: link_gbit='measure': {self.link.gbit:.3f} Gbit/s payload, latency {self.link.alpha * 1e6:.0f} us "
                f"({'between nodes' if self.layout.mode == 'node' else 'among all ranks'}); the dense rule and "
                "exchange='auto' use it"
            )

    def set_step(self, step: int) -> None:
        """Tell the hook the current optimizer step (the Lightning strategy does this).

        Without it the hook counts synchronising backward passes, which equals optimizer steps
        for DDP with ``no_sync`` accumulation.
        """
        self.step = int(step)
        self._external_step = True

    def end_backward(self) -> None:
        """The last tensor of a backward pass was handed to the pipeline: monitor requests are
        served, and without :meth:`set_step` one more optimizer step is counted."""
        self._capture_next = False
        self._norms_next = False
        if not self._external_step:
            self.step += 1

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
        return inflight.wait_idle(self, timeout)

    def density_at(self, step: int) -> float:
        """The density at optimizer step ``step`` (see :meth:`GaussKConfig.density_at`)."""
        return self.config.density_at(step)

    def k_for(self, d: int) -> int:
        """Entries sent for a bucket of ``d`` entries at the current step (:func:`~lightning_gaussk.config.bucket_k`)."""
        return bucket_k(self.density_at(self.step), d)

    # ---------------------------------------------------------------- the exchange of a bucket
    def exchange_for(self, d: int, k: int, peers: int, device_type: str, exchange: str | None = None) -> Exchange:
        """The exchange of a bucket of ``d`` entries at ``k`` among ``peers`` (``exchange``: the
        configured one by default): :func:`~lightning_gaussk.costs.policy.pick_exchange` with this
        state's ``dense_fallback``, link (``link_gbit``, or measured at setup: the same on every
        rank), the host costs of ``device_type`` and, in node mode, the ``L`` ranks of a node
        sharing its link. ``exchange="auto"`` logs each choice once per bucket size.

        A pure function of configuration and shapes, cached, so every rank takes the same branch
        (they must: the branches call different collectives)."""
        name = self.config.exchange if exchange is None else exchange
        key = (d, k, peers, device_type, name)
        if key not in self._choices:
            share = self.layout.ranks_per_node or 1  # node mode: a node's L exchanges share its link
            host = costmodel.HostCosts.for_device(device_type)
            decision = pick_exchange(d, k, peers, self.link, host, share, exchange=name, dense_fallback=self.config.dense_fallback)
            self._choices[key] = decision.exchange
            if name == "auto" and (d, peers, decision.name) not in self._logged:
                self._logged.add((d, peers, decision.name))
                rank_zero_info(f"GaussK: exchange='auto' sends buckets of {d} entries (k={k}) among {peers} peers by {decision.name}")
        return self._choices[key]

    # ---------------------------------------------------------------- monitor requests
    def capture_next_step(self) -> None:
        """Ask the hook to keep a copy of every bucket's ``u`` and selection on the next step:
        ``state.captured[bucket_index] = {"u", "indices", "k", "parameters", "grad", "places"}``
        (``grad``: the bucket's gradient in fp32, so ``residual = u - grad``; in node mode this
        rank's shard of both, each parameter's chunk at ``places``). Used by
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

    # ---------------------------------------------------------------- residuals
    def residuals(self) -> dict[str, Tensor]:
        """This rank's residual per parameter name (views into live buffers; do not modify).

        With a loss scale (:meth:`set_loss_scale`) they are in their bucket's loss scale;
        :meth:`state_dict` holds them unscaled."""
        return self.store.residuals()

    def velocities(self) -> dict[str, Tensor]:
        """This rank's momentum-correction velocity per parameter name (views into live buffers,
        in the same layout and loss scale as :meth:`residuals`); empty without momentum correction."""
        return self.store.velocities()

    # ---------------------------------------------------------------- (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: config, step, counters and fp32 CPU residuals keyed by parameter name
        (and, with momentum correction, the velocities under ``"velocity"``, in the same layout)."""
        residuals, velocity = self.store.export(self._scaled)
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
        if isinstance(state_dict.get("layout"), dict) and state_dict["layout"].get("sharding"):
            raise ValueError(
                f"GaussKState.load_state_dict: `state_dict` holds {state_dict['layout']['sharding']!r} shards of an FSDP2 "
                "model (lightning_gaussk.engine.fsdp); they cannot be loaded into a DDP hook state"
            )
        residuals = state_dict["residuals"]
        if not isinstance(residuals, dict):
            raise ValueError("GaussKState.load_state_dict: `residuals` must be a dict of tensors")
        cfg = state_dict.get("config", {})
        if cfg.get("error_feedback", True) and not self.error_feedback and residuals:
            warnings.warn("GaussKState: loading residuals into a state with error_feedback=False; they are dropped")
        self.store.validate(residuals, state_dict.get("velocity") or {})  # everything is checked before anything changes
        self.step = int(state_dict["step"])
        self.telemetry.update({k: int(v) for k, v in state_dict.get("telemetry", {}).items()})
        if self.error_feedback:
            self.store.load(residuals, state_dict.get("velocity") or {})
