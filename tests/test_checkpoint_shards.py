"""Residual checkpoints that scale (lightning_gaussk/checkpoint/): per-rank shard files with a
manifest, the layout-change policy for residuals and momentum-correction velocities, every saved
format through one reader, named errors for missing and corrupt shards, agreement on failure
(every rank raises, under Lightning and under a real Accelerate save_state/load_state), a
Lightning fit whose old checkpoints are removed with their shards, and peak host memory while
saving that does not grow with the world size.

The policy keeps the pending averaged update P (what the saved ranks still owe the model):
flat P = (1/W) sum_r r_r, node mode P[chunk l] = (1/W) sum_n R_{n,l}; a new flat rank gets r' = P,
a new node rank (L' per node, local rank l') R' = L' P[chunk l']. Velocities (same layout as the
residuals) follow the same rule: the averaged velocity V is kept."""

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from torch import nn

from _dist import run_distributed
from lightning_gaussk import GaussKDDPStrategy, GaussKState
from lightning_gaussk.checkpoint.files import MANIFEST_FORMAT, check_manifest, make_manifest, read_shard, shard_dir, shard_name, write_shard
from lightning_gaussk.checkpoint.formats import SavedState, state_from_legacy, state_from_shards
from lightning_gaussk.checkpoint.protocol import agree_on_failure, restore_state, save_shards
from lightning_gaussk.checkpoint.reshard import average_states
from lightning_gaussk.frontends.lightning_ddp import CHECKPOINT_KEY
from lightning_gaussk.comm.layout import Layout, chunk_bounds

SIZES = {"a.weight": 37, "b.bias": 5, "c.weight": 3}  # 3 < L: empty chunks in node mode
SCRIPT = Path(__file__).parent / "scripts" / "lightning_fit.py"


# ============================================================================ synthetic saves
def saved_states(world: int, rpn: int | None, seed: int = 0, velocity: bool = False) -> list[dict]:
    """One state dict per rank of a layout: flat residuals of whole parameters, or in node mode
    chunk l of the node's summed residual (and, with ``velocity``, momentum-correction velocities
    in the same layout)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        layout = Layout(world, r, rpn)
        residuals, velocities = {}, {}
        for name, n in SIZES.items():
            start, stop = layout.chunk(n)
            residuals[name] = torch.randn(stop - start, generator=g)
            velocities[name] = torch.randn(stop - start, generator=g)
        out.append({"format": "lightning_gaussk.state/1", "config": {"density": 0.1}, "layout": layout.to_dict(),
                    "step": 11 + r, "telemetry": {"hook_calls": 7 + r}, "residuals": residuals,
                    **({"velocity": velocities} if velocity else {})})  # fmt: skip
    return out


def pending(states: list[dict], world: int, rpn: int | None, key: str = "residuals") -> dict[str, torch.Tensor]:
    """The reference P (or V, ``key="velocity"``): every saved rank's buffer put at its chunk,
    summed, divided by W."""
    parts = rpn or 1
    out = {name: torch.zeros(n, dtype=torch.float64) for name, n in SIZES.items()}
    for r, sd in enumerate(states):
        for name, t in sd[key].items():
            start, stop = chunk_bounds(SIZES[name], parts, r % parts)
            out[name][start:stop] += t.double()
    return {name: p / world for name, p in out.items()}


def write_save(folder: Path, states: list[dict]) -> dict:
    entries = [write_shard(sd, folder / shard_name(r), rank=r, world_size=len(states)) for r, sd in enumerate(states)]
    return make_manifest(entries, world_size=len(states), dir_name=folder.name)


def load_all(manifest: dict, folder: Path, world: int, rpn: int | None) -> list[dict]:
    return [state_from_shards(manifest, folder, Layout(world, r, rpn)) for r in range(world)]


LAYOUT_CHANGES = [  # (saved W, saved L) -> (new W, new L)
    ((2, None), (3, None)),
    ((2, None), (4, 2)),  # flat -> node
    ((4, 2), (2, None)),  # node -> flat
    ((4, 2), (4, 4)),  # N=2, L=2 -> N=1, L=4
    ((4, 2), (6, 3)),  # another N and L
    ((4, 4), (4, None)),  # one node -> flat on the same world size
]


@pytest.mark.parametrize(("saved", "new"), LAYOUT_CHANGES, ids=lambda x: f"W{x[0]}L{x[1]}")
def test_a_layout_change_preserves_the_pending_update_with_a_warning(tmp_path, saved, new):
    (ws, rpn), (ws2, rpn2) = saved, new
    states = saved_states(ws, rpn)
    manifest = write_save(tmp_path, states)
    with pytest.warns(UserWarning, match=r"world size .* on world size .*pending averaged update") as rec:
        loaded = load_all(manifest, tmp_path, ws2, rpn2)
    assert any(f"saved with world size {ws}" in str(w.message) for w in rec)
    before, after = pending(states, ws, rpn), pending(loaded, ws2, rpn2)
    for name in SIZES:
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-7)
    for r, sd in enumerate(loaded):
        assert sd["step"] == 11 and sd["telemetry"] == {"hook_calls": 7}  # from saved rank 0
        assert sd["layout"] == Layout(ws2, r, rpn2).to_dict()
        for name, n in SIZES.items():  # each new rank gets its own chunk length
            start, stop = Layout(ws2, r, rpn2).chunk(n)
            assert sd["residuals"][name].numel() == stop - start


def test_flat_to_flat_on_another_world_size_is_the_mean_of_the_residuals(tmp_path):
    states = saved_states(2, None)
    manifest = write_save(tmp_path, states)
    with pytest.warns(UserWarning, match="world size 2 on world size 3"):
        loaded = load_all(manifest, tmp_path, 3, None)
    for sd in loaded:
        for name in SIZES:
            torch.testing.assert_close(sd["residuals"][name], (states[0]["residuals"][name] + states[1]["residuals"][name]) / 2)


@pytest.mark.parametrize(("saved", "new"), LAYOUT_CHANGES, ids=lambda x: f"W{x[0]}L{x[1]}")
def test_a_layout_change_preserves_the_averaged_velocity_and_drops_none(tmp_path, saved, new):
    (ws, rpn), (ws2, rpn2) = saved, new
    states = saved_states(ws, rpn, velocity=True)
    manifest = write_save(tmp_path, states)
    with pytest.warns(UserWarning, match="velocities follow the same rule"):
        loaded = load_all(manifest, tmp_path, ws2, rpn2)
    before, after = pending(states, ws, rpn, "velocity"), pending(loaded, ws2, rpn2, "velocity")
    for name in SIZES:
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-7)
    for r, sd in enumerate(loaded):  # every velocity fits its new rank: none is dropped by GaussKState
        assert sd["velocity"].keys() == SIZES.keys()
        for name, n in SIZES.items():
            start, stop = Layout(ws2, r, rpn2).chunk(n)
            assert sd["velocity"][name].numel() == sd["residuals"][name].numel() == stop - start


def test_flat_to_flat_velocity_is_the_mean_not_saved_rank_0s(tmp_path):
    states = saved_states(2, None, velocity=True)
    with pytest.warns(UserWarning):
        loaded = load_all(write_save(tmp_path, states), tmp_path, 3, None)
    mean = {n: (states[0]["velocity"][n] + states[1]["velocity"][n]) / 2 for n in SIZES}
    for sd in loaded:
        for name in SIZES:
            torch.testing.assert_close(sd["velocity"][name], mean[name])
    assert average_states(states)["velocity"].keys() == SIZES.keys()
    with pytest.warns(UserWarning):
        without = load_all(write_save(tmp_path / "none", saved_states(2, None)), tmp_path / "none", 3, None)
    assert "velocity" not in without[0]  # nothing saved, nothing made up


def test_a_live_state_takes_converted_velocities_without_a_drop_warning():
    """GaussKState restarts a velocity that does not fit from zero, with a warning: converted
    velocities always fit, so the warning never comes and the velocity is kept."""
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    per_rank = [{**GaussKState(density=0.1, momentum_correction=0.9).bind(model).state_dict(), "layout": Layout(2, r).to_dict(),
                 "residuals": {n: torch.randn(k, generator=g) for n, k in sizes.items()},
                 "velocity": {n: torch.randn(k, generator=g) for n, k in sizes.items()}} for r in range(2)]  # fmt: skip
    saved = SavedState.from_embedded({"world_size": 2, "per_rank": per_rank})
    fresh = GaussKState(density=0.1, momentum_correction=0.9).bind(model)  # flat, whole parameters (in process)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fresh.load_state_dict(saved.state_for(Layout(3, 1)))
    assert not [w for w in rec if "velocity" in str(w.message) and "restarts" in str(w.message)], [str(w.message) for w in rec]
    out = fresh.state_dict()["velocity"]
    for n in sizes:  # V = the mean of the saved velocities (node-mode targets: the 4-process run below)
        torch.testing.assert_close(out[n], (per_rank[0]["velocity"][n] + per_rank[1]["velocity"][n]) / 2)


@pytest.mark.parametrize("layout", [(2, None), (4, 2)], ids=["flat", "node"])
def test_the_same_layout_loads_each_ranks_own_shard_exactly_without_a_warning(tmp_path, layout):
    ws, rpn = layout
    states = saved_states(ws, rpn, velocity=True)
    manifest = write_save(tmp_path, states)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_all(manifest, tmp_path, ws, rpn)
    for sd, ref in zip(loaded, states):
        assert sd["step"] == ref["step"] and sd["telemetry"] == ref["telemetry"]
        for name in SIZES:
            assert torch.equal(sd["residuals"][name], ref["residuals"][name])
            assert torch.equal(sd["velocity"][name], ref["velocity"][name])


def test_shards_load_with_weights_only_and_the_manifest_holds_no_tensors(tmp_path):
    manifest = write_save(tmp_path, saved_states(2, None))
    check_manifest(manifest)
    assert manifest["format"] == MANIFEST_FORMAT and manifest["world_size"] == 2 and manifest["dir"] == tmp_path.name
    assert [e["name"] for e in manifest["files"]] == ["rank0.pt", "rank1.pt"]
    assert "Tensor" not in json.dumps(manifest, default=lambda o: type(o).__name__)  # plain values only
    for e in manifest["files"]:
        payload = torch.load(tmp_path / e["name"], weights_only=True)
        assert payload["rank"] == e["rank"] and os.path.getsize(tmp_path / e["name"]) == e["bytes"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_a_deleted_shard_raises_naming_the_file(tmp_path):
    manifest = write_save(tmp_path, saved_states(2, None))
    (tmp_path / "rank1.pt").unlink()
    state_from_shards(manifest, tmp_path, Layout(2, 0))  # rank 0 needs only its own file
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "rank1.pt"))):
        state_from_shards(manifest, tmp_path, Layout(2, 1))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "rank1.pt"))), pytest.warns(UserWarning):
        state_from_shards(manifest, tmp_path, Layout(3, 0))  # a layout change needs every file


def test_a_corrupt_shard_raises_naming_the_file_and_the_checksum(tmp_path):
    manifest = write_save(tmp_path, saved_states(2, None))
    path = tmp_path / "rank0.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*checksum"):
        state_from_shards(manifest, tmp_path, Layout(2, 0))
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(ValueError, match=re.escape(str(path))):
        state_from_shards(manifest, tmp_path, Layout(2, 0))
    path.write_bytes(b"not a torch file")  # unloadable, checked without a manifest entry
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*cannot be loaded"):
        read_shard(path)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m: m.update(world_size="2"),
        lambda m: m.update(files=m["files"][:1]),
        lambda m: m["files"][1].update(name="../../etc/passwd"),
        lambda m: m["files"][1].update(rank=0),
        lambda m: m.update(layout={"world_size": 3, "rank": 0}),
        lambda m: m.update(format="something/else"),
    ],
    ids=["world_size", "missing entry", "path in name", "duplicate rank", "layout", "format"],
)
def test_a_malformed_manifest_is_refused(tmp_path, corrupt):
    manifest = write_save(tmp_path, saved_states(2, None))
    corrupt(manifest)
    with pytest.raises(ValueError, match="malformed"):
        check_manifest(manifest)


def test_the_earlier_embedded_format_follows_the_same_policy():
    states = saved_states(2, None)
    for sd in states:
        del sd["layout"]  # saved before node mode: flat
    legacy = {"world_size": 2, "per_rank": states}
    own = state_from_legacy(legacy, Layout(2, 1))
    assert torch.equal(own["residuals"]["a.weight"], states[1]["residuals"]["a.weight"])
    with pytest.warns(UserWarning, match="world size 2 on world size 4 in node mode"):
        loaded = [state_from_legacy(legacy, Layout(4, r, 2)) for r in range(4)]
    for name, p in pending(states, 2, None).items():
        torch.testing.assert_close(pending(loaded, 4, 2)[name], p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "entry",
    [{"world_size": 2, "per_rank": [{}]}, {"format": MANIFEST_FORMAT, "world_size": 2}, [1, 2], {"format": "other"}],
    ids=["embedded, too few ranks", "manifest without files", "a list", "unknown format"],
)
def test_a_malformed_checkpoint_entry_is_refused_naming_the_checkpoint(entry):
    with pytest.raises(ValueError, match=r"Checkpoint a\.ckpt: `gaussk` hook state is malformed"):
        SavedState.from_checkpoint(entry, "a.ckpt")


def test_earlier_accelerate_files_without_manifests_read_through_the_same_reader(tmp_path):
    states = saved_states(2, None)
    for r, sd in enumerate(states):  # the "lightning_gaussk.accelerate/1" files: no layout, no manifest
        torch.save({"format": "lightning_gaussk.accelerate/1", "rank": r, "world_size": 2, "state": sd}, tmp_path / f"s{r}.pt")
    names = {"shard_name": lambda r: f"s{r}.pt", "manifest_name": lambda r: f"m{r}.json"}
    saved = SavedState.from_folder(tmp_path, **names)
    assert saved.world_size == 2 and saved.folder == tmp_path
    assert torch.equal(saved.state_for(Layout(2, 1))["residuals"]["a.weight"], states[1]["residuals"]["a.weight"])
    assert SavedState.from_folder(tmp_path / "empty", **names) is None
    (tmp_path / "m0.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "m0.json"))):
        SavedState.from_folder(tmp_path, **names)


# ============================================================================ the strategy, in process (world size 1)
def _strategy_with_state(model: nn.Module) -> GaussKDDPStrategy:
    strategy = GaussKDDPStrategy(density=0.1, cluster_environment=LightningEnvironment())
    strategy._gaussk_state = GaussKState(density=0.1).bind(model)
    return strategy


def test_strategy_save_writes_a_shard_and_a_manifest_and_remove_deletes_both(tmp_path):
    model = nn.Linear(3, 2)
    strategy = _strategy_with_state(model)
    sd = strategy._gaussk_state.state_dict()
    strategy._gaussk_state.load_state_dict({**sd, "step": 3, "residuals": {n: torch.full((p.numel(),), 0.5) for n, p in model.named_parameters()}})
    ckpt = tmp_path / "a.ckpt"
    strategy.save_checkpoint({"state_dict": model.state_dict()}, ckpt)
    assert (tmp_path / "a.ckpt.gaussk" / "rank0.pt").is_file()
    saved = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert saved["format"] == MANIFEST_FORMAT and saved["world_size"] == 1

    fresh = _strategy_with_state(model)
    fresh.load_checkpoint(ckpt)
    assert fresh._gaussk_state.step == 3
    assert torch.equal(fresh._gaussk_state.state_dict()["residuals"]["weight"], torch.full((6,), 0.5))

    (tmp_path / "a.ckpt.gaussk" / "rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "a.ckpt.gaussk" / "rank0.pt"))):
        _strategy_with_state(model).load_checkpoint(ckpt)

    strategy.save_checkpoint({"state_dict": model.state_dict()}, ckpt)
    strategy.remove_checkpoint(ckpt)
    assert not ckpt.exists() and not shard_dir(ckpt).exists()


def test_strategy_carries_loaded_shards_through_a_save_while_not_fitting(tmp_path):
    model = nn.Linear(3, 2)
    strategy = _strategy_with_state(model)
    strategy.save_checkpoint({"state_dict": {}}, tmp_path / "a.ckpt")
    idle = GaussKDDPStrategy(density=0.1, cluster_environment=LightningEnvironment())  # no state: not fitting
    idle.load_checkpoint(tmp_path / "a.ckpt")
    idle.save_checkpoint({"state_dict": {}}, tmp_path / "b.ckpt")
    saved = torch.load(tmp_path / "b.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert saved["dir"] == "b.ckpt.gaussk"
    assert (tmp_path / "b.ckpt.gaussk" / "rank0.pt").read_bytes() == (tmp_path / "a.ckpt.gaussk" / "rank0.pt").read_bytes()
    _strategy_with_state(model).load_checkpoint(tmp_path / "b.ckpt")  # checksums hold


# ============================================================================ Accelerate's files, in process
def test_accelerate_files_carry_checksums_and_follow_the_same_policy(tmp_path):
    pytest.importorskip("accelerate")
    from lightning_gaussk.frontends.accelerate import _load_into, _save_files, manifest_file, state_file

    states = []
    for rank in range(2):
        state = GaussKState(density=0.1)
        state.load_state_dict({**state.state_dict(), "step": 4, "residuals": {"w": torch.full((3,), float(rank + 1))}})
        _save_files(state, tmp_path, rank, 2)
        states.append(state)
    assert {state_file(0), state_file(1), manifest_file(0), manifest_file(1)} <= {p.name for p in tmp_path.iterdir()}
    entry = json.loads((tmp_path / manifest_file(1)).read_text())
    check_manifest(entry, complete=False)
    assert entry["files"][0]["sha256"] and entry["world_size"] == 2

    own = GaussKState(density=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load_into(own, tmp_path, rank=1, world=2)
    assert torch.equal(own.state_dict()["residuals"]["w"], torch.full((3,), 2.0))
    mean = GaussKState(density=0.1)
    with pytest.warns(UserWarning, match="world size 2 on world size 3"):
        _load_into(mean, tmp_path, rank=2, world=3)
    assert torch.equal(mean.state_dict()["residuals"]["w"], torch.full((3,), 1.5)) and mean.step == 4

    path = tmp_path / state_file(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*checksum"):
        _load_into(GaussKState(density=0.1), tmp_path, rank=1, world=2)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        _load_into(GaussKState(density=0.1), tmp_path, rank=1, world=2)


# ============================================================================ Lightning, 2 processes
def test_model_checkpoint_save_top_k_keeps_one_shard_folder_next_to_the_kept_checkpoint(tmp_path):
    ckpts = tmp_path / "ckpts"
    plan = [{"name": "top1", "density": 0.05, "max_steps": 12, "ckpt_every": 4, "ckpt_dir": str(ckpts), "save_top_k": 1}]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--devices", "2", "--plan", json.dumps(plan)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    kept = sorted(p.name for p in ckpts.iterdir())
    assert kept == ["step=12.ckpt", "step=12.ckpt.gaussk"], kept  # steps 4 and 8 removed with their shards
    folder = ckpts / "step=12.ckpt.gaussk"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0.pt", "rank1.pt"]
    manifest = torch.load(ckpts / "step=12.ckpt", weights_only=True)[CHECKPOINT_KEY]
    check_manifest(manifest)
    assert manifest["world_size"] == 2 and [e["name"] for e in manifest["files"]] == ["rank0.pt", "rank1.pt"]
    r0, r1 = (read_shard(folder / e["name"], e)["state"]["residuals"]["net.0.weight"] for e in manifest["files"])
    assert not torch.equal(r0, r1)  # each rank wrote its own residuals


# ============================================================================ peak host memory while saving
PARAMS = 2000 * 2000 + 2000  # nn.Linear(2000, 2000): a 16 MB fp32 residual per rank


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def _peak_during(fn) -> int:
    """Peak RSS increase over the RSS before ``fn()``: the kernel's high-water mark (reset
    before) and a thread sampling /proc/self/statm about every millisecond."""
    gc.collect()
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    hwm = _reset_hwm()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    top = max(peak[0], _hwm()) if hwm else peak[0]
    return top - base


def _legacy_gather(state: GaussKState, world: int) -> None:
    """The earlier save: every rank's full state gathered into every rank."""
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, state.state_dict())


def _outcome(fn) -> str:
    """``"no error"`` or ``"<ExceptionType>: <message>"`` of ``fn()``."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - what this rank raised
        return f"{type(err).__name__}: {err}"
    return "no error"


def _agreement_entry(rank: int, world: int, out: str) -> None:
    """Rank 1's shard is missing: rank 1 fails converting, and through the exchange of errors
    (checkpoint.agree_on_failure, the strategy's) rank 0 raises too, naming rank 1's file (nobody
    trains on alone). Then a write that fails on rank 1 only: save_shards raises on both."""
    folder = Path(out) / "agree"
    manifest = None
    if rank == 0:
        manifest = write_save(folder, saved_states(world, None))
        (folder / "rank1.pt").unlink()
    box = [manifest]
    dist.broadcast_object_list(box, src=0)

    def convert_then_agree() -> None:
        error = None
        try:
            state_from_shards(box[0], folder, Layout(world, rank))
        except (ValueError, OSError) as err:
            error = err
        agree_on_failure(error)

    Path(out, f"agree_rank{rank}.txt").write_text(_outcome(convert_then_agree))

    class FailsOnRank1:
        def state_dict(self) -> dict:
            if rank == 1:
                raise OSError(28, "No space left on device (simulated on rank 1)")
            return saved_states(world, None)[rank]

    save = lambda: save_shards(FailsOnRank1(), Path(out) / "save_fails", rank=rank, world_size=world)  # noqa: E731
    Path(out, f"save_fails_rank{rank}.txt").write_text(_outcome(save))

    full = write_save(folder / f"full{rank}", saved_states(world, None))  # rank 1 then finds nothing at all
    found = lambda: SavedState.from_manifest(full, folder / f"full{rank}") if rank == 0 else None  # noqa: E731
    half = lambda: restore_state(GaussKState(density=0.1), found, rank=rank, world_size=world)  # noqa: E731
    Path(out, f"half_rank{rank}.txt").write_text(_outcome(half))
    dist.barrier()
    _accelerate_agreement_entry(rank, world, out)


def _accelerate_agreement_entry(rank: int, world: int, out: str) -> None:
    """A real Accelerate MULTI_CPU accelerator on the spawned gloo group: register_gaussk,
    save_state, then load_state with rank 1's shard (a) missing, (b) corrupt (one flipped byte),
    and (c) intact, each from a copy of the save. Each rank records what load_state raised."""
    import shutil

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")  # fmt: skip
    from accelerate import Accelerator

    from lightning_gaussk.frontends.accelerate import register_gaussk, state_file

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = acc.prepare(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_gaussk(acc, model, density=0.2)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
    saved = Path(out) / "acc" / "saved"
    acc.save_state(str(saved))
    acc.wait_for_everyone()
    outcomes = {}
    for case in ("missing", "corrupt", "intact"):
        folder = Path(out) / "acc" / case
        if rank == 0:
            shutil.copytree(saved, folder)
            victim = folder / state_file(1)
            if case == "missing":
                victim.unlink()
            elif case == "corrupt":
                data = bytearray(victim.read_bytes())
                data[len(data) // 2] ^= 0xFF
                victim.write_bytes(bytes(data))
        acc.wait_for_everyone()
        outcomes[case] = _outcome(lambda folder=folder: acc.load_state(str(folder)))
        acc.wait_for_everyone()
    Path(out, f"acc_rank{rank}.json").write_text(json.dumps(outcomes))


def _save_memory_entry(rank: int, world: int, out: str, legacy: bool) -> None:
    torch.set_num_threads(1)
    model = nn.Linear(2000, 2000)
    state = GaussKState(density=0.01).bind(model)
    if hasattr(state, "setup_layout"):
        state.setup_layout()
    g = torch.Generator().manual_seed(rank)
    residuals = {n: torch.randn(p.numel(), generator=g) for n, p in model.named_parameters()}
    state.load_state_dict({**state.state_dict(), "residuals": residuals})  # placed at the first bucket: held pending
    del residuals
    dist.barrier()
    result = {"new": _peak_during(lambda: save_shards(state, Path(out) / f"w{world}", rank=rank, world_size=world))}
    dist.barrier()
    if legacy:
        result["legacy"] = _peak_during(lambda: _legacy_gather(state, world))
    dist.barrier()
    Path(out, f"mem_w{world}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    if legacy:  # the 2-process run also checks that a failed restore stops every rank
        _agreement_entry(rank, world, out)
    else:  # the 4-process run also saves a real node-mode state and loads it into other layouts
        _node_round_trip(rank, world, out)


def _node_round_trip(rank: int, world: int, out: str) -> None:
    """2 nodes x 2 ranks train 3 steps with the hook and momentum correction, save shards; the
    shards then load into live states of the same layout (exact), flat on 4 ranks and 1 node of 4
    ranks (the policy): GaussKState.load_state_dict accepts every converted chunk, residual and
    velocity, and drops no velocity. Each rank keeps what it loaded and any velocity warning."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_gaussk import gaussk_hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    ddp = DDP(model)
    state = GaussKState(density=0.1, hierarchy="node", ranks_per_node=2, momentum_correction=0.9).bind(ddp)
    state.setup_layout()
    ddp.register_comm_hook(state, gaussk_hook)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        ddp(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
    folder = Path(out) / "node"
    manifest = save_shards(state, folder, rank=rank, world_size=world)
    loaded = {}
    for kind, options in {"same": {"hierarchy": "node", "ranks_per_node": 2}, "flat": {"hierarchy": "flat"},
                          "node4": {"hierarchy": "node", "ranks_per_node": 4}}.items():  # fmt: skip
        fresh = GaussKState(density=0.1, momentum_correction=0.9, **options).bind(model)
        fresh.setup_layout()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fresh.load_state_dict(state_from_shards(manifest, folder, fresh.layout))
        after = fresh.state_dict()
        loaded[kind] = {"layout": fresh.layout.to_dict(), "residuals": after["residuals"], "velocity": after["velocity"],
                        "velocity_warnings": [str(w.message) for w in rec if "velocity" in str(w.message).split(":")[0]
                                              or "restarts from zero" in str(w.message)]}  # fmt: skip
    loaded["saved"] = state.state_dict()["residuals"]
    loaded["saved_velocity"] = state.state_dict()["velocity"]
    torch.save(loaded, Path(out) / f"node_rank{rank}.pt")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """One 2-process and one 4-process gloo run (the 4-process one kept single and small)."""
    out = tmp_path_factory.mktemp("spawned")
    run_distributed(_save_memory_entry, str(out), True, world=2)
    run_distributed(_save_memory_entry, str(out), False, world=4)
    return out


def test_a_missing_shard_on_one_rank_makes_every_rank_raise_naming_the_file(spawned):
    path = str(spawned / "agree" / "rank1.pt")
    mine = (spawned / "agree_rank1.txt").read_text()
    peer = (spawned / "agree_rank0.txt").read_text()
    assert mine.startswith("FileNotFoundError") and path in mine, mine
    assert peer.startswith("RuntimeError") and "rank(s) [1]" in peer and path in peer, peer


def test_a_shard_write_failing_on_one_rank_makes_save_shards_raise_on_every_rank(spawned):
    mine = (spawned / "save_fails_rank1.txt").read_text()
    peer = (spawned / "save_fails_rank0.txt").read_text()
    assert mine.startswith("OSError") and "No space left" in mine, mine
    assert peer.startswith("RuntimeError") and "rank(s) [1]" in peer and "No space left" in peer, peer


def test_a_save_found_on_some_ranks_only_raises_on_every_rank(spawned):
    for r in (0, 1):  # rank 0 found a save, rank 1 none: neither resumes with residuals reset on one rank only
        text = (spawned / f"half_rank{r}.txt").read_text()
        assert text.startswith("FileNotFoundError") and "rank(s) [1] found no saved hook state" in text, text


def test_the_checkpoint_protocol_imports_neither_lightning_nor_accelerate():
    """The checkpoint protocol and the package modules it imports (transitively) import no `lightning` or
    `accelerate`, so the protocol serves both integrations and raw DDP; the agreement helper uses
    torch.distributed only."""
    import ast

    import lightning_gaussk

    root = Path(lightning_gaussk.__file__).parent
    todo, seen, foreign = ["lightning_gaussk.checkpoint.protocol"], set(), []
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = root.joinpath(*mod.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                if top in ("lightning", "accelerate", "pytorch_lightning"):
                    foreign.append((mod, name))
                elif top == "lightning_gaussk" and name != "lightning_gaussk":
                    todo.append(name)
    assert "lightning_gaussk.utils.log" in seen and foreign == [], (sorted(seen), foreign)


@pytest.mark.parametrize(("case", "error", "detail"), [("missing", "FileNotFoundError", "is missing"),
                                                        ("corrupt", "ValueError", "checksum")])  # fmt: skip
def test_accelerate_load_state_raises_on_every_rank_when_one_ranks_shard_is_bad(spawned, case, error, detail):
    """Under a real Accelerate load_state (2 gloo processes), rank 1's shard missing or corrupt:
    rank 1 raises its own error and rank 0, whose own shard is fine, raises too, both naming
    rank 1's file; the intact copy of the same save loads on both."""
    from lightning_gaussk.frontends.accelerate import state_file

    path = str(spawned / "acc" / case / state_file(1))
    mine, peer = (json.loads((spawned / f"acc_rank{r}.json").read_text())[case] for r in (1, 0))
    assert mine.startswith(error) and path in mine and detail in mine, mine
    assert peer.startswith("RuntimeError") and "rank(s) [1]" in peer and path in peer and detail in peer, peer
    for r in (0, 1):
        assert json.loads((spawned / f"acc_rank{r}.json").read_text())["intact"] == "no error"


def test_a_real_node_mode_save_loads_into_other_layouts_with_the_same_pending_update_and_velocity(spawned):
    folder = spawned / "node"
    per_rank = [torch.load(spawned / f"node_rank{r}.pt", weights_only=True) for r in range(4)]
    entries = [read_shard(folder / f"rank{r}.pt") for r in range(4)]
    assert [e["layout"]["ranks_per_node"] for e in entries] == [2] * 4
    sizes = {n: t.numel() for n, t in per_rank[0]["flat"]["residuals"].items()}  # flat: whole parameters

    def p_of(states: list[dict], rpn: int | None) -> dict[str, torch.Tensor]:
        parts = rpn or 1
        out = {n: torch.zeros(k, dtype=torch.float64) for n, k in sizes.items()}
        for r, res in enumerate(states):
            for n, t in res.items():
                start, stop = chunk_bounds(sizes[n], parts, r % parts)
                out[n][start:stop] += t.double()
        return {n: v / len(states) for n, v in out.items()}

    for key, kept in (("residuals", "saved"), ("velocity", "saved_velocity")):
        saved = p_of([e["state"][key] for e in entries], 2)
        assert any(v.abs().max() > 0 for v in saved.values())  # the hook left residuals and velocities
        for r in range(4):  # same layout: exact
            assert per_rank[r][kept].keys() == sizes.keys()
            for n, t in per_rank[r][kept].items():
                assert torch.equal(per_rank[r]["same"][key][n], t)
        for kind, rpn in (("flat", None), ("node4", 4)):
            assert per_rank[1][kind]["layout"]["ranks_per_node"] == rpn
            after = p_of([per_rank[r][kind][key] for r in range(4)], rpn)
            for n in sizes:
                torch.testing.assert_close(after[n], saved[n], rtol=1e-6, atol=1e-7)
    for r in range(4):  # GaussKState restarts a velocity that does not fit, with a warning: none came
        assert all(per_rank[r][kind]["velocity_warnings"] == [] for kind in ("same", "flat", "node4")), r


def test_peak_host_memory_while_saving_does_not_grow_with_the_world_size(spawned):
    """2 and 4 gloo processes, a 16 MB residual each. Saving holds this rank's copy only (the
    state dict), so the peak increase stays below 2.5 residuals for both, and 4 ranks cost no
    more than 2 (plus one residual of slack). The earlier all_gather_object design, measured the
    same way on 2 ranks as a control, holds every rank's copy (plus pickles) and exceeds it."""
    residual_bytes = PARAMS * 4
    tmp_path = spawned
    two = json.loads((tmp_path / "mem_w2_rank0.json").read_text())
    four = json.loads((tmp_path / "mem_w4_rank0.json").read_text())
    mb = {k: round(v / 2**20, 1) for k, v in {"w2": two["new"], "w4": four["new"], "legacy_w2": two["legacy"]}.items()}
    print(f"peak RSS increase while saving (MB), residual {residual_bytes / 2**20:.1f} MB: {mb}")
    for world in (2, 4):
        for r in range(world):
            peak = json.loads((tmp_path / f"mem_w{world}_rank{r}.json").read_text())["new"]
            assert peak < 2.5 * residual_bytes, (world, r, mb)
    assert four["new"] <= two["new"] + residual_bytes, mb
    assert two["legacy"] > 2.5 * residual_bytes, mb  # the measurement sees W copies when they are there
    for world in (2, 4):
        assert sorted(p.name for p in (tmp_path / f"w{world}").iterdir()) == [f"rank{r}.pt" for r in range(world)]


# ------------------------------------------------------------------ the reshard policy comes from the saved marker
def _fsdp_saves(world: int = 4, per_node: int = 2) -> list[dict]:
    """Per-rank FSDP2 saves of one (5, 3) parameter, dim-0 shards of 3 and 2 rows, marked."""
    from lightning_gaussk.engine.fsdp import SHARDING

    def one(r: int) -> dict:
        rows = 3 if r % per_node == 0 else 2
        return {"format": "lightning_gaussk.state/1", "shapes": {"w": [5, 3]}, "step": 7,
                "layout": {"world_size": world, "rank": r, "ranks_per_node": per_node, "sharding": SHARDING},
                "residuals": {"w": torch.full((rows * 3,), float(r))}}  # fmt: skip

    return [one(r) for r in range(world)]


def _ddp_saves(world: int = 2) -> list[dict]:
    return [{"format": "lightning_gaussk.state/1", "step": 3, "layout": {"world_size": world, "rank": r, "ranks_per_node": None},
             "residuals": {"w": torch.full((15,), float(r))}} for r in range(world)]  # fmt: skip


def test_the_reshard_policy_registry_maps_markers_and_refuses_an_unknown_one():
    from lightning_gaussk.checkpoint.reshard import fsdp_state_for_layout, policy_for, state_for_layout
    from lightning_gaussk.engine.fsdp import SHARDING

    assert policy_for(None).state_for is state_for_layout
    assert policy_for(SHARDING).state_for is fsdp_state_for_layout
    with pytest.raises(ValueError, match="no reshard policy knows"):
        policy_for("zero3")


def test_an_fsdp2_save_on_another_layout_takes_the_row_policy_from_its_marker():
    from lightning_gaussk.engine.fsdp import SHARDING

    saved = SavedState.from_embedded({"world_size": 4, "per_rank": _fsdp_saves()})
    assert saved.sharding(Layout(4, 0, 4)) == SHARDING
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = saved.state_for(Layout(4, 1, 4))
    assert out["layout"]["sharding"] == SHARDING and any("FSDP2" in str(w.message) for w in caught)


def test_a_same_layout_restore_reads_only_this_ranks_own_file():
    per, reads = _fsdp_saves(), []

    def read(r: int) -> dict:
        reads.append(r)
        return per[r]

    out = SavedState(Layout(4, 0, 2), read, entry={}, folder=None).state_for(Layout(4, 3, 2))
    assert reads == [3] and out["residuals"]["w"][0] == 3


def test_a_save_of_the_other_kind_or_an_unknown_marker_is_refused_before_anything_changes():
    from lightning_gaussk.engine.fsdp import SHARDING, GaussKFSDPState

    with pytest.raises(ValueError, match="saved by an FSDP2 hook state.*cannot be loaded into a DDP hook state"):
        restore_state(GaussKState(density=0.1), lambda: SavedState.from_embedded({"world_size": 4, "per_rank": _fsdp_saves()}),
                      rank=0, world_size=4)  # fmt: skip
    with pytest.raises(ValueError, match="saved by a DDP hook state.*FSDP2"):
        restore_state(GaussKFSDPState(density=0.1), lambda: SavedState.from_embedded({"world_size": 2, "per_rank": _ddp_saves()}),
                      rank=0, world_size=2, sharding=SHARDING)  # fmt: skip
    unknown = _fsdp_saves()
    for sd in unknown:
        sd["layout"]["sharding"] = "zero3"
    with pytest.raises(ValueError, match="'zero3', which no reshard policy knows"):
        restore_state(GaussKState(density=0.1), lambda: SavedState.from_embedded({"world_size": 4, "per_rank": unknown}), rank=0, world_size=4)


def test_saved_format_names_are_the_ones_existing_checkpoints_carry():
    """Moving modules must not rename what files say they are: saves made before the layering
    refactor still load (a renamed format would be refused as "not a ... state dict")."""
    from lightning_gaussk.checkpoint.files import LEGACY_SHARD_FORMATS, SHARD_FORMAT
    from lightning_gaussk.engine.local.driver import LOCAL_SGD_FORMAT
    from lightning_gaussk.engine.state import STATE_FORMAT
    from lightning_gaussk.observe.monitor import HISTORY_FORMAT, SNAPSHOT_FORMAT

    assert (MANIFEST_FORMAT, SHARD_FORMAT, STATE_FORMAT) == ("lightning_gaussk.shards/1", "lightning_gaussk.shard/1", "lightning_gaussk.state/1")
    assert LOCAL_SGD_FORMAT == "lightning_gaussk.local_sgd/1"
    assert "lightning_gaussk.accelerate/1" in LEGACY_SHARD_FORMATS
    assert (SNAPSHOT_FORMAT, HISTORY_FORMAT) == ("lightning_gaussk.monitor_snapshot/1", "lightning_gaussk.monitor_history/1")
