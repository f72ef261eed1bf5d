"""The wiring every front end shares, written once: the Lightning strategies and ``register_gaussk``
differ only in the lifecycle methods that call it.

- **options**: :func:`resolve_options` builds an options dataclass (``GaussKConfig``,
  ``LocalSGDConfig``) from keywords > ``GAUSSK_*`` variables > defaults;
  :func:`strategy_options` does it for a strategy's spelled-out signature (LightningCLI reads
  it), :func:`options_doc` writes its ``Args:`` lines and :func:`check_signature` checks it
  against the declaration;
- **keywords**: :func:`check_keywords` refuses, at construction, a keyword that neither the
  strategy nor what it forwards ``**kwargs`` to takes (naming it and listing what is allowed);
- **DDP arguments**: :func:`ddp_arguments` refuses a second comm hook and checks what DDP or the
  launcher would refuse late;
- **the step and the loss scale** told to the hook: :func:`tell_step_and_scale`,
  :func:`tell_loss_scale`;
- **the checkpoint adapter** :class:`HookCheckpoint`: one rank's hook state (DDP, FSDP2 or local
  SGD) as :mod:`lightning_gaussk.checkpoint` writes and restores it, on any layout (local SGD by
  :data:`~lightning_gaussk.checkpoint.reshard.LOCAL_SGD_POLICY`);
- :func:`refuse_fsdp2`: a DDP-based strategy's refusal of a ``configure_model`` that shards with
  FSDP2;
- **the end-of-fit summary**: :class:`FitSummary` reads a hook state's counters when a fit starts
  and logs, on rank 0, what it sent against dense data parallelism, the steps and the time in
  communication when it ends (:func:`~lightning_gaussk.engine.describe.fit_summary_line`,
  :func:`~lightning_gaussk.engine.describe.local_fit_summary_line`); Accelerate logs it at
  ``accelerator.end_training()`` (:func:`summary_at_end_training`);
- :class:`StrategyWiring`, the strategies' mixin (Trainer and Fabric): the deferred restore, the
  checkpoint hooks, the teardown and the end-of-fit summary; over it :class:`PerStepWiring`
  (``gaussk_ddp``, ``gaussk_fsdp``: the options, ``gaussk_state`` / ``gaussk_config``, the optimizer
  remedies) and :class:`LocalSGDWiring` (``gaussk_local``: the options, ``local_sgd`` /
  ``local_config``, the checkpoint entry).

Example::

    class MyStrategy(StrategyWiring, DDPStrategy):
        @override
        def configure_ddp(self) -> None:
            super().configure_ddp()
            self._gaussk_built(build_state(self.model))  # restores what load_checkpoint kept

        @override
        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            self._gaussk_save(checkpoint, shard_dir(filepath))
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch.nn.parallel import DistributedDataParallel

from lightning_gaussk.checkpoint.files import remove_shards
from lightning_gaussk.checkpoint.formats import SavedState
from lightning_gaussk.checkpoint.protocol import restore_state, save_rank_files, save_shards
from lightning_gaussk.checkpoint.reshard import LOCAL_SGD_POLICY
from lightning_gaussk.comm.inflight import destroy_group_at_exit
from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig
from lightning_gaussk.config.declare import ENV_PREFIX, env_values, from_env
from lightning_gaussk.engine.counters import counter_diff
from lightning_gaussk.engine.describe import fit_summary_line, local_fit_summary_line
from lightning_gaussk.engine.fsdp import GaussKFSDPState
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.engine.timing import fold as fold_device_times
from lightning_gaussk.utils.log import rank_zero_info, rank_zero_warn

__all__ = [
    "COMM_HOOK_ARGUMENTS",
    "FitSummary",
    "HookCheckpoint",
    "LoadedState",
    "LocalSGDWiring",
    "PerStepWiring",
    "StrategyWiring",
    "check_keywords",
    "check_signature",
    "foreign_options",
    "ddp_arguments",
    "options_doc",
    "refuse_fsdp2",
    "resolve_options",
    "strategy_options",
    "summary_at_end_training",
    "tell_loss_scale",
    "tell_step_and_scale",
]

C = TypeVar("C")

#: DDP arguments that would register a second comm hook (the strategies register their own)
COMM_HOOK_ARGUMENTS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")


# ------------------------------------------------------------------------------- options
def _variable(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for option values (``True == 1`` is not the same option value)."""
    return type(a) is type(b) and a == b


def _fields(config_cls: type, left_out: Iterable[str] = ()) -> dict[str, dataclasses.Field[Any]]:
    skip = set(left_out)
    return {f.name: f for f in dataclasses.fields(config_cls) if f.name not in skip}  # type: ignore[arg-type]


def resolve_options(
    config_cls: type[C],
    given: Mapping[str, Any],
    *,
    owner: str,
    environ: Mapping[str, str] | None = None,
    also_known: Iterable[str] = (),
) -> C:
    """The options ``config_cls`` from keyword > ``GAUSSK_*`` variable > default
    (docs/configuration.md), validated.

    Args:
        config_cls: an options dataclass declared with :func:`lightning_gaussk.config.declare.option`
            (``GaussKConfig``, ``LocalSGDConfig``).
        given: the options given as keywords (only those given).
        owner: who asks, for the messages (``"GaussKDDPStrategy"``, ``"register_gaussk"``).
        environ: the environment (default ``os.environ``).
        also_known: further ``GAUSSK_*`` names that are not unknown (``GAUSSK_DISABLE``).

    A variable for an option not given is used, and logged on rank 0; one for an option given
    otherwise is overridden, with a warning; ``GAUSSK_*`` names of no option of ``config_cls``
    are warned about. Nothing is ignored silently.

    Raises:
        TypeError / ValueError: an invalid option, naming it (and its variable when it came from
            the environment); a variable whose text does not parse, naming it.
    """
    environ = os.environ if environ is None else environ
    fields = _fields(config_cls)
    known = {_variable(n) for n in fields} | set(also_known)
    unknown = sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known)
    if unknown:
        rank_zero_warn(f"Unknown GaussK environment variable(s) {unknown} ignored; known: {sorted(known)}", stacklevel=3)
    env = env_values(config_cls, environ)  # ValueError naming the variable for text that does not parse
    overridden = [n for n in env if n in given and not _same(env[n], given[n])]
    if overridden:
        rank_zero_warn(
            f"{owner}: "
            + ", ".join(f"{_variable(n)}={environ[_variable(n)]!r} is overridden by {n}={given[n]!r}" for n in overridden)
            + " (precedence: keyword argument > GAUSSK_* variable > default)",
            stacklevel=3,
        )
    config = from_env(config_cls, environ, given)  # validates; names the variable of a bad value
    used = [n for n in env if n not in given]
    if used:
        rank_zero_info(
            f"{owner}: from the environment: " + ", ".join(f"{n}={getattr(config, n)!r} ({_variable(n)})" for n in used)
        )
    return config


def strategy_options(strategy_cls: type, config_cls: type[C], values: Mapping[str, Any], *, left_out: Iterable[str] = ()) -> C:
    """A strategy's options from its constructor's arguments ``values`` (its ``locals()``), by
    :func:`resolve_options`. Every argument reaches ``__init__`` with a value (LightningCLI passes
    all it has), so a keyword counts as given when it differs from the signature's default."""
    defaults = inspect.signature(strategy_cls.__init__).parameters
    names = _fields(config_cls, left_out)
    given = {n: values[n] for n in names if not _same(values[n], defaults[n].default)}
    return resolve_options(config_cls, given, owner=strategy_cls.__name__)


def options_doc(config_cls: type, *, left_out: Iterable[str] = ()) -> str:
    """The ``Args:`` lines of ``config_cls``'s options, from their declared docs (for a strategy's
    docstring, where LightningCLI's ``--help`` shows them)."""
    return "\n".join(f"        {name}: {f.metadata['doc']}." for name, f in _fields(config_cls, left_out).items())


def check_signature(init: Callable[..., Any], config_cls: type, *, left_out: Iterable[str] = (), doc: str | None = None) -> list[str]:
    """What differs between a strategy's spelled-out options and their declaration (empty: none).

    The parameters of ``init`` after ``self`` must be ``config_cls``'s fields but ``left_out``:
    the same names in the same order, first, with the same defaults and types; ``doc`` (the
    class docstring) must give each one's declared doc and no line for a left-out option."""
    left_out = tuple(left_out)
    fields = _fields(config_cls, left_out)
    params = list(inspect.signature(init).parameters.values())[1 : 1 + len(fields)]
    names = [p.name for p in params]
    if names != list(fields):
        return [f"names or order: {names} != {list(fields)}"]
    problems = []
    declared, spelled = typing.get_type_hints(config_cls), typing.get_type_hints(init)
    for p in params:
        if not _same(p.default, fields[p.name].default):
            problems.append(f"{p.name}: default {p.default!r} != {fields[p.name].default!r}")
        if spelled.get(p.name) != declared[p.name]:
            problems.append(f"{p.name}: type {spelled.get(p.name)} != {declared[p.name]}")
        if doc is not None and f"{p.name}: {fields[p.name].metadata['doc']}" not in doc:
            problems.append(f"{p.name}: its declared doc is not in the docstring")
    if doc is not None:
        problems += [f"{n}: left out, but documented" for n in left_out if f"        {n}: " in doc]
    return problems


# ------------------------------------------------------------------------------- keywords
def _arguments(fn: Callable[..., Any], skip: Iterable[str] = ()) -> list[str]:
    """The named parameters of ``fn`` (not ``self``, ``*args``, ``**kwargs`` or ``skip``), in order."""
    leave = {"self", *skip}
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in leave]


def check_keywords(
    strategy_cls: type,
    kwargs: Mapping[str, Any],
    *,
    forwarded_to: Callable[..., Any] | None = None,
    forwarded_name: str = "",
    hints: Mapping[str, str] | None = None,
    note: str = "",
) -> None:
    """Refuse, at construction (not inside every worker after launch), a keyword argument that
    neither ``strategy_cls.__init__`` nor what it forwards ``**kwargs`` to (``forwarded_to``, e.g.
    ``DistributedDataParallel.__init__``; None: nothing) takes.

    Args:
        strategy_cls: the strategy whose ``__init__`` got ``kwargs``.
        kwargs: its ``**kwargs``.
        forwarded_to: the callable ``kwargs`` go on to (its ``self`` and ``module`` are not allowed).
        forwarded_name: how to name it in the message.
        hints: why a name is not allowed here, by name (an option of another engine).
        note: a last sentence for the message.

    Raises:
        TypeError: naming the keyword, with the closest allowed name or the hint, and listing the
            strategy's own arguments and those of ``forwarded_to``.
    """
    own = _arguments(strategy_cls.__init__)
    further = [] if forwarded_to is None else sorted(set(_arguments(forwarded_to, ("module",))) - set(own))
    for name in kwargs:
        if name in own or name in further:
            continue
        close = difflib.get_close_matches(name, own + further, n=1)
        why = (hints or {}).get(name) or (f"did you mean `{close[0]}`?" if close else "")
        allowed = f"{strategy_cls.__name__}'s own arguments {own}" + (
            f" and {forwarded_name}'s arguments {further}" if further else " (it forwards no further keywords)"
        )
        raise TypeError(
            f"{strategy_cls.__name__} got an unexpected keyword argument `{name}`" + (f" ({why})" if why else "")
            + f"; allowed: {allowed}" + (f". {note}" if note else "")
        )


def foreign_options(config_cls: type, *others: type, why: str) -> dict[str, str]:
    """The options of the options dataclasses ``others`` that ``config_cls`` lacks, each with
    ``why`` (the ``hints`` of :func:`check_keywords`: an option of another engine)."""
    mine = set(_fields(config_cls))
    return {name: why for other in others for name in _fields(other) if name not in mine}


# ------------------------------------------------------------------------------- DDP arguments
def ddp_arguments(
    strategy_cls: type, kwargs: Mapping[str, Any], *, timeout: Any, start_method: Any, hints: Mapping[str, str] | None = None,
    **flags: Any,
) -> dict[str, Any]:  # fmt: skip
    """The further ``DistributedDataParallel`` keywords of a DDP-based strategy, checked at
    construction (not inside the workers) for what DDP or the launcher would refuse late, or take
    silently as a truthy object: ``flags`` must be bools, ``timeout`` a ``timedelta`` or None,
    ``start_method`` a launcher's, ``kwargs`` DDP's arguments (:func:`check_keywords`, with
    ``hints``) and no second comm hook.

    Raises:
        ValueError / TypeError: naming the argument.
    """
    owner = strategy_cls.__name__
    for name in COMM_HOOK_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{owner} registers its own comm hook; `{name}` would add a second one. Use DDPStrategy for other hooks.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise TypeError(f"`timeout` must be a datetime.timedelta or None, got {type(timeout).__name__} {timeout!r}")
    if start_method not in _START_METHODS:
        raise ValueError(f"`start_method` must be one of {_START_METHODS}, got {start_method!r}")
    check_keywords(
        strategy_cls,
        {k: v for k, v in kwargs.items() if k not in COMM_HOOK_ARGUMENTS},
        forwarded_to=DistributedDataParallel.__init__,
        forwarded_name="torch's DistributedDataParallel",
        hints=hints,
        note="This strategy is DDP with a comm hook: FSDP and DeepSpeed settings are not supported.",
    )
    return {k: v for k, v in kwargs.items() if k not in COMM_HOOK_ARGUMENTS}


# ------------------------------------------------------------------------------- FSDP2 in a DDP strategy
def _is_fsdp2(module: Any) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)  # what fully_shard makes a module


@contextmanager
def refuse_fsdp2(owner: str, module: Any, *, alternatives: str) -> Iterator[None]:
    """Around a LightningModule's ``configure_model`` under a DDP-based strategy (its
    ``model_sharded_context``): a module that shards itself with FSDP2 is refused, naming the
    combination and ``alternatives``. DDP-based strategies have no device mesh: the usual
    ``fully_shard(..., mesh=self.device_mesh["shard"])`` fails on ``None`` (that ``TypeError`` is
    turned into this refusal, chained); a ``fully_shard`` without a mesh is found afterwards.

    Raises:
        ValueError: ``configure_model`` shards with FSDP2.
    """
    message = (
        f"{owner} runs on DDP (every rank holds the whole model, no device mesh): a LightningModule whose configure_model "
        f"shards it with FSDP2 (fully_shard) is not supported. {alternatives}"
    )
    try:
        yield
    except TypeError as err:
        if getattr(module, "device_mesh", None) is None and "'NoneType'" in str(err):
            raise ValueError(f"{message} (configure_model failed on the missing device mesh: {err})") from err
        raise
    if module is not None and any(_is_fsdp2(m) for m in module.modules()):
        raise ValueError(message)


# ------------------------------------------------------------------------------- step and loss scale
def tell_loss_scale(state: Any, scaler: Any) -> None:
    """Tell the hook state the GradScaler's scale of the gradients about to arrive (fp16 mixed
    precision; nothing without an enabled scaler)."""
    if scaler is not None and scaler.is_enabled():
        state.set_loss_scale(scaler.get_scale())


def tell_step_and_scale(state: Any, strategy: Any) -> None:
    """Before a micro-batch's backward (a strategy's ``training_step``): tell the hook state the
    optimizer step it serves (``trainer.global_step``), so warm-up and seeds follow optimizer
    steps, and under "16-mixed" the loss scale (:func:`tell_loss_scale`)."""
    state.set_step(strategy.lightning_module.trainer.global_step)
    tell_loss_scale(state, getattr(strategy.precision_plugin, "scaler", None))


# ------------------------------------------------------------------------------- the checkpoint adapter
class HookCheckpoint:
    """The checkpoint adapter: one rank's hook state (``GaussKState``, ``GaussKFSDPState`` or
    ``SparseLocalSGD``) in the shape :mod:`lightning_gaussk.checkpoint` reads and writes
    (``layout``, ``state_dict()``, ``load_state_dict()``), with the save and restore of its kind.

    Args:
        state: the hook state.
        owner: who saves it, for the messages.
        split: local SGD only: the shard holds this rank's part (error feedback, window position,
            local model, inner optimizer), the checkpoint the shared part (:meth:`shared_state`:
            theta and the outer momentum); False: the shard holds everything.
        shared: with ``split``, the shared part loaded from the checkpoint (merged at load).
    """

    def __init__(self, state: Any, *, owner: str, split: bool = False, shared: Mapping[str, Any] | None = None) -> None:
        self.state, self.owner, self.split, self.shared = state, owner, split, dict(shared or {})
        self._local = isinstance(state, SparseLocalSGD)

    @property
    def layout(self) -> Layout:
        return self.state.layout

    def state_dict(self) -> dict[str, Any]:
        if self._local and self.split:
            return self.state.state_dict(shared=False, local=True)
        return self.state.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._local:  # the local model and inner optimizer go in after the framework's own load
            self.state.load_state_dict({**state_dict, **self.shared}, defer_local=True)
        else:
            self.state.load_state_dict(state_dict)

    def shared_state(self) -> dict[str, Any]:
        """Local SGD's part that is the same on every rank (theta, the outer optimizer's state)."""
        own = self.state.state_dict(shared=False, local=False).keys()
        return {k: v for k, v in self.state.state_dict(local=False).items() if k not in own}

    # ---------------------------------------------------------------- save and restore
    def save(self, folder: Path, *, rank: int, world_size: int) -> dict[str, Any]:
        """Every rank writes its own shard into ``folder``; returns the manifest (a collective)."""
        return save_shards(self, folder, rank=rank, world_size=world_size)

    def save_files(
        self, folder: Path, *, rank: int, world_size: int, shard_name: Callable[[int], str], manifest_name: Callable[[int], str],
        extra: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """This rank's shard ``shard_name(rank)`` and one-entry manifest ``manifest_name(rank)`` in
        ``folder``, with no collective (inside Accelerate's ``save_state`` pre-hook)."""
        save_rank_files(
            self, folder, rank=rank, world_size=world_size, shard_name=shard_name, manifest_name=manifest_name, extra=extra
        )

    def restore(self, open_saved: Callable[[], SavedState | None], *, rank: int, world_size: int, where: str) -> bool:
        """Load this rank's saved state through the one restore protocol (a collective: a failure
        on one rank raises on all). Local SGD: on any layout, by
        :data:`~lightning_gaussk.checkpoint.reshard.LOCAL_SGD_POLICY` (its saves carry no marker).
        Returns False when no rank found a save."""
        if self._local:
            return restore_state(self, open_saved, rank=rank, world_size=world_size, policy=LOCAL_SGD_POLICY)
        # the saved marker must match this state's kind; it picks the reshard policy
        return restore_state(self, open_saved, rank=rank, world_size=world_size, sharding=self.state.sharding)

    def restore_files(
        self, folder: Path, *, rank: int, world_size: int, shard_name: Callable[[int], str], manifest_name: Callable[[int], str]
    ) -> bool:
        """:meth:`restore` from a folder written by :meth:`save_files` (by every rank)."""

        def open_saved() -> SavedState | None:
            return SavedState.from_folder(folder, shard_name=shard_name, manifest_name=manifest_name)

        return self.restore(open_saved, rank=rank, world_size=world_size, where=str(folder))


@dataclass(frozen=True)
class LoadedState:
    """A hook state read from a Lightning checkpoint: its save, and with local SGD the shared part
    the checkpoint holds beside the manifest (``{"manifest": ..., "global": ..., "momentum": ...}``;
    None: the entry is the manifest itself)."""

    saved: SavedState
    shared: dict[str, Any] | None = None

    @classmethod
    def from_entry(cls, entry: Any, path: Any, *, key: str, split: bool, folder: Path | None = None) -> LoadedState:
        """The entry under ``key`` of the checkpoint at ``path``; its shard ``folder`` when known
        (inside a distributed checkpoint folder), else found from the manifest. Raises
        ``ValueError`` saying "malformed" for what is not one (no silent reset)."""
        shared = None
        if split:
            if not isinstance(entry, Mapping) or "manifest" not in entry:
                raise ValueError(f"Checkpoint {path}: `{key}` is malformed (no manifest)")
            entry, shared = entry["manifest"], {k: v for k, v in entry.items() if k != "manifest"}
        if folder is not None and isinstance(entry, Mapping):
            return cls(SavedState.from_manifest(entry, folder), shared)
        return cls(SavedState.from_checkpoint(entry, path, key=key), shared)

    def carry_to(self, folder: Path, *, copy: bool) -> dict[str, Any]:
        """The checkpoint entry of a save that passes this one on unchanged (a save while not
        fitting): its shards copied into ``folder`` by the rank that ``copy``."""
        return _entry(self.saved.carry_to(folder, copy=copy), self.shared)


def _entry(manifest: Mapping[str, Any], shared: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(manifest) if shared is None else {"manifest": manifest, **shared}


# ------------------------------------------------------------------------------- the end-of-fit summary
class FitSummary:
    """A hook state's counters when a fit started, and the line that sums the fit up when it ends.

    Args:
        state: the hook state (``GaussKState``, ``GaussKFSDPState`` or ``SparseLocalSGD``).
        step: the optimizer step the fit starts at (per-step engines; local SGD counts its own
            optimizer steps, ``inner_steps``).

    :meth:`line` is this rank's (no collective: safe at the end of a fit, after an error too);
    :meth:`log` logs it on rank 0, whose own counters it labels as such. After a restore of the
    state's counters, :meth:`restart` (a resumed fit sums up its own steps, not the saved ones).
    """

    def __init__(self, state: Any, step: int = 0) -> None:
        self.state = state
        self.restart(step)

    def restart(self, step: int = 0) -> None:
        """Read the counters (and the optimizer step) now, as the fit's start."""
        self.counters, self.step = dict(self.state.telemetry), int(step)

    def line(self, step: int | None = None) -> str:
        """The line from the start to now; ``step``: the optimizer step now (per-step engines;
        None: the steps are not known and read 0)."""
        state = self.state
        if isinstance(state, SparseLocalSGD):
            return local_fit_summary_line(
                counter_diff(self.counters, state.telemetry), dense_bytes_per_step=state.dense_bytes_per_step,
                sync_every=state.sync_every, layout=state.layout,
            )  # fmt: skip
        fold_device_times(state)  # GPU stage times whose CUDA events are complete (no sync)
        steps = 0 if step is None else int(step) - self.step
        return fit_summary_line(
            counter_diff(self.counters, state.telemetry), steps=steps, layout=state.layout, fsdp=isinstance(state, GaussKFSDPState)
        )

    def log(self, step: int | None = None) -> None:
        """:meth:`line` at INFO on rank 0 (the ``lightning_gaussk`` logger)."""
        rank_zero_info(self.line(step))


def summary_at_end_training(accelerator: Any, state: Any) -> FitSummary:
    """Accelerate's front ends: the end-of-training line of ``state`` (:class:`FitSummary`, counted
    from now), logged on rank 0 when ``accelerator.end_training()`` is called, before
    Accelerate ends its trackers and destroys the process group. Accelerate has no hook there:
    ``end_training`` is wrapped on this accelerator object (once; each registered state logs its
    own line). No line without ``end_training()``."""
    summary = FitSummary(state, getattr(state, "step", 0))
    summaries: list[FitSummary] | None = accelerator.__dict__.get("_gaussk_summaries")
    if summaries is None:
        summaries = accelerator.__dict__["_gaussk_summaries"] = []
        end_training = accelerator.end_training

        def end_training_with_summary(*args: Any, **kwargs: Any) -> Any:
            for done in summaries:
                done.log(getattr(done.state, "step", None))
            summaries.clear()
            return end_training(*args, **kwargs)

        end_training_with_summary.__doc__ = end_training.__doc__
        accelerator.end_training = end_training_with_summary  # type: ignore[method-assign]
    summaries.append(summary)
    return summary


# ------------------------------------------------------------------------------- the Lightning strategies
class StrategyWiring:
    """The Lightning strategies' part of the wiring: a mixin before the Lightning strategy class.

    It keeps the hook state (``_gaussk_state``, set by :meth:`_gaussk_built`) and what
    ``load_checkpoint`` read before it existed (``_gaussk_loaded``: Lightning loads on every rank
    before ``setup()``; the layout is known only when the state is built). The strategy's short
    ``@override`` methods call :meth:`_gaussk_save`, :meth:`_gaussk_load`,
    :meth:`_gaussk_remove`, :meth:`_gaussk_tell` and :meth:`_gaussk_teardown`.

    The end-of-fit summary: its ``on_train_start`` (cooperative: it calls the strategy's next in
    line) reads the state's counters and the optimizer step (:class:`FitSummary`), and
    :meth:`_gaussk_teardown` logs the line on rank 0 at the end of a fit that was not interrupted
    by an error (rank 0's own counters: no collective).

    Every rank's state goes into its own shard (:mod:`lightning_gaussk.checkpoint`: atomic,
    checksummed; a failure on one rank raises on all), the manifest into the checkpoint under
    ``_gaussk_key``.
    """

    #: the checkpoint entry of the hook state
    _gaussk_key: ClassVar[str] = "gaussk"
    #: local SGD: the shared part goes into the checkpoint beside the manifest (:class:`HookCheckpoint`)
    _gaussk_split: ClassVar[bool] = False
    #: what a checkpoint without the entry means
    _gaussk_fresh: ClassVar[str] = "residuals start from zero"

    _gaussk_state: Any = None
    _gaussk_loaded: LoadedState | None = None
    _gaussk_fit: FitSummary | None = None

    # attributes of the Lightning strategy
    global_rank: int
    world_size: int
    is_global_zero: bool

    def _gaussk_adapter(self, shared: Mapping[str, Any] | None = None) -> HookCheckpoint:
        return HookCheckpoint(self._gaussk_state, owner=type(self).__name__, split=self._gaussk_split, shared=shared)

    def _gaussk_built(self, state: Any) -> None:
        """The hook state exists: keep it, destroy the process group at exit (gloo groups while
        Python runs, not at finalization), and restore what a checkpoint loaded before."""
        self._gaussk_state = state
        destroy_group_at_exit()
        loaded, self._gaussk_loaded = self._gaussk_loaded, None
        if loaded is not None:
            self._gaussk_restore(loaded)

    def _gaussk_restore(self, loaded: LoadedState) -> None:
        """Give this rank its saved state (:meth:`HookCheckpoint.restore`: its own shard on the
        same layout, else the documented policy, with a warning). A collective."""
        self._gaussk_adapter(loaded.shared).restore(
            lambda: loaded.saved, rank=self.global_rank, world_size=self.world_size, where="the checkpoint"
        )

    def _gaussk_tell(self) -> None:
        """Before a micro-batch's backward: :func:`tell_step_and_scale`."""
        if self._gaussk_state is not None:
            tell_step_and_scale(self._gaussk_state, self)

    def on_train_start(self) -> None:
        """The next strategy's ``on_train_start``, then the counters and the optimizer step the fit
        starts from (the state is built and restored by now), for the end-of-fit summary."""
        super().on_train_start()  # type: ignore[misc]
        state = self._gaussk_state
        if state is not None:
            self._gaussk_fit = FitSummary(state, self._gaussk_global_step())

    def _gaussk_global_step(self) -> int:
        trainer = getattr(getattr(self, "lightning_module", None), "_trainer", None)
        return int(getattr(trainer, "global_step", 0))

    def _gaussk_interrupted(self) -> bool:
        trainer = getattr(getattr(self, "lightning_module", None), "_trainer", None)
        status = getattr(getattr(trainer, "state", None), "status", None)
        return getattr(status, "value", status) == "interrupted"

    def _gaussk_teardown(self) -> None:
        """Local, no collective (safe after an error): let torch's communication threads release
        the hook's last callbacks before the wrapper and the process go away; local SGD takes its
        hook off the optimizer. At the end of a fit that was not interrupted by an error, the
        summary line on rank 0 (:class:`FitSummary`: this fit's steps and bytes against dense
        data parallelism, and the time in communication where measured)."""
        state = self._gaussk_state
        if isinstance(state, SparseLocalSGD):
            state.remove()
        elif state is not None:
            state.wait_idle()
        fit, self._gaussk_fit = self._gaussk_fit, None
        if fit is not None and fit.state is state and not self._gaussk_interrupted():
            fit.log(self._gaussk_global_step())

    def _gaussk_save(self, checkpoint: dict[str, Any], folder: Path) -> None:
        """Every rank writes its shard into ``folder`` (a collective) and ``checkpoint`` gets the
        entry. Not fitting (no state) but loaded from a checkpoint: the loaded save is carried
        through (rank 0 copies its shards)."""
        if self._gaussk_state is not None:
            adapter = self._gaussk_adapter()
            manifest = adapter.save(folder, rank=self.global_rank, world_size=self.world_size)
            checkpoint[self._gaussk_key] = _entry(manifest, adapter.shared_state() if self._gaussk_split else None)
        elif self._gaussk_loaded is not None:
            checkpoint[self._gaussk_key] = self._gaussk_loaded.carry_to(folder, copy=self.is_global_zero)

    def _gaussk_load(self, checkpoint: Mapping[str, Any], path: Any, *, folder: Path | None = None) -> None:
        """The hook state's entry of a loaded checkpoint, checked (``ValueError`` saying
        "malformed" otherwise), restored now if the state exists, else when it is built. No entry:
        a warning, and the state starts afresh."""
        entry = checkpoint.get(self._gaussk_key)
        if entry is None:
            rank_zero_warn(
                f"Checkpoint {path} has no `{self._gaussk_key}` hook state (not saved by {type(self).__name__}?): "
                f"{self._gaussk_fresh}."
            )
            return
        loaded = LoadedState.from_entry(entry, path, key=self._gaussk_key, split=self._gaussk_split, folder=folder)
        if self._gaussk_state is not None:
            self._gaussk_restore(loaded)
        else:
            self._gaussk_loaded = loaded

    def _gaussk_remove(self, filepath: Any) -> None:
        """Remove the shards beside a removed checkpoint (rank 0; ``ModelCheckpoint(save_top_k=...)``
        removes old checkpoints through ``remove_checkpoint``)."""
        if self.is_global_zero:
            remove_shards(filepath)


class PerStepWiring(StrategyWiring):
    """The per-step strategies' shared part (``gaussk_ddp``, ``gaussk_fsdp``; Trainer and Fabric),
    over :class:`StrategyWiring`: their options (:class:`~lightning_gaussk.config.GaussKConfig`,
    kept by :meth:`_gaussk_keep`), the ``gaussk_state`` / ``gaussk_config`` properties and the
    optimizer remedies (:meth:`_gaussk_remedies`)."""

    #: the options dataclass of the strategy's keywords
    _gaussk_config_cls: ClassVar[type] = GaussKConfig
    #: the keywords that are another engine's options, and why they are refused (:func:`check_keywords`)
    _gaussk_foreign: ClassVar[dict[str, str]] = foreign_options(
        GaussKConfig, LocalSGDConfig, why="an option of local SGD: gaussk_local, diloco"
    )

    _gaussk_config: Any = None

    def _gaussk_keep(self, config: Any) -> None:
        """Keep the resolved options (``gaussk_config``)."""
        self._gaussk_config = config

    @property
    def gaussk_state(self) -> Any:
        """This rank's hook state (``GaussKState``; under FSDP2 ``GaussKFSDPState``); None until
        the model is set up (``fit``, or ``fabric.setup``)."""
        return self._gaussk_state

    @property
    def gaussk_config(self) -> Any:
        """The hook's options (:class:`~lightning_gaussk.config.GaussKConfig`)."""
        return self._gaussk_config

    def _gaussk_remedies(self, optimizers: Iterable[Any], *, follow: bool = True) -> None:
        """The optimizer remedies (:func:`~lightning_gaussk.frontends.remedies.wrap_optimizer`)
        on each of ``optimizers``, once the hook state exists (before: nothing); ``follow``:
        ``gaussk_config`` then holds what they changed (the momentum, a warm-up)."""
        state = self._gaussk_state
        if state is None:
            return
        from lightning_gaussk.frontends.remedies import wrap_optimizer

        for optimizer in optimizers:
            wrap_optimizer(optimizer, state)
        if follow:
            self._gaussk_config = state.config


class LocalSGDWiring(StrategyWiring):
    """The local SGD strategies' shared part (``gaussk_local``, ``diloco``; Trainer and Fabric),
    over :class:`StrategyWiring`: their options (:class:`~lightning_gaussk.config.LocalSGDConfig`,
    kept by :meth:`_gaussk_keep`), the ``local_sgd`` / ``local_config`` properties, and the
    checkpoint entry ``"gaussk_local"`` (``theta`` and the outer momentum beside the manifest)."""

    _gaussk_key: ClassVar[str] = "gaussk_local"
    _gaussk_split: ClassVar[bool] = True  # theta and the outer momentum in the checkpoint, each rank's part in its shard
    _gaussk_fresh: ClassVar[str] = "the outer loop starts afresh"
    _gaussk_config_cls: ClassVar[type] = LocalSGDConfig
    _gaussk_foreign: ClassVar[dict[str, str]] = foreign_options(
        LocalSGDConfig, GaussKConfig, why="an option of the per-step engines gaussk_ddp and gaussk_fsdp, not of local SGD"
    )

    _local_config: Any = None

    def _gaussk_keep(self, config: Any) -> None:
        """Keep the resolved options (``local_config``)."""
        self._local_config = config

    @property
    def local_sgd(self) -> SparseLocalSGD | None:
        """This rank's :class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` (None until
        the optimizer is set up)."""
        return self._gaussk_state

    @property
    def local_config(self) -> Any:
        """The outer loop's options (:class:`~lightning_gaussk.config.LocalSGDConfig`)."""
        return self._local_config
