"""The checkpoint protocol, as every integration runs it: save, restore, and agreement on failure.

Saving
------
:func:`save_shards` (Lightning; a collective): every rank writes its own shard, then the ranks
exchange their small manifest entries and each returns the whole manifest. :func:`save_rank_files`
(Accelerate's ``save_state`` pre-hook; no collective): every rank writes its shard and a one-entry
manifest of its own, merged when read.

Restoring
---------
:func:`restore_state` (a collective) opens the save, reads the marker it carries
(``layout["sharding"]``), refuses a save whose marker is not the loading state's (an FSDP2 save into
a DDP hook state, or back), converts it for this rank's layout by the policy of that marker
(:mod:`lightning_gaussk.checkpoint.reshard`) and loads it.

Agreement on failure
--------------------
:func:`restore_state` and :func:`save_shards` end in one small ``all_gather_object`` of each rank's
outcome: if any rank failed (a missing or corrupt shard, a write error, a save of the wrong kind),
every rank raises, the failing one its own error and the others a ``RuntimeError`` naming the
failed ranks and their messages. No rank trains on, or walks into the next collective, while a peer
has died.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lightning_gaussk.checkpoint.files import make_manifest, rank_pattern, shard_name, write_json_atomic, write_shard
from lightning_gaussk.checkpoint.formats import SavedState
from lightning_gaussk.checkpoint.layouts import target_layout
from lightning_gaussk.checkpoint.reshard import LOCAL_SGD_POLICY, ReshardPolicy, policy_for
from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.engine.fsdp import GaussKFSDPState
from lightning_gaussk.engine.local.driver import SparseLocalSGD

#: a rank's file, and its manifest, in a :func:`save_local_sgd` folder
LOCAL_SGD_FILE = "local_sgd_rank{rank}.pt"
LOCAL_SGD_MANIFEST = "local_sgd_manifest_rank{rank}.json"

__all__ = [
    "LOCAL_SGD_FILE",
    "LOCAL_SGD_MANIFEST",
    "agree_on_failure",
    "restore_fsdp_shards",
    "restore_local_sgd",
    "restore_state",
    "save_local_sgd",
    "save_fsdp_shards",
    "save_rank_files",
    "save_shards",
]


# ----------------------------------------------------------------------------- agreement on failure
def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _gather(value: Any, group: Any = None) -> list[Any] | None:
    """Every rank's ``value`` (``all_gather_object``, small plain values only), or None without a
    process group of more than one rank (then only this rank's outcome counts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return None
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def _raise_agreed(error: BaseException | None, messages: list[str | None] | None, what: str) -> None:
    """Raise ``error`` on its rank, and a ``RuntimeError`` naming the failed ranks on the others."""
    if error is not None:
        raise error
    failed = {r: m for r, m in enumerate(messages or []) if m is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
        raise RuntimeError(f"GaussK: {what} failed on rank(s) {sorted(failed)}: {detail}")


def agree_on_failure(error: BaseException | None, *, what: str = "restoring the saved hook state", group: Any = None) -> None:
    """Raise on every rank if ``what`` failed on any: a collective (one small ``all_gather_object``
    of the error messages; call it on every rank of ``group``, the default group when None).

    The failing rank raises its own ``error``; every other rank raises ``RuntimeError("GaussK:
    <what> failed on rank(s) [r]: rank r: <its error>")``, so a rank whose own part went well
    neither trains on nor waits in the next collective while a peer has died. Without an
    initialized process group of more than one rank it just raises ``error`` (if any).

    Example::

        error = None
        try:
            state.load_state_dict(saved.state_for(state.layout))
        except Exception as err:
            error = err
        agree_on_failure(error)
    """
    messages = _gather(None if error is None else _describe_error(error), group)
    _raise_agreed(error, messages, what)


# ----------------------------------------------------------------------------- restoring (collective)
def restore_state(
    state: Any,
    open_saved: Callable[[], SavedState | None],
    *,
    rank: int,
    world_size: int,
    group: Any = None,
    sharding: str | None = None,
    policy: ReshardPolicy | None = None,
) -> bool:
    """The one restore protocol of every integration; a collective (call it on every rank).

    1. ``open_saved()`` finds the save (None: nothing saved);
    2. the marker the save carries (:meth:`SavedState.sharding`, read from the first file this
       rank needs) must be ``sharding``, the marker ``state`` saves (None: a DDP hook state;
       :data:`~lightning_gaussk.engine.fsdp.SHARDING`: an FSDP2 one), else ``ValueError``;
    3. it is converted for this rank's layout (:func:`~lightning_gaussk.checkpoint.layouts.target_layout`
       of ``state``) by the policy of that marker (or ``policy``, for states whose saves carry
       none of their own: local SGD's :data:`~lightning_gaussk.checkpoint.reshard.LOCAL_SGD_POLICY`):
       its own shard on the same layout, else the pending averaged update of the saved ranks;
    4. ``state.load_state_dict(...)``;
    5. every rank's outcome is exchanged (:func:`agree_on_failure`).

    Returns True when the saved state was loaded, False when no rank found one (the caller says
    so). Raises on every rank if any rank failed in steps 1-4 (the failing rank its own error,
    naming the file or the two kinds of state, the others ``RuntimeError`` naming it too), or if
    some ranks found a save and others found none (a checkpoint folder that differs between
    nodes)."""
    error: BaseException | None = None
    found = False
    try:
        saved = open_saved()
        if saved is not None:
            found = True
            target = target_layout(state, world_size, rank)
            _check_sharding(saved, target, sharding)
            state.load_state_dict(saved.state_for(target, policy))
    except Exception as err:  # noqa: BLE001 - every failure is agreed on, then raised again
        error = err
    outcomes = _gather((found, None if error is None else _describe_error(error)), group)
    _raise_agreed(error, None if outcomes is None else [m for _, m in outcomes], "restoring the saved hook state")
    if outcomes is not None:
        absent = [r for r, (f, _) in enumerate(outcomes) if not f]
        if absent and len(absent) < len(outcomes):
            present = [r for r, (f, _) in enumerate(outcomes) if f]
            raise FileNotFoundError(
                f"GaussK: rank(s) {absent} found no saved hook state where rank(s) {present} found one; is the checkpoint "
                "the same, and complete, on every node? Refusing to resume with residuals reset on some ranks only."
            )
    return found


def _check_sharding(saved: SavedState, target: Layout, expected: str | None) -> None:
    """Raise ``ValueError`` unless ``saved`` carries the marker ``expected`` (before any conversion)."""
    found = saved.sharding(target)
    if found != expected:
        raise ValueError(
            f"GaussK: {saved!r} was saved by {policy_for(found).saved_by} (sharding {found!r}); it cannot be loaded "
            f"into {policy_for(expected).saved_by} (sharding {expected!r}): their residuals are laid out differently"
        )


# ----------------------------------------------------------------------------- saving
def save_shards(
    state: Any,
    folder: str | os.PathLike[str],
    *,
    rank: int,
    world_size: int,
    group: Any = None,
) -> dict[str, Any]:
    """Write this rank's shard ``folder/rank{rank}.pt`` and return the manifest (on every rank).

    A collective when ``world_size > 1``: call it on every rank. Each rank holds only its own
    state dict (one copy of its residuals) while writing; the ranks then exchange their small
    manifest entries (``all_gather_object`` of dicts, no tensors). If writing failed on any rank,
    every rank raises (the same exchange: see :func:`agree_on_failure`). Rank 0 removes files of
    the folder that are not in the manifest (an earlier, larger save into the same folder)."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"save_shards: world_size={world_size} needs an initialized torch.distributed process group")
    folder = Path(folder)
    entry: dict[str, Any] | None = None
    error: BaseException | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        sd = state.state_dict()
        entry = write_shard(sd, folder / shard_name(rank), rank=rank, world_size=world_size)
        del sd
    except Exception as err:  # noqa: BLE001 - agreed on below, then raised again
        error = err
    outcomes = _gather((entry, None if error is None else _describe_error(error)), group) if world_size > 1 else None
    _raise_agreed(error, None if outcomes is None else [m for _, m in outcomes], f"saving GaussK shards into {folder}")
    entries = [entry] if outcomes is None else [e for e, _ in outcomes]
    manifest = make_manifest(entries, world_size=world_size, dir_name=folder.name)
    if rank == 0:
        keep = {e["name"] for e in manifest["files"]}
        for p in folder.iterdir():
            if p.name not in keep and p.is_file() and (p.suffix in (".pt", ".tmp")):
                p.unlink(missing_ok=True)
    return manifest


def save_rank_files(
    state: Any,
    folder: str | os.PathLike[str],
    *,
    rank: int,
    world_size: int,
    shard_name: Callable[[int], str],
    manifest_name: Callable[[int], str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write this rank's shard ``folder/shard_name(rank)`` and its one-entry manifest
    ``folder/manifest_name(rank)``, each atomically, with no collective (for hooks that a
    framework runs on every process, like Accelerate's ``save_state`` pre-hook: the manifests are
    merged when loading, :meth:`SavedState.from_folder`). Rank 0 removes files of both names for
    ranks ``>= world_size`` (an earlier, larger save into the folder). Returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state.state_dict()
    entry = write_shard(sd, folder / shard_name(rank), rank=rank, world_size=world_size, extra=extra)
    del sd
    manifest = make_manifest([entry], world_size=world_size)
    write_json_atomic(folder / manifest_name(rank), manifest)
    if rank == 0:
        patterns = (rank_pattern(shard_name), rank_pattern(manifest_name))
        for name in os.listdir(folder):
            for pattern in patterns:
                m = pattern.match(name)
                if m and int(m.group(1)) >= world_size:
                    (folder / name).unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------- local SGD, on its group
def _local_file(rank: int) -> str:
    return LOCAL_SGD_FILE.format(rank=rank)


def _local_manifest(rank: int) -> str:
    return LOCAL_SGD_MANIFEST.format(rank=rank)


def save_local_sgd(local: SparseLocalSGD, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Every rank writes its whole :class:`~lightning_gaussk.local_sgd.SparseLocalSGD` state
    (theta, outer momentum, error feedback, window, local model, inner optimizer, landings in
    flight) to ``folder/local_sgd_rank{r}.pt`` with a one-entry manifest (:func:`save_rank_files`).
    Call it on every rank at the same step (with exchanges in flight it waits for them)."""
    layout = local.layout
    return save_rank_files(local, folder, rank=layout.rank, world_size=layout.world_size, shard_name=_local_file,
                           manifest_name=_local_manifest)  # fmt: skip


def restore_local_sgd(local: SparseLocalSGD, folder: str | os.PathLike[str]) -> bool:
    """Restore :func:`save_local_sgd`'s save into ``local`` (a collective), on any layout: its own
    file on the same ``(W, L)``, else :data:`~lightning_gaussk.checkpoint.reshard.LOCAL_SGD_POLICY`
    (the error feedback keeps the owed update ``(1/W) sum_r e_r``; every rank restarts from theta;
    a partial window is lost, with a warning). Returns False when ``folder`` holds no save."""
    layout = local.layout

    def open_saved() -> SavedState | None:
        return SavedState.from_folder(folder, shard_name=_local_file, manifest_name=_local_manifest)

    return restore_state(
        local, open_saved, rank=layout.rank, world_size=layout.world_size, group=local.process_group, policy=LOCAL_SGD_POLICY
    )


# ----------------------------------------------------------------------------- FSDP2, on the default group
def save_fsdp_shards(state: GaussKFSDPState, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`save_shards` of an FSDP2 hook state on the default process group: every rank writes
    its own shard ``folder/rank{r}.pt``; returns the manifest (a collective: call it on every rank)."""
    return save_shards(state, folder, rank=dist.get_rank(), world_size=dist.get_world_size())


def restore_fsdp_shards(state: GaussKFSDPState, open_saved: Callable[[], SavedState | None]) -> bool:
    """:func:`restore_state` of an FSDP2 hook state on the default process group (a collective):
    its own shard on the same ``(N, L)``, else the row policy
    (:func:`~lightning_gaussk.checkpoint.reshard.fsdp_state_for_layout`), with a warning; a DDP
    save is refused. Returns False when nothing was saved."""
    return restore_state(state, open_saved, rank=dist.get_rank(), world_size=dist.get_world_size(), sharding=state.sharding)
