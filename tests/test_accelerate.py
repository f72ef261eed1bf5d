"""lightning_gaussk.frontends.accelerate.register_gaussk: real 2-process Accelerate runs (torchrun, MULTI_CPU)
plus in-process checks of configuration, misuse and checkpoint-folder handling.

The two torchrun launches (tests/scripts/accelerate_train.py) run once per module and feed
several tests: ``first`` trains, saves, trains on, reloads in the same processes and checks
misuse; ``resume`` loads the checkpoint in fresh processes and checks ``sync_each_batch``."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from lightning_gaussk import GaussKState  # noqa: E402
from lightning_gaussk.frontends.accelerate import (  # noqa: E402
    ENV_VARS,
    STATE_FILE,
    _attach_loss_scale,
    _load_into,
    config_from_env,
    find_ddp_module,
    register_gaussk,
    resolve_config,
    state_file,
)

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_train.py"
NUMEL = 16 * 64 + 64 + 64 + 1  # the script's model: one DDP bucket
DENSITY = 0.05  # from GAUSSK_DENSITY
K = math.ceil(DENSITY * NUMEL)


def launch(out: Path, mode: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAUSSK_")}
    env.update(
        ACCELERATE_USE_CPU="true",
        GAUSSK_DENSITY=str(DENSITY),
        GAUSSK_SELECTOR="topk",
        GAUSSK_SEED="5",  # the script passes seed=3: the keyword must win
        GAUSSK_DENSE_FALLBACK="auto",  # read from the environment, and given as a keyword by the script
        GAUSSK_LINK_GBIT="0.001",  # 1 Mbit/s: the cost model keeps every bucket sparse
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), "--out", str(out), "--mode", mode]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("accelerate")
    first = launch(out, "first")
    resume = launch(out, "resume")
    return {"first": first, "resume": resume}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------- 2 processes
def test_hook_runs_through_torch_compile_and_sparsifies_once_per_optimizer_step(runs):
    steps = 6 + 4 + 4  # before save, after save, after the in-process reload
    for rec in runs["first"]:
        assert rec["distributed_type"] == "DistributedType.MULTI_CPU" and rec["world"] == 2
        assert rec["wrapper"] == "OptimizedModule" and rec["numel"] == NUMEL
        log = rec["log"]
        assert len(log["grad_nnz"]) == steps
        # the optimizer saw at most world * k nonzeros: the hook ran and sparsified
        assert 0 < max(log["grad_nnz"]) <= 2 * K < NUMEL // 4
        # accumulate(): 2 micro-batches per step, one synchronising backward, one hook call
        assert log["hook_calls"][:10] == list(range(1, 11))
        assert log["state_step"][:10] == list(range(1, 11))
        assert log["hook_calls"][10:] == list(range(7, 11))  # counters came back with load_state


def test_environment_configures_and_keywords_take_precedence(runs):
    for rec in runs["first"] + runs["resume"]:
        cfg = rec["config"]
        assert cfg["density"] == DENSITY and cfg["selector"] == "topk"  # GAUSSK_DENSITY, GAUSSK_SELECTOR
        assert cfg["seed"] == 3  # keyword over GAUSSK_SEED=5
        assert cfg["error_feedback"] is True and cfg["warmup_steps"] == 0  # defaults
        assert cfg["dense_fallback"] == "auto" and cfg["link_gbit"] == 0.001  # keyword; GAUSSK_LINK_GBIT


def test_save_state_writes_each_ranks_residuals_and_load_state_restores_them(runs):
    first = runs["first"]
    for rank, rec in enumerate(first):
        assert {STATE_FILE.format(rank=0), STATE_FILE.format(rank=1)} <= set(rec["ckpt_files"])
        assert rec["saved_step"] == rec["loaded_step"] == 6
        assert _equal(rec["loaded_residuals"], rec["saved_residuals"]), f"rank {rank}"
        assert any(r.abs().sum() > 0 for r in rec["saved_residuals"].values())
        # same processes, reloaded model + optimizer + residuals: the same 4 steps again
        assert _equal(rec["params_reloaded"], rec["params_uninterrupted"])
    # residuals differ between ranks, so a swapped or rank-0-only restore could not pass above
    assert not _equal(first[0]["saved_residuals"], first[1]["saved_residuals"])


def test_resume_in_fresh_processes_equals_the_uninterrupted_run(runs):
    for rank, (first, resumed) in enumerate(zip(runs["first"], runs["resume"])):
        assert resumed["loaded_step"] == 6
        assert _equal(resumed["loaded_residuals"], first["saved_residuals"]), f"rank {rank}"
        assert resumed["log"]["hook_calls"] == [7, 8, 9, 10]
        assert _equal(resumed["params_resumed"], first["params_uninterrupted"]), f"rank {rank}"


def test_sync_each_batch_counts_optimizer_steps_not_micro_batches(runs):
    for rec in runs["resume"]:
        sync = rec["sync_each_batch"]
        assert sync["hook_calls"] == 6  # 3 steps x 2 micro-batches, each synchronised
        assert sync["step"] == 3  # optimizer steps


def test_two_models_on_one_accelerator_keep_separate_state_files(runs):
    for rank, rec in enumerate(runs["resume"]):
        two = rec["two_models"]
        assert {state_file(rank, 0), state_file(rank, 1)} <= set(two["files"])
        for i in range(2):
            assert _equal(two["loaded"][i], two["saved"][i]), f"rank {rank}, model {i}"
        assert not _equal(two["saved"][0], two["saved"][1])


def test_misuse_is_refused_with_clear_errors_in_a_distributed_run(runs):
    for rec in runs["first"]:
        errors = rec["errors"]
        assert "already registered" in errors["twice"] and "gaussk_hook" in errors["twice"]
        assert "accelerator.prepare" in errors["unprepared"]
        assert "fp16_compress_hook" in errors["foreign_hook"]
        assert "densty" in errors["bad_kwarg"]
        assert "FSDP2" in errors["fsdp2"] and "mesh=mesh" in errors["fsdp2"]  # a model sharded by hand: the recipe


# ------------------------------------------------------------------------- in process
def test_environment_values_parse_and_invalid_ones_name_the_variable():
    env = {
        "GAUSSK_DENSITY": "0.02",
        "GAUSSK_SELECTOR": "randk",
        "GAUSSK_ERROR_FEEDBACK": "off",
        "GAUSSK_WARMUP_STEPS": "10",
        "GAUSSK_WARMUP_DENSITY": "0.5",
        "GAUSSK_SEED": "9",
    }
    assert config_from_env(env) == {
        "density": 0.02, "selector": "randk", "error_feedback": False,
        "warmup_steps": 10, "warmup_density": 0.5, "seed": 9,
    }  # fmt: skip
    assert set(env) <= set(ENV_VARS.values())  # and every other option has one too (tests/test_config.py)
    cfg = resolve_config(environ=env, density=0.1, error_feedback=True)
    assert cfg["density"] == 0.1 and cfg["error_feedback"] is True and cfg["selector"] == "randk"
    assert resolve_config(environ={})["density"] == 0.001  # the default
    assert config_from_env({"GAUSSK_WARMUP_DENSITY": "none"}) == {"warmup_density": None}
    for var, bad in [("GAUSSK_DENSITY", "abc"), ("GAUSSK_ERROR_FEEDBACK", "maybe"), ("GAUSSK_WARMUP_STEPS", "1.5"),
                     ("GAUSSK_SEED", "x")]:  # fmt: skip
        with pytest.raises(ValueError, match=var):
            resolve_config(environ={var: bad})
    with pytest.raises(ValueError, match="GAUSSK_DENSITY='2'"):  # parses, but out of range
        resolve_config(environ={"GAUSSK_DENSITY": "2"})
    with pytest.raises(ValueError, match="GAUSSK_SELECTOR='bogus'"):
        resolve_config(environ={"GAUSSK_SELECTOR": "bogus"})
    with pytest.raises(ValueError, match="density"):  # from a keyword: no variable to name
        resolve_config(environ={}, density=2.0)
    with pytest.warns(UserWarning, match="GAUSSK_DENSTY"):
        config_from_env({"GAUSSK_DENSTY": "0.1"})


def test_single_process_is_a_noop_with_a_warning(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    model = accelerator.prepare(nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="single process"):
        assert register_gaussk(accelerator, model, density=0.01) is None
    monkeypatch.setenv("GAUSSK_DISABLE", "1")
    with pytest.warns(UserWarning, match="GAUSSK_DISABLE"):
        assert register_gaussk(accelerator, model) is None
    monkeypatch.delenv("GAUSSK_DISABLE")
    monkeypatch.setenv("GAUSSK_DENSITY", "1.5")  # invalid settings fail even where nothing is registered
    with pytest.raises(ValueError, match="GAUSSK_DENSITY"):
        register_gaussk(accelerator, model)
    with pytest.raises(TypeError, match="Accelerator"):
        register_gaussk(object(), model)


def test_fp16_grad_scaler_scale_reaches_the_hook_before_every_training_forward():
    accelerator = Accelerator(cpu=True)
    model, state = nn.Linear(4, 2), GaussKState(density=0.5)
    _attach_loss_scale(accelerator, model, state)  # no scaler (fp32): nothing attached
    assert not model._forward_pre_hooks
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1)  # as with fp16
    _attach_loss_scale(accelerator, model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        opt.zero_grad()
        x = torch.full((1, 4), float("nan") if step == 2 else 1.0)  # a NaN step: the scale backs off
        loss = model(x).sum()
        seen.append((state.loss_scale, accelerator.scaler.get_scale()))
        accelerator.scaler.scale(loss).backward()
        accelerator.scaler.step(opt)
        accelerator.scaler.update()
    assert all(hook == scaler for hook, scaler in seen)
    assert [s for s, _ in seen] == [64.0, 128.0, 256.0, 128.0]
    model.eval()
    model(torch.ones(1, 4))  # evaluation forwards leave the training scale alone
    assert state.loss_scale == 128.0


@pytest.mark.parametrize("kind", [DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM])
def test_deepspeed_and_megatron_accelerators_are_refused(monkeypatch, kind):
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    with pytest.raises(ValueError, match=f"{kind.name} is not supported"):
        register_gaussk(accelerator, nn.Linear(2, 2))


def test_find_ddp_module_refuses_fsdp_and_deepspeed_wrappers():
    class DeepSpeedEngine(nn.Module):  # stands in for deepspeed's engine (matched by class name)
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="DeepSpeedEngine"):
        find_ddp_module(DeepSpeedEngine())
    assert find_ddp_module(nn.Sequential(nn.Linear(2, 2))) is None


def _saved(tmp_path: Path, world: int, value_of_rank) -> None:
    for rank in range(world):
        state = GaussKState(density=0.1)
        state.load_state_dict({**state.state_dict(), "step": 4, "residuals": {"w": torch.full((3,), value_of_rank(rank))}})
        payload = {"format": "lightning_gaussk.accelerate/1", "rank": rank, "world_size": world, "state": state.state_dict()}
        torch.save(payload, tmp_path / STATE_FILE.format(rank=rank))


def test_checkpoint_folder_policies(tmp_path):
    state = GaussKState(density=0.1)
    with pytest.warns(UserWarning, match="residuals start from zero"):
        _load_into(state, tmp_path, rank=0, world=2)

    _saved(tmp_path, 2, lambda r: float(r + 1))
    state = GaussKState(density=0.1)
    _load_into(state, tmp_path, rank=1, world=2)  # own file
    assert state.step == 4 and torch.equal(state.state_dict()["residuals"]["w"], torch.full((3,), 2.0))

    state = GaussKState(density=0.1)
    with pytest.warns(UserWarning, match="world size 2 on world size 3"):
        _load_into(state, tmp_path, rank=2, world=3)  # another world size: the mean
    assert torch.equal(state.state_dict()["residuals"]["w"], torch.full((3,), 1.5))

    (tmp_path / STATE_FILE.format(rank=1)).unlink()  # save_state called on rank 0 only
    with pytest.raises(FileNotFoundError, match="every process"):
        _load_into(GaussKState(density=0.1), tmp_path, rank=1, world=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load_into(GaussKState(density=0.1), tmp_path, rank=0, world=2)  # rank 0's own file is there
