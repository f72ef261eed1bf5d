"""The Fabric strategies: ``L.Fabric(strategy="gaussk_ddp")`` and its siblings, in Fabric's own
registry (``lightning.fabric.strategies.STRATEGY_REGISTRY``) under the Trainer's names. Wiring only.

Fabric's strategies are not the Trainer's (``lightning.fabric.strategies``, another registry), and
Fabric's ``DDPStrategy`` takes no comm hook (Lightning#18581). So each strategy here registers its
hook itself, where Fabric wraps the model:

- :class:`GaussKFabricDDPStrategy` (``"gaussk_ddp"``, ``"gaussk_ddp_spawn"``, ``"topk_ddp"``,
  ``"topk_ddp_spawn"``): ``setup_module`` wraps the module in DDP (Fabric's) and registers
  :func:`~lightning_gaussk.gaussk_hook` on it, on every device type; ``setup_optimizer`` applies the
  optimizer remedies (:func:`~lightning_gaussk.frontends.remedies.wrap_optimizer`);
- :class:`GaussKFabricLocalSGDStrategy` (``"gaussk_local"``, ``"gaussk_local_spawn"``,
  ``"diloco"``): ``setup_module`` switches DDP's per-step all-reduce off
  (:func:`~lightning_gaussk.engine.local.grad_hook.local_grad_hook`), ``setup_optimizer`` hooks
  :class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` on the (one) optimizer;
- :class:`GaussKFabricFSDPStrategy` (``"gaussk_fsdp"``): Fabric's ``ModelParallelStrategy`` on the
  mesh ``(num_nodes, devices)`` with dims ``("replicate", "shard")``; ``setup_module`` shards the
  module (``parallelize_fn``; by default every child that holds parameters, then the root, over
  ``mesh["shard"]``) and registers the sparse replica reduction
  (:func:`~lightning_gaussk.engine.fsdp.register_gaussk_fsdp`).

What the three share (:class:`FabricWiring`, over :class:`~lightning_gaussk.frontends.wiring.StrategyWiring`;
the DDP-based two also :class:`FabricDDPWiring`: the constructor and ``setup_module``; the options
and their properties are the Trainer strategies' :class:`~lightning_gaussk.frontends.wiring.PerStepWiring`
and :class:`~lightning_gaussk.frontends.wiring.LocalSGDWiring`):

- options from keywords > ``GAUSSK_*`` variables > defaults
  (:func:`~lightning_gaussk.frontends.wiring.resolve_options`), checked at construction; a keyword
  that is neither an option nor a DDP argument raises naming it;
- ``fabric.save(path, state)``: every rank writes its own hook state next to the checkpoint
  (``<path>.gaussk/rank{r}.pt``; inside a distributed FSDP checkpoint folder ``<path>/gaussk/``)
  through :class:`~lightning_gaussk.frontends.wiring.HookCheckpoint` (a collective), the manifest
  goes into the checkpoint under ``"gaussk"`` (``"gaussk_local"`` for local SGD);
  ``fabric.load(path, state)`` (a dict of objects) restores it on every rank (every rank its own
  shard; local SGD: then each rank's own local model and inner optimizer over rank 0's);
- ``fabric.backward`` tells the hook the loss scale of a GradScaler ("16-mixed");
- one model per strategy: a second ``setup_module`` raises;
- compiled autograd is refused (``torch._dynamo.config.compiled_autograd = True``, or DDP's
  ``optimize_ddp="python_reducer"``), at ``setup_module`` and at every ``fabric.backward``
  (:func:`refuse_compiled_autograd`); ``torch.compile`` of the model is supported:
  ``fabric.setup(torch.compile(model), optimizer, _reapply_compile=False)``, so DDP wraps the
  compiled module, DDPOptimizer splits its graph at the bucket boundaries and DDP's eager reducer
  calls the hook per bucket (Fabric's default re-applies the compile over its DDP wrapper, where
  torch 2.13's dynamo captures no graph: the model then runs eager; docs/fabric.md).

The summary line: Fabric has no end of fit. ``fabric.strategy.log_summary()`` logs on rank 0
the line the Trainer's strategies log at the end of a fit (:class:`~lightning_gaussk.frontends.wiring.FitSummary`:
the optimizer steps since the model was set up or last loaded, the bytes sent against dense data
parallelism, the time in communication where measured); ``fabric.strategy.teardown()`` logs it
when ``log_summary`` was not called.

Steps: Fabric has no trainer step. The per-step hooks count synchronising backward passes as
optimizer steps (``fabric.no_backward_sync(model)`` during gradient accumulation keeps that exact);
local SGD counts ``optimizer.step()`` calls.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from lightning.fabric.strategies.registry import _StrategyRegistry
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gaussk.checkpoint.files import shard_dir
from lightning_gaussk.config import GaussKConfig
from lightning_gaussk.engine.ddp_hook import gaussk_hook
from lightning_gaussk.engine.fsdp import MESH_DIMS, register_gaussk_fsdp
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.engine.local.grad_hook import local_grad_hook
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.frontends.wiring import (
    FitSummary,
    LocalSGDWiring,
    PerStepWiring,
    StrategyWiring,
    check_keywords,
    ddp_arguments,
    refuse_fsdp2,
    resolve_options,
    tell_loss_scale,
)
from lightning_gaussk.utils.log import rank_zero_info

__all__ = [
    "FabricDDPWiring",
    "FabricWiring",
    "GaussKFabricDDPStrategy",
    "GaussKFabricFSDPStrategy",
    "GaussKFabricLocalSGDStrategy",
    "refuse_compiled_autograd",
    "register_fabric_strategies",
    "shard_children",
]

#: the residual shards' folder inside a distributed (FSDP) checkpoint folder
SHARD_SUBDIR = "gaussk"
#: options of ``GaussKConfig`` that are not the FSDP strategy's: the layout is the mesh's
LAYOUT_OPTIONS = ("hierarchy", "ranks_per_node")
_NOT_FSDP = {
    **PerStepWiring._gaussk_foreign,
    **dict.fromkeys(LAYOUT_OPTIONS, "not an option here: the layout is the mesh (num_nodes, devices)"),
}


# ------------------------------------------------------------------------------- compiled autograd
def refuse_compiled_autograd(owner: str, ddp: Any = None) -> None:
    """Refuse compiled autograd, naming ``owner`` and what to do instead.

    The hooks here run in DDP's eager C++ reducer (or FSDP2's eager post-backward): one call per
    bucket, with asynchronous collectives and host-side selection. Compiled autograd traces the
    backward instead: with DDP's C++ reducer torch refuses it ("Compiled autograd is not compatible
    with C++ DDP Reducer"), and with ``torch._dynamo.config.optimize_ddp = "python_reducer"`` DDP
    calls comm hooks once per parameter with ``(grad, param)`` instead of a bucket, which no bucket
    hook can serve. ``torch.compile`` of the model alone (the default ``optimize_ddp``,
    DDPOptimizer) keeps the eager reducer and is supported.

    Args:
        owner: who refuses (the strategy's class name).
        ddp: the ``DistributedDataParallel`` module, when there is one (its python reducer is refused).

    Raises:
        RuntimeError: ``torch._dynamo.config.compiled_autograd`` is True, or ``ddp`` uses the
            python reducer.
    """
    dynamo = sys.modules.get("torch._dynamo")  # not imported: neither can be on
    if dynamo is None:
        return
    why = None
    if getattr(ddp, "_use_python_reducer", False):
        why = "DDP was built with torch._dynamo.config.optimize_ddp='python_reducer' (compiled autograd's DDP)"
    elif getattr(dynamo.config, "compiled_autograd", False):
        why = "torch._dynamo.config.compiled_autograd is True"
    if why is not None:
        raise RuntimeError(
            f"{owner}: compiled autograd is not supported: {why}. Its hook runs per gradient bucket in the eager backward "
            "(asynchronous collectives, selection on the host); compiled autograd traces the backward and calls DDP comm "
            "hooks per parameter (python reducer) or not at all (torch refuses the C++ reducer). torch.compile of the model "
            "is supported: leave torch._dynamo.config.compiled_autograd False and optimize_ddp at its default "
            "('ddp_optimizer'). See docs/fabric.md."
        )


# ------------------------------------------------------------------------------- options
def _split_options(
    cls: type, config_cls: type, kwargs: dict[str, Any], *, left_out: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """The options ``config_cls`` out of ``kwargs`` (keyword > ``GAUSSK_*`` variable > default),
    the keywords left, and a hint per keyword left that is close to an option's name."""
    names = [f.name for f in dataclasses.fields(config_cls) if f.name not in left_out]
    given = {n: kwargs.pop(n) for n in names if n in kwargs}
    config = resolve_options(config_cls, given, owner=cls.__name__)
    hints = {}
    for name in kwargs:
        close = difflib.get_close_matches(name, names, n=1)
        hints[name] = f"did you mean the option `{close[0]}`?" if close else f"the options are {names}"
    return config, kwargs, hints


# ------------------------------------------------------------------------------- the shared wiring
class FabricWiring(StrategyWiring):
    """What the Fabric strategies share, over :class:`StrategyWiring` (the deferred restore, the
    checkpoint adapter; with :class:`PerStepWiring` / :class:`LocalSGDWiring` the options and their
    properties): the hook state's checkpoint entry in ``fabric.save`` / ``fabric.load``, the loss
    scale at ``fabric.backward``, the refusal of compiled autograd and of a second model, and the
    summary line (:meth:`log_summary`, else at :meth:`teardown`)."""

    #: whether :meth:`log_summary` has logged the line since the model was set up (teardown then does not)
    _gaussk_summary_logged: bool = False

    def _gaussk_shard_folder(self, path: Path) -> Path:
        """Where the ranks' shards go: ``<path>.gaussk`` (a distributed FSDP checkpoint: inside it)."""
        return shard_dir(path)

    def _gaussk_setup_guard(self, module: nn.Module) -> None:
        """Before a model is set up: one model per strategy; no compiled autograd."""
        if self._gaussk_state is not None:
            raise ValueError(
                f"{type(self).__name__}: a model is already set up with the hook (one model per strategy: its hook state "
                "is what fabric.save / fabric.load carry). Set up one model, or use a second Fabric for another."
            )
        refuse_compiled_autograd(type(self).__name__)

    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """Fabric's backward; before it, compiled autograd is refused and the hook gets the loss
        scale of the coming gradients (a GradScaler's, under "16-mixed")."""
        state = self._gaussk_state
        if state is not None:
            refuse_compiled_autograd(type(self).__name__)
            if not isinstance(state, SparseLocalSGD):
                tell_loss_scale(state, getattr(self.precision, "scaler", None))  # type: ignore[attr-defined]
        super().backward(tensor, module, *args, **kwargs)  # type: ignore[misc]

    # ---------------------------------------------------------------- the summary line
    def _gaussk_built(self, state: Any) -> None:
        """The hook state exists (a checkpoint loaded before restored): the summary counts from now."""
        super()._gaussk_built(state)
        self._gaussk_fit = FitSummary(state, self._gaussk_global_step())
        self._gaussk_summary_logged = False

    def _gaussk_restore(self, loaded: Any) -> None:
        """The saved state back, then the summary counts from it (a resumed run sums up its own steps)."""
        super()._gaussk_restore(loaded)
        if self._gaussk_fit is not None:
            self._gaussk_fit.restart(self._gaussk_global_step())

    def _gaussk_global_step(self) -> int:
        """The optimizer steps so far: the per-step hook's own count (synchronising backward
        passes; local SGD counts its own)."""
        step = getattr(self._gaussk_state, "step", 0)  # SparseLocalSGD has none
        return step if isinstance(step, int) else 0

    def log_summary(self) -> str | None:
        """Log, at INFO on rank 0 (the ``lightning_gaussk`` logger), the line the Trainer's
        strategies log at the end of a fit, and return this rank's line (None before the model is
        set up): the optimizer steps since the model was set up or since the last ``fabric.load``,
        the bytes this rank sent against dense data parallelism (how many times fewer), and the
        time in communication where measured (:class:`~lightning_gaussk.frontends.wiring.FitSummary`).

        Fabric has no end of fit: call it at the end of training (on every rank, or on rank 0
        alone: no collective). Without a call, :meth:`teardown` logs the line."""
        fit = self._gaussk_fit
        if fit is None:
            return None
        line = fit.line(self._gaussk_global_step())
        rank_zero_info(line)
        self._gaussk_summary_logged = True
        return line

    def teardown(self) -> None:
        """Let torch's communication threads release the hook's last callbacks (local SGD: its
        hook off the optimizer) and, unless :meth:`log_summary` did, log the summary line on
        rank 0; then Fabric's teardown (Fabric does not call it itself: ``fabric.strategy.teardown()``)."""
        if self._gaussk_summary_logged:
            self._gaussk_fit = None
        self._gaussk_teardown()
        super().teardown()  # type: ignore[misc]

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, path: Any, state: dict[str, Any], storage_options: Any | None = None, filter: dict[str, Callable[[str, Any], bool]] | None = None
    ) -> None:  # fmt: skip
        """Every rank writes its own hook state (a collective: ``fabric.save`` runs on every rank;
        a write error on one rank raises on all), the checkpoint gets the manifest under the
        strategy's key, then Fabric saves as usual. No rank holds another rank's residuals."""
        if self._gaussk_key in state:
            raise ValueError(
                f"{type(self).__name__}: the state to save has a key {self._gaussk_key!r}, which the hook state's entry uses"
            )
        path = self.broadcast(path)  # type: ignore[attr-defined]  # one folder of shards, rank 0's
        state = dict(state)
        self._gaussk_save(state, self._gaussk_shard_folder(Path(path)))
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)  # type: ignore[misc]

    def load_checkpoint(
        self, path: Any, state: Any = None, strict: bool = True, weights_only: bool | None = None
    ) -> dict[str, Any]:  # fmt: skip
        """Fabric's load, then, when ``state`` is a dict of objects to restore, the hook state's
        entry: checked (``ValueError`` saying "malformed" otherwise) and restored on every rank (a
        collective), or when the model is set up if it is not yet. The entry is not among the
        returned remainder. ``state`` None (the raw checkpoint returned) or a single module or
        optimizer restores nothing of the hook."""
        remainder = super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)  # type: ignore[misc]
        if isinstance(state, Mapping) and state:
            entry = remainder.pop(self._gaussk_key, None)
            self._gaussk_load({} if entry is None else {self._gaussk_key: entry}, path, folder=self._gaussk_inside(path))
        return remainder

    def _gaussk_inside(self, path: Any) -> Path | None:
        """The shard folder inside a checkpoint folder (FSDP's distributed checkpoint), if any."""
        return None


def _registered(registry: _StrategyRegistry, name: str, cls: type, description: str, **init_params: Any) -> None:
    registry.register(name, cls, description=description, override=True, **init_params)


class FabricDDPWiring(FabricWiring, DDPStrategy):
    """Fabric's ``DDPStrategy`` with the hook's wiring: what ``gaussk_ddp`` and ``gaussk_local``
    share. The constructor takes ``DDPStrategy``'s arguments, the options of
    ``_gaussk_config_cls`` (keyword > ``GAUSSK_*`` variable > default, kept by ``_gaussk_keep``) and
    further ``DistributedDataParallel`` arguments; :meth:`setup_module` refuses a second model, an
    FSDP2 module and compiled autograd, wraps the module in DDP and hands it to
    :meth:`_gaussk_wire` (the subclass's hook)."""

    _gaussk_config_cls: ClassVar[type]
    _gaussk_foreign: ClassVar[dict[str, str]]
    #: what to use instead, when the module is sharded with FSDP2
    _gaussk_fsdp2_alternatives: ClassVar[str]

    def __init__(
        self,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        config, rest, hints = _split_options(type(self), self._gaussk_config_cls, dict(kwargs))
        self._gaussk_keep(config)  # type: ignore[attr-defined]
        ddp_kwargs = ddp_arguments(
            type(self), rest, timeout=timeout, start_method=start_method, hints={**hints, **self._gaussk_foreign}
        )
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision=precision, process_group_backend=process_group_backend, timeout=timeout,
            start_method=start_method, **ddp_kwargs,
        )  # fmt: skip

    @override
    def setup_module(self, module: nn.Module) -> Any:
        """Fabric's DDP wrapper, then the subclass's hook on it (:meth:`_gaussk_wire`)."""
        self._gaussk_setup_guard(module)
        with refuse_fsdp2(type(self).__name__, module, alternatives=self._gaussk_fsdp2_alternatives):
            pass
        ddp = super().setup_module(module)
        refuse_compiled_autograd(type(self).__name__, ddp)
        self._gaussk_wire(ddp)
        return ddp

    def _gaussk_wire(self, ddp: Any) -> None:
        """Register the hook on Fabric's DDP wrapper ``ddp``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------- gaussk_ddp
class GaussKFabricDDPStrategy(PerStepWiring, FabricDDPWiring):
    """Fabric's DDP with the TopK-SGD comm hook (``L.Fabric(strategy="gaussk_ddp")``).

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision,
            process_group_backend, timeout, start_method: as for Fabric's ``DDPStrategy``.
        **kwargs: the hook's options (:class:`~lightning_gaussk.config.GaussKConfig`: ``density``,
            ``selector``, ``exchange``, ...; keyword > ``GAUSSK_*`` variable > default) and further
            ``DistributedDataParallel`` arguments (``bucket_cap_mb``, ``find_unused_parameters``, ...).

    Raises:
        TypeError: for a keyword that is neither an option nor a DDP argument, naming it.
        ValueError / TypeError: for an invalid option (naming it, and its variable when it came
            from the environment) or a second comm hook (``ddp_comm_hook``, ...); at setup, for a
            second model, a module sharded with FSDP2, or compiled autograd.

    Example::

        import lightning as L
        import lightning_gaussk  # registers "gaussk_ddp" with Fabric

        fabric = L.Fabric(accelerator="cpu", devices=2, strategy="gaussk_ddp")  # GAUSSK_DENSITY=0.01 ...
        fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)
        fabric.strategy.gaussk_state.telemetry["hook_calls"]
        fabric.strategy.log_summary()  # at the end: steps, bytes against dense DDP, time in communication
    """

    _gaussk_fsdp2_alternatives = "Use strategy='gaussk_fsdp' for an FSDP2 model."

    def _gaussk_wire(self, ddp: Any) -> None:
        """:func:`~lightning_gaussk.gaussk_hook` on ``ddp`` (every device type) with this rank's
        :class:`GaussKState` (restoring a checkpoint loaded before)."""
        state = GaussKState(self._gaussk_config).bind(ddp)
        state.setup_layout(launcher_ranks_per_node=self.num_processes)  # Fabric numbers ranks node by node
        ddp.register_comm_hook(state, gaussk_hook)
        self._gaussk_built(state)

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer remedies (:func:`~lightning_gaussk.frontends.remedies.wrap_optimizer`),
        once the model is set up; before that the optimizer is left as it is."""
        optimizer = super().setup_optimizer(optimizer)
        self._gaussk_remedies([optimizer])
        return optimizer

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, selector, start_method in (
            ("gaussk_ddp", "gaussk", "popen"),
            ("gaussk_ddp_spawn", "gaussk", "spawn"),
            ("topk_ddp", "topk", "popen"),
            ("topk_ddp_spawn", "topk", "spawn"),
        ):
            _registered(
                strategy_registry, name, cls, f"TopK-SGD DDP (selector '{selector}', start_method '{start_method}')",
                selector=selector, start_method=start_method,
            )  # fmt: skip


# ------------------------------------------------------------------------------- gaussk_local
class GaussKFabricLocalSGDStrategy(LocalSGDWiring, FabricDDPWiring):
    """Fabric's DDP as local SGD (``L.Fabric(strategy="gaussk_local")``): no per-step exchange,
    an outer step every ``sync_every`` optimizer steps (sparse, or DiLoCo's dense one: ``"diloco"``).

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision,
            process_group_backend, timeout, start_method: as for Fabric's ``DDPStrategy``.
        **kwargs: the outer loop's options (:class:`~lightning_gaussk.config.LocalSGDConfig`:
            ``sync_every``, ``density``, ``outer_lr``, ...; keyword > ``GAUSSK_*`` variable >
            default) and further ``DistributedDataParallel`` arguments.

    Set up one model and one optimizer (``fabric.setup(model, optimizer)``, or ``setup_module``
    then ``setup_optimizers``). At the end of training call :meth:`finish` on every rank (a
    collective): with ``end_on_theta`` (the default) every rank then ends on ``theta``; then
    :meth:`log_summary`.

    Raises:
        TypeError / ValueError: as :class:`GaussKFabricDDPStrategy`; at setup, for a second
            optimizer.
    """

    _gaussk_fsdp2_alternatives = "Local SGD needs each rank's whole model."
    _gaussk_module: nn.Module | None = None

    def _gaussk_wire(self, ddp: Any) -> None:
        """DDP's per-step all-reduce switched off (the local hook); the outer loop waits for the optimizer."""
        ddp.register_comm_hook(None, local_grad_hook)
        self._gaussk_module = ddp.module

    @override
    def setup_module(self, module: nn.Module) -> Any:
        """Fabric's DDP wrapper with DDP's per-step all-reduce switched off (the local hook)."""
        if self._gaussk_module is not None:
            raise ValueError(f"{type(self).__name__}: a model is already set up (local SGD averages one model)")
        return super().setup_module(module)

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The outer loop hooked on ``optimizer`` (restoring a checkpoint loaded before)."""
        optimizer = super().setup_optimizer(optimizer)
        if self._gaussk_module is None:
            raise ValueError(f"{type(self).__name__}: set up the model first (fabric.setup(model, optimizer) or setup_module)")
        if self._gaussk_state is not None:
            raise ValueError(f"{type(self).__name__}: local SGD hooks exactly one optimizer; a second one was set up")
        local = SparseLocalSGD(self._gaussk_module, optimizer, launcher_ranks_per_node=self.num_processes, config=self._local_config)
        self._gaussk_built(local)
        return optimizer

    @override
    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """Refuses a backward with the model set up but not the optimizer: DDP's all-reduce is off,
        and without the outer loop the ranks would never be averaged."""
        if self._gaussk_module is not None and self._gaussk_state is None:
            raise RuntimeError(
                f"{type(self).__name__}: the model is set up but not its optimizer: DDP's all-reduce is off and the outer "
                "loop hooks the optimizer, so nothing would average the ranks. Set up the optimizer "
                "(fabric.setup(model, optimizer) or fabric.setup_optimizers(optimizer)) before training."
            )
        super().backward(tensor, module, *args, **kwargs)

    def finish(self) -> bool:
        """End of training, on every rank (a collective): :meth:`SparseLocalSGD.finish` (with
        ``end_on_theta`` a last outer step over a partial window). Returns whether one ran."""
        return self._gaussk_state.finish() if self._gaussk_state is not None else False

    @override
    def _gaussk_restore(self, loaded: Any) -> None:
        """Every rank's own state, then its own local model and inner optimizer over rank 0's
        (Fabric has loaded the model and the optimizer before)."""
        super()._gaussk_restore(loaded)
        self._gaussk_state.apply_local()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        _registered(strategy_registry, "gaussk_local", cls, "local SGD with a sparse (SparseLoCo-style) outer step")
        _registered(strategy_registry, "gaussk_local_spawn", cls, "gaussk_local, start_method 'spawn'", start_method="spawn")
        _registered(
            strategy_registry, "diloco", cls, "local SGD with DiLoCo's dense outer step (outer Nesterov)", outer="dense", outer_lr=0.7
        )


# ------------------------------------------------------------------------------- gaussk_fsdp
def shard_children(module: nn.Module, mesh: Any) -> nn.Module:
    """The default ``parallelize_fn`` of :class:`GaussKFabricFSDPStrategy`: ``fully_shard`` over
    ``mesh["shard"]`` each direct child that holds parameters (the blocks), then the root."""
    from torch.distributed.fsdp import fully_shard

    for child in module.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh[MESH_DIMS[1]])
    fully_shard(module, mesh=mesh[MESH_DIMS[1]])
    return module


class GaussKFabricFSDPStrategy(PerStepWiring, FabricWiring, ModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` as FSDP2 sharded inside each node, replicated across nodes,
    with TopK-SGD between replicas (``L.Fabric(strategy="gaussk_fsdp", num_nodes=N, devices=L)``).

    Args:
        parallelize_fn: shards the module over ``mesh["shard"]`` (``fn(module, mesh) -> module``;
            the mesh is ``(num_nodes, devices)`` with dims ``("replicate", "shard")``); None:
            :func:`shard_children`.
        save_distributed_checkpoint, process_group_backend, timeout: as for ``ModelParallelStrategy``.
        **kwargs: the hook's options (:class:`~lightning_gaussk.config.GaussKConfig` but
            ``hierarchy`` and ``ranks_per_node``: the layout is the mesh).

    Raises:
        TypeError / ValueError: for an unknown keyword or an invalid option; at setup, for a
            second model, a module not sharded over ``mesh["shard"]``, or compiled autograd.
    """

    def __init__(
        self,
        parallelize_fn: Callable[[Any, Any], Any] | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        config, rest, hints = _split_options(type(self), GaussKConfig, dict(kwargs), left_out=LAYOUT_OPTIONS)
        check_keywords(type(self), rest, hints={**hints, **_NOT_FSDP})
        if config.hierarchy == "flat" or config.ranks_per_node is not None:
            raise ValueError(
                f"{type(self).__name__}: hierarchy={config.hierarchy!r} / ranks_per_node={config.ranks_per_node!r} (from the "
                "environment) cannot apply: the layout is the mesh (num_nodes, devices); unset GAUSSK_HIERARCHY / "
                "GAUSSK_RANKS_PER_NODE"
            )
        if not isinstance(save_distributed_checkpoint, bool):
            raise TypeError(f"`save_distributed_checkpoint` must be a bool, got {save_distributed_checkpoint!r}")
        self._gaussk_keep(config)
        super().__init__(
            parallelize_fn=parallelize_fn or shard_children, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )  # fmt: skip

    @override
    def setup_environment(self) -> None:
        """The process group, then the mesh ``(num_nodes, devices)`` with dims ``("replicate", "shard")``."""
        from torch.distributed.device_mesh import init_device_mesh

        self.accelerator.setup_device(self.root_device)  # type: ignore[union-attr]
        self._setup_distributed()
        self._device_mesh = init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes), mesh_dim_names=MESH_DIMS)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank is a data-parallel replica (sharding splits the model, not the data)."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Shard (``parallelize_fn``), then the hook on every FSDP2 unit."""
        self._gaussk_setup_guard(module)
        module = super().setup_module(module)
        state = register_gaussk_fsdp(module, self.device_mesh, self._gaussk_config)
        self._gaussk_built(state)
        return module

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer remedies, as :class:`GaussKFabricDDPStrategy`."""
        optimizer = super().setup_optimizer(optimizer)
        self._gaussk_remedies([optimizer], follow=False)  # gaussk_config stays the constructor's
        return optimizer

    @override
    def teardown(self) -> None:
        """As :meth:`FabricWiring.teardown`. Fabric's ``ModelParallelStrategy.teardown`` ends with
        ``self.checkpoint_io.teardown()``, and its ``checkpoint_io`` raises ``NotImplementedError``
        (it has none); by then the rest is torn down, so that error alone is let go."""
        try:
            super().teardown()
        except NotImplementedError as err:
            if "CheckpointIO" not in str(err):
                raise

    @override
    def _gaussk_shard_folder(self, path: Path) -> Path:
        return path / SHARD_SUBDIR if self._save_distributed_checkpoint else shard_dir(path)

    @override
    def _gaussk_inside(self, path: Any) -> Path | None:
        inside = Path(self.broadcast(path)) / SHARD_SUBDIR
        return inside if inside.is_dir() else None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        _registered(strategy_registry, "gaussk_fsdp", cls, "FSDP2 across nodes with TopK-SGD between replicas")


def register_fabric_strategies(registry: _StrategyRegistry | None = None) -> None:
    """Register the names above with Fabric's registry (``import lightning_gaussk`` does; again is harmless)."""
    if registry is None:
        from lightning.fabric.strategies import STRATEGY_REGISTRY as registry
    for cls in (GaussKFabricDDPStrategy, GaussKFabricLocalSGDStrategy, GaussKFabricFSDPStrategy):
        cls.register_strategies(registry)
