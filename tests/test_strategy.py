"""GaussKDDPStrategy inside Lightning: names, argument checks, and real 2-process fits on CPU.

Multi-process fits run tests/scripts/lightning_fit.py as a subprocess (Lightning's popen
launcher re-runs sys.argv, which must not be pytest's): one fit from flags (``fit``), or several
fits in one process pair from a plan (``run_plan``)."""

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_gaussk import GaussKDDPStrategy, GaussKState
from lightning_gaussk.checkpoint.files import MANIFEST_FORMAT, read_shard, shard_dir
from test_hook import BAD_CONFIG, check_message

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fit.py"
NUMEL = 16 * 64 + 64 + 64 + 1  # the script's model: one DDP bucket


def fit(tmp_path: Path, name: str, *args: str) -> tuple[list[dict], str]:
    """Run the fit script; return every rank's record and the combined output."""
    out = tmp_path / name
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    records = [torch.load(f, weights_only=True) for f in sorted(out.glob("rank*.pt"))]
    return records, log


# -------------------------------------------------------------------------------- in-process
def test_importing_registers_the_four_names_idempotently():
    for name, selector in [("gaussk_ddp", "gaussk"), ("gaussk_ddp_spawn", "gaussk"), ("topk_ddp", "topk"), ("topk_ddp_spawn", "topk")]:
        assert name in StrategyRegistry
        assert StrategyRegistry[name]["strategy"] is GaussKDDPStrategy
        assert StrategyRegistry[name]["init_params"]["selector"] == selector
    GaussKDDPStrategy.register_strategies(StrategyRegistry)  # a second registration must not fail
    trainer = L.Trainer(strategy="topk_ddp_spawn", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, GaussKDDPStrategy)
    assert trainer.strategy.gaussk_config.selector == "topk"
    assert trainer.strategy._start_method == "spawn"
    assert "ddp" in StrategyRegistry  # plain DDP untouched


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"density": 0}, ValueError, "density"),
        ({"density": -0.1}, ValueError, "density"),
        ({"density": 1.5}, ValueError, "density"),
        ({"density": float("nan")}, ValueError, "density"),
        ({"density": "0.01"}, TypeError, "density"),
        ({"density": True}, TypeError, "density"),
        ({"selector": "bogus"}, ValueError, "bogus"),
        ({"error_feedback": 1}, TypeError, "error_feedback"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 10}, ValueError, "warmup_density"),
        ({"warmup_steps": 10, "warmup_density": 0.0001}, ValueError, "warmup_density"),
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb"),
        ({"ddp_comm_hook": lambda s, b: None}, ValueError, "ddp_comm_hook"),
        ({"ddp_comm_state": object()}, ValueError, "ddp_comm_state"),
        ({"ddp_comm_wrapper": lambda h: h}, ValueError, "ddp_comm_wrapper"),
        ({"model_averaging_period": 4}, ValueError, "model_averaging_period"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, names):
    with pytest.raises(error, match=names):
        GaussKDDPStrategy(**kwargs)


def test_ddp_arguments_pass_through():
    s = GaussKDDPStrategy(density=0.01, start_method="spawn", process_group_backend="gloo", static_graph=True, bucket_cap_mb=4)
    assert s._start_method == "spawn" and s._process_group_backend == "gloo"
    assert s._ddp_kwargs == {"find_unused_parameters": False, "static_graph": True, "gradient_as_bucket_view": False, "bucket_cap_mb": 4}


def test_resume_on_another_world_size_averages_residuals_with_a_warning():
    """Policy: each rank starts from the mean of the saved ranks' residuals, which keeps the
    pending averaged update sum_r r_r / W unchanged."""
    model = nn.Linear(3, 2)
    saved_ranks = []
    for r in range(2):
        sd = GaussKState(density=0.1).bind(model).state_dict()
        sd["step"] = 7
        sd["residuals"] = {n: torch.full((p.numel(),), float(r + 1)) for n, p in model.named_parameters()}
        saved_ranks.append(sd)
    strategy = GaussKDDPStrategy(density=0.1, cluster_environment=LightningEnvironment())  # world size 1
    strategy._gaussk_state = GaussKState(density=0.1).bind(model)
    with pytest.warns(UserWarning, match="world size 2 on world size 1"):
        strategy._gaussk_load({"gaussk": {"world_size": 2, "per_rank": saved_ranks}}, "early.ckpt")  # the state exists: now
    loaded = strategy._gaussk_state.state_dict()
    assert loaded["step"] == 7
    for n, p in model.named_parameters():
        assert torch.equal(loaded["residuals"][n], torch.full((p.numel(),), 1.5))


def test_malformed_checkpoint_state_is_refused(tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "gaussk": {"world_size": 2, "per_rank": [{}]}}, path)
    with pytest.raises(ValueError, match="malformed"):
        GaussKDDPStrategy().load_checkpoint(path)


# -------------------------------------------------------------------------------- 2 processes
def test_spawn_fit_on_cpu_really_sparsifies_and_learns(tmp_path):
    density = 0.05
    for attempt in range(2):  # twice: every process must exit with status 0 every time
        records, _ = fit(tmp_path, f"run{attempt}", "--strategy", "gaussk_ddp_spawn", "--density", str(density), "--max-steps", "60",
                              "--lr", "0.1", "--momentum", "0")
        assert len(records) == 2
        k = math.ceil(density * NUMEL)
        for rec in records:
            assert rec["numel"] == NUMEL and rec["global_step"] == 60
            # the optimizer saw at most world * k nonzeros: the hook ran on CPU
            assert max(rec["grad_nnz"]) <= 2 * k < NUMEL // 4
            assert rec["hook_calls"] == list(range(1, 61))
            first, last = sum(rec["losses"][:10]) / 10, sum(rec["losses"][-10:]) / 10
            assert last < 0.5 * first, (first, last)
        # both ranks hold the same model
        for n, p in records[0]["params"].items():
            assert torch.equal(p, records[1]["params"][n])


def test_string_name_from_a_script_with_the_popen_launcher(tmp_path):
    records, _ = fit(tmp_path, "popen", "--strategy", "gaussk_ddp", "--max-steps", "8")
    assert len(records) == 2
    for rec in records:
        assert max(rec["grad_nnz"]) <= 2 * math.ceil(0.001 * NUMEL)  # the registered default density
        assert rec["state"]["config"]["selector"] == "gaussk"


def test_accumulation_and_bf16_mixed_compress_once_per_optimizer_step(tmp_path):
    records, _ = fit(tmp_path, "acc", "--strategy", "gaussk_ddp_spawn", "--density", "0.05", "--max-steps", "10",
                     "--accumulate", "2", "--precision", "bf16-mixed")
    for rec in records:
        assert rec["global_step"] == 10
        assert rec["hook_calls"] == list(range(1, 11))  # one bucket, once per optimizer step
        assert rec["state"]["step"] == 9  # the step the last compression served, from the trainer
        assert all(r.dtype == torch.float32 for r in rec["state"]["residuals"].values())
        assert max(rec["grad_nnz"]) <= 2 * math.ceil(0.05 * NUMEL)


def test_fp16_grad_scaler_scale_reaches_the_hook_every_step(tmp_path):
    records, _ = fit(tmp_path, "fp16", "--density", "0.05", "--strategy", "gaussk_ddp_spawn", "--precision", "16-mixed-cpu",
                     "--max-steps", "6", "--momentum", "0")  # fmt: skip
    for rec in records:
        scales = rec["loss_scales"]
        assert len(scales) == 6 and all(hook == scaler for scaler, hook in scales)
        assert len({s for s, _ in scales}) >= 3  # the scale changed during the run
        assert all(bool(torch.isfinite(p).all()) for p in rec["params"].values())
        assert all(bool(torch.isfinite(r).all()) for r in rec["state"]["residuals"].values())
        assert any(int(r.count_nonzero()) > 0 for r in rec["state"]["residuals"].values())


def test_bf16_true_buckets_train_with_fp32_residuals(tmp_path):
    records, _ = fit(tmp_path, "bf16", "--strategy", "gaussk_ddp_spawn", "--density", "0.05", "--max-steps", "10",
                     "--precision", "bf16-true")
    for rec in records:
        assert all(math.isfinite(v) for v in rec["losses"])
        assert all(r.dtype == torch.float32 for r in rec["state"]["residuals"].values())
        assert max(rec["grad_nnz"]) <= 2 * math.ceil(0.05 * NUMEL)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    args = ["--strategy", "gaussk_ddp", "--density", "0.05"]
    ckpt = tmp_path / "half.ckpt"
    fit(tmp_path, "half", *args, "--max-steps", "8", "--save-ckpt", str(ckpt))
    resumed, _ = fit(tmp_path, "resumed", *args, "--max-steps", "16", "--resume", str(ckpt))
    straight, _ = fit(tmp_path, "straight", *args, "--max-steps", "16")

    saved = torch.load(ckpt, weights_only=True)["gaussk"]  # no pickled code in the checkpoint
    assert saved["world_size"] == 2 and saved["format"] == MANIFEST_FORMAT  # a manifest, no residual tensors
    assert [e["name"] for e in saved["files"]] == ["rank0.pt", "rank1.pt"]
    r0, r1 = (read_shard(shard_dir(ckpt) / e["name"], e)["state"]["residuals"]["net.0.weight"] for e in saved["files"])
    assert not torch.equal(r0, r1)  # residuals differ per rank: both were kept, each in its rank's shard
    for a, b in zip(resumed, straight):
        for n in a["params"]:
            torch.testing.assert_close(a["params"][n], b["params"][n], rtol=1e-6, atol=1e-7)
        for n in a["state"]["residuals"]:
            torch.testing.assert_close(a["state"]["residuals"][n], b["state"]["residuals"][n], rtol=1e-6, atol=1e-7)
        assert a["state"]["step"] == b["state"]["step"] == 15


def test_resume_on_one_process_from_two_warns_and_continues(tmp_path):
    ckpt = tmp_path / "two.ckpt"
    fit(tmp_path, "two", "--strategy", "gaussk_ddp", "--density", "0.05", "--max-steps", "6", "--save-ckpt", str(ckpt))
    records, log = fit(tmp_path, "one", "--strategy", "gaussk_ddp", "--density", "0.05", "--max-steps", "10",
                       "--devices", "1", "--resume", str(ckpt))
    assert "world size 2 on world size 1" in log
    assert len(records) == 1 and records[0]["global_step"] == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    BAD_CONFIG
    + [
        ({"bucket_cap_mb": 0}, ValueError, ["`bucket_cap_mb`", "0", "> 0"]),
        ({"bucket_cap_mb": -4}, ValueError, ["`bucket_cap_mb`", "-4", "> 0"]),
        ({"bucket_cap_mb": float("nan")}, ValueError, ["`bucket_cap_mb`", "nan", "> 0"]),
        ({"bucket_cap_mb": "4"}, ValueError, ["`bucket_cap_mb`", "'4'", "> 0"]),
        # flags DDP would take as truthy objects
        ({"static_graph": "yes"}, TypeError, ["`static_graph`", "'yes'", "bool"]),
        ({"find_unused_parameters": 1}, TypeError, ["`find_unused_parameters`", "1", "bool"]),
        ({"gradient_as_bucket_view": None}, TypeError, ["`gradient_as_bucket_view`", "None", "bool"]),
        # settings of other strategies (FSDP, DeepSpeed) or typos: DDP itself would only fail inside the workers
        ({"sharding_strategy": "FULL_SHARD"}, TypeError, ["`sharding_strategy`", "DistributedDataParallel"]),
        ({"cpu_offload": True}, TypeError, ["`cpu_offload`", "DistributedDataParallel"]),
        ({"zero_optimization": {"stage": 2}}, TypeError, ["`zero_optimization`", "DistributedDataParallel"]),
        ({"timeout": 20}, TypeError, ["`timeout`", "20", "timedelta"]),
        ({"start_method": "threads"}, ValueError, ["`start_method`", "'threads'", "popen"]),
    ],
)
def test_strategy_rejects_bad_and_unsupported_settings_at_construction(kwargs, error, fragments):
    with pytest.raises(error) as err:
        GaussKDDPStrategy(**kwargs)
    check_message(err, fragments)


def test_strategy_accepts_ddp_arguments_and_a_timedelta_timeout():
    s = GaussKDDPStrategy(density=0.5, broadcast_buffers=False, timeout=timedelta(seconds=20), start_method="spawn")
    assert s._ddp_kwargs["broadcast_buffers"] is False and s._timeout == timedelta(seconds=20)


# ============================================================================ Lightning fits from a plan (several fits per process pair)
def run_plan(cwd: Path, plan: list[dict], *, devices: int = 2, env: dict | None = None, expect_ok: bool = True, timeout: int = 400):
    out = cwd / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices), "--plan", json.dumps(plan)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,  # hang guard
        env={**os.environ, **(env or {})},
    )
    log = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, log[-5000:]
    return proc.returncode, log


def records(cwd: Path, name: str) -> list[dict]:
    return [torch.load(f, weights_only=True) for f in sorted((cwd / "out" / name).glob("rank*.pt"))]


NONFINITE = [[4, 1, "nan"], [7, 0, "inf"]]  # (batch, rank, what): one rank at a time


@pytest.fixture(scope="module")
def manual_fits(tmp_path_factory):
    """One process pair, three fits: plain DDP, GaussK at density 1 and at 0.05; manual
    optimization, two optimizers, a non-finite gradient on rank 1 then on rank 0."""
    cwd = tmp_path_factory.mktemp("manual")
    common = {"mode": "manual2", "nonfinite": NONFINITE}
    run_plan(
        cwd,
        [
            {"name": "plain", "strategy": "ddp", "max_steps": 24, **common},
            {"name": "dense", "density": 1.0, "max_steps": 24, **common},
            {"name": "sparse", "density": 0.05, "max_steps": 40, **common},
        ],
    )
    return {n: records(cwd, n) for n in ("plain", "dense", "sparse")}


def test_lightning_manual_two_optimizers_at_density_one_equal_plain_ddp_through_skipped_steps(manual_fits):
    for plain, dense in zip(manual_fits["plain"], manual_fits["dense"]):
        assert dense["skipped"] == plain["skipped"] == [4, 7]
        assert dense["global_step"] == plain["global_step"] == 24  # two optimizers: two steps per batch
        for n, p in plain["params"].items():
            torch.testing.assert_close(dense["params"][n], p, rtol=1e-6, atol=1e-7)


def test_lightning_nonfinite_gradient_on_one_rank_is_skipped_and_training_recovers(manual_fits):
    recs = manual_fits["sparse"]
    for rec in recs:
        assert rec["skipped"] == [4, 7]  # every rank saw both bad steps, as with plain DDP
        assert rec["residuals_kept_on_skip"] == [True, True]  # residuals untouched by the bad steps
        assert all(rec["residuals_finite"])
        assert rec["state"]["telemetry"]["skipped_buckets"] == 2  # one bucket, two bad steps
        assert all(torch.isfinite(p).all() for p in rec["params"].values())
        assert all(torch.isfinite(r).all() for r in rec["state"]["residuals"].values())
        assert len(rec["applied"]) == 20 and all(math.isfinite(v) for v in rec["losses"])
        first, last = sum(rec["losses"][:4]) / 4, sum(rec["losses"][-4:]) / 4
        assert last < 0.6 * first, (first, last)  # it kept learning after the bad steps
    for n, p in recs[0]["params"].items():
        assert torch.equal(p, recs[1]["params"][n])


def test_lightning_manual_two_optimizers_conserve_gradient_mass(manual_fits):
    """sum over steps and ranks of local gradients == W * sum of applied gradients + sum of
    the final residuals (skipped steps excluded): what is not applied yet is still owed."""
    recs = manual_fits["sparse"]
    world = len(recs)
    local = sum(r["local_sum"] for r in recs)
    residual = sum(torch.cat([r["state"]["residuals"][n] for n in r["param_order"]]) for r in recs)
    assert residual.abs().max() > 1e-3  # density 0.05: plenty still in flight
    torch.testing.assert_close(world * recs[0]["applied_sum"] + residual, local, rtol=1e-5, atol=1e-5)


# ============================================================================ missing / corrupted hook state
def bound_strategy() -> tuple[GaussKDDPStrategy, nn.Module]:
    model = nn.Linear(3, 2)
    strategy = GaussKDDPStrategy(density=0.1, cluster_environment=LightningEnvironment())  # world size 1
    strategy._gaussk_state = GaussKState(density=0.1).bind(model)
    return strategy, model


def good_state(model: nn.Module) -> dict:
    sd = GaussKState(density=0.1).bind(model).state_dict()
    sd["residuals"] = {n: torch.ones(p.numel()) for n, p in model.named_parameters()}
    return sd


def test_checkpoint_without_hook_state_warns_and_falls_back_to_zero_residuals(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    strategy = GaussKDDPStrategy()
    with pytest.warns(UserWarning, match="no `gaussk` hook state.*residuals start from zero"):
        strategy.load_checkpoint(tmp_path / "plain.ckpt")
    assert strategy._gaussk_loaded is None  # nothing to restore: the state starts fresh


CORRUPT = {
    "world_size not an int": lambda sd: {"world_size": "1", "per_rank": [sd]},
    "fewer states than ranks": lambda sd: {"world_size": 2, "per_rank": [sd]},
    "a rank state that is not a dict": lambda sd: {"world_size": 1, "per_rank": [[1, 2]]},
    "no residuals": lambda sd: {"world_size": 1, "per_rank": [{k: v for k, v in sd.items() if k != "residuals"}]},
    "not a dict at all": lambda sd: [sd],
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_malformed_hook_state_in_a_checkpoint_is_refused_at_load(tmp_path, case):
    _, model = bound_strategy()
    torch.save({"state_dict": {}, "gaussk": CORRUPT[case](good_state(model))}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="malformed"):
        GaussKDDPStrategy().load_checkpoint(tmp_path / "bad.ckpt")


def _wrong_format(sd):
    sd["format"] = "something/else"


def _wrong_size(sd):
    sd["residuals"]["weight"] = torch.ones(5)


def _unknown_name(sd):
    sd["residuals"]["nope.weight"] = torch.ones(6)


def _nan_residual(sd):
    sd["residuals"]["weight"][2] = float("nan")


def _inf_residual(sd):
    sd["residuals"]["bias"][0] = float("inf")


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_wrong_format, "lightning_gaussk.state/1"),
        (_wrong_size, "'weight' has 5 entries, parameter has 6"),
        (_unknown_name, "'nope.weight'"),
        (_nan_residual, "'weight'.*non-finite"),
        (_inf_residual, "'bias'.*non-finite"),
    ],
)
def test_corrupted_rank_state_is_refused_with_a_clear_error(corrupt, match):
    strategy, model = bound_strategy()
    sd = good_state(model)
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        strategy._gaussk_load({"gaussk": {"world_size": 1, "per_rank": [sd]}}, "early.ckpt")
