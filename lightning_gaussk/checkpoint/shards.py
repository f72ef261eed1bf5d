"""The one checkpoint protocol of the hook state: per-rank residual shards and their manifest,
every saved format, the policy for a change of layout (residuals and velocities) and agreement on
failure. The Lightning strategy and the Accelerate integration wire it in; it imports neither.

Shards
------
Every rank writes its own :meth:`GaussKState.state_dict` to its own file (no rank ever holds
another rank's residuals while saving), atomically: a temporary file in the same folder, ``fsync``,
``os.replace``, ``fsync`` of the folder. A file holds plain values and CPU tensors only, so it loads
with ``torch.load(..., weights_only=True)``::

    {"format": "lightning_gaussk.shard/1", "rank": r, "world_size": W,
     "layout": {"world_size": W, "rank": r, "ranks_per_node": L or None}, "state": state_dict_r}

The manifest says which files make up a save and how to check them (small: no tensors)::

    {"format": "lightning_gaussk.shards/1", "world_size": W, "layout": layout of saved rank 0,
     "dir": name of the shard folder,
     "files": [{"rank": r, "name": "rank{r}.pt", "sha256": hex, "bytes": int, "layout": {...}}, ...]}

Policy on a change of layout
----------------------------
Saved layout: ``W`` ranks, flat or ``N`` nodes of ``L`` ranks; new layout: ``W'`` ranks, flat or
``N'`` nodes of ``L'`` ranks. What the saved ranks still owe the model, per parameter (full size),
is the pending averaged update

    flat:  P = (1/W) sum_r r_r                    (r_r: rank r's residual of the whole parameter)
    node:  P[chunk l] = (1/W) sum_n R_{n,l}       (R_{n,l}: chunk l of node n's summed residual,
                                                   held by local rank l of node n)

The new layout is given the same ``P``:

    new flat rank:              r' = P                      so (1/W') sum_r' r' = P
    new node rank (n', l'):     R'_{n',l'} = L' P[chunk l'] so (1/W') sum_n' R'_{n'} = N' L' P / W' = P

Flat to flat on another world size this is the mean of the saved residuals (the earlier policy).
``P`` is reassembled from the shards one file at a time (a running sum per parameter chunk: memory
is one ``P`` plus one shard, whatever ``W``). Step and counters come from saved rank 0. The same
layout (same ``W`` and ``L``; ``L = 1`` counts as flat) loads each rank's own file exactly.

Momentum correction's velocities (``state["velocity"]``) are kept in the residuals' layout (flat:
the rank's velocity of the whole parameter; node mode: chunk ``l`` of the node's summed velocity),
so they follow the same rule: the new layout carries the same averaged velocity
``V = (1/W) sum_r v_r`` (``v' = V``, node ``V' = L' V[chunk l']``). No velocity is dropped.

Formats read
------------
:class:`SavedState` is the one reader of every format ever written: shard files with a manifest
(current), per-rank files of the Accelerate integration without manifests
(``"lightning_gaussk.frontends.accelerate/1"``, read without checksums) and the embedded
``{"world_size": W, "per_rank": [...]}`` of early Lightning checkpoints.

Agreement on failure
--------------------
:func:`restore_state` (both integrations) and :func:`save_shards` end in one small
``all_gather_object`` of each rank's outcome: if any rank failed (a missing or corrupt shard, a
write error), every rank raises, the failing one its own error and the others a ``RuntimeError``
naming the failed ranks and their messages. No rank trains on, or walks into the next
collective, while a peer has died.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.utils.log import rank_zero_warn
from lightning_gaussk.comm.layout import Layout, chunk_bounds

__all__ = [
    "MANIFEST_FORMAT",
    "SHARD_DIR_SUFFIX",
    "SHARD_FORMAT",
    "SavedState",
    "agree_on_failure",
    "average_states",
    "check_manifest",
    "copy_shards",
    "describe_layout",
    "layout_of",
    "locate_shards",
    "make_manifest",
    "merge_manifests",
    "pending_update",
    "read_shard",
    "remove_shards",
    "residuals_for_layout",
    "restore_state",
    "save_rank_files",
    "save_shards",
    "shard_dir",
    "shard_name",
    "state_for_layout",
    "state_from_legacy",
    "state_from_shards",
    "target_layout",
    "warn_layout_change",
    "write_json_atomic",
    "write_shard",
]

MANIFEST_FORMAT = "lightning_gaussk.shards/1"
SHARD_FORMAT = "lightning_gaussk.shard/1"
#: earlier per-rank files of the Accelerate integration (no layout, no checksum): still read
_LEGACY_SHARD_FORMATS = ("lightning_gaussk.frontends.accelerate/1",)
SHARD_DIR_SUFFIX = ".gaussk"
#: the per-parameter buffers of a rank's state dict, both in the residuals' layout: one policy for both
_BUFFERS = ("residuals", "velocity")
_CHUNK = 1 << 20  # bytes per read when hashing


# ----------------------------------------------------------------------------- names and layouts
def shard_dir(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The folder of a checkpoint's residual shards: ``<checkpoint_path>.gaussk``.

    Raises ``ValueError`` for a URL (``s3://...``): every rank writes its shard with plain file
    operations, so the checkpoint must be on a local or shared POSIX file system."""
    text = os.fspath(checkpoint_path)
    if "://" in text:
        raise ValueError(
            f"GaussK residual shards are written with plain file operations next to the checkpoint; {text!r} is a URL. "
            "Save to a local or shared (mounted) file system."
        )
    return Path(text + SHARD_DIR_SUFFIX)


def shard_name(rank: int) -> str:
    """File name of rank ``rank``'s shard in a Lightning shard folder."""
    return f"rank{rank}.pt"


def target_layout(state: Any, world_size: int, rank: int) -> Layout:
    """The layout a live state loads into: ``state.layout`` when it describes this world and rank
    (set up by the hook, the strategy or ``register_gaussk``), else flat on ``world_size`` ranks."""
    layout = getattr(state, "layout", None)
    if isinstance(layout, Layout) and (layout.world_size, layout.rank) == (world_size, rank):
        return layout
    return Layout(world_size, rank)


def layout_of(state_dict: Mapping[str, Any], world_size: int, rank: int) -> Layout:
    """The layout a state dict was saved in: its ``"layout"`` when that describes ``world_size``
    and ``rank``, else flat on ``world_size`` ranks (state dicts from before node mode, or of a
    state whose layout was never set up: their residuals are whole parameters)."""
    raw = state_dict.get("layout")
    if isinstance(raw, Mapping):
        layout = Layout.from_dict(raw)
        if (layout.world_size, layout.rank) == (world_size, rank):
            return layout  # else a state that was never set up (its default layout): flat residuals
    return Layout(world_size, rank)


def _norm(layout: Layout) -> tuple[int, int | None]:
    """What decides residual semantics: ``(W, L)``, with ``L = 1`` equal to flat (a node of one
    rank sums one residual)."""
    rpn = layout.ranks_per_node
    return layout.world_size, None if rpn in (None, 1) else rpn


def describe_layout(layout: Layout) -> str:
    """``"world size 4"`` (flat) or ``"world size 4 in node mode (2 nodes x 2 ranks)"``."""
    ws, rpn = _norm(layout)
    if rpn is None:
        return f"world size {ws}"
    return f"world size {ws} in node mode ({ws // rpn} nodes x {rpn} ranks)"


def warn_layout_change(saved: str, now: str) -> None:
    """Say, once (rank 0), that saved residuals are redistributed because the layout changed."""
    rank_zero_warn(
        f"Resuming GaussK state saved with {saved} on {now}: residuals follow the documented policy, the new ranks "
        "carry the same pending averaged update P = (1/W) sum of the saved residuals (flat: each rank starts from "
        "the mean of the saved residuals, r' = P; node mode: R' = L' P[chunk]); momentum-correction velocities "
        "follow the same rule; see docs/checkpointing.md."
    )


# ----------------------------------------------------------------------------- atomic writes
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic(path: Path, write: Callable[[Any], None]) -> tuple[str, int]:
    """Write ``path`` through ``write(file)`` into a temporary file of the same folder, fsync,
    hash it (read back from disk, in 1 MiB pieces), ``os.replace`` it over ``path``. Returns
    ``(sha256, bytes)``; on any error the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest, size = _sha256(Path(tmp)), os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return digest, size


def write_json_atomic(path: Path, data: Any) -> None:
    """``json.dump(data)`` to ``path`` atomically (temporary file, fsync, replace)."""
    _atomic(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()))


def write_shard(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    rank: int,
    world_size: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one rank's state dict as a shard file, atomically; return its manifest entry
    ``{"rank", "name", "sha256", "bytes", "layout"}`` (``name``: the file name in its folder)."""
    path = Path(path)
    layout = layout_of(state_dict, world_size, rank)
    payload = {
        "format": SHARD_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "layout": layout.to_dict(),
        **(dict(extra) if extra else {}),
        "state": state_dict,
    }
    digest, size = _atomic(path, lambda f: torch.save(payload, f))
    return {"rank": rank, "name": path.name, "sha256": digest, "bytes": size, "layout": layout.to_dict()}


# ----------------------------------------------------------------------------- manifests
def make_manifest(entries: Iterable[Mapping[str, Any]], *, world_size: int, dir_name: str | None = None) -> dict[str, Any]:
    """The manifest of a save from its entries (one per rank, any order); ``"layout"`` is saved
    rank 0's. Raises ``ValueError`` if the entries disagree on the layout."""
    files = sorted((dict(e) for e in entries), key=lambda e: e["rank"])
    if not files:
        raise ValueError("make_manifest: no entries")
    layouts = {_norm(Layout.from_dict(e["layout"])) for e in files}
    if len(layouts) != 1:
        raise ValueError(f"GaussK shards disagree on the layout: {sorted(layouts, key=str)} (W, ranks per node)")
    ref = next((e for e in files if e["rank"] == 0), files[0])
    layout = {**Layout.from_dict(ref["layout"]).to_dict(), "rank": 0}
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "world_size": world_size, "layout": layout, "files": files}
    if dir_name is not None:
        manifest["dir"] = dir_name
    return manifest


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_manifest(manifest: Any, *, complete: bool = True) -> None:
    """Raise ``ValueError`` (saying "malformed") unless ``manifest`` is a well-formed manifest:
    the format, an int world size, a layout, entries with an int rank below the world size (each
    once; every rank when ``complete``), a plain file name, a sha256 string (or None) and a byte
    count (or None)."""

    def bad(why: str) -> ValueError:
        return ValueError(f"GaussK shard manifest is malformed: {why}")

    if not isinstance(manifest, Mapping) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad(f"not a {MANIFEST_FORMAT!r} dict")
    ws = manifest.get("world_size")
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise bad(f"world_size {ws!r}")
    try:
        layout = Layout.from_dict(manifest["layout"])
    except (KeyError, TypeError, ValueError) as err:
        raise bad(f"layout {manifest.get('layout')!r} ({err})") from None
    if layout.world_size != ws:
        raise bad(f"layout world size {layout.world_size} != world_size {ws}")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise bad("`files` is not a list")
    seen: set[int] = set()
    for e in files:
        ok = (
            isinstance(e, Mapping)
            and isinstance(e.get("rank"), int)
            and 0 <= e["rank"] < ws
            and e["rank"] not in seen
            and isinstance(e.get("name"), str)
            and bool(_SAFE_NAME.match(e["name"]))
            and e["name"] not in (".", "..")
            and (e.get("sha256") is None or isinstance(e.get("sha256"), str))
            and (e.get("bytes") is None or isinstance(e.get("bytes"), int))
        )
        if not ok:
            raise bad(f"file entry {e!r}")
        seen.add(e["rank"])
    if complete and seen != set(range(ws)):
        raise bad(f"entries for ranks {sorted(seen)}, expected 0..{ws - 1}")


def merge_manifests(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One manifest from per-rank manifests (the Accelerate integration: each rank writes its
    own, no collective). Saved rank 0's part (else the first) decides the world size and layout;
    parts that disagree with it are left out (stale files of an earlier save into the same
    folder). The result may lack ranks: loading names the missing file when it is needed."""
    parts = list(parts)
    for p in parts:
        check_manifest(p, complete=False)
    if not parts:
        raise ValueError("merge_manifests: no manifests")
    ref = next((p for p in parts if any(e["rank"] == 0 for e in p["files"])), parts[0])
    key = (ref["world_size"], _norm(Layout.from_dict(ref["layout"])))
    files: dict[int, dict[str, Any]] = {}
    for p in parts:
        if (p["world_size"], _norm(Layout.from_dict(p["layout"]))) == key:
            for e in p["files"]:
                files.setdefault(e["rank"], dict(e))
    return {"format": MANIFEST_FORMAT, "world_size": ref["world_size"], "layout": {**ref["layout"], "rank": 0},
            "files": [files[r] for r in sorted(files)]}  # fmt: skip


def locate_shards(checkpoint_path: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """The shard folder of a checkpoint: ``<checkpoint_path>.gaussk`` if it exists, else the
    folder named in the manifest next to the checkpoint (a renamed file or a ``last.ckpt``
    link), else ``<checkpoint_path>.gaussk`` (loading then names the missing file)."""
    own = shard_dir(checkpoint_path)
    if own.is_dir():
        return own
    name = manifest.get("dir")
    if isinstance(name, str) and _SAFE_NAME.match(name):
        for base in (Path(os.fspath(checkpoint_path)).parent, Path(os.path.realpath(checkpoint_path)).parent):
            if (base / name).is_dir():
                return base / name
    return own


# ----------------------------------------------------------------------------- reading
def read_shard(path: str | os.PathLike[str], entry: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load and verify one shard file; return its payload (``payload["state"]`` is the state dict).

    Verified: the file exists (``FileNotFoundError``), its size and sha256 match ``entry`` when it
    gives them, it loads with ``weights_only=True``, it is a shard of ``entry["rank"]``
    (``ValueError``). Every message names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GaussK residual shard {path} is missing: was every rank's shard saved (save_checkpoint / save_state on every "
            "process) and is the checkpoint folder reachable from this rank? Refusing to resume with silently reset residuals."
        )
    if entry is not None and entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
        raise ValueError(
            f"GaussK residual shard {path} is corrupt: {path.stat().st_size} bytes, the manifest says {entry['bytes']} "
            "(truncated or overwritten; checksum not checked)"
        )
    if entry is not None and entry.get("sha256"):
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise ValueError(
                f"GaussK residual shard {path} is corrupt: sha256 checksum mismatch (file {digest[:16]}..., manifest "
                f"{entry['sha256'][:16]}...); it was changed after the checkpoint was written"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any loader error is a corrupt file, named
        raise ValueError(f"GaussK residual shard {path} cannot be loaded ({type(err).__name__}: {err})") from err
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (SHARD_FORMAT, *_LEGACY_SHARD_FORMATS) or not isinstance(payload.get("state"), dict):
        raise ValueError(f"{path} is not a GaussK shard ({SHARD_FORMAT!r}), format {fmt!r}")
    if not isinstance(payload["state"].get("residuals"), dict):
        raise ValueError(f"GaussK residual shard {path} is malformed: its state has no `residuals` dict")
    if not isinstance(payload["state"].get("velocity", {}), dict):
        raise ValueError(f"GaussK residual shard {path} is malformed: its `velocity` is not a dict")
    if entry is not None and payload.get("rank") != entry["rank"]:
        raise ValueError(f"GaussK residual shard {path} holds rank {payload.get('rank')!r}, the manifest lists it for rank {entry['rank']}")
    return payload


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
        if _norm(saved) != _norm(Layout.from_dict({**manifest["layout"], "rank": 0})) or saved.rank != rank:
            raise ValueError(f"GaussK residual shard {folder / entry['name']}: its layout {saved} disagrees with the manifest")
        return state

    return read


# ----------------------------------------------------------------------------- the policy
def _pending_buffers(
    read_rank: Callable[[int], Mapping[str, Any]], saved: Layout
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """The pending averages of every per-parameter buffer (``"residuals"``, ``"velocity"``) from the
    saved ranks' state dicts, read one at a time: ``(rank 0's state without the buffers,
    {buffer: {name: full-size average}})``. A buffer no rank saved is absent from the result; a
    parameter missing on a rank counts as zeros there."""
    ws, rpn = _norm(saved)
    parts = 1 if rpn is None else rpn
    sums: dict[str, dict[str, dict[int, Tensor]]] = {}
    first: dict[str, Any] | None = None
    for r in range(ws):
        sd = read_rank(r)
        if first is None:
            first = {k: v for k, v in sd.items() if k not in _BUFFERS}
        local = r % parts
        for key in _BUFFERS:
            what = "residual" if key == "residuals" else key
            for name, t in (sd.get(key) or {}).items():
                per = sums.setdefault(key, {}).setdefault(name, {})
                flat = t.detach().reshape(-1)
                if local in per:
                    if per[local].numel() != flat.numel():
                        raise ValueError(
                            f"GaussK saved state: {what} {name!r} chunk {local} has {flat.numel()} entries on rank {r}, "
                            f"{per[local].numel()} on an earlier rank"
                        )
                    per[local].add_(flat.to(torch.float32))
                else:
                    per[local] = flat.to(torch.float32, copy=True)
        del sd
    assert first is not None
    out: dict[str, dict[str, Tensor]] = {}
    for key, by_name in sums.items():
        what = "residual" if key == "residuals" else key
        for name, per in by_name.items():
            if sorted(per) != list(range(parts)):
                raise ValueError(
                    f"GaussK saved state: {what} {name!r} has chunks {sorted(per)} of {parts} saved; cannot reassemble it"
                )
            p = per[0] if parts == 1 else torch.cat([per[l] for l in range(parts)])
            per.clear()
            out.setdefault(key, {})[name] = p.div_(ws)
    return first, out


def pending_update(read_rank: Callable[[int], Mapping[str, Any]], saved: Layout) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``P`` per parameter (see the module docstring) from the saved ranks' state dicts, reading
    them one at a time through ``read_rank(r)``, ``r = 0 .. W-1``: running sums per (parameter,
    chunk), so memory holds one ``P`` and one state dict. Returns ``(rank 0's state without
    residuals and velocities, P)``. A parameter missing on a rank counts as a zero residual there.
    (:func:`state_for_layout` averages the velocities in the same pass, by the same rule.)"""
    first, buffers = _pending_buffers(read_rank, saved)
    return first, buffers.get("residuals", {})


def residuals_for_layout(pending: Mapping[str, Tensor], target: Layout) -> dict[str, Tensor]:
    """The target rank's residuals (or velocities) carrying ``P``: flat ``r' = P``; node mode
    (``L'`` ranks per node, local rank ``l'``) ``R' = L' P[chunk l']``. Tensors of ``pending`` may
    be reused."""
    _, rpn = _norm(target)
    if rpn is None:
        return dict(pending)
    out: dict[str, Tensor] = {}
    for name, p in pending.items():
        start, stop = chunk_bounds(p.numel(), rpn, target.local_rank)
        out[name] = p[start:stop].mul(rpn)
    return out


def state_for_layout(read_rank: Callable[[int], Mapping[str, Any]], saved: Layout, target: Layout) -> dict[str, Any]:
    """The state dict for ``target`` (a rank of the new layout) from the saved ranks' state dicts.

    Same layout (``W`` and ``L`` equal): rank ``target.rank``'s own state, exactly (one read).
    Otherwise the policy of the module docstring for the residuals and, when saved, the velocities,
    with :func:`warn_layout_change` (rank 0)."""
    if _norm(saved) == _norm(target):
        return {**read_rank(target.rank), "layout": target.to_dict()}
    warn_layout_change(describe_layout(saved), describe_layout(target))
    first, buffers = _pending_buffers(read_rank, saved)
    out = {**first, "layout": target.to_dict(), "residuals": residuals_for_layout(buffers.get("residuals", {}), target)}
    if "velocity" in buffers:
        out["velocity"] = residuals_for_layout(buffers["velocity"], target)
    return out


def state_from_shards(
    manifest: Mapping[str, Any],
    folder: str | os.PathLike[str],
    target: Layout,
    *,
    expected_name: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """:func:`state_for_layout` over the shard files of ``manifest`` in ``folder`` (each verified by
    :func:`read_shard`; a rank without an entry raises ``FileNotFoundError`` naming
    ``folder / expected_name(rank)``)."""
    return SavedState.from_manifest(manifest, folder, expected_name=expected_name or shard_name).state_for(target)


def state_from_legacy(saved: Mapping[str, Any], target: Layout) -> dict[str, Any]:
    """:func:`state_for_layout` over the earlier embedded format
    ``{"world_size": W, "per_rank": [state_dict_0, ...]}``."""
    return SavedState.from_embedded(saved).state_for(target)


def average_states(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One state dict whose residuals (and velocities, when saved) are the mean over ``per_rank``
    of each parameter's saved buffer (flat policy ``r' = P``; a parameter missing on a rank counts
    as zeros there), summed one rank at a time so memory holds one running sum per parameter."""
    items = per_rank if isinstance(per_rank, (list, tuple)) else list(per_rank)
    if not items:
        raise ValueError("average_states: `per_rank` is empty")
    first, buffers = _pending_buffers(lambda r: items[r], Layout(len(items), 0))
    return {**first, "residuals": buffers.get("residuals", {}), **({"velocity": buffers["velocity"]} if "velocity" in buffers else {})}


# ----------------------------------------------------------------------------- every saved format
def _malformed(where: str, why: str) -> ValueError:
    return ValueError(f"{where} is malformed ({why}); refusing to resume with silently reset residuals.")


def _is_embedded(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "per_rank" in entry


def _rank_pattern(namer: Callable[[int], str]) -> re.Pattern[str]:
    """A regex matching ``namer(r)`` for any rank ``r`` (group 1: the rank)."""
    probe = 987_654_321
    return re.compile("^" + re.escape(namer(probe)).replace(str(probe), r"(\d+)") + "$")


class SavedState:
    """One save of the hook state, in whichever format it was written; the single reader of them all.

    - shard files with a manifest (:func:`save_shards`, :func:`save_rank_files`), verified by
      size and sha256 (:meth:`from_manifest`, :meth:`from_checkpoint`, :meth:`from_folder`);
    - per-rank files of the Accelerate integration from before manifests
      (``"lightning_gaussk.frontends.accelerate/1"``, flat, read without checksums: :meth:`from_folder`);
    - the embedded ``{"world_size": W, "per_rank": [state_dict_0, ...]}`` of early Lightning
      checkpoints (:meth:`from_embedded`, :meth:`from_checkpoint`).

    :meth:`state_for` converts it to one rank's state dict by the policy of the module docstring;
    :meth:`carry_to` gives the checkpoint entry of a save that passes it on unchanged.

    Example::

        saved = SavedState.from_checkpoint(checkpoint["gaussk"], "last.ckpt")
        state.load_state_dict(saved.state_for(state.layout))
    """

    __slots__ = ("entry", "folder", "layout", "_read")

    def __init__(
        self, layout: Layout, read_rank: Callable[[int], Mapping[str, Any]], *, entry: Mapping[str, Any], folder: Path | None
    ) -> None:
        self.layout = layout  #: the saved layout, as saved rank 0 described it
        self.entry = entry  #: what a checkpoint holds for it (a manifest, or the embedded states)
        self.folder = folder  #: the folder of its shard files (None: embedded)
        self._read = read_rank

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
        shard_re, manifest_re = _rank_pattern(shard_name), _rank_pattern(manifest_name)
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
        return self._read(rank)

    def state_for(self, target: Layout) -> dict[str, Any]:
        """The state dict of rank ``target.rank`` of ``target``: its own saved state on the same
        layout, else the policy (residuals and velocities), with a warning on rank 0."""
        return state_for_layout(self._read, self.layout, target)

    def carry_to(self, folder: str | os.PathLike[str], *, copy: bool) -> dict[str, Any]:
        """The checkpoint entry of a new save that passes this one on unchanged (a save made while
        not fitting): shard files are copied into ``folder`` when ``copy`` (one rank does it) with
        the same checksums; embedded states are returned as they are."""
        if self.folder is None:
            return dict(self.entry)
        if copy:
            return copy_shards(self.entry, self.folder, folder)
        return {**self.entry, "dir": Path(folder).name}


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
) -> bool:
    """The one restore protocol of both integrations; a collective (call it on every rank).

    1. ``open_saved()`` finds the save (None: nothing saved);
    2. it is converted for this rank's layout (:func:`target_layout` of ``state``): its own
       shard on the same layout, else the policy for residuals and velocities;
    3. ``state.load_state_dict(...)``;
    4. every rank's outcome is exchanged (:func:`agree_on_failure`).

    Returns True when the saved state was loaded, False when no rank found one (the caller says
    so). Raises on every rank if any rank failed in steps 1-3 (the failing rank its own error,
    naming the file, the others ``RuntimeError`` naming it too), or if some ranks found a save
    and others found none (a checkpoint folder that differs between nodes)."""
    error: BaseException | None = None
    found = False
    try:
        saved = open_saved()
        if saved is not None:
            found = True
            state.load_state_dict(saved.state_for(target_layout(state, world_size, rank)))
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
        patterns = (_rank_pattern(shard_name), _rank_pattern(manifest_name))
        for name in os.listdir(folder):
            for pattern in patterns:
                m = pattern.match(name)
                if m and int(m.group(1)) >= world_size:
                    (folder / name).unlink(missing_ok=True)
    return manifest


def copy_shards(manifest: Mapping[str, Any], src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy the files of a loaded save to another folder (streamed, atomically each); return the
    manifest for ``dst`` (same checksums). Used to carry loaded residuals through a save made
    while not fitting."""
    src, dst = Path(src), Path(dst)
    if src.resolve() != dst.resolve():
        for e in manifest["files"]:
            source = src / e["name"]
            if not source.is_file():
                raise FileNotFoundError(f"GaussK residual shard {source} is missing; cannot carry it into {dst}")
            with open(source, "rb") as f_in:
                _atomic(dst / e["name"], lambda f_out, f_in=f_in: shutil.copyfileobj(f_in, f_out, _CHUNK))
    return {**manifest, "dir": dst.name}


def remove_shards(checkpoint_path: str | os.PathLike[str]) -> None:
    """Remove ``<checkpoint_path>.gaussk`` (nothing if it is not there)."""
    try:
        folder = shard_dir(checkpoint_path)
    except ValueError:
        return
    shutil.rmtree(folder, ignore_errors=True)
