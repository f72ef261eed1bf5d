"""Local SGD under Hugging Face Accelerate: the path ``register_gaussk(..., sync_every=H)`` takes.

After ``accelerator.prepare(...)``::

    local = register_gaussk(accelerator, model, sync_every=16, density=0.02, quantize=2)

- DDP's per-step all-reduce is switched off (:func:`~lightning_gaussk.engine.local.grad_hook.local_grad_hook`);
- :class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` hooks the prepared optimizer's inner
  optimizer: Accelerate steps it once per accumulation cycle, so ``sync_every`` counts optimizer
  steps, not micro-batches (a step a GradScaler skips is not counted either);
- ``save_state`` writes every rank's own ``gaussk_local_rank{r}.pt`` and manifest (error feedback,
  ``theta``, outer momentum, window position, this rank's local model and inner optimizer
  state); ``load_state`` restores them through :func:`lightning_gaussk.checkpoint.protocol.restore_state`
  (a missing or corrupt file on any rank raises on every rank). Accelerate loads rank 0's model
  and optimizer after its pre-hooks, so each rank's own are put back at the model's next forward;
- the options are :class:`~lightning_gaussk.config.LocalSGDConfig`'s, from keywords > ``GAUSSK_*``
  variables (``GAUSSK_SYNC_EVERY``, ``GAUSSK_OUTER_LR``, ...) > defaults, as everywhere
  (:func:`lightning_gaussk.frontends.wiring.resolve_options`);
- at ``accelerator.end_training()``, rank 0 logs the optimizer and outer steps, the bytes sent
  against dense DDP over the same optimizer steps and the outer steps' time
  (:func:`lightning_gaussk.frontends.wiring.summary_at_end_training`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from lightning_gaussk.comm.inflight import destroy_group_at_exit
from lightning_gaussk.config import LocalSGDConfig
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.engine.local.grad_hook import local_grad_hook
from lightning_gaussk.frontends.wiring import FitSummary, HookCheckpoint, summary_at_end_training
from lightning_gaussk.utils.log import rank_zero_warn

__all__ = ["LOCAL_MANIFEST_FILE", "LOCAL_STATE_FILE", "register_local_sgd"]

#: rank ``rank``'s file in an ``accelerator.save_state()`` folder
LOCAL_STATE_FILE = "gaussk_local_rank{rank}.pt"
#: its one-entry manifest (checksum, size, layout)
LOCAL_MANIFEST_FILE = "gaussk_local_manifest_rank{rank}.json"


def register_local_sgd(
    accelerator: Accelerator, model: nn.Module, config: LocalSGDConfig, *, mesh: Any = None, ddp: Any = None,
    process_group: Any = None,
) -> SparseLocalSGD | None:
    """Local SGD on a model prepared by Accelerate (``register_gaussk`` with ``sync_every``).

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` and the optimizer.
        model: the prepared model (``DistributedDataParallel``, possibly inside ``torch.compile``).
        config: the outer loop's options (``register_gaussk`` resolves them from its keywords >
            ``GAUSSK_*`` variables > defaults, :func:`lightning_gaussk.frontends.wiring.resolve_options`).
        mesh: not supported with local SGD (must be None).
        ddp: the ``DistributedDataParallel`` inside ``model``
            (:func:`lightning_gaussk.frontends.accelerate.find_ddp_module`, which ``register_gaussk`` passes).
        process_group: the group to average over (None: the world).

    Returns:
        This rank's :class:`SparseLocalSGD`, or None on a single process (with a warning).

    Raises:
        ValueError: a ``mesh``, a model that was not
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
    local = SparseLocalSGD(module, getattr(owners[0], "optimizer", owners[0]), process_group=process_group, config=config)
    ddp.register_comm_hook(None, local_grad_hook)
    ddp._gaussk_state = local
    _attach_checkpointing(accelerator, local, summary_at_end_training(accelerator, local))
    model.register_forward_pre_hook(lambda m, args: local.apply_local())  # after load_state: this rank's own
    destroy_group_at_exit()  # also without accelerator.end_training(): gloo groups destroyed while Python runs
    return local


def _attach_checkpointing(accelerator: Accelerator, local: SparseLocalSGD, summary: FitSummary) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    files: dict[str, Any] = dict(
        shard_name=lambda r: LOCAL_STATE_FILE.format(rank=r), manifest_name=lambda r: LOCAL_MANIFEST_FILE.format(rank=r)
    )
    checkpoint = HookCheckpoint(local, owner="register_gaussk")  # the whole state in each rank's file

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        checkpoint.save_files(Path(output_dir), rank=rank, world_size=world, **files)

    def load(models: list[Any], input_dir: str) -> None:
        if not checkpoint.restore_files(Path(input_dir), rank=rank, world_size=world, **files):
            rank_zero_warn(f"{input_dir} has no {LOCAL_STATE_FILE.format(rank='*')}: the outer loop starts afresh.")
        summary.restart()  # the summary counts from the restored counters on

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
