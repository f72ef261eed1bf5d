"""``GaussKLocalSGDStrategy`` (``"gaussk_local"``): Lightning's DDP as local SGD. Wiring only.

- DDP's per-step all-reduce is switched off by a comm hook that returns the local gradient
  (:func:`~lightning_gaussk.engine.local.grad_hook.local_grad_hook`), registered on every device type;
- :class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` hooks the optimizer, so the outer step runs
  every ``sync_every`` optimizer steps (gradient accumulation counts optimizer steps, not
  micro-batches);
- checkpoints: ``theta`` and the outer momentum (the same on every rank) go into the Lightning
  checkpoint under ``"gaussk_local"``; each rank's error feedback, window position, local
  parameters and inner optimizer state go into its own shard ``<ckpt>.gaussk/rank{r}.pt``
  (:mod:`lightning_gaussk.checkpoint`: atomic, checksummed, every rank raises if one fails).
  On resume each rank gets its own local model and optimizer back at ``on_train_start`` (after
  Lightning has loaded rank 0's), so a resume in the middle of a window continues it exactly.

Options (keyword > ``GAUSSK_*`` variable > default, declared by :class:`~lightning_gaussk.config.LocalSGDConfig`),
checkpoints, the deferred restore and the teardown are :mod:`lightning_gaussk.frontends.wiring`'s.
"""

# no `from __future__ import annotations`: Lightning's registry and jsonargparse read the signature

from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal, Optional

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_gaussk.checkpoint.files import shard_dir
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.engine.local.grad_hook import local_grad_hook
from lightning_gaussk.frontends.wiring import (
    StrategyWiring,
    ddp_arguments,
    foreign_options,
    options_doc,
    refuse_fsdp2,
    strategy_options,
)

__all__ = ["LOCAL_CHECKPOINT_KEY", "GaussKLocalSGDStrategy"]

LOCAL_CHECKPOINT_KEY = "gaussk_local"
#: why a per-step option is refused here (:func:`~lightning_gaussk.frontends.wiring.check_keywords`)
_PER_STEP_ONLY = foreign_options(
    LocalSGDConfig, GaussKConfig, why="an option of the per-step engines gaussk_ddp and gaussk_fsdp, not of local SGD"
)
#: what to use instead of local SGD over an FSDP2-sharded model
_FSDP2_ALTERNATIVES = (
    "Local SGD needs each rank's whole model: build it without fully_shard for gaussk_local / diloco, or keep the "
    "FSDP2 configure_model and use strategy='gaussk_fsdp' (GaussKFSDPStrategy: FSDP2 inside each node, TopK-SGD "
    "between nodes)."
)


class GaussKLocalSGDStrategy(StrategyWiring, DDPStrategy):
    """DDP without per-step gradient exchange: local SGD with a sparse or dense outer step.

    Args:
{options}
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout, start_method: as for ``DDPStrategy``.
        **kwargs: further ``DistributedDataParallel`` arguments.

    See :class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` for the math.

    Raises:
        TypeError: for an unknown keyword, naming it and listing what is allowed (its own
            arguments and ``DistributedDataParallel``'s).
        ValueError / TypeError: for an invalid argument, naming it; at setup, for more than one
            optimizer, or a ``configure_model`` that shards with FSDP2.

    Example::

        trainer = L.Trainer(strategy=GaussKLocalSGDStrategy(sync_every=16, density=0.02, quantize=2),
                            accelerator="cpu", devices=4)
    """

    strategy_name = "gaussk_local"
    _gaussk_key = LOCAL_CHECKPOINT_KEY
    _gaussk_split = True  # theta and the outer momentum in the checkpoint, each rank's part in its shard
    _gaussk_fresh = "the outer loop starts afresh"

    def __init__(
        self,
        sync_every: int = 16,
        density: float = 0.02,
        outer_lr: float = 1.5,
        ef_decay: float = 0.95,
        outer: Literal["sparse", "dense"] = "sparse",
        chunk: Optional[int] = 4096,
        quantize: Optional[int] = 2,
        selector: str = "gaussk",
        exchange: str = "allgather",
        dense_fallback: Literal["auto", "never"] = "auto",
        outer_momentum: float = 0.9,
        hierarchy: Literal["auto", "flat", "node"] = "auto",
        ranks_per_node: Optional[int] = None,
        seed: int = 0,
        overlap_steps: int = 0,
        fragments: int = 1,
        end_on_theta: bool = True,
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        self._local_config = strategy_options(type(self), LocalSGDConfig, locals())  # validates
        ddp_kwargs = ddp_arguments(type(self), kwargs, timeout=timeout, start_method=start_method, hints=_PER_STEP_ONLY)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )

    @property
    def local_sgd(self) -> Optional[SparseLocalSGD]:
        """This rank's :class:`SparseLocalSGD` (None before ``fit`` has set up the optimizer)."""
        return self._gaussk_state

    @property
    def local_config(self) -> LocalSGDConfig:
        """The outer loop's options, as given to the constructor (or by ``GAUSSK_*`` variables)."""
        return self._local_config

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Around ``configure_model``: a module that shards itself with FSDP2 is refused
        (:func:`~lightning_gaussk.frontends.wiring.refuse_fsdp2`; local SGD runs on DDP)."""
        with refuse_fsdp2(type(self).__name__, self.lightning_module, alternatives=_FSDP2_ALTERNATIVES):
            with super().model_sharded_context():
                yield

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        self.model.register_comm_hook(None, local_grad_hook)  # no per-step all-reduce, on every device type

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        """Lightning's optimizers, then the outer loop hooked on the one optimizer."""
        super().setup_optimizers(trainer)
        if len(self.optimizers) != 1:
            raise ValueError(f"GaussKLocalSGDStrategy: local SGD hooks exactly one optimizer, the module configured {len(self.optimizers)}")
        local = SparseLocalSGD(
            self.lightning_module, self.optimizers[0], launcher_ranks_per_node=self.num_processes, config=self._local_config
        )
        self._gaussk_built(local)  # restores a checkpoint loaded before

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._gaussk_state is not None:
            self._gaussk_state.apply_local()  # this rank's model and optimizer, over rank 0's from the checkpoint

    @override
    def on_train_end(self) -> None:
        """End on theta (``end_on_theta``, the default): a last outer step over a partial window,
        on every rank (:meth:`SparseLocalSGD.finish`); otherwise a warning when ranks differ."""
        super().on_train_end()
        local = self._gaussk_state
        if local is None:
            return
        position = local.window_position
        if local.finish():
            rank_zero_info(
                f"GaussKLocalSGDStrategy: the fit ended {position} optimizer steps into a window of sync_every="
                f"{local.sync_every}; a last outer step ran, so every rank ends on theta (end_on_theta=True)."
            )
        elif not local.on_theta:
            rank_zero_warn(
                f"GaussKLocalSGDStrategy: the fit ended {position} optimizer steps into a window of "
                f"sync_every={local.sync_every} with end_on_theta=False: every rank holds its own local model, and the "
                "model Lightning returns or saves from here is rank 0's. Pass end_on_theta=True (GAUSSK_END_ON_THETA=1) "
                "to end on theta, or make max_steps a multiple of sync_every."
            )

    @override
    def teardown(self) -> None:
        self._gaussk_teardown()  # the outer loop's hook off the optimizer
        super().teardown()

    # ---------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shard (a collective); ``checkpoint["gaussk_local"]`` gets the
        manifest and the shared state; then rank 0 writes the file as usual."""
        self._gaussk_save(checkpoint, shard_dir(filepath))
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        self._gaussk_remove(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's load, then the outer loop's entry: restored when :meth:`setup_optimizers`
        builds the loop (every rank its own shard, on the same layout only)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._gaussk_load(checkpoint, checkpoint_path)
        return checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            "gaussk_local", cls, description="local SGD with a sparse (SparseLoCo-style) outer step", override=True
        )
        strategy_registry.register(
            "gaussk_local_spawn", cls, description="gaussk_local, start_method 'spawn'", override=True, start_method="spawn"
        )
        strategy_registry.register(
            "diloco", cls, description="local SGD with DiLoCo's dense outer step (outer Nesterov)", override=True,
            outer="dense", outer_lr=0.7,
        )  # fmt: skip


GaussKLocalSGDStrategy.__doc__ = (GaussKLocalSGDStrategy.__doc__ or "").replace("{options}", options_doc(LocalSGDConfig))
