"""``strategy="gaussk_fsdp"`` as a real multi-node Lightning job: 2 nodes x 2 CPU devices, in two
network namespaces joined by a shaped veth (benchmarks/cluster.py; needs root, skipped with the
reason otherwise), one launch per node running five fits (tests/scripts/fsdp_fit.py): 16 steps
straight; 8 steps and a distributed checkpoint; a resume from it to step 16; and the same with a
single-file checkpoint (4 steps, resumed to 6). It trains, every rank
holds the same full parameters, the residuals are saved and restored, and the resumed fit equals
the uninterrupted one exactly. Also: the strategy's mesh and arguments, without processes."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "scripts" / "fsdp_fit.py"
sys.path.insert(0, str(HERE.parent / "benchmarks"))
sys.path.insert(0, str(HERE / "scripts"))
import cluster  # noqa: E402
from _launched import groups_at_exit  # noqa: E402

pytest.importorskip("torch.distributed.fsdp")

NODES, DEVICES = 2, 2
LOG_LINE = "GaussK: FSDP2 across nodes (custom HSDP), 2 nodes x 2 ranks"


def _records(out: Path) -> list[dict]:
    files = sorted(out.glob("rank*.pt"), key=lambda f: int(f.stem[4:]))
    return [torch.load(f, weights_only=True) for f in files]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    why = cluster.missing_privileges()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    tmp = tmp_path_factory.mktemp("fsdp_lightning")
    ckpt = tmp / "half.ckpt"
    plan = [
        {"name": "straight", "max_steps": 16},
        {"name": "half", "max_steps": 8, "save_ckpt": str(ckpt)},
        {"name": "resumed", "max_steps": 16, "resume": str(ckpt)},
        {"name": "file", "max_steps": 4, "save_ckpt": str(tmp / "file.ckpt"), "single_file": True},
        {"name": "file_resumed", "max_steps": 6, "resume": str(tmp / "file.ckpt"), "single_file": True},
    ]
    out = tmp / "out"
    argv = [str(SCRIPT), "--out", str(out), "--devices", str(DEVICES), "--num-nodes", str(NODES), "--plan", json.dumps(plan)]
    spec = cluster.ClusterSpec(world=NODES, link=cluster.LinkSpec("1gbit"), ranks_per_host=DEVICES)
    with cluster.EmulatedCluster(spec, log_dir=str(tmp / "logs")) as c:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        c.run(argv, env=env, timeout=400, python=sys.executable, per_host=True)
        logs = [Path(p.log).read_text(errors="replace") for p in c.procs]
    assert not [ns for ns in cluster.list_namespaces() if ns.startswith(f"{cluster.PREFIX}-{spec.run_id}-")]
    names = ("straight", "half", "resumed", "file", "file_resumed")
    exits = groups_at_exit(str(out))
    return {"logs": logs, "ckpt": ckpt, "tmp": tmp, "exits": exits, **{name: _records(out / name) for name in names}}


def test_two_nodes_in_two_namespaces_train_with_the_sparse_replica_exchange(fits):
    logs, straight = fits["logs"], fits["straight"]
    assert LOG_LINE in logs[0], logs[0][-3000:]
    assert LOG_LINE not in logs[1]  # logged once, on global rank 0
    assert all("fsdp_fit: child exit codes [0]" in log for log in logs)
    assert fits["exits"] == ["False"] * 4  # every rank's gloo group destroyed at exit while Python ran
    for rank, rec in enumerate(straight):
        assert rec["layout"] == {"world_size": 4, "rank": rank, "ranks_per_node": DEVICES}
        assert rec["global_step"] == 16
        tel = rec["telemetry"]
        assert tel["hook_calls"] == 16 * 3 and tel["dense_buckets"] == 0
        assert tel["bytes_inter"] == tel["bytes_sent"] > 0 and tel["bytes_intra"] > tel["bytes_inter"]
        head, tail = sum(rec["losses"][:4]) / 4, sum(rec["losses"][-4:]) / 4
        assert tail < 0.8 * head, rec["losses"]
    for rec in straight[1:]:  # every rank holds the same full parameters
        for n, p in rec["params"].items():
            assert torch.equal(p, straight[0]["params"][n]), n


def test_distributed_checkpoint_carries_every_rank_residual_shard(fits):
    ckpt = fits["ckpt"]
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    # inside the folder: copying the checkpoint carries them
    assert sorted(p.name for p in (ckpt / "gaussk").glob("rank*.pt")) == [f"rank{r}.pt" for r in range(4)]
    assert not Path(str(ckpt) + ".gaussk").exists()
    for half, resumed in zip(fits["half"], fits["resumed"]):
        saved, loaded = half["state"]["residuals"], resumed["start_state"]["residuals"]
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
        assert any(r.abs().sum() > 0 for r in loaded.values())
        assert resumed["start_state"]["step"] == half["state"]["step"] == 7  # the step the last backward served


def test_single_file_checkpoint_keeps_the_shards_beside_it(fits):
    """``save_distributed_checkpoint=False``: one file (the full state dict), the shards in
    ``<ckpt>.gaussk``, restored on resume."""
    single = fits["tmp"] / "file.ckpt"
    assert single.is_file()
    assert sorted(p.name for p in Path(str(single) + ".gaussk").glob("rank*.pt")) == [f"rank{r}.pt" for r in range(4)]
    for saved, resumed in zip(fits["file"], fits["file_resumed"]):
        a, b = saved["state"]["residuals"], resumed["start_state"]["residuals"]
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert resumed["global_step"] == 6


def test_resume_equals_the_uninterrupted_fit_exactly(fits):
    for a, b in zip(fits["resumed"], fits["straight"]):
        assert a["global_step"] == b["global_step"] == 16
        for n in b["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), n
        for n in b["state"]["residuals"]:
            assert torch.equal(a["state"]["residuals"][n], b["state"]["residuals"][n]), n


def test_strategy_is_registered_and_refuses_a_layout_from_the_environment(monkeypatch):
    import lightning.pytorch as pl

    from lightning_gaussk import GaussKFSDPStrategy

    trainer = pl.Trainer(strategy="gaussk_fsdp", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, GaussKFSDPStrategy)
    with pytest.raises(ValueError, match="density"):
        GaussKFSDPStrategy(density=0.0)
    monkeypatch.setenv("GAUSSK_HIERARCHY", "flat")
    with pytest.raises(ValueError, match="GAUSSK_HIERARCHY"):
        GaussKFSDPStrategy(density=0.01)
    monkeypatch.delenv("GAUSSK_HIERARCHY")
    monkeypatch.setenv("GAUSSK_DENSITY", "0.02")
    assert GaussKFSDPStrategy().gaussk_config.density == 0.02
