"""``GaussKDDPStrategy``: Lightning's DDP with the TopK-SGD comm hook. Wiring only.

- validates its arguments at construction (before any process starts);
- builds :class:`GaussKState` inside the worker (spawn pickles the strategy) and registers
  :func:`gaussk_hook` on every device type (Lightning itself registers hooks only on CUDA);
- tells the hook the optimizer step (``trainer.global_step``), so warm-up and seeds follow
  optimizer steps, not hook calls or micro-batches;
- saves every rank's hook state as its own shard next to the Lightning checkpoint
  (``<ckpt>.gaussk/rank{r}.pt``, a manifest inside the checkpoint) and restores it on resume
  (:mod:`lightning_gaussk.checkpoint.shards`); removing the checkpoint removes its shards.
"""

import inspect
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_gaussk.checkpoint.shards import SavedState, remove_shards, restore_state, save_shards, shard_dir
from lightning_gaussk.config import GaussKConfig, config_fields, env_options, env_var, warn_unknown_env_vars
from lightning_gaussk.comm.inflight import destroy_group_at_exit
from lightning_gaussk.engine.ddp_hook import gaussk_hook
from lightning_gaussk.engine.state import GaussKState

__all__ = ["CHECKPOINT_KEY", "GaussKDDPStrategy"]

CHECKPOINT_KEY = "gaussk"
_REJECTED = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")


class GaussKDDPStrategy(DDPStrategy):
    """DDP whose gradients are sparsified by TopK-SGD (error feedback, Gaussian-k selection).

    Args:
{options}
        find_unused_parameters: passed to ``DistributedDataParallel``.
        static_graph: passed to ``DistributedDataParallel``.
        gradient_as_bucket_view: passed to ``DistributedDataParallel``.
        bucket_cap_mb: DDP bucket size in MiB (each bucket is sparsified on its own); None = DDP's default.
        accelerator: as for ``DDPStrategy``.
        parallel_devices: as for ``DDPStrategy``.
        cluster_environment: as for ``DDPStrategy``.
        checkpoint_io: as for ``DDPStrategy``.
        precision_plugin: as for ``DDPStrategy``.
        process_group_backend: as for ``DDPStrategy``.
        timeout: as for ``DDPStrategy``.
        start_method: as for ``DDPStrategy``.
        **kwargs: further ``DistributedDataParallel`` arguments.

    Raises:
        ValueError / TypeError: for an invalid argument, or one that would register a second
            comm hook (``ddp_comm_hook``, ``ddp_comm_state``, ``ddp_comm_wrapper``,
            ``model_averaging_period``).
    """

    strategy_name = "gaussk_ddp"

    def __init__(
        self,
        density: float = 0.001,
        selector: str = "gaussk",
        error_feedback: bool = True,
        warmup_steps: int = 0,
        warmup_density: float | None = None,
        seed: int = 0,
        dense_fallback: Literal["auto", "never"] = "auto",
        link_gbit: float | Literal["measure"] | None = None,
        exchange: str = "allgather",
        hierarchy: Literal["auto", "flat", "node"] = "auto",
        ranks_per_node: int | None = None,
        remedies: Literal["auto", "all", "none"] = "auto",
        momentum_correction: float | None = None,
        momentum_masking: bool = True,
        adam_remedy: Literal["freeze", "amsgrad", "none"] = "none",
        variance_freeze_steps: int | None = None,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        bucket_cap_mb: float | None = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        for name in _REJECTED:
            if name in kwargs and kwargs[name] is not None:
                raise ValueError(
                    f"GaussKDDPStrategy registers its own comm hook; `{name}` would add a second one. "
                    "Use DDPStrategy for other hooks."
                )
        given = locals()
        self._gaussk_config = _config_with_env({name: given[name] for name in config_fields()}, os.environ)  # validates
        _validate_ddp_args(
            kwargs,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            timeout=timeout,
            start_method=start_method,
        )
        if bucket_cap_mb is not None:
            if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
                raise ValueError(f"`bucket_cap_mb` must be a number > 0 or None, got {bucket_cap_mb!r}")
            kwargs["bucket_cap_mb"] = bucket_cap_mb
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            **_ddp_kwargs(kwargs),  # a call, not **kwargs: keeps jsonargparse from listing DDP's internals
        )
        self._gaussk_state: GaussKState | None = None
        self._gaussk_loaded: SavedState | None = None  # from a checkpoint, before the state exists

    @property
    def gaussk_state(self) -> GaussKState | None:
        """This rank's hook state (None before ``fit`` has set up DDP)."""
        return self._gaussk_state

    @property
    def gaussk_config(self) -> GaussKConfig:
        """The hook's options, as given to the constructor."""
        return self._gaussk_config

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model; registers no hook (we pass none)
        state = GaussKState(self._gaussk_config).bind(self.lightning_module)
        # Lightning numbers ranks node by node: node_rank * devices + local_rank
        state.setup_layout(launcher_ranks_per_node=self.num_processes)
        self.model.register_comm_hook(state, gaussk_hook)  # on every device type, CPU included
        self._gaussk_state = state
        destroy_group_at_exit()  # gloo groups destroyed while Python runs, not at finalization
        if self._gaussk_loaded is not None:
            self._restore(self._gaussk_loaded)
            self._gaussk_loaded = None

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        """Lightning's optimizers, then the remedies (:func:`lightning_gaussk.frontends.remedies.wrap_optimizer`):
        under ``remedies="auto"`` (the default) Adam/AdamW get ``adam_remedy`` (``"none"`` by
        default) and SGD keeps its momentum; only ``remedies="all"`` also moves a
        ``torch.optim.SGD`` momentum into the hook (momentum correction); ``"none"`` changes
        nothing. An adaptive optimizer below the measured safe density is warned about. What is
        done is logged once, on rank 0."""
        super().setup_optimizers(trainer)
        state = self._gaussk_state
        if state is None:
            return
        from lightning_gaussk.frontends.remedies import wrap_optimizer

        for optimizer in self.optimizers:
            wrap_optimizer(optimizer, state)
        self._gaussk_config = state.config  # with what the remedies changed (momentum, warm-up)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._gaussk_state is not None:
            tell_step_and_scale(self._gaussk_state, self)
        return super().training_step(*args, **kwargs)

    @override
    def teardown(self) -> None:
        if self._gaussk_state is not None:
            # local, no collective (safe after an error): let torch's communication threads
            # release the hook's last callbacks before the DDP wrapper and process go away
            self._gaussk_state.wait_idle()
        super().teardown()

    # ---------------------------------------------------------------- checkpoints
    # wiring only: the protocol (formats, layout policy, agreement on failure) is lightning_gaussk.checkpoint.shards
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its own residual shard ``<filepath>.gaussk/rank{r}.pt`` (atomically);
        the ranks exchange the small manifest entries (a collective: Lightning calls this on every
        rank; a write error on one rank raises on all) and ``checkpoint["gaussk"]`` gets the
        manifest; then rank 0 writes the file as usual. No rank holds another rank's residuals.
        Not fitting (no state) but loaded from a checkpoint: the loaded save is carried through
        (rank 0 copies its shards; :meth:`SavedState.carry_to`)."""
        if self._gaussk_state is not None:
            checkpoint[CHECKPOINT_KEY] = save_shards(
                self._gaussk_state, shard_dir(filepath), rank=self.global_rank, world_size=self.world_size
            )
        elif self._gaussk_loaded is not None:  # not fitting: carry the loaded state through unchanged
            checkpoint[CHECKPOINT_KEY] = self._gaussk_loaded.carry_to(shard_dir(filepath), copy=self.is_global_zero)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Remove the checkpoint and its residual shards ``<filepath>.gaussk`` (rank 0;
        ``ModelCheckpoint(save_top_k=...)`` removes old checkpoints through this)."""
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_shards(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, then the hook state's entry, checked (``ValueError`` saying "malformed"
        otherwise; :meth:`SavedState.from_checkpoint`) and restored now if the hook state exists,
        else when ``configure_ddp`` builds it (its layout is known only then)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None:
            rank_zero_warn(
                f"Checkpoint {checkpoint_path} has no `{CHECKPOINT_KEY}` hook state (not saved by GaussKDDPStrategy?): "
                "residuals start from zero."
            )
            return checkpoint
        saved = SavedState.from_checkpoint(entry, checkpoint_path, key=CHECKPOINT_KEY)
        if self._gaussk_state is not None:
            self._restore(saved)
        else:
            self._gaussk_loaded = saved
        return checkpoint

    def _restore(self, saved: SavedState | Mapping[str, Any]) -> None:
        """Give this rank its saved state (:func:`~lightning_gaussk.checkpoint.shards.restore_state`: its own
        shard on the same layout, else the documented policy, with a warning). ``saved`` may also be
        the earlier embedded ``{"world_size", "per_rank"}``. A collective: if any rank fails (a
        missing or corrupt shard), every rank raises, naming the failing rank's error."""
        assert self._gaussk_state is not None

        def open_saved() -> SavedState:
            return saved if isinstance(saved, SavedState) else SavedState.from_embedded(saved)

        restore_state(self._gaussk_state, open_saved, rank=self.global_rank, world_size=self.world_size)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries = (
            ("gaussk_ddp", "gaussk", "popen"),
            ("gaussk_ddp_spawn", "gaussk", "spawn"),
            ("topk_ddp", "topk", "popen"),
            ("topk_ddp_spawn", "topk", "spawn"),
        )
        for name, selector, start_method in entries:
            strategy_registry.register(
                name,
                cls,
                description=f"TopK-SGD DDP (selector '{selector}', start_method '{start_method}')",
                override=True,  # idempotent: importing twice (or reloading) must not fail
                selector=selector,
                start_method=start_method,
            )


def tell_step_and_scale(state: GaussKState, strategy: Any) -> None:
    """Before a micro-batch's backward (a strategy's ``training_step``): tell the hook state the
    optimizer step it serves (``trainer.global_step``) and, under "16-mixed", the GradScaler's
    scale of the gradients about to arrive (one read per step; GradScaler reads found_inf too)."""
    state.set_step(strategy.lightning_module.trainer.global_step)
    scaler = getattr(strategy.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        state.set_loss_scale(scaler.get_scale())


def _options_doc() -> str:
    """The ``Args:`` lines of the hook's options, from the fields' docs (declared once)."""
    return "\n".join(f"        {name}: {f.metadata['doc']}." for name, f in config_fields().items())


GaussKDDPStrategy.__doc__ = (GaussKDDPStrategy.__doc__ or "").replace("{options}", _options_doc())


def _config_with_env(values: Mapping[str, Any], environ: Mapping[str, str], owner: type | None = None) -> GaussKConfig:
    """The strategy's options: keyword > ``GAUSSK_*`` variable > default, the precedence of
    :func:`lightning_gaussk.frontends.accelerate.resolve_config` (docs/configuration.md).

    Every argument reaches ``__init__`` with a value (LightningCLI passes all it has), so a keyword
    counts as given when it differs from the strategy's default. A variable for an option left at
    its default is used, and logged on rank 0; a variable for an option given as a keyword is
    overridden, with a warning; unknown ``GAUSSK_*`` names are warned about. Nothing is ignored
    silently.
    """
    owner = GaussKDDPStrategy if owner is None else owner
    defaults = inspect.signature(owner.__init__).parameters
    given = {n: v for n, v in values.items() if not _same(v, defaults[n].default)}
    warn_unknown_env_vars(environ)
    env = env_options(environ)  # ValueError naming the variable for text that does not parse
    overridden = [n for n in env if n in given and not _same(env[n], given[n])]
    if overridden:
        rank_zero_warn(
            f"{owner.__name__}: "
            + ", ".join(f"{env_var(n)}={environ[env_var(n)]!r} is overridden by {n}={given[n]!r}" for n in overridden)
            + " (precedence: keyword argument > GAUSSK_* variable > default)"
        )
    config = GaussKConfig.from_env(environ, **given)  # validates; names the variable of a bad value
    used = [n for n in env if n not in given]
    if used:
        rank_zero_info(
            f"{owner.__name__}: from the environment: "
            + ", ".join(f"{n}={getattr(config, n)!r} ({env_var(n)})" for n in used)
        )
    return config


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for option values (``True == 1`` is not the same option value)."""
    return type(a) is type(b) and a == b


def _validate_ddp_args(kwargs: dict[str, Any], *, timeout: Any, start_method: Any, **flags: Any) -> None:
    """Fail at construction, not inside the workers, for what DDP or the launcher would reject late
    (or silently take as a truthy object)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise TypeError(f"`timeout` must be a datetime.timedelta or None, got {type(timeout).__name__} {timeout!r}")
    if start_method not in _START_METHODS:
        raise ValueError(f"`start_method` must be one of {_START_METHODS}, got {start_method!r}")
    allowed = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
    for name in kwargs:
        if name not in allowed:
            raise TypeError(
                f"GaussKDDPStrategy got `{name}` = {kwargs[name]!r}, which is not an argument of torch's "
                f"DistributedDataParallel (this strategy is DDP with a comm hook: FSDP and DeepSpeed settings are not "
                f"supported); extra arguments allowed: {sorted(allowed)}"
            )


def _ddp_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Further ``DistributedDataParallel`` keywords, without the (None) hook arguments."""
    return {k: v for k, v in kwargs.items() if k not in _REJECTED}
