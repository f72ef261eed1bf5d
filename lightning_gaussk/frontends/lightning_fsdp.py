"""``GaussKFSDPStrategy``: Lightning's ``ModelParallelStrategy`` as FSDP2 across nodes with the sparse
replica reduction (:mod:`lightning_gaussk.engine.fsdp`). Wiring only.

- its device mesh is ``(nodes, devices per node)`` with dims ``("replicate", "shard")``; the
  user's ``configure_model`` shards with it, the two lines::

      def configure_model(self):
          for block in self.blocks:
              fully_shard(block, mesh=self.device_mesh["shard"])
          fully_shard(self, mesh=self.device_mesh["shard"])

- after ``configure_model`` (in :meth:`setup`) it registers the hook on every FSDP2 unit
  (:func:`~lightning_gaussk.engine.fsdp.register_gaussk_fsdp`), then applies the optimizer remedies;
- every rank reads different data (the sampler spans the world: all ranks are data parallel);
- tells the hook the optimizer step and the loss scale, as :class:`GaussKDDPStrategy` does;
- saves each rank's residual shard with the checkpoint: inside the distributed checkpoint folder
  (``<ckpt>/gaussk/rank{r}.pt``), or beside a single-file checkpoint (``<ckpt>.gaussk/``), the
  manifest in the checkpoint's metadata, and restores it on resume (on another mesh by the row
  policy, :mod:`lightning_gaussk.checkpoint.reshard`);
- logs, on rank 0 at the end of a fit, what it sent between nodes against native HSDP's
  all-reduce, the steps and the time in communication
  (:class:`~lightning_gaussk.frontends.wiring.FitSummary`).

Options, checkpoints, the deferred restore and the teardown are :mod:`lightning_gaussk.frontends.wiring`'s.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.strategy import _StrategyRegistry
from typing_extensions import override

from lightning_gaussk.checkpoint.files import shard_dir
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig
from lightning_gaussk.engine.fsdp import MESH_DIMS, GaussKFSDPState, register_gaussk_fsdp
from lightning_gaussk.frontends.wiring import StrategyWiring, check_keywords, foreign_options, options_doc, strategy_options

__all__ = ["GaussKFSDPStrategy"]

#: options of ``GaussKConfig`` that are not this strategy's: the layout is the mesh's
LAYOUT_OPTIONS = ("hierarchy", "ranks_per_node")
#: the residual shards' folder inside a distributed checkpoint folder
SHARD_SUBDIR = "gaussk"
#: why a keyword of another engine is refused here (:func:`~lightning_gaussk.frontends.wiring.check_keywords`)
_NOT_HERE = {
    **foreign_options(GaussKConfig, LocalSGDConfig, why="an option of local SGD: gaussk_local, diloco"),
    **dict.fromkeys(LAYOUT_OPTIONS, "not an option here: the layout is the mesh (num_nodes, devices)"),
}


class GaussKFSDPStrategy(StrategyWiring, ModelParallelStrategy):
    """FSDP2 sharded inside each node, replicated across nodes, with TopK-SGD between replicas.

    Args:
{options}
        save_distributed_checkpoint: as for ``ModelParallelStrategy`` (True: a folder of shards).
        process_group_backend: as for ``ModelParallelStrategy``.
        timeout: as for ``ModelParallelStrategy``.
        **kwargs: none is taken (it forwards no further keywords): an unknown keyword raises
            ``TypeError`` at construction, listing what is allowed.

    ``hierarchy`` and ``ranks_per_node`` are not options here: the mesh is
    ``(num_nodes, devices)``. Raises ``ValueError`` / ``TypeError`` for an invalid argument.

    At the end of a fit rank 0 logs one line: the optimizer steps, the bytes it sent between
    nodes against what native HSDP's all-reduce of the shards would have sent (how many times
    fewer), FSDP's bytes inside the node and, where measured, the time in communication
    (:func:`~lightning_gaussk.engine.describe.fit_summary_line`).
    """

    strategy_name = "gaussk_fsdp"

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
        remedies: Literal["auto", "all", "none"] = "auto",
        momentum_correction: float | None = None,
        momentum_masking: bool = True,
        adam_remedy: Literal["freeze", "amsgrad", "none"] = "none",
        variance_freeze_steps: int | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        check_keywords(type(self), kwargs, hints=_NOT_HERE)  # before anything else: a typo is named, not lost
        config = strategy_options(type(self), GaussKConfig, locals(), left_out=LAYOUT_OPTIONS)  # validates
        if config.hierarchy == "flat" or config.ranks_per_node is not None:
            raise ValueError(
                f"GaussKFSDPStrategy: hierarchy={config.hierarchy!r} / ranks_per_node={config.ranks_per_node!r} (from the "
                "environment) cannot apply: the layout is the mesh (num_nodes, devices); unset GAUSSK_HIERARCHY / "
                "GAUSSK_RANKS_PER_NODE"
            )
        if not isinstance(save_distributed_checkpoint, bool):
            raise TypeError(f"`save_distributed_checkpoint` must be a bool, got {save_distributed_checkpoint!r}")
        self._gaussk_config: GaussKConfig = config
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint, process_group_backend=process_group_backend, timeout=timeout
        )

    @property
    def gaussk_state(self) -> GaussKFSDPState | None:
        """This rank's hook state (None before ``fit`` has set up the model)."""
        return self._gaussk_state

    @property
    def gaussk_config(self) -> GaussKConfig:
        """The hook's options, as given to the constructor."""
        return self._gaussk_config

    @override
    def setup_environment(self) -> None:
        """The process group, then the mesh ``(num_nodes, devices)`` with dims ``("replicate", "shard")``
        (Lightning numbers ranks node by node: node-contiguous, as the mesh needs)."""
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()
        self._device_mesh = init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes), mesh_dim_names=MESH_DIMS)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank is a data-parallel replica (sharding splits the model, not the data)."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def setup(self, trainer: Any) -> None:
        """Lightning's setup (``configure_model`` has sharded the model), then the hook on every
        FSDP2 unit and the optimizer remedies."""
        super().setup(trainer)
        assert self.model is not None
        state = register_gaussk_fsdp(self.model, self.device_mesh, self._gaussk_config)
        from lightning_gaussk.frontends.remedies import wrap_optimizer

        for optimizer in self.optimizers:
            wrap_optimizer(optimizer, state)
        self._gaussk_built(state)  # restores a checkpoint loaded before

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
        """Every rank writes its residual shard (a collective; :meth:`_shard_folder`; the manifest
        goes into the checkpoint's metadata), then Lightning saves the model and optimizer (a
        distributed checkpoint folder, or one file)."""
        path = self.broadcast(filepath)
        self._gaussk_save(checkpoint, self._shard_folder(path))
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    def _shard_folder(self, path: _PATH) -> Path:
        """Where the residual shards go: inside a distributed checkpoint folder (``<ckpt>/gaussk``,
        so copying the folder carries them), beside a single-file checkpoint (``<ckpt>.gaussk``)."""
        return Path(path) / SHARD_SUBDIR if self._save_distributed_checkpoint else shard_dir(path)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        self._gaussk_remove(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, then the hook state's entry: restored now (the state exists after
        setup) or when :meth:`setup` builds it."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = Path(self.broadcast(checkpoint_path))
        inside = path / SHARD_SUBDIR  # a distributed checkpoint folder holds its shards
        self._gaussk_load(checkpoint, path, folder=inside if path.is_dir() and inside.is_dir() else None)
        return checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="FSDP2 across nodes with TopK-SGD between replicas", override=True
        )


GaussKFSDPStrategy.__doc__ = (GaussKFSDPStrategy.__doc__ or "").replace("{options}", options_doc(GaussKConfig, left_out=LAYOUT_OPTIONS))
