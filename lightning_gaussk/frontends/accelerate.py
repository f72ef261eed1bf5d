"""Hugging Face Accelerate integration: :func:`register_gaussk`.

Accelerate cannot register a custom DDP comm hook itself (``DistributedDataParallelKwargs``
accepts only its built-in enum and silently ignores a callable), and ``accelerate config`` files
have no keys for one. So, after ``accelerator.prepare(...)``::

    from lightning_gaussk.frontends.accelerate import register_gaussk

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register_gaussk(accelerator, model, density=0.01)   # or GAUSSK_DENSITY=0.01

``register_gaussk``

- finds the ``DistributedDataParallel`` module (through ``torch.compile``'s ``OptimizedModule``
  and other ``.module`` wrappers, or among the accelerator's prepared models);
- registers :func:`~lightning_gaussk.gaussk_hook` on it, once, with a :class:`GaussKState` bound
  to the parameter names;
- adds the state to ``accelerator.save_state()`` / ``load_state()``: every rank writes its OWN
  shard ``gaussk_state_rank{r}.pt`` and manifest ``gaussk_manifest_rank{r}.json`` (sha256, size,
  layout) in the checkpoint folder, atomically (Accelerate writes objects registered with
  ``register_for_checkpointing`` on the main process only, which would lose every other rank's
  residuals); ``load_state`` reads them through the same restore protocol as the Lightning
  strategy (:mod:`lightning_gaussk.checkpoint`: checks, layout policy, and a missing or corrupt
  shard on any rank raising on every rank);
- reads its settings from keyword arguments, then ``GAUSSK_*`` environment variables, then the
  defaults (see :data:`ENV_VARS`);
- at ``accelerator.end_training()``, logs on rank 0 what it sent against dense DDP since
  registration (or since the last ``load_state``), the optimizer steps and the time in
  communication where measured (:class:`~lightning_gaussk.frontends.wiring.FitSummary`; rank 0's
  own counters, no collective).

Optimizer steps: the hook counts synchronising backward passes. Under
``accelerator.accumulate(model)`` non-final micro-batches run in ``no_sync``, so this equals the
number of optimizer steps. With ``GradientAccumulationPlugin(sync_each_batch=True)`` every
micro-batch synchronises; then the step is counted by a post-step hook on the (first) prepared
optimizer that holds the model's parameters instead.
"""

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_gaussk.comm.inflight import destroy_group_at_exit
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig, config_fields, env_options, env_var, parse_env, warn_unknown_env_vars
from lightning_gaussk.engine.ddp_hook import gaussk_hook
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.frontends.wiring import FitSummary, HookCheckpoint, resolve_options, summary_at_end_training, tell_loss_scale
from lightning_gaussk.utils.log import rank_zero_warn

try:
    from accelerate import Accelerator
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lightning_gaussk.accelerate needs Hugging Face Accelerate: pip install 'lightning-gaussk[accelerate]'"
    ) from err

__all__ = [
    "DISABLE_VAR",
    "ENV_VARS",
    "FSDP_RECIPE",
    "MANIFEST_FILE",
    "STATE_FILE",
    "config_from_env",
    "find_ddp_module",
    "manifest_file",
    "register_gaussk",
    "resolve_config",
    "state_file",
]

#: configuration key -> environment variable read by :func:`register_gaussk` (one per
#: :class:`~lightning_gaussk.config.GaussKConfig` field: ``GAUSSK_`` + the upper-cased name)
ENV_VARS: dict[str, str] = {name: env_var(name) for name in config_fields()}
#: set to a true value (1, true, yes, on) to skip registration: plain DDP allreduce, same script
DISABLE_VAR = "GAUSSK_DISABLE"
#: per-rank file written into the ``accelerator.save_state()`` folder (first registered model;
#: the i-th further one, i >= 1, writes ``gaussk_state_{i}_rank{rank}.pt``, as Accelerate numbers models)
STATE_FILE = "gaussk_state_rank{rank}.pt"
#: rank ``rank``'s manifest next to its file: ``{"format": "lightning_gaussk.shards/1", "world_size",
#: "layout", "files": [its entry: name, sha256, bytes]}`` (merged with the other ranks' at load)
MANIFEST_FILE = "gaussk_manifest_rank{rank}.json"

_UNSUPPORTED = {"FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"}

#: why ``register_gaussk`` refuses FSDP2, and what to do instead (docs/fsdp.md, "Accelerate")
FSDP_RECIPE = (
    "register_gaussk: Accelerate's FSDP2 cannot carry the sparse replica exchange: it shards 1-D over the whole world "
    "(no replicas to exchange between) or, with ParallelismConfig(dp_replicate_size, dp_shard_size), natively 2-D "
    "(HSDP), whose dense all-reduce across nodes runs before any hook. Shard per node yourself under plain "
    "`accelerate launch` (no FSDP plugin): mesh = init_device_mesh(device, (nodes, gpus_per_node), "
    "mesh_dim_names=('replicate', 'shard')); fully_shard(block, mesh=mesh['shard']) for each block and the model; "
    "prepare only the optimizer and data loaders; then register_gaussk(accelerator, model, mesh=mesh, density=...). "
    "The recipe, with checkpoints: docs/fsdp.md#accelerate"
)


# ------------------------------------------------------------------------------- configuration
def config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given by ``GAUSSK_*`` environment variables (only those that are set).

    Raises ``ValueError`` naming the variable for a value that does not parse; warns about
    unknown ``GAUSSK_*`` names (likely typos).
    """
    environ = os.environ if environ is None else environ
    out = env_options(environ)
    warn_unknown_env_vars(environ, also_known=(DISABLE_VAR,))
    return out


def resolve_config(environ: Mapping[str, str] | None = None, **config: Any) -> dict[str, Any]:
    """Merge keyword arguments > ``GAUSSK_*`` environment variables > defaults, and validate
    (:func:`lightning_gaussk.frontends.wiring.resolve_options`, as the strategies do): every
    :class:`~lightning_gaussk.config.GaussKConfig` field, plus ``process_group`` when given (a
    keyword only). A variable overridden by a keyword is warned about, one used is logged on rank 0.

    Invalid values raise ``TypeError`` / ``ValueError``; when a value came from the environment
    the message names the variable.
    """
    known = set(config_fields())
    unknown = set(config) - known - {"process_group"}
    if unknown:
        raise TypeError(
            f"register_gaussk() got unknown argument(s) {sorted(unknown)}; allowed: {sorted(known)} and process_group"
        )
    options = {k: v for k, v in config.items() if k != "process_group"}
    merged = resolve_options(GaussKConfig, options, owner="register_gaussk", environ=environ, also_known=(DISABLE_VAR,)).to_dict()
    if "process_group" in config:
        merged["process_group"] = config["process_group"]
    return merged


def _env_true(var: str, environ: Mapping[str, str]) -> bool:
    raw = environ.get(var, "")
    return bool(raw.strip()) and parse_env(var, raw, bool)


# ------------------------------------------------------------------------------- finding DDP
def _is_unsupported_wrapper(module: Any) -> str | None:
    name = type(module).__name__
    if name in ("FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine"):
        return name
    if any(c.__name__ == "FSDPModule" for c in type(module).__mro__):  # FSDP2 (fully_shard)
        return "FSDP2 (fully_shard)"
    return None


def find_ddp_module(model: Any, max_depth: int = 8) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` inside ``model``, looking through ``torch.compile``
    (``_orig_mod``) and wrappers exposing ``.module``; None if there is none.

    Raises ``ValueError`` on FSDP / DeepSpeed wrappers (no DDP buckets to hook).
    """
    seen = model
    for _ in range(max_depth):
        if isinstance(seen, DistributedDataParallel):
            return seen
        bad = _is_unsupported_wrapper(seen)
        if bad == "FSDP2 (fully_shard)":
            raise ValueError(FSDP_RECIPE)
        if bad:
            raise ValueError(
                f"register_gaussk: the model is wrapped by {bad}, which does not use DDP gradient buckets; "
                "GaussK sparsification needs DistributedDataParallel (Accelerate's MULTI_GPU / MULTI_CPU modes)."
            )
        inner = getattr(seen, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            inner = seen.__dict__.get("_modules", {}).get("module") if isinstance(seen, nn.Module) else None
        if not isinstance(inner, nn.Module):
            return None
        seen = inner
    return None


def _unwrapped(module: nn.Module) -> nn.Module:
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(module, DistributedDataParallel):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


# ------------------------------------------------------------------------------- registration
def register_gaussk(accelerator: Accelerator, model: nn.Module, mesh: Any = None, **config: Any) -> GaussKState | None:
    """Register TopK-SGD gradient sparsification on a model prepared by Accelerate.

    Call after ``accelerator.prepare(...)``, with the model it returned (the unwrapped model
    passed to ``prepare`` is found too), on every process.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model``.
        model: the prepared model (``DistributedDataParallel``, possibly inside ``torch.compile``),
            or a model you sharded per node with FSDP2 (``fully_shard(..., mesh=mesh["shard"])``,
            not prepared; see :data:`FSDP_RECIPE`).
        mesh: with an FSDP2 model, its 2-D ``("replicate", "shard")`` device mesh: the hook is then
            :func:`lightning_gaussk.engine.fsdp.register_gaussk_fsdp`'s, and ``save_state`` / ``load_state``
            carry its residual shards.
        **config: any :class:`~lightning_gaussk.config.GaussKConfig` option (``density``,
            ``selector``, ``error_feedback``, ``warmup_steps``, ``warmup_density``, ``seed``,
            ``dense_fallback``, ``link_gbit``, ...) and ``process_group``. Options not given
            here are read from their ``GAUSSK_*`` variables (:data:`ENV_VARS`, e.g.
            ``GAUSSK_DENSITY``, ``GAUSSK_DENSE_FALLBACK``); then the defaults apply.
            With ``sync_every``: local SGD instead (models averaged every ``sync_every``
            optimizer steps, no per-step exchange); the options are then those of
            :class:`~lightning_gaussk.config.LocalSGDConfig` (keywords > ``GAUSSK_*`` variables >
            defaults, e.g. ``GAUSSK_OUTER_LR``) and the result is a
            :class:`~lightning_gaussk.local_sgd.SparseLocalSGD`
            (:func:`lightning_gaussk.frontends.accelerate_local.register_local_sgd`, docs/local-sgd.md).

    Returns:
        This rank's :class:`GaussKState` (``state.telemetry`` counts hook calls and bytes), or
        ``None`` when nothing was registered: a single process (with a warning) or
        ``GAUSSK_DISABLE=1`` (plain DDP allreduce, with a warning). ``accelerator.end_training()``
        then logs, on rank 0, what it sent against dense DDP
        (:func:`~lightning_gaussk.frontends.wiring.summary_at_end_training`).

    Raises:
        TypeError / ValueError: invalid settings (naming the argument or environment variable);
            an FSDP / DeepSpeed / Megatron / XLA accelerator; a model that was not prepared (no
            DDP module while distributed); a comm hook already registered on the model.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"register_gaussk: `accelerator` must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"register_gaussk: `model` must be the nn.Module returned by accelerator.prepare, got {type(model).__name__}")
    if "sync_every" in config:  # local SGD: models averaged every sync_every optimizer steps (docs/local-sgd.md)
        from lightning_gaussk.frontends.accelerate_local import register_local_sgd

        process_group = config.pop("process_group", None)
        local = resolve_options(LocalSGDConfig, config, owner="register_gaussk", also_known=(DISABLE_VAR,))  # validate first
        return register_local_sgd(  # type: ignore[return-value]
            accelerator, model, local, mesh=mesh, ddp=find_ddp_module(model), process_group=process_group
        )
    resolved = resolve_config(**config)  # validate first: a bad setting fails even on one process
    kind = accelerator.distributed_type
    kind_name = getattr(kind, "name", str(kind))
    if kind_name == "FSDP":
        raise ValueError(FSDP_RECIPE)
    if kind_name in _UNSUPPORTED:
        raise ValueError(
            f"register_gaussk: Accelerate distributed type {kind_name} is not supported; GaussK sparsification "
            "hooks DistributedDataParallel gradient buckets (use MULTI_GPU / MULTI_CPU, i.e. plain DDP)."
        )
    if _env_true(DISABLE_VAR, os.environ):
        warnings.warn(f"{DISABLE_VAR} is set: GaussK is not registered; gradients use DDP's dense allreduce.", stacklevel=2)
        return None
    if accelerator.num_processes <= 1:
        warnings.warn(
            "register_gaussk: a single process (not distributed): there is no gradient communication to "
            "sparsify; nothing registered, returning None.",
            stacklevel=2,
        )
        return None

    destroy_group_at_exit()  # also without accelerator.end_training(): gloo groups destroyed while Python runs
    if mesh is not None:
        return _register_fsdp(accelerator, model, mesh, resolved)
    ddp = find_ddp_module(model)
    if ddp is None:  # the user may have passed the module given to prepare(): find its wrapper
        for prepared in accelerator._models:
            cand = find_ddp_module(prepared)
            if cand is not None and _unwrapped(cand) is _unwrapped(model):
                ddp = cand
                break
    if ddp is None:
        prepared_flag = getattr(model, "_is_accelerate_prepared", False)
        raise ValueError(
            "register_gaussk: no DistributedDataParallel module found in "
            f"{type(model).__name__} while running on {accelerator.num_processes} processes"
            + (
                " (it was prepared, but Accelerate did not wrap it in DDP: evaluation_mode=True or no trainable parameters?)."
                if prepared_flag
                else ". Call `model = accelerator.prepare(model)` first and pass the model it returns."
            )
        )
    registered = getattr(ddp, "_comm_hooks", [])  # DDP keeps (hook, state) pairs here
    if registered or getattr(ddp, "_gaussk_state", None) is not None:
        hooks = [getattr(h, "__qualname__", repr(h)) for h, _ in registered]
        raise ValueError(
            f"register_gaussk: a DDP comm hook is already registered on this model ({hooks}); DDP allows one. "
            "Call register_gaussk once per model, and do not also pass DistributedDataParallelKwargs(comm_hook=...)."
        )

    process_group = resolved.pop("process_group", None)
    state = GaussKState(GaussKConfig(**resolved), process_group=process_group).bind(ddp)
    state.setup_layout()  # node mode from LOCAL_WORLD_SIZE (torchrun, accelerate launch) under "auto"
    ddp.register_comm_hook(state, gaussk_hook)
    ddp._gaussk_state = state  # marks the module; found again by a second call
    summary = summary_at_end_training(accelerator, state)
    _attach_checkpointing(accelerator, state, summary)
    _attach_step_counter(accelerator, ddp, state)
    _attach_loss_scale(accelerator, model, state)
    _adapt_optimizers(accelerator, ddp, state)
    return state


def _register_fsdp(accelerator: Accelerator, model: nn.Module, mesh: Any, resolved: dict[str, Any]) -> GaussKState:
    """The FSDP2 recipe: the sparse replica exchange on every unit of a model sharded per node
    (:func:`lightning_gaussk.engine.fsdp.register_gaussk_fsdp`), and the same checkpoint, loss-scale and
    optimizer wiring as for DDP. Optimizer steps are counted per backward that reduces gradients
    (``model.set_requires_gradient_sync(accelerator.sync_gradients)`` under accumulation)."""
    from lightning_gaussk.engine.fsdp import register_gaussk_fsdp

    if resolved.get("process_group") is not None:
        raise ValueError("register_gaussk: `process_group` cannot be used with `mesh` (the mesh gives the groups)")
    resolved.pop("process_group", None)
    target = _unwrapped(model)
    if getattr(target, "_gaussk_state", None) is not None:
        raise ValueError("register_gaussk: this FSDP2 model already has the GaussK hook; call register_gaussk once per model")
    state = register_gaussk_fsdp(target, mesh, GaussKConfig(**resolved))
    target._gaussk_state = state
    _attach_checkpointing(accelerator, state, summary_at_end_training(accelerator, state))
    _attach_loss_scale(accelerator, model, state)
    _adapt_optimizers(accelerator, target, state)
    return state


def _adapt_optimizers(accelerator: Accelerator, ddp: nn.Module, state: GaussKState) -> None:
    """``remedies="auto"``: adapt every prepared optimizer that holds this model's parameters
    (:func:`lightning_gaussk.frontends.remedies.wrap_optimizer`; an optimizer created after
    ``register_gaussk`` needs ``wrap_optimizer(optimizer, state)`` by hand)."""
    from lightning_gaussk.frontends.remedies import wrap_optimizer

    params = {id(p) for p in ddp.parameters()}
    for opt in accelerator._optimizers:
        if any(id(p) in params for group in opt.param_groups for p in group["params"]):
            wrap_optimizer(opt, state)


def _attach_loss_scale(accelerator: Accelerator, model: nn.Module, state: GaussKState) -> None:
    """fp16 mixed precision: before each forward, tell the hook the GradScaler's current scale
    (its backward sees gradients scaled by it; see ``GaussKState.set_loss_scale``)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return

    def follow(module: nn.Module, args: Any) -> None:
        if module.training:
            tell_loss_scale(state, scaler)

    model.register_forward_pre_hook(follow)  # on the outermost module: runs eagerly, also around torch.compile


def _attach_step_counter(accelerator: Accelerator, ddp: DistributedDataParallel, state: GaussKState) -> None:
    gs = accelerator.gradient_state
    if not (gs.num_steps > 1 and gs.plugin_kwargs.get("sync_each_batch", False)):
        return  # the hook's own count of synchronising backward passes is the optimizer step
    params = {id(p) for p in ddp.parameters()}
    owners = [
        opt for opt in accelerator._optimizers
        if any(id(p) in params for group in opt.param_groups for p in group["params"])
    ]
    if not owners:
        warnings.warn(
            "register_gaussk: sync_each_batch=True synchronises every micro-batch and no prepared optimizer holds "
            "this model's parameters: the hook's step counter counts micro-batches (affects warm-up and randomised "
            "selectors).",
            stacklevel=3,
        )
        return
    state.set_step(state.step)  # the counter below owns the step from now on
    inner = getattr(owners[0], "optimizer", owners[0])

    def count(optimizer: Any, args: Any, kwargs: Any) -> None:
        state.set_step(state.step + 1)

    inner.register_step_post_hook(count)


# ------------------------------------------------------------------------------- checkpoints
def state_file(rank: int, index: int = 0) -> str:
    """Name of rank ``rank``'s file for the ``index``-th model registered on an accelerator."""
    return STATE_FILE.format(rank=rank) if index == 0 else f"gaussk_state_{index}_rank{rank}.pt"


def manifest_file(rank: int, index: int = 0) -> str:
    """Name of rank ``rank``'s manifest (its entry: checksum, size, layout) for the ``index``-th model."""
    return MANIFEST_FILE.format(rank=rank) if index == 0 else f"gaussk_manifest_{index}_rank{rank}.json"


def _attach_checkpointing(accelerator: Accelerator, state: GaussKState, summary: FitSummary | None = None) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    index = getattr(accelerator, "_gaussk_registrations", 0)  # several models: one file set each
    accelerator._gaussk_registrations = index + 1

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        _save_files(state, Path(output_dir), rank, world, index)

    def load(models: list[Any], input_dir: str) -> None:
        _load_into(state, Path(input_dir), rank, world, index)
        if summary is not None:  # the summary counts from the restored counters on
            summary.restart(state.step)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _save_files(state: GaussKState, folder: Path, rank: int, world: int, index: int = 0) -> None:
    """This rank's shard ``state_file(rank, index)`` and its one-entry manifest
    ``manifest_file(rank, index)`` (:meth:`~lightning_gaussk.frontends.wiring.HookCheckpoint.save_files`:
    atomic, no collective, since a rank must not wait for the others inside Accelerate's pre-hook)."""
    HookCheckpoint(state, owner="register_gaussk").save_files(
        folder, rank=rank, world_size=world, shard_name=lambda r: state_file(r, index),
        manifest_name=lambda r: manifest_file(r, index), extra={"index": index},
    )  # fmt: skip


def _load_into(state: GaussKState, folder: Path, rank: int, world: int, index: int = 0) -> None:
    """Restore ``state`` from a ``save_state`` folder through the one restore protocol
    (:meth:`~lightning_gaussk.frontends.wiring.HookCheckpoint.restore_files`): this rank's own
    shard on the same layout, else the documented policy (with a warning); per-rank manifests
    merged, files of the earlier format read without checksums. A collective: a missing or corrupt
    shard on any rank raises on every rank. A folder without GaussK files on every rank: a
    warning, residuals start from zero."""
    found = HookCheckpoint(state, owner="register_gaussk").restore_files(
        folder, rank=rank, world_size=world, shard_name=lambda r: state_file(r, index), manifest_name=lambda r: manifest_file(r, index)
    )
    if not found:
        rank_zero_warn(
            f"{folder} has no {state_file(0, index).replace('rank0', 'rank*')} (not saved with register_gaussk?): "
            "residuals start from zero."
        )
