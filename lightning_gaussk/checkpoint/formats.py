"""Every format a save of the hook state was ever written in, behind one reader, :class:`SavedState`.

Formats read
------------
- shard files with a manifest (current, :mod:`lightning_gaussk.checkpoint.files`): a Lightning
  ``.ckpt`` holding the manifest with a ``.gaussk/`` folder beside it, or an Accelerate
  ``save_state`` folder of shards with per-rank one-entry manifests (merged when read); verified
  by size and sha256;
- per-rank files of the Accelerate integration from before manifests
  (``"lightning_gaussk.accelerate/1"``, flat, read without checksums);
- the embedded ``{"world_size": W, "per_rank": [state_dict_0, ...]}`` of early Lightning
  checkpoints.

Whatever the format, :meth:`SavedState.state_for` converts a save for one rank of a layout by the
reshard policy that the save's own marker selects (:mod:`lightning_gaussk.checkpoint.reshard`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning_gaussk.checkpoint.files import (
    MANIFEST_FORMAT,
    check_manifest,
    copy_shards,
    locate_shards,
    merge_manifests,
    rank_pattern,
    read_shard,
    shard_name,
)
from lightning_gaussk.checkpoint.layouts import describe_layout, layout_of, residual_layout
from lightning_gaussk.checkpoint.reshard import ReshardPolicy, policy_for, sharding_of
from lightning_gaussk.comm.layout import Layout

__all__ = ["SavedState", "state_from_legacy", "state_from_shards"]


def _malformed(where: str, why: str) -> ValueError:
    return ValueError(f"{where} is malformed ({why}); refusing to resume with silently reset residuals.")


def _is_embedded(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "per_rank" in entry


def _shard_reader(manifest: Mapping[str, Any], folder: Path, expected_name: Callable[[int], str]) -> Callable[[int], dict[str, Any]]:
    entries = {e["rank"]: e for e in manifest["files"]}

    def read(rank: int) -> dict[str, Any]:
        entry = entries.get(rank)
        if entry is None:
            raise FileNotFoundError(
                f"GaussK residual shard {folder / expected_name(rank)} is missing (no manifest entry for rank {rank}; ranks "
                f"saved: {sorted(entries)}): was every process saving? Refusing to resume with silently reset residuals."
            )
        payload = read_shard(folder / entry["name"], entry)
        state = payload["state"]
        ws = manifest["world_size"]
        saved = layout_of(payload, ws, rank) if "layout" in payload else layout_of(state, ws, rank)
        if residual_layout(saved) != residual_layout(Layout.from_dict({**manifest["layout"], "rank": 0})) or saved.rank != rank:
            raise ValueError(f"GaussK residual shard {folder / entry['name']}: its layout {saved} disagrees with the manifest")
        return state

    return read


class SavedState:
    """One save of the hook state, in whichever format it was written; the single reader of them all.

    - shard files with a manifest (:func:`~lightning_gaussk.checkpoint.protocol.save_shards`,
      :func:`~lightning_gaussk.checkpoint.protocol.save_rank_files`), verified by
      size and sha256 (:meth:`from_manifest`, :meth:`from_checkpoint`, :meth:`from_folder`);
    - per-rank files of the Accelerate integration from before manifests
      (``"lightning_gaussk.accelerate/1"``, flat, read without checksums: :meth:`from_folder`);
    - the embedded ``{"world_size": W, "per_rank": [state_dict_0, ...]}`` of early Lightning
      checkpoints (:meth:`from_embedded`, :meth:`from_checkpoint`).

    :meth:`state_for` converts it to one rank's state dict by the reshard policy of the marker it
    was saved with (:meth:`sharding`; :func:`~lightning_gaussk.checkpoint.reshard.policy_for`);
    :meth:`carry_to` gives the checkpoint entry of a save that passes it on unchanged.

    Example::

        saved = SavedState.from_checkpoint(checkpoint["gaussk"], "last.ckpt")
        state.load_state_dict(saved.state_for(state.layout))
    """

    __slots__ = ("entry", "folder", "layout", "_kept", "_read")

    def __init__(
        self, layout: Layout, read_rank: Callable[[int], Mapping[str, Any]], *, entry: Mapping[str, Any], folder: Path | None
    ) -> None:
        self.layout = layout  #: the saved layout, as saved rank 0 described it
        self.entry = entry  #: what a checkpoint holds for it (a manifest, or the embedded states)
        self.folder = folder  #: the folder of its shard files (None: embedded)
        self._read = read_rank
        self._kept: tuple[int, Mapping[str, Any]] | None = None  # the state dict :meth:`sharding` read

    @property
    def world_size(self) -> int:
        """``W``: how many ranks saved it."""
        return self.layout.world_size

    def __repr__(self) -> str:
        where = f"shards in {self.folder}" if self.folder is not None else "embedded"
        return f"SavedState({describe_layout(self.layout)}, {where})"

    # ---------------------------------------------------------------- constructors, one per format
    @classmethod
    def from_manifest(
        cls, manifest: Mapping[str, Any], folder: str | os.PathLike[str], *, expected_name: Callable[[int], str] = shard_name
    ) -> SavedState:
        """Shard files in ``folder`` listed by ``manifest`` (entries may lack ranks: a rank without
        one raises ``FileNotFoundError`` naming ``folder / expected_name(rank)`` when it is read)."""
        check_manifest(manifest, complete=False)
        layout = Layout.from_dict({**manifest["layout"], "rank": 0})
        folder = Path(folder)
        return cls(layout, _shard_reader(manifest, folder, expected_name), entry=dict(manifest), folder=folder)

    @classmethod
    def from_embedded(cls, saved: Any, *, where: str = "embedded GaussK state") -> SavedState:
        """The earlier embedded format ``{"world_size": W, "per_rank": [W state dicts]}`` (flat
        unless the state dicts say otherwise). Raises ``ValueError`` saying "malformed" otherwise."""
        ok = (
            isinstance(saved, Mapping)
            and isinstance(saved.get("world_size"), int)
            and not isinstance(saved.get("world_size"), bool)
            and saved["world_size"] >= 1
            and isinstance(saved.get("per_rank"), list)
            and len(saved["per_rank"]) == saved["world_size"]
            and all(isinstance(sd, Mapping) and isinstance(sd.get("residuals"), Mapping) for sd in saved["per_rank"])
        )
        if not ok:
            raise _malformed(where, "expected world_size and one state dict with residuals per rank")
        per_rank = saved["per_rank"]
        ws = saved["world_size"]
        layout = Layout(ws, 0, layout_of(per_rank[0], ws, 0).ranks_per_node)
        return cls(layout, lambda r: per_rank[r], entry=saved, folder=None)

    @classmethod
    def from_checkpoint(cls, entry: Any, checkpoint_path: str | os.PathLike[str], *, key: str = "gaussk") -> SavedState:
        """What a Lightning checkpoint holds under ``key``: a shard manifest (its folder found by
        :func:`locate_shards`) or the earlier embedded format. Raises ``ValueError`` naming the
        checkpoint and saying "malformed" for anything else (no silent reset)."""
        where = f"Checkpoint {os.fspath(checkpoint_path)}: `{key}` hook state"
        if isinstance(entry, Mapping) and entry.get("format") == MANIFEST_FORMAT:
            try:
                check_manifest(entry)
            except ValueError as err:
                raise _malformed(where, str(err)) from None
            return cls.from_manifest(entry, locate_shards(checkpoint_path, entry))
        if _is_embedded(entry):
            return cls.from_embedded(entry, where=where)
        raise _malformed(where, f"expected a {MANIFEST_FORMAT!r} manifest, or world_size and one state dict per rank")

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], *, shard_name: Callable[[int], str], manifest_name: Callable[[int], str]
    ) -> SavedState | None:
        """A folder of per-rank files ``shard_name(r)`` with per-rank manifests ``manifest_name(r)``
        (each rank's own entry, merged by :func:`merge_manifests`), or, from before manifests,
        the shard files alone (world size from the lowest rank's file; no checksums). None if the
        folder holds neither. An unreadable manifest raises ``ValueError`` naming it."""
        folder = Path(folder)
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        shard_re, manifest_re = rank_pattern(shard_name), rank_pattern(manifest_name)
        parts = []
        for name in names:
            if manifest_re.match(name):
                try:
                    parts.append(json.loads((folder / name).read_text()))
                except (OSError, ValueError) as err:
                    raise ValueError(f"GaussK shard manifest {folder / name} cannot be read ({type(err).__name__}: {err})") from err
        if parts:
            return cls.from_manifest(merge_manifests(parts), folder, expected_name=shard_name)
        shards = {int(m.group(1)): name for name in names if (m := shard_re.match(name))}
        if not shards:
            return None
        lowest = folder / shards[min(shards)]
        payload = read_shard(lowest)
        ws = payload.get("world_size")
        if not isinstance(ws, int) or ws < 1:
            raise ValueError(f"GaussK residual shard {lowest} is malformed: world_size {ws!r}")
        entries = [{"rank": r, "name": n, "sha256": None, "bytes": None} for r, n in sorted(shards.items()) if r < ws]
        manifest = {"format": MANIFEST_FORMAT, "world_size": ws, "layout": Layout(ws, 0).to_dict(), "files": entries}
        return cls.from_manifest(manifest, folder, expected_name=shard_name)

    # ---------------------------------------------------------------- use
    def read(self, rank: int) -> Mapping[str, Any]:
        """Saved rank ``rank``'s state dict as it was written (checked against the manifest)."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == rank:
            return kept[1]
        return self._read(rank)

    def sharding(self, target: Layout) -> str | None:
        """The marker this save carries (``layout["sharding"]`` of its state dicts; None for a DDP
        hook state and every format from before the marker).

        It is read from the first file that rank ``target.rank`` of ``target`` needs anyway: its own
        on the same layout (so a same-layout resume still reads only its own shard, also from
        node-local storage), else saved rank 0's. That state dict is kept for the next
        :meth:`read`, so :meth:`state_for` does not load it again."""
        rank = target.rank if residual_layout(self.layout) == residual_layout(target) else 0
        state_dict = self.read(rank)
        self._kept = (rank, state_dict)
        return sharding_of(state_dict)

    def state_for(self, target: Layout, policy: ReshardPolicy | None = None) -> dict[str, Any]:
        """The state dict of rank ``target.rank`` of ``target``, by the policy of this save's marker
        (:func:`~lightning_gaussk.checkpoint.reshard.policy_for` of :meth:`sharding`), or ``policy``
        (a state whose saves carry no marker of their own: local SGD): its own saved state on the
        same layout, else the pending averaged update of the saved ranks (residuals and
        velocities), with a warning on rank 0."""
        policy = policy or policy_for(self.sharding(target))
        return policy.state_for(self.read, self.layout, target)

    def carry_to(self, folder: str | os.PathLike[str], *, copy: bool) -> dict[str, Any]:
        """The checkpoint entry of a new save that passes this one on unchanged (a save made while
        not fitting): shard files are copied into ``folder`` when ``copy`` (one rank does it) with
        the same checksums; embedded states are returned as they are."""
        if self.folder is None:
            return dict(self.entry)
        if copy:
            return copy_shards(self.entry, self.folder, folder)
        return {**self.entry, "dir": Path(folder).name}


def state_from_shards(
    manifest: Mapping[str, Any],
    folder: str | os.PathLike[str],
    target: Layout,
    *,
    expected_name: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """The state dict for ``target`` from the shard files of ``manifest`` in ``folder`` (each verified by
    :func:`read_shard`; a rank without an entry raises ``FileNotFoundError`` naming
    ``folder / expected_name(rank)``)."""
    return SavedState.from_manifest(manifest, folder, expected_name=expected_name or shard_name).state_for(target)


def state_from_legacy(saved: Mapping[str, Any], target: Layout) -> dict[str, Any]:
    """The state dict for ``target`` from the earlier embedded format
    ``{"world_size": W, "per_rank": [state_dict_0, ...]}``."""
    return SavedState.from_embedded(saved).state_for(target)
