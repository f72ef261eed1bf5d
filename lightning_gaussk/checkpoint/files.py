"""Checkpoint files: shard and manifest names, atomic writes, checksums, manifests, and reading
one shard with its checks.

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

A shard is checked when it is read (:func:`read_shard`): present, its size and sha256 as the
manifest says, loadable with ``weights_only=True``, a shard of the rank the manifest lists it for.
Every error names the file.
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

from lightning_gaussk.checkpoint.layouts import layout_of, residual_layout
from lightning_gaussk.comm.layout import Layout

__all__ = [
    "LEGACY_SHARD_FORMATS",
    "MANIFEST_FORMAT",
    "SHARD_DIR_SUFFIX",
    "SHARD_FORMAT",
    "check_manifest",
    "copy_shards",
    "locate_shards",
    "make_manifest",
    "merge_manifests",
    "rank_pattern",
    "read_shard",
    "remove_shards",
    "shard_dir",
    "shard_name",
    "write_json_atomic",
    "write_shard",
]

MANIFEST_FORMAT = "lightning_gaussk.shards/1"
SHARD_FORMAT = "lightning_gaussk.shard/1"
#: earlier per-rank files of the Accelerate integration (no layout, no checksum): still read
LEGACY_SHARD_FORMATS = ("lightning_gaussk.accelerate/1",)
SHARD_DIR_SUFFIX = ".gaussk"
_CHUNK = 1 << 20  # bytes per read when hashing or copying
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


# ----------------------------------------------------------------------------- names
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


def rank_pattern(namer: Callable[[int], str]) -> re.Pattern[str]:
    """A regex matching ``namer(r)`` for any rank ``r`` (group 1: the rank)."""
    probe = 987_654_321
    return re.compile("^" + re.escape(namer(probe)).replace(str(probe), r"(\d+)") + "$")


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
    layouts = {residual_layout(Layout.from_dict(e["layout"])) for e in files}
    if len(layouts) != 1:
        raise ValueError(f"GaussK shards disagree on the layout: {sorted(layouts, key=str)} (W, ranks per node)")
    ref = next((e for e in files if e["rank"] == 0), files[0])
    layout = {**Layout.from_dict(ref["layout"]).to_dict(), "rank": 0}
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "world_size": world_size, "layout": layout, "files": files}
    if dir_name is not None:
        manifest["dir"] = dir_name
    return manifest


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
    key = (ref["world_size"], residual_layout(Layout.from_dict(ref["layout"])))
    files: dict[int, dict[str, Any]] = {}
    for p in parts:
        if (p["world_size"], residual_layout(Layout.from_dict(p["layout"]))) == key:
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
    if fmt not in (SHARD_FORMAT, *LEGACY_SHARD_FORMATS) or not isinstance(payload.get("state"), dict):
        raise ValueError(f"{path} is not a GaussK shard ({SHARD_FORMAT!r}), format {fmt!r}")
    if not isinstance(payload["state"].get("residuals"), dict):
        raise ValueError(f"GaussK residual shard {path} is malformed: its state has no `residuals` dict")
    if not isinstance(payload["state"].get("velocity", {}), dict):
        raise ValueError(f"GaussK residual shard {path} is malformed: its `velocity` is not a dict")
    if entry is not None and payload.get("rank") != entry["rank"]:
        raise ValueError(f"GaussK residual shard {path} holds rank {payload.get('rank')!r}, the manifest lists it for rank {entry['rank']}")
    return payload


# ----------------------------------------------------------------------------- copying, removing
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
