"""``GaussKLocalSGDStrategy`` (``"gaussk_local"``): Lightning's DDP as local SGD. Wiring only.

- DDP's per-step all-reduce is switched off by a comm hook that returns the local gradient
  (:func:`~lightning_gaussk.engine.local_sgd.local_grad_hook`), registered on every device type;
- :class:`~lightning_gaussk.engine.local_sgd.SparseLocalSGD` hooks the optimizer, so the outer step runs
  every ``sync_every`` optimizer steps (gradient accumulation counts optimizer steps, not
  micro-batches);
- checkpoints: ``theta`` and the outer momentum (the same on every rank) go into the Lightning
  checkpoint under ``"gaussk_local"``; each rank's error feedback, window position, local
  parameters and inner optimizer state go into its own shard ``<ckpt>.gaussk/rank{r}.pt``
  (:mod:`lightning_gaussk.checkpoint.shards`: atomic, checksummed, every rank raises if one fails).
  On resume each rank gets its own local model and optimizer back at ``on_train_start`` (after
  Lightning has loaded rank 0's), so a resume in the middle of a window continues it exactly.
"""

# no `from __future__ import annotations`: Lightning's registry and jsonargparse read the signature

from datetime import timedelta
from typing import Any, Literal, Optional

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_gaussk.checkpoint.shards import SavedState, remove_shards, restore_state, save_shards, shard_dir
from lightning_gaussk.comm.inflight import destroy_group_at_exit
from lightning_gaussk.engine.local_sgd import SparseLocalSGD, _check_choices, _check_numbers, local_grad_hook
from lightning_gaussk.comm.layout import Layout

__all__ = ["LOCAL_CHECKPOINT_KEY", "GaussKLocalSGDStrategy"]

LOCAL_CHECKPOINT_KEY = "gaussk_local"


class GaussKLocalSGDStrategy(DDPStrategy):
    """DDP without per-step gradient exchange: local SGD with a sparse or dense outer step.

    Args:
        sync_every: optimizer steps between outer steps (``H``).
        density: fraction of the entries sent per outer step (``outer="sparse"``).
        outer_lr: the outer learning rate ``alpha``.
        ef_decay: the error-feedback decay ``beta`` (``outer="sparse"``).
        outer: ``"sparse"`` (SparseLoCo-style) or ``"dense"`` (DiLoCo, outer Nesterov).
        chunk: entries per chunk of the chunk-wise exact top-k (None: one whole-tensor selection).
        quantize: None, 2 or 8 bits per sent value (one scale per chunk).
        selector: whole-tensor selection method (``chunk=None``).
        exchange: ``"allgather"`` or the bounded ``"allreduce"``.
        dense_fallback: ``"auto"`` (byte rule) or ``"never"``.
        outer_momentum: Nesterov momentum of ``outer="dense"``.
        hierarchy: ``"auto"``, ``"flat"`` or ``"node"`` (node mode for the outer step).
        ranks_per_node: ranks per node for node mode (None: Lightning's devices).
        seed: seed of randomised selectors.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout, start_method: as for ``DDPStrategy``.
        **kwargs: further ``DistributedDataParallel`` arguments.

    See :class:`~lightning_gaussk.engine.local_sgd.SparseLocalSGD` for the math.

    Raises:
        ValueError / TypeError: for an invalid argument, naming it; at setup, for more than one
            optimizer.

    Example::

        trainer = L.Trainer(strategy=GaussKLocalSGDStrategy(sync_every=16, density=0.02, quantize=2),
                            accelerator="cpu", devices=4)
    """

    strategy_name = "gaussk_local"

    def __init__(
        self,
        sync_every: int = 16,
        density: float = 0.02,
        outer_lr: float = 1.0,
        ef_decay: float = 0.95,
        outer: Literal["sparse", "dense"] = "sparse",
        chunk: Optional[int] = 4096,
        quantize: Optional[int] = None,
        selector: str = "gaussk",
        exchange: str = "allgather",
        dense_fallback: Literal["auto", "never"] = "auto",
        outer_momentum: float = 0.9,
        hierarchy: Literal["auto", "flat", "node"] = "auto",
        ranks_per_node: Optional[int] = None,
        seed: int = 0,
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
        if kwargs.get("ddp_comm_hook") is not None or kwargs.get("model_averaging_period") is not None:
            raise ValueError("GaussKLocalSGDStrategy registers its own comm hook; `ddp_comm_hook` / `model_averaging_period` would conflict")
        _check_numbers(sync_every, density, outer_lr, ef_decay, outer_momentum)
        _check_choices(outer, chunk, quantize, selector, exchange, dense_fallback)
        self._local_options: dict[str, Any] = dict(
            sync_every=sync_every, density=density, outer_lr=outer_lr, ef_decay=ef_decay, outer=outer, chunk=chunk,
            quantize=quantize, selector=selector, exchange=exchange, dense_fallback=dense_fallback,
            outer_momentum=outer_momentum, hierarchy=hierarchy, ranks_per_node=ranks_per_node, seed=seed,
        )  # fmt: skip
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **{k: v for k, v in kwargs.items() if k not in ("ddp_comm_hook", "model_averaging_period")},
        )
        self._local: Optional[SparseLocalSGD] = None
        self._local_loaded: Optional[tuple[SavedState, dict[str, Any]]] = None  # from a checkpoint, before setup

    @property
    def local_sgd(self) -> Optional[SparseLocalSGD]:
        """This rank's :class:`SparseLocalSGD` (None before ``fit`` has set up the optimizer)."""
        return self._local

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        self.model.register_comm_hook(None, local_grad_hook)  # no per-step all-reduce, on every device type
        destroy_group_at_exit()  # gloo groups destroyed while Python runs, not at finalization

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        """Lightning's optimizers, then the outer loop hooked on the one optimizer."""
        super().setup_optimizers(trainer)
        if len(self.optimizers) != 1:
            raise ValueError(f"GaussKLocalSGDStrategy: local SGD hooks exactly one optimizer, the module configured {len(self.optimizers)}")
        self._local = SparseLocalSGD(
            self.lightning_module, self.optimizers[0], launcher_ranks_per_node=self.num_processes, **self._local_options
        )
        if self._local_loaded is not None:
            self._restore(*self._local_loaded)
            self._local_loaded = None

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._local is not None:
            self._local.apply_local()  # this rank's model and optimizer, over rank 0's from the checkpoint

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        local = self._local
        if local is not None and local.window_position != 0:
            rank_zero_warn(
                f"GaussKLocalSGDStrategy: the fit ended {local.window_position} optimizer steps into a window of "
                f"sync_every={local.sync_every}: every rank holds its own local model, and the model Lightning returns "
                "or saves from here is rank 0's. End on theta with max_steps a multiple of sync_every, or call "
                "trainer.strategy.local_sgd.outer_step() on every rank."
            )

    @override
    def teardown(self) -> None:
        if self._local is not None:
            self._local.remove()
        super().teardown()

    # ---------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shard (a collective); ``checkpoint["gaussk_local"]`` gets the
        manifest and the shared state; then rank 0 writes the file as usual."""
        if self._local is not None:
            manifest = save_shards(_RankPart(self._local), shard_dir(filepath), rank=self.global_rank, world_size=self.world_size)
            shared = {k: v for k, v in self._local.state_dict(local=False).items() if k in ("global", "momentum")}
            checkpoint[LOCAL_CHECKPOINT_KEY] = {"manifest": manifest, **shared}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_shards(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        entry = checkpoint.get(LOCAL_CHECKPOINT_KEY)
        if entry is None:
            rank_zero_warn(f"Checkpoint {checkpoint_path} has no `{LOCAL_CHECKPOINT_KEY}` state: the outer loop starts afresh.")
            return checkpoint
        if not isinstance(entry, dict) or "manifest" not in entry:
            raise ValueError(f"Checkpoint {checkpoint_path}: `{LOCAL_CHECKPOINT_KEY}` is malformed (no manifest)")
        saved = SavedState.from_checkpoint(entry["manifest"], checkpoint_path, key=LOCAL_CHECKPOINT_KEY)
        shared = {k: v for k, v in entry.items() if k != "manifest"}
        if self._local is not None:
            self._restore(saved, shared)
        else:
            self._local_loaded = (saved, shared)
        return checkpoint

    def _restore(self, saved: SavedState, shared: dict[str, Any]) -> None:
        """Every rank loads its own shard (a collective: a failure on one rank raises on all)."""
        local = self._local
        assert local is not None

        def open_saved() -> SavedState:
            mine, theirs = local.layout, saved.layout
            if (mine.world_size, mine.ranks_per_node or 1) != (theirs.world_size, theirs.ranks_per_node or 1):
                raise ValueError(
                    f"GaussKLocalSGDStrategy: the checkpoint was saved on {theirs.describe()}, this run is {mine.describe()}; "
                    "local SGD resumes on the same layout only"
                )
            return saved

        restore_state(_RankPart(local, shared), open_saved, rank=self.global_rank, world_size=self.world_size)

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


class _RankPart:
    """What one rank's shard holds, in the shape :mod:`lightning_gaussk.checkpoint.shards` expects of a
    state (``layout``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, local: SparseLocalSGD, shared: Optional[dict[str, Any]] = None) -> None:
        self.local, self.shared = local, shared or {}

    @property
    def layout(self) -> Layout:
        return self.local.layout

    def state_dict(self) -> dict[str, Any]:
        return self.local.state_dict(shared=False, local=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.local.load_state_dict({**state_dict, **self.shared}, defer_local=True)

