"""Local SGD under Hugging Face Accelerate: the path ``register_gaussk(..., sync_every=H)`` takes.

After ``accelerator.prepare(...)``::

    local = register_gaussk(accelerator, model, sync_every=16, density=0.02, quantize=2)

- DDP's per-step all-reduce is switched off (:func:`~lightning_gaussk.engine.local_sgd.local_grad_hook`);
- :class:`~lightning_gaussk.engine.local_sgd.SparseLocalSGD` hooks the prepared optimizer's inner
  optimizer: Accelerate steps it once per accumulation cycle, so ``sync_every`` counts optimizer
  steps, not micro-batches (a step a GradScaler skips is not counted either);
- ``save_state`` writes every rank's own ``gaussk_local_rank{r}.pt`` and manifest (error feedback,
  ``theta``, outer momentum, window position, this rank's local model and inner optimizer
  state); ``load_state`` restores them through :func:`lightning_gaussk.checkpoint.shards.restore_state`
  (a missing or corrupt file on any rank raises on every rank). Accelerate loads rank 0's model
  and optimizer after its pre-hooks, so each rank's own are put back at the model's next forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from lightning_gaussk.checkpoint import shards as ckpt
from lightning_gaussk.comm.inflight import destroy_group_at_exit
from lightning_gaussk.utils.log import rank_zero_warn
from lightning_gaussk.engine.local_sgd import SparseLocalSGD, local_grad_hook
from lightning_gaussk.comm.layout import Layout

__all__ = ["LOCAL_MANIFEST_FILE", "LOCAL_STATE_FILE", "register_local_sgd"]

#: rank ``rank``'s file in an ``accelerator.save_state()`` folder
LOCAL_STATE_FILE = "gaussk_local_rank{rank}.pt"
#: its one-entry manifest (checksum, size, layout)
LOCAL_MANIFEST_FILE = "gaussk_local_manifest_rank{rank}.json"


def register_local_sgd(
    accelerator: Accelerator, model: nn.Module, mesh: Any = None, *, ddp: Any = None, **options: Any
) -> SparseLocalSGD | None:
    """Local SGD on a model prepared by Accelerate (``register_gaussk`` with ``sync_every``).

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` and the optimizer.
        model: the prepared model (``DistributedDataParallel``, possibly inside ``torch.compile``).
        mesh: not supported with local SGD (must be None).
        ddp: the ``DistributedDataParallel`` inside ``model``
            (:func:`lightning_gaussk.frontends.accelerate.find_ddp_module`, which ``register_gaussk`` passes).
        **options: :class:`~lightning_gaussk.engine.local_sgd.SparseLocalSGD` arguments (``sync_every``,
            ``density``, ``outer_lr``, ``ef_decay``, ``outer``, ``chunk``, ``quantize``, ...).

    Returns:
        This rank's :class:`SparseLocalSGD`, or None on a single process (with a warning).

    Raises:
        TypeError / ValueError: an invalid option (naming it), a ``mesh``, a model that was not
            prepared, no prepared optimizer over the model, or a comm hook already registered.
    """
    if mesh is not None:
        raise ValueError("register_gaussk: `mesh` (FSDP2) cannot be combined with `sync_every` (local SGD runs on DDP)")
    if accelerator.num_processes <= 1:
        import warnings

        warnings.warn("register_gaussk: a single process: local SGD has nothing to average; returning None.", stacklevel=3)
        return None
    if ddp is None:
        raise ValueError("register_gaussk: no DistributedDataParallel module found; call `model = accelerator.prepare(model)` first")
    if getattr(ddp, "_comm_hooks", []) or getattr(ddp, "_gaussk_state", None) is not None:
        raise ValueError("register_gaussk: a DDP comm hook is already registered on this model; call register_gaussk once per model")
    module = ddp.module
    params = {id(p) for p in module.parameters()}
    owners = [o for o in accelerator._optimizers if any(id(p) in params for g in o.param_groups for p in g["params"])]
    if len(owners) != 1:
        raise ValueError(f"register_gaussk: local SGD needs exactly one prepared optimizer over the model, found {len(owners)}")
    local = SparseLocalSGD(module, getattr(owners[0], "optimizer", owners[0]), **options)  # validates the options
    ddp.register_comm_hook(None, local_grad_hook)
    ddp._gaussk_state = local
    _attach_checkpointing(accelerator, local)
    model.register_forward_pre_hook(lambda m, args: local.apply_local())  # after load_state: this rank's own
    destroy_group_at_exit()  # also without accelerator.end_training(): gloo groups destroyed while Python runs
    return local


class _File:
    """One rank's file, in the shape :mod:`lightning_gaussk.checkpoint.shards` expects of a state."""

    def __init__(self, local: SparseLocalSGD) -> None:
        self.local = local

    @property
    def layout(self) -> Layout:
        return self.local.layout

    def state_dict(self) -> dict[str, Any]:
        return self.local.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.local.load_state_dict(state_dict, defer_local=True)


def _attach_checkpointing(accelerator: Accelerator, local: SparseLocalSGD) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = lambda r: LOCAL_STATE_FILE.format(rank=r)  # noqa: E731
    manifest = lambda r: LOCAL_MANIFEST_FILE.format(rank=r)  # noqa: E731

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        ckpt.save_rank_files(_File(local), Path(output_dir), rank=rank, world_size=world, shard_name=shard, manifest_name=manifest)

    def load(models: list[Any], input_dir: str) -> None:
        def open_saved() -> ckpt.SavedState | None:
            saved = ckpt.SavedState.from_folder(Path(input_dir), shard_name=shard, manifest_name=manifest)
            if saved is not None and (saved.world_size, saved.layout.ranks_per_node or 1) != (world, local.layout.ranks_per_node or 1):
                raise ValueError(f"register_gaussk: {input_dir} was saved on {saved.layout.describe()}; local SGD resumes on the same layout only")
            return saved

        if not ckpt.restore_state(_File(local), open_saved, rank=rank, world_size=world):
            rank_zero_warn(f"{input_dir} has no {LOCAL_STATE_FILE.format(rank='*')}: the outer loop starts afresh.")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
