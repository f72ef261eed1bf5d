"""GaussKDDPStrategy inside Lightning: names, argument checks, and real 2-process fits on CPU.

Multi-process fits run tests/scripts/lightning_fit.py as a subprocess (Lightning's popen
launcher re-runs sys.argv, which must not be pytest's)."""

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_gaussk
from lightning_gaussk import GaussKDDPStrategy, GaussKState

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
    assert trainer.strategy._gaussk_config["selector"] == "topk"
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
        strategy._restore({"world_size": 2, "per_rank": saved_ranks})
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
    assert saved["world_size"] == 2
    r0, r1 = (sd["residuals"]["net.0.weight"] for sd in saved["per_rank"])
    assert not torch.equal(r0, r1)  # residuals differ per rank: both were kept
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
