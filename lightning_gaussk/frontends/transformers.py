"""Hugging Face Transformers ``Trainer`` integration: :func:`register_gaussk`.

The ``Trainer`` builds its own ``Accelerator`` and wraps the model in ``DistributedDataParallel``
only inside ``train()``, so one line after building it is enough::

    from lightning_gaussk.transformers import register_gaussk

    trainer = Trainer(model=model, args=args, train_dataset=train)   # any Trainer subclass too
    register_gaussk(trainer, density=0.01)                           # or GAUSSK_DENSITY=0.01
    trainer.train()                  # under torchrun / accelerate launch, one process per rank

``register_gaussk`` checks the options now (keywords > ``GAUSSK_*`` variables > defaults) and
refuses FSDP and DeepSpeed Trainers; it adds a :class:`GaussKCallback` (first in the Trainer's
callback list) which, at every ``train()``:

- ``on_train_begin`` (the DDP module exists, the optimizer is prepared): registers the Accelerate
  path on the Trainer's accelerator and model (:func:`lightning_gaussk.frontends.accelerate.register_gaussk`:
  the per-step TopK-SGD hook with a ``GaussKState``; with ``sync_every``,
  :func:`lightning_gaussk.frontends.accelerate_local.register_local_sgd`: local SGD), once per DDP
  module; with ``train(resume_from_checkpoint=...)`` restores every rank's shard from the
  checkpoint folder (:meth:`~lightning_gaussk.frontends.wiring.HookCheckpoint.restore_files`: a
  collective, a missing or corrupt shard on any rank raises on every rank);
- ``on_step_begin``: tells the hook the optimizer step (``state.global_step``), so warm-up and
  seeds follow optimizer steps whatever the accumulation;
- ``on_save``: every rank writes its own shard and manifest into the ``checkpoint-N`` folder
  (the files and format of Accelerate's ``save_state``: ``gaussk_state_rank{r}.pt``, or
  ``gaussk_local_rank{r}.pt`` for local SGD);
- ``on_log``: adds the hook's figures since the previous log to the Trainer's logs (and to
  ``state.log_history``) as ``gaussk/<figure>``
  (:func:`~lightning_gaussk.observe.telemetry.telemetry_figures`,
  :func:`~lightning_gaussk.observe.telemetry.local_sgd_figures`);
- ``on_train_end``: local SGD ends on ``theta`` (``end_on_theta``); rank 0 logs what this
  ``train()`` sent against dense DDP (:class:`~lightning_gaussk.frontends.wiring.FitSummary`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import warnings
from pathlib import Path
from typing import Any

from lightning_gaussk.config import LocalSGDConfig, parse_env
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.frontends.accelerate import DISABLE_VAR, find_ddp_module, manifest_file, resolve_config, state_file
from lightning_gaussk.frontends.accelerate import register_gaussk as register_accelerate
from lightning_gaussk.frontends.accelerate_local import LOCAL_MANIFEST_FILE, LOCAL_STATE_FILE, register_local_sgd
from lightning_gaussk.frontends.wiring import FitSummary, HookCheckpoint, resolve_options
from lightning_gaussk.observe.telemetry import local_sgd_figures, telemetry_figures
from lightning_gaussk.utils.log import rank_zero_info, rank_zero_warn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lightning_gaussk.transformers needs Hugging Face Transformers: pip install 'lightning-gaussk[transformers]'"
    ) from err

__all__ = ["FSDP_RECIPE", "LOG_PREFIX", "GaussKCallback", "register_gaussk"]

#: first part of the names the figures get in the Trainer's logs (``gaussk/bytes_sent``, ...)
LOG_PREFIX = "gaussk/"

#: why ``register_gaussk`` refuses a Trainer with FSDP, and what to do instead (docs/transformers.md)
FSDP_RECIPE = (
    "register_gaussk(trainer): the Trainer's FSDP (TrainingArguments(fsdp=...) or an Accelerate FSDP plugin) shards "
    "the model over the whole world and reduces gradients with its own collectives: there are no DDP gradient "
    "buckets to sparsify. Either train with plain DDP (no fsdp arguments) and keep register_gaussk, or shard per node "
    "and exchange sparsely between nodes with the FSDP2 paths: Lightning's strategy='gaussk_fsdp', or Accelerate's "
    "register_gaussk(accelerator, model, mesh=mesh) in your own loop (docs/fsdp.md)."
)


# ------------------------------------------------------------------------------- registration
def register_gaussk(trainer: Trainer, **options: Any) -> GaussKCallback:
    """TopK-SGD gradient sparsification (or, with ``sync_every``, sparse local SGD) for a
    ``transformers.Trainer``: one line after building it, on every process.

    Args:
        trainer: a ``transformers.Trainer`` (subclasses too), launched on several processes
            (``torchrun`` or ``accelerate launch``) so that it trains with DDP.
        **options: any :class:`~lightning_gaussk.config.GaussKConfig` option (``density``,
            ``selector``, ``warmup_steps``, ...) and ``process_group``, as for Accelerate's
            ``register_gaussk``; with ``sync_every``, the options of
            :class:`~lightning_gaussk.config.LocalSGDConfig` (local SGD, docs/local-sgd.md).
            Options not given are read from their ``GAUSSK_*`` variables, then the defaults apply.
            ``GAUSSK_DISABLE=1`` at ``train()`` leaves DDP's dense all-reduce (with a warning).

    Returns:
        The :class:`GaussKCallback` added to the Trainer: its ``state`` is this rank's hook
        state (``GaussKState`` or ``SparseLocalSGD``) once ``train()`` has begun; None before, on a
        single process or with ``GAUSSK_DISABLE``.

    Raises:
        TypeError: ``trainer`` is not a ``transformers.Trainer``; an unknown or ill-typed option
            (naming it).
        ValueError: an invalid option value; a Trainer with FSDP (:data:`FSDP_RECIPE`), DeepSpeed
            or another engine than DDP; ``register_gaussk`` called twice on one Trainer.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"register_gaussk: `trainer` must be a transformers.Trainer, got {type(trainer).__name__}")
    local, resolved = _resolve(options)  # a bad option fails here, on one process too
    _refuse_engines(trainer)
    if any(isinstance(cb, GaussKCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("register_gaussk: this Trainer already has GaussK registered; call register_gaussk once per Trainer")
    callback = GaussKCallback(trainer, resolved, local=local, process_group=options.get("process_group"))
    trainer.callback_handler.callbacks.insert(0, callback)  # first: the reporters after it see the figures
    _follow_resume(trainer, callback)
    return callback


def _resolve(options: dict[str, Any]) -> tuple[LocalSGDConfig | None, dict[str, Any]]:
    """Local SGD's config (with ``sync_every``) or the per-step options, from keywords >
    ``GAUSSK_*`` > defaults. An unknown keyword raises ``TypeError`` naming it."""
    if "sync_every" not in options:
        return None, resolve_config(**options)
    given = {k: v for k, v in options.items() if k != "process_group"}
    known = [f.name for f in dataclasses.fields(LocalSGDConfig)]
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise TypeError(
                f"register_gaussk() got an unknown argument `{name}` for local SGD (sync_every given)"
                + (f"; did you mean `{close[0]}`?" if close else "")
                + f"; allowed: {sorted(known)} and process_group"
            )
    return resolve_options(LocalSGDConfig, given, owner="register_gaussk", also_known=(DISABLE_VAR,)), {}


def _refuse_engines(trainer: Trainer) -> None:
    """FSDP, DeepSpeed and other engines without DDP buckets are refused at registration."""
    args = trainer.args
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None) or getattr(args, "fsdp_plugin_args", None):
        raise ValueError(FSDP_RECIPE)
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
        raise ValueError(
            "register_gaussk(trainer): DeepSpeed runs its own engine (no DDP gradient buckets to sparsify); "
            "train with plain DDP (no deepspeed config) to use GaussK."
        )
    kind = getattr(getattr(trainer, "accelerator", None), "distributed_type", None)
    kind_name = getattr(kind, "name", str(kind))
    if kind_name in ("FSDP",):
        raise ValueError(FSDP_RECIPE)
    if kind_name in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise ValueError(
            f"register_gaussk(trainer): Accelerate distributed type {kind_name} is not supported; GaussK hooks "
            "DistributedDataParallel gradient buckets (multi-GPU / multi-CPU DDP)."
        )


def _follow_resume(trainer: Trainer, callback: GaussKCallback) -> None:
    """Wrap this Trainer's ``train`` so the callback knows the checkpoint it resumes from
    (``on_train_begin`` is not told)."""
    train = trainer.train

    @functools.wraps(train)
    def train_and_resume_gaussk(*args: Any, **kwargs: Any) -> Any:
        callback._resume = kwargs["resume_from_checkpoint"] if "resume_from_checkpoint" in kwargs else (args[0] if args else None)
        try:
            return train(*args, **kwargs)
        finally:
            callback._resume = None

    trainer.train = train_and_resume_gaussk  # type: ignore[method-assign]


def _env_true(var: str) -> bool:
    raw = os.environ.get(var, "")
    return bool(raw.strip()) and parse_env(var, raw, bool)


# ------------------------------------------------------------------------------- the callback
class GaussKCallback(TrainerCallback):
    """The Trainer's side of :func:`register_gaussk` (see the module doc): registration when the
    DDP module exists, the step, the checkpoint shards, the figures in the logs, the summary.

    Args:
        trainer: the Trainer it serves.
        options: the resolved per-step options (:func:`lightning_gaussk.frontends.accelerate.resolve_config`).
        local: local SGD's config instead (``sync_every`` given).
        process_group: the group to sparsify over (None: the world).

    Attributes:
        state: this rank's ``GaussKState`` / ``SparseLocalSGD`` once ``train()`` began, else None.
        last: the figures (without the prefix) added to the latest log, on every rank.
    """

    def __init__(self, trainer: Trainer, options: dict[str, Any], *, local: LocalSGDConfig | None = None,
                 process_group: Any = None) -> None:  # fmt: skip
        self.trainer = trainer
        self.options = {k: v for k, v in options.items() if k != "process_group"}
        self.local = local
        self.process_group = process_group
        self.state: Any = None
        self.last: dict[str, float] = {}
        self._ddp: Any = None
        self._summary: FitSummary | None = None
        self._before: dict[str, int] = {}
        self._resume: Any = None

    # ---------------------------------------------------------------- lifecycle
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Register on the DDP module (once per module), restore from the checkpoint resumed from."""
        resume = self._resume
        if resume is True:
            resume = get_last_checkpoint(args.output_dir)
        elif resume is False:
            resume = None
        ddp = find_ddp_module(self.trainer.model_wrapped)
        if self.state is None or ddp is not self._ddp:
            self._register(ddp)
        if self.state is None:
            return
        if resume is not None:
            self._restore(Path(resume))
        elif state.global_step > 0:
            rank_zero_warn(
                f"register_gaussk: training resumes at step {state.global_step} without a known checkpoint folder "
                "(train() was not called through the Trainer's own train?): the GaussK state is not restored."
            )
        self._summary = FitSummary(self.state, state.global_step)
        self._before = dict(self.state.telemetry)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Tell the per-step hook the optimizer step it serves (local SGD counts its own)."""
        if self.state is not None and not isinstance(self.state, SparseLocalSGD):
            self.state.set_step(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every rank writes its own shard and manifest into the checkpoint folder just saved."""
        if self.state is None:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"  # the Trainer's _save_checkpoint
        rank, world = self._rank_world()
        HookCheckpoint(self.state, owner="register_gaussk").save_files(folder, rank=rank, world_size=world, **self._names())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the figures since the previous log to ``logs`` (and to the ``log_history`` entry)."""
        if self.state is None or logs is None:
            return
        now = dict(self.state.telemetry)
        if isinstance(self.state, SparseLocalSGD):
            figures = local_sgd_figures(self._before, now, self.state.window_position, self.state.dense_bytes_per_step)
        else:
            figures = telemetry_figures(self._before, now, self._rank_world()[1], nodes=self.state.layout.nodes)
        if not figures:
            return
        self._before, self.last = now, figures
        named = {LOG_PREFIX + k: v for k, v in figures.items()}
        history = state.log_history
        if history and {k: v for k, v in history[-1].items() if k != "step"} == logs:
            history[-1].update(named)
        logs.update(named)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Local SGD: a last outer step (``end_on_theta``); rank 0 logs this ``train()``'s summary."""
        local = self.state
        if isinstance(local, SparseLocalSGD):
            position = local.window_position
            if local.finish():
                rank_zero_info(
                    f"register_gaussk: training ended {position} optimizer steps into a window of sync_every="
                    f"{local.sync_every}; a last outer step ran, so every rank ends on theta (end_on_theta=True)."
                )
            elif not local.on_theta:
                rank_zero_warn(
                    f"register_gaussk: training ended {position} optimizer steps into a window of sync_every="
                    f"{local.sync_every} with end_on_theta=False: every rank holds its own local model, and what the "
                    "Trainer saves from here is rank 0's."
                )
        elif local is not None:
            local.wait_idle()
        if self._summary is not None:
            self._summary.log(state.global_step)
            self._summary = None

    # ---------------------------------------------------------------- parts
    def _rank_world(self) -> tuple[int, int]:
        accelerator = self.trainer.accelerator
        return accelerator.process_index, accelerator.num_processes

    def _names(self) -> dict[str, Any]:
        if isinstance(self.state, SparseLocalSGD):
            return {
                "shard_name": lambda r: LOCAL_STATE_FILE.format(rank=r),
                "manifest_name": lambda r: LOCAL_MANIFEST_FILE.format(rank=r),
            }
        return {"shard_name": state_file, "manifest_name": manifest_file}

    def _register(self, ddp: Any) -> None:
        """The Accelerate path on the Trainer's accelerator and wrapped model; its own end-of-training
        summary is taken over (logged at ``on_train_end``, not at ``accelerator.end_training()``)."""
        if _env_true(DISABLE_VAR):
            warnings.warn(f"{DISABLE_VAR} is set: GaussK is not registered; gradients use DDP's dense allreduce.", stacklevel=2)
            self.state, self._ddp = None, ddp
            return
        accelerator, model = self.trainer.accelerator, self.trainer.model_wrapped
        if self.local is not None:
            if accelerator.num_processes > 1 and ddp is None:
                raise ValueError(_no_ddp(model, accelerator.num_processes))
            state = register_local_sgd(accelerator, model, self.local, ddp=ddp, process_group=self.process_group)
        else:
            if accelerator.num_processes > 1 and ddp is None:
                raise ValueError(_no_ddp(model, accelerator.num_processes))
            extra = {} if self.process_group is None else {"process_group": self.process_group}
            with warnings.catch_warnings():  # resolved at registration: its variables were reported there already
                warnings.filterwarnings("ignore", message=r"register_gaussk: GAUSSK_\w+=.* is overridden by")
                warnings.filterwarnings("ignore", message="Unknown GaussK environment variable")
                state = register_accelerate(accelerator, model, **self.options, **extra)
        summaries = accelerator.__dict__.get("_gaussk_summaries", [])
        summaries[:] = [s for s in summaries if s.state is not state]
        self.state, self._ddp = state, ddp

    def _restore(self, folder: Path) -> None:
        """This rank's shard from ``folder`` (a collective); a folder without GaussK files: a warning."""
        rank, world = self._rank_world()
        names = self._names()
        if not HookCheckpoint(self.state, owner="register_gaussk").restore_files(folder, rank=rank, world_size=world, **names):
            rank_zero_warn(
                f"{folder} has no {names['shard_name']('*')} (not saved with register_gaussk?): the GaussK state starts "
                "afresh (residuals / error feedback from zero)."
            )


def _no_ddp(model: Any, world: int) -> str:
    return (
        f"register_gaussk(trainer): no DistributedDataParallel module in the Trainer's model ({type(model).__name__}) "
        f"on {world} processes: GaussK needs the Trainer to train with DDP (not model parallel, FSDP or DeepSpeed)."
    )
