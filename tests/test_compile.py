"""``torch.compile`` with the hooks (issue 29, point 3): eager against compiled (inductor, CPU).

The Fabric cells (``gaussk_ddp``, ``gaussk_local``, ``gaussk_fsdp``, compiled and with Fabric's
re-applied compile) are tests/test_fabric.py's runs; this file has the others:

- raw DDP with ``GaussKState`` + ``gaussk_hook`` (docs/raw_ddp.md) on 2 gloo processes: DDP over
  ``torch.compile(model)`` with small buckets, so DDPOptimizer splits the graph at every bucket
  boundary and keeps DDP's eager reducer (pytorch#108966): the hook runs once per bucket, the
  gradients are sparse, the ranks identical, compiled matches eager; compiled autograd: with the
  C++ reducer torch refuses it itself, with ``optimize_ddp="python_reducer"`` DDP calls the hook per
  parameter with ``(grad, param)`` and the hook refuses that with a ``RuntimeError`` of its own
  (``local_grad_hook`` there keeps each rank's gradient: a no-op per parameter);
- the Lightning Trainer (tests/scripts/compile_trainer.py: one popen launch of 2 CPU processes,
  every fit in the same processes): ``gaussk_ddp`` and ``gaussk_local`` fitting
  ``torch.compile(module)`` against the same fits eager; both with compiled autograd on
  (Lightning's backward runs outside the compiled step: compiled autograd does not engage, the
  hook runs per bucket), ``gaussk_ddp`` with DDP's python reducer (the fit fails with the hook's refusal); a
  compiled module under ``gaussk_fsdp`` is refused by Lightning (``ModelParallelStrategy`` does not
  take one);
- Accelerate (tests/scripts/compile_accelerate.py, torchrun on 2 CPU processes):
  ``register_gaussk`` on ``accelerator.prepare(torch.compile(model))`` against the same run eager.

The matrix is docs/fabric.md.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAINER_SCRIPT = HERE / "scripts" / "compile_trainer.py"
ACCELERATE_SCRIPT = HERE / "scripts" / "compile_accelerate.py"
DENSITY = 0.05
STEPS = 4
CLOSE = 1e-2  # relative L2 distance, compiled against eager (TopK may pick a near-tied entry differently)


# ------------------------------------------------------------------------------ raw DDP, 2 gloo processes
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    wide = [torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU()]  # 1 MiB each
    return torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.ReLU(), *wide, torch.nn.Linear(512, 1))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(16, 32, generator=g)
    return x, torch.tanh(x[:, :1] - x[:, 1:2])


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def _train(rank: int, world: int, compiled: bool) -> dict:
    from torch._inductor.compile_fx import compile_fx

    from lightning_gaussk import GaussKState, gaussk_hook

    graphs: list[int] = []

    def inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(sum(n.op == "call_function" for n in gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    model = _mlp()
    module = torch.compile(model, backend=inductor) if compiled else model
    # 1 MiB buckets: the model spans three (DDPOptimizer asserts that no bucket is below its first, 1 MiB)
    ddp = DDP(module, bucket_cap_mb=1)
    state = GaussKState(density=DENSITY, dense_fallback="never").bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    rec: dict = {"nnz": [], "losses": [], "numel": sum(p.numel() for p in model.parameters())}
    for step in range(STEPS):
        x, y = _batch(step, rank)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        rec["nnz"].append(int(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).count_nonzero()))
        rec["losses"].append(float(loss.detach()))
        opt.step()
    flat = _flat(model)
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat)
    data = ddp._get_ddp_logging_data()
    rec.update(params=flat, all_ranks=torch.stack(rows), graphs=graphs, hook_calls=state.telemetry["hook_calls"],
               comm_hook=data.get("comm_hook"), buckets=data.get("num_buckets_reduced"))  # fmt: skip
    state.wait_idle()
    return rec


def _error_of(run) -> str | None:
    """What ``run()`` raised, as ``"Type: message"`` (None: it ran); what torch raises is what is recorded."""
    try:
        run()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def _compiled_autograd(rank: int) -> dict:
    from lightning_gaussk import GaussKState, gaussk_hook

    out: dict = {}
    x, _ = _batch(0, rank)
    torch._dynamo.reset()
    ddp = DDP(_mlp())
    state = GaussKState(density=DENSITY).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)

    @torch.compile(backend="eager")  # the refusal, not the code, is what is looked at
    def step(inputs: torch.Tensor) -> torch.Tensor:
        loss = ddp(inputs).sum()
        loss.backward()
        return loss

    with torch._dynamo.config.patch(compiled_autograd=True):  # a compiled step with its backward
        out["compiled_step"] = _error_of(lambda: step(x))
    state.wait_idle()
    torch._dynamo.reset()
    from torch._dynamo import compiled_autograd

    ddp = DDP(_mlp())  # afresh: the failed step left the reducer mid-iteration
    state = GaussKState(density=DENSITY).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)

    def eager_forward_compiled_backward() -> None:  # the backward alone under compiled autograd
        with compiled_autograd._enable(torch.compile(backend="eager")):
            ddp(x).sum().backward()

    out["cpp_reducer"] = _error_of(eager_forward_compiled_backward)
    state.wait_idle()
    # compiled autograd's own DDP: the python reducer calls comm hooks per parameter, with (grad, param)
    with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
        ddp = DDP(_mlp())
        state = GaussKState(density=DENSITY).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
        out["python_reducer"] = _error_of(lambda: ddp(x).sum().backward())
        from lightning_gaussk.local_sgd import local_grad_hook

        ddp = DDP(_mlp())  # local SGD's hook there: the gradient should stay this rank's own
        ddp.register_comm_hook(None, local_grad_hook)
        out["local_python_reducer"] = _error_of(lambda: ddp(x).sum().backward())
        out["local_grad"] = None if out["local_python_reducer"] else torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
    return out


def _worker(rank: int, world: int, out: str) -> None:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    rec = {mode: _train(rank, world, mode == "compiled") for mode in ("eager", "compiled")}
    dist.barrier()
    rec["compiled_autograd"] = _compiled_autograd(rank)
    torch.save(rec, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_raw")
    run_distributed(_worker, str(out), world=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_raw_ddp_compiled_runs_the_hook_per_bucket_and_matches_eager(raw):
    for rec in raw:
        eager, compiled = rec["eager"], rec["compiled"]
        assert eager["comm_hook"] == compiled["comm_hook"] == "gaussk_hook"
        assert compiled["buckets"] >= 2 and compiled["buckets"] == eager["buckets"]
        # DDPOptimizer: one graph per bucket (forward), each through inductor; the eager reducer calls the hook
        assert len(compiled["graphs"]) == compiled["buckets"] and all(n > 0 for n in compiled["graphs"]) and not eager["graphs"]
        assert compiled["hook_calls"] == eager["hook_calls"] >= STEPS * (compiled["buckets"] - 1)
        bound = 2 * (math.ceil(DENSITY * rec["eager"]["numel"]) + 8)  # k per bucket from each rank
        assert all(0 < n <= bound for n in compiled["nnz"] + eager["nnz"])
        assert torch.equal(compiled["all_ranks"][0], compiled["all_ranks"][1])
        assert _distance(compiled["params"], eager["params"]) < CLOSE
        torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=CLOSE, atol=1e-6)


def test_raw_ddp_compiled_autograd_with_the_cpp_reducer_is_refused_by_torch(raw):
    for rec in raw:
        message = rec["compiled_autograd"]["cpp_reducer"]
        assert message is not None and "Compiled autograd is not compatible with C++ DDP Reducer" in message
        assert rec["compiled_autograd"]["compiled_step"] is not None  # a compiled step with its backward fails in dynamo


def test_raw_ddp_python_reducer_is_refused_by_the_hook_with_a_clear_message(raw):
    """Compiled autograd's DDP calls comm hooks per parameter with ``(grad, param)``: ``gaussk_hook``
    raises a ``RuntimeError`` that names the cause and what to use instead."""
    for rec in raw:
        message = rec["compiled_autograd"]["python_reducer"]
        assert message is not None and message.startswith("RuntimeError: gaussk_hook: DDP called the comm hook with (grad, param)")
        assert "compiled autograd" in message and "optimize_ddp='python_reducer'" in message
        assert "torch.compile without compiled autograd" in message and "optimize_ddp='ddp_optimizer'" in message


def test_raw_ddp_python_reducer_with_local_grad_hook_keeps_each_ranks_gradient(raw):
    for rec in raw:
        assert rec["compiled_autograd"]["local_python_reducer"] is None
    assert not torch.equal(raw[0]["compiled_autograd"]["local_grad"], raw[1]["compiled_autograd"]["local_grad"])


# ------------------------------------------------------------------------------ the Lightning Trainer
def test_trainer_refuses_a_compiled_module_under_gaussk_fsdp():
    import lightning as L
    from lightning.pytorch.utilities.compile import (
        _maybe_unwrap_optimized,
        _verify_strategy_supports_compile,
    )

    from lightning_gaussk import GaussKFSDPStrategy

    module = _maybe_unwrap_optimized(torch.compile(L.LightningModule()))  # what Trainer.fit does with it
    with pytest.raises(RuntimeError, match="compiled model is incompatible with the current strategy: `GaussKFSDPStrategy`"):
        _verify_strategy_supports_compile(module, GaussKFSDPStrategy())


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAUSSK_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), TORCHINDUCTOR_COMPILE_THREADS="1", **extra)
    return env


TRAINER_CASES = ("eager", "compiled", "local_eager", "local_compiled", "compiled_autograd", "local_compiled_autograd", "python_reducer")


@pytest.fixture(scope="module")
def trainer_fits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile_trainer")
    proc = subprocess.run(
        [sys.executable, str(TRAINER_SCRIPT), "--out", str(tmp / "out")], cwd=tmp, env=_env(), capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return {name: [torch.load(tmp / "out" / name / f"rank{r}.pt", weights_only=False) for r in range(2)] for name in TRAINER_CASES}


def test_trainer_gaussk_ddp_compiled_module_runs_the_hook_and_matches_eager(trainer_fits):
    for eager, compiled in zip(trainer_fits["eager"], trainer_fits["compiled"]):
        assert compiled["graphs"] and all(n > 0 for n in compiled["graphs"]) and not eager["graphs"]
        assert compiled["comm_hook"] == eager["comm_hook"] == "gaussk_hook"
        assert compiled["hook_calls"] == eager["hook_calls"] > 0
        assert all(0 < n < 0.2 * compiled["numel"] for n in compiled["nnz"])  # sparse after the hook
        assert _distance(compiled["params"], eager["params"]) < CLOSE
    for name in ("eager", "compiled"):
        fit = trainer_fits[name]
        assert torch.equal(fit[0]["params"], fit[1]["params"])  # the ranks agree


def test_trainer_gaussk_local_compiled_module_averages_and_matches_eager(trainer_fits):
    for eager, compiled in zip(trainer_fits["local_eager"], trainer_fits["local_compiled"]):
        assert compiled["graphs"] and all(n > 0 for n in compiled["graphs"]) and not eager["graphs"]
        assert compiled["comm_hook"] == eager["comm_hook"] == "local_grad_hook"  # no per-step all-reduce
        for rec in (eager, compiled):  # 4 optimizer steps, an outer step every 2
            assert rec["telemetry"]["inner_steps"] == 4 and rec["telemetry"]["outer_steps"] == 2, rec["telemetry"]
        assert _distance(compiled["params"], eager["params"]) < CLOSE
    for name in ("local_eager", "local_compiled"):
        fit = trainer_fits[name]
        assert torch.equal(fit[0]["params"], fit[1]["params"])  # the last outer step ended the fit on theta


def test_trainer_compiled_autograd_flag_does_not_engage_and_the_hook_runs_per_bucket(trainer_fits):
    """``torch._dynamo.config.compiled_autograd = True`` with a compiled module under ``gaussk_ddp``
    and ``gaussk_local``: Lightning calls ``backward`` outside the compiled ``training_step``, so
    compiled autograd does not engage: DDP's eager reducer calls the hook per bucket, as in the
    compiled fit."""
    for flagged, compiled in zip(trainer_fits["compiled_autograd"], trainer_fits["compiled"]):
        assert flagged["error"] is None
        assert flagged["comm_hook"] == "gaussk_hook" and flagged["hook_calls"] == compiled["hook_calls"] > 0
        assert _distance(flagged["params"], compiled["params"]) < CLOSE
    for flagged, compiled in zip(trainer_fits["local_compiled_autograd"], trainer_fits["local_compiled"]):
        assert flagged["error"] is None and flagged["comm_hook"] == "local_grad_hook"
        assert flagged["telemetry"]["outer_steps"] == compiled["telemetry"]["outer_steps"] == 2
        assert _distance(flagged["params"], compiled["params"]) < CLOSE


def test_trainer_with_ddps_python_reducer_fails_with_the_hooks_refusal(trainer_fits):
    for rec in trainer_fits["python_reducer"]:
        assert rec["error"].startswith("RuntimeError: gaussk_hook: DDP called the comm hook with (grad, param)")
        assert "torch.compile without compiled autograd" in rec["error"]


# ------------------------------------------------------------------------------ Accelerate
@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    pytest.importorskip("accelerate")
    tmp = tmp_path_factory.mktemp("compile_accelerate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ACCELERATE_SCRIPT), "--out", str(tmp / "out")]
    proc = subprocess.run(cmd, cwd=tmp, env=_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return {name: [torch.load(tmp / "out" / name / f"rank{r}.pt", weights_only=False) for r in range(2)] for name in ("eager", "compiled")}


def test_accelerate_register_gaussk_on_a_compiled_model_runs_the_hook_and_matches_eager(accelerate_runs):
    for eager, compiled in zip(accelerate_runs["eager"], accelerate_runs["compiled"]):
        # Accelerate wraps the compiled module in DDP: DDPOptimizer, one graph per bucket, the eager reducer calls the hook
        assert compiled["wrapper"] == "DistributedDataParallel" and compiled["inner"] == "OptimizedModule"
        assert len(compiled["graphs"]) == compiled["buckets"] >= 1 and all(n > 0 for n in compiled["graphs"]) and not eager["graphs"]
        assert compiled["comm_hook"] == eager["comm_hook"] == "gaussk_hook"
        assert compiled["hook_calls"] == eager["hook_calls"] >= 4 * compiled["buckets"]
        bound = 2 * (math.ceil(0.05 * compiled["numel"]) + 4)  # k per bucket from each rank
        assert all(0 < n <= bound for n in compiled["nnz"] + eager["nnz"])
        assert _distance(compiled["params"], eager["params"]) < CLOSE
        torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=CLOSE, atol=1e-6)
    for run in accelerate_runs.values():
        for rec in run:
            assert torch.equal(rec["all_ranks"][0], rec["all_ranks"][1])  # every rank holds the same parameters
