"""lightning_gaussk.transformers.register_gaussk: a real 2-process ``transformers.Trainer`` run (torchrun,
``use_cpu=True, ddp_backend="gloo"``, a tiny GPT-2 from a config, nothing downloaded) feeding several tests,
the example run briefly, and in-process checks of the options and refusals.

The launch (tests/scripts/hf_train.py) trains dense DDP, ``register_gaussk(trainer, density=0.01)`` and local SGD
(``sync_every=4``) from the same initial model, each with a checkpoint at step 6 of 12, then resumes both GaussK runs
from ``checkpoint-6`` on new Trainers and models."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from lightning_gaussk.transformers import FSDP_RECIPE, LOG_PREFIX, GaussKCallback, register_gaussk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "hf_train.py"
sys.path.insert(0, str(SCRIPT.parent))
import hf_train  # noqa: E402

SAVE, STEPS = hf_train.SAVE, hf_train.STEPS
RUNS = ("dense", "gaussk", "local", "gaussk_resumed", "local_resumed")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GAUSSK_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _torchrun(*args: str, cwd: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("hf")
    _torchrun(str(SCRIPT), "--out", str(out), cwd=out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _differs(saved: dict, restored: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values are not bit for bit the same (tensors: same dtype and torch.equal), or in one only."""
    bad = []
    for k in sorted(set(saved) | set(restored)):
        if k.startswith(skip):
            continue
        a, b = saved.get(k), restored.get(k)
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        else:
            same = k in saved and k in restored and a == b
        if not same:
            bad.append(k)
    return bad


def _logs(rec: dict) -> list[dict]:
    return json.loads(rec["log_history"])


# ------------------------------------------------------------------------- 2 processes
def test_the_trainers_ddp_reports_the_projects_hook(runs):
    for rank, rec in enumerate(runs):
        assert all(rec[name]["wrapper"] == "DistributedDataParallel" for name in RUNS), rank
        assert rec["dense"]["comm_hook"] in ("", "None")  # DDP's own allreduce
        assert rec["gaussk"]["comm_hook"] == rec["gaussk_resumed"]["comm_hook"] == "gaussk_hook"
        assert rec["local"]["comm_hook"] == rec["local_resumed"]["comm_hook"] == "local_grad_hook"
        assert rec["gaussk"]["state_kind"] == "GaussKState" and rec["local"]["state_kind"] == "SparseLocalSGD"


def test_every_rank_holds_the_same_parameters(runs):
    for name in RUNS:  # local SGD ends on theta: 12 steps, sync_every 4
        assert torch.equal(runs[0][name]["params"], runs[1][name]["params"]), name
    assert not torch.equal(runs[0]["gaussk"]["params"], runs[0]["dense"]["params"])  # it did change the training


def test_loss_within_ten_percent_of_dense_ddp_after_the_same_steps(runs):
    rec = runs[0]
    initial, dense, gaussk = rec["dense"]["initial_loss"], rec["dense"]["eval_loss"], rec["gaussk"]["eval_loss"]
    assert rec["gaussk"]["initial_loss"] == initial
    assert dense < 0.7 * initial and gaussk < 0.7 * initial, (initial, dense, gaussk)  # both learned
    assert abs(gaussk - dense) <= 0.10 * dense, (dense, gaussk)
    train_loss = [e["loss"] for e in _logs(rec["gaussk"]) if "loss" in e]
    assert len(train_loss) == STEPS // 2 and train_loss[-1] < train_loss[0]


def test_a_resume_restores_every_ranks_residual_shards_bit_for_bit(runs):
    for rank, rec in enumerate(runs):
        saved, restored = rec["gaussk"]["saved"][str(SAVE)], rec["gaussk_resumed"]["begin"]
        assert rec["gaussk_resumed"]["begin_step"] == SAVE
        assert any(k.startswith("residuals/") for k in saved)
        assert _differs(saved, restored) == [], rank  # residuals, step, counters, config, layout
        nonzero = sum(int(v.count_nonzero()) for k, v in saved.items() if k.startswith("residuals/"))
        assert nonzero > 0
    a, b = (rec["gaussk"]["saved"][str(SAVE)] for rec in runs)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("residuals/"))  # each rank has its own shard
    for rec in runs:  # and the resumed run is the uninterrupted one, bit for bit
        assert torch.equal(rec["gaussk_resumed"]["params"], rec["gaussk"]["params"])
        assert rec["gaussk_resumed"]["eval_loss"] == rec["gaussk"]["eval_loss"]


def test_one_hook_call_per_optimizer_step_with_gradient_accumulation(runs):
    for rec in runs:  # 2 micro-batches per step, the first under no_sync
        assert json.loads(rec["gaussk"]["telemetry"])["hook_calls"] == STEPS
        assert json.loads(rec["gaussk_resumed"]["telemetry"])["hook_calls"] == STEPS  # 6 saved + 6 after the resume


def test_a_checkpoint_without_gaussk_shards_warns_and_starts_from_zero(runs):
    zero, zero_warns = runs[0]["gaussk_from_local"], [w for w in runs[0]["gaussk_from_local"]["warnings"] if "has no" in w]
    assert zero["begin_step"] == SAVE and len(zero_warns) == 1 and "gaussk_state_rank*.pt" in zero_warns[0]
    for rec in runs:
        begin = rec["gaussk_from_local"]["begin"]
        assert all(int(v.count_nonzero()) == 0 for k, v in begin.items() if k.startswith("residuals/"))
        assert json.loads(begin["telemetry/hook_calls"]) == 0
        assert json.loads(rec["gaussk_from_local"]["telemetry"])["hook_calls"] == STEPS - SAVE
    assert not any("has no" in w for w in runs[1]["gaussk_from_local"]["warnings"])  # rank 0 speaks


def test_local_sgd_trains_and_resumes(runs):
    for rank, rec in enumerate(runs):
        local, resumed = rec["local"], rec["local_resumed"]
        assert local["eval_loss"] < 0.8 * local["initial_loss"]
        assert json.loads(local["telemetry"])["outer_steps"] == STEPS // 4
        saved = local["saved"][str(SAVE)]
        # this rank's local model and inner optimizer go in at the next forward (after the Trainer's own load of
        # rank 0's): the rest is restored at on_train_begin
        assert _differs(saved, resumed["begin"], skip=("local/", "optimizer/")) == [], rank
        assert resumed["begin_step"] == SAVE
        assert torch.equal(resumed["params"], local["params"]), rank  # the uninterrupted run, bit for bit
    a, b = (rec["local"]["saved"][str(SAVE)] for rec in runs)
    # step 6 is mid-window: the ranks' local models differ, so restoring rank 0's on both would not reproduce the run
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("local/"))


def test_checkpoint_folders_hold_every_ranks_files_beside_the_trainers(runs):
    files = runs[0]["gaussk"]["files"]
    for step in (SAVE, STEPS):
        assert {"gaussk_state_rank0.pt", "gaussk_state_rank1.pt", "gaussk_manifest_rank0.json",
                "gaussk_manifest_rank1.json", "trainer_state.json", "optimizer.pt"} <= set(files[step])  # fmt: skip
    assert {"gaussk_local_rank0.pt", "gaussk_local_rank1.pt"} <= set(runs[0]["local"]["files"][SAVE])
    assert {"gaussk_state_rank0.pt", "gaussk_state_rank1.pt"} <= set(runs[0]["gaussk_resumed"]["files"][STEPS])


def test_telemetry_goes_into_the_trainers_logs(runs):
    rec = runs[0]
    steps = [e for e in _logs(rec["gaussk"]) if "loss" in e]
    assert len(steps) == STEPS // 2
    for entry in steps:
        assert entry[LOG_PREFIX + "bytes_sent"] > 0 and entry[LOG_PREFIX + "hook_calls"] == 2  # 2 steps, one bucket
        assert 40 < entry[LOG_PREFIX + "compression"] < 60  # density 0.01: (2k + 1) * 4 bytes against 4 d
        assert entry[LOG_PREFIX + "density"] == pytest.approx(0.01, rel=0.05)
    local = [e for e in _logs(rec["local"]) if "loss" in e]
    assert [e[LOG_PREFIX + "outer_steps"] for e in local] == [0, 1, 1, 2, 2, 3]
    assert all(not k.startswith(LOG_PREFIX) for e in _logs(rec["dense"]) for k in e)
    resumed = [e for e in _logs(rec["gaussk_resumed"]) if "loss" in e]  # the checkpoint's history, then its own
    assert [e["step"] for e in resumed] == list(range(2, STEPS + 1, 2))
    assert all(e[LOG_PREFIX + "hook_calls"] == 2 for e in resumed)  # counted from the resume on


def test_fsdp_is_refused_with_the_recipe(runs):
    for rec in runs:
        assert rec["fsdp_refusal"] == FSDP_RECIPE
    assert "gaussk_fsdp" in FSDP_RECIPE and "mesh" in FSDP_RECIPE and "docs/fsdp.md" in FSDP_RECIPE


def test_the_example_fine_tunes_on_two_processes(tmp_path):
    example = ROOT / "examples" / "hf_trainer.py"
    proc = _torchrun(str(example), "--max-steps", "4", "--save-steps", "2", "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert "Trainer on 2 process(es): eval loss" in text and "rank 0 (GaussKState):" in text, text[-3000:]
    assert "GaussK fit summary" in text and LOG_PREFIX + "compression" in text
    assert {"gaussk_state_rank0.pt", "gaussk_state_rank1.pt"} <= set(os.listdir(tmp_path / "out" / "checkpoint-4"))


# ------------------------------------------------------------------------- in-process (one process)
def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=4,
        optim="sgd", learning_rate=0.1, save_strategy="no", disable_tqdm=True, **kwargs,
    )  # fmt: skip
    return Trainer(model=hf_train.model(), args=args, train_dataset=hf_train.Bytes(16, seed=0))


@pytest.fixture
def clean_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("GAUSSK_")]:
        monkeypatch.delenv(var)
    return monkeypatch


def test_unknown_keywords_raise_type_error_naming_them(tmp_path, clean_env):
    trainer = _trainer(tmp_path)
    with pytest.raises(TypeError, match="densty"):
        register_gaussk(trainer, densty=0.01)
    with pytest.raises(TypeError, match=r"`outer_lrr`.*did you mean `outer_lr`"):
        register_gaussk(trainer, sync_every=4, outer_lrr=0.5)
    with pytest.raises(ValueError, match="density"):
        register_gaussk(trainer, density=2.0)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        register_gaussk(object(), density=0.01)
    assert not any(isinstance(cb, GaussKCallback) for cb in trainer.callback_handler.callbacks)  # nothing half-added


def test_options_resolve_keyword_over_environment_over_default(tmp_path, clean_env):
    clean_env.setenv("GAUSSK_DENSITY", "0.05")
    assert register_gaussk(_trainer(tmp_path)).options["density"] == 0.05
    with pytest.warns(UserWarning, match="GAUSSK_DENSITY='0.05' is overridden by density=0.01"):
        assert register_gaussk(_trainer(tmp_path), density=0.01).options["density"] == 0.01
    clean_env.setenv("GAUSSK_OUTER_LR", "0.7")
    assert register_gaussk(_trainer(tmp_path), sync_every=4).local.outer_lr == 0.7
    clean_env.delenv("GAUSSK_OUTER_LR")
    clean_env.setenv("GAUSSK_DENSITY", "lots")
    with pytest.raises(ValueError, match="GAUSSK_DENSITY"):
        register_gaussk(_trainer(tmp_path))


def test_register_twice_is_refused_and_the_callback_comes_first(tmp_path, clean_env):
    trainer = _trainer(tmp_path)
    callback = register_gaussk(trainer, density=0.01)
    assert trainer.callback_handler.callbacks[0] is callback and callback.state is None
    with pytest.raises(ValueError, match="once per Trainer"):
        register_gaussk(trainer, density=0.01)


@pytest.mark.parametrize(("disable", "says"), [("", "single process"), ("1", "GAUSSK_DISABLE is set")])
def test_a_single_process_or_gaussk_disable_trains_dense_with_a_warning(tmp_path, clean_env, disable, says):
    clean_env.setenv("GAUSSK_DISABLE", disable)
    trainer = _trainer(tmp_path)
    callback = register_gaussk(trainer, density=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = trainer.train()
    assert any(says in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert callback.state is None and out.global_step == 2 and math.isfinite(out.training_loss)
    assert all(not k.startswith(LOG_PREFIX) for e in trainer.state.log_history for k in e)
