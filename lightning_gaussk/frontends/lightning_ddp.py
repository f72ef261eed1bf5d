"""``GaussKDDPStrategy``: Lightning's DDP with the TopK-SGD comm hook. Wiring only.

- validates its arguments at construction (before any process starts);
- builds :class:`GaussKState` inside the worker (spawn pickles the strategy) and registers
  :func:`gaussk_hook` on every device type (Lightning itself registers hooks only on CUDA);
- tells the hook the optimizer step (``trainer.global_step``), so warm-up and seeds follow
  optimizer steps, not hook calls or micro-batches;
- saves every rank's hook state as its own shard next to the Lightning checkpoint
  (``<ckpt>.gaussk/rank{r}.pt``, a manifest inside the checkpoint) and restores it on resume;
  removing the checkpoint removes its shards;
- refuses a ``configure_model`` that shards with FSDP2 (DDP has no device mesh), pointing to
  ``strategy="gaussk_fsdp"``;
- logs, on rank 0 at the end of a fit, what it sent against dense DDP, the steps and the time in
  communication (:class:`~lightning_gaussk.frontends.wiring.FitSummary`).

Options, checkpoints, the deferred restore and the teardown are :mod:`lightning_gaussk.frontends.wiring`'s.
"""

from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from typing_extensions import override

from lightning_gaussk.checkpoint.files import shard_dir
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig
from lightning_gaussk.engine.ddp_hook import gaussk_hook
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.frontends.wiring import (
    StrategyWiring,
    ddp_arguments,
    foreign_options,
    options_doc,
    refuse_fsdp2,
    strategy_options,
)

__all__ = ["CHECKPOINT_KEY", "GaussKDDPStrategy"]

CHECKPOINT_KEY = "gaussk"
#: why a local SGD option is refused here (:func:`~lightning_gaussk.frontends.wiring.check_keywords`)
_LOCAL_ONLY = foreign_options(GaussKConfig, LocalSGDConfig, why="an option of local SGD: gaussk_local, diloco")
#: what to use instead of gaussk_ddp over an FSDP2-sharded model
_FSDP2_ALTERNATIVES = (
    "For an FSDP2 configure_model use strategy='gaussk_fsdp' (GaussKFSDPStrategy: FSDP2 inside each node, TopK-SGD "
    "between nodes; its device mesh is what configure_model shards with), or build the model without fully_shard "
    "for gaussk_ddp."
)


class GaussKDDPStrategy(StrategyWiring, DDPStrategy):
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
        TypeError: for an unknown keyword, naming it and listing what is allowed (its own
            arguments and ``DistributedDataParallel``'s).
        ValueError / TypeError: for an invalid argument, or one that would register a second
            comm hook (``ddp_comm_hook``, ``ddp_comm_state``, ``ddp_comm_wrapper``,
            ``model_averaging_period``); at setup, for a ``configure_model`` that shards with
            FSDP2 (use ``strategy="gaussk_fsdp"``).

    At the end of a fit rank 0 logs one line: the optimizer steps, the bytes it sent against
    what dense DDP would have all-reduced (how many times fewer) and, where measured, the time
    in communication (:func:`~lightning_gaussk.engine.describe.fit_summary_line`).
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
        self._gaussk_config = strategy_options(type(self), GaussKConfig, locals())  # validates
        ddp_kwargs = ddp_arguments(
            type(self),
            kwargs,
            hints=_LOCAL_ONLY,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            timeout=timeout,
            start_method=start_method,
        )
        if bucket_cap_mb is not None:
            if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
                raise ValueError(f"`bucket_cap_mb` must be a number > 0 or None, got {bucket_cap_mb!r}")
            ddp_kwargs["bucket_cap_mb"] = bucket_cap_mb
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
            **ddp_kwargs,  # not **kwargs: keeps jsonargparse from listing DDP's internals
        )

    @property
    def gaussk_state(self) -> GaussKState | None:
        """This rank's hook state (None before ``fit`` has set up DDP)."""
        return self._gaussk_state

    @property
    def gaussk_config(self) -> GaussKConfig:
        """The hook's options, as given to the constructor."""
        return self._gaussk_config

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Around ``configure_model``: a module that shards itself with FSDP2 is refused
        (:func:`~lightning_gaussk.frontends.wiring.refuse_fsdp2`; this strategy runs on DDP)."""
        with refuse_fsdp2(type(self).__name__, self.lightning_module, alternatives=_FSDP2_ALTERNATIVES):
            with super().model_sharded_context():
                yield

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model; registers no hook (we pass none)
        state = GaussKState(self._gaussk_config).bind(self.lightning_module)
        # Lightning numbers ranks node by node: node_rank * devices + local_rank
        state.setup_layout(launcher_ranks_per_node=self.num_processes)
        self.model.register_comm_hook(state, gaussk_hook)  # on every device type, CPU included
        self._gaussk_built(state)  # restores a checkpoint loaded before

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
        self._gaussk_tell()  # the optimizer step and the loss scale
        return super().training_step(*args, **kwargs)

    @override
    def teardown(self) -> None:
        self._gaussk_teardown()  # and, at the end of a fit, the summary line on rank 0
        super().teardown()

    # ---------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its own residual shard ``<filepath>.gaussk/rank{r}.pt`` (atomically);
        the ranks exchange the small manifest entries (a collective: Lightning calls this on every
        rank; a write error on one rank raises on all) and ``checkpoint["gaussk"]`` gets the
        manifest; then rank 0 writes the file as usual. No rank holds another rank's residuals.
        Not fitting (no state) but loaded from a checkpoint: the loaded save is carried through."""
        self._gaussk_save(checkpoint, shard_dir(filepath))
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Remove the checkpoint and its residual shards ``<filepath>.gaussk``."""
        super().remove_checkpoint(filepath)
        self._gaussk_remove(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, then the hook state's entry, checked (``ValueError`` saying "malformed"
        otherwise) and restored now if the hook state exists, else when ``configure_ddp`` builds it
        (its layout is known only then)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._gaussk_load(checkpoint, checkpoint_path)
        return checkpoint

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


GaussKDDPStrategy.__doc__ = (GaussKDDPStrategy.__doc__ or "").replace("{options}", options_doc(GaussKConfig))
