"""Accelerate + register_gaussk on 2 CPU processes, for tests/test_accelerate.py. Launch with

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/scripts/accelerate_train.py --out DIR --mode first|resume

``first``: train with gradient accumulation (through torch.compile), save_state, train on,
load_state in the same processes, train the same steps again; then the misuse checks.
``resume``: fresh processes load the ``first`` checkpoint and train the same steps; then a
``sync_each_batch=True`` run of a second model, and save/load of both models' states. Every rank writes what it saw to ``DIR/{mode}_rank{r}.pt``.
"""

import argparse
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from lightning_gaussk.frontends.accelerate import register_gaussk

STEPS_BEFORE_SAVE = 6
STEPS_AFTER_SAVE = 4
ACCUMULATE = 2


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))  # 1153 parameters, one bucket


def make_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])


def train(acc, model, opt, state, first_step: int, steps: int, log: dict) -> None:
    for step in range(first_step, first_step + steps):
        for micro in range(acc.gradient_accumulation_steps):
            with acc.accumulate(model):
                x, y = make_batch(step, micro, acc.process_index)
                loss = nn.functional.mse_loss(model(x), y)
                acc.backward(loss)
                if acc.sync_gradients:
                    log["grad_nnz"].append(sum(int((p.grad != 0).sum()) for p in model.parameters()))
                    log["hook_calls"].append(state.telemetry["hook_calls"])
                    log["state_step"].append(state.step)
                log["losses"].append(float(loss.detach()))
                opt.step()
                opt.zero_grad()


def residuals(state) -> dict[str, torch.Tensor]:
    return {n: r.clone() for n, r in state.state_dict()["residuals"].items()}


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def expect_error(fn, error, text: str) -> str:
    try:
        fn()
    except error as err:
        assert text in str(err), f"{text!r} not in {err!r}"
        return str(err)
    raise AssertionError(f"no {error.__name__} raised (expected one mentioning {text!r})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["first", "resume"], required=True)
    a = p.parse_args()
    ckpt = os.path.join(a.out, "ckpt")

    acc = Accelerator(gradient_accumulation_steps=ACCUMULATE)
    model = acc.prepare(net())
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model = torch.compile(model, backend="eager")  # OptimizedModule(DistributedDataParallel)
    state = register_gaussk(acc, model, seed=3, dense_fallback="auto")  # seed: keyword beats GAUSSK_SEED
    rec: dict = {
        "distributed_type": str(acc.distributed_type),
        "world": acc.num_processes,
        "wrapper": type(model).__name__,
        "config": state.state_dict()["config"],
        "numel": sum(p.numel() for p in model.parameters()),
    }
    log: dict = {"grad_nnz": [], "hook_calls": [], "state_step": [], "losses": []}

    if a.mode == "first":
        train(acc, model, opt, state, 0, STEPS_BEFORE_SAVE, log)
        rec["saved_residuals"], rec["saved_step"] = residuals(state), state.step
        acc.save_state(ckpt)
        acc.wait_for_everyone()  # every rank has written its file
        rec["ckpt_files"] = sorted(os.listdir(ckpt))
        train(acc, model, opt, state, STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE, log)
        rec["params_uninterrupted"] = params(model)
        acc.load_state(ckpt)  # same processes, live buffers
        rec["loaded_residuals"], rec["loaded_step"] = residuals(state), state.step
        train(acc, model, opt, state, STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE, log)
        rec["params_reloaded"] = params(model)

        # ------------------------------------------------------------------ misuse
        errors = {}
        errors["twice"] = expect_error(lambda: register_gaussk(acc, model), ValueError, "already registered")
        errors["unprepared"] = expect_error(lambda: register_gaussk(acc, nn.Linear(3, 3)), ValueError, "accelerator.prepare")
        foreign = nn.parallel.DistributedDataParallel(nn.Linear(3, 3))
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        foreign.register_comm_hook(None, default_hooks.fp16_compress_hook)
        errors["foreign_hook"] = expect_error(lambda: register_gaussk(acc, foreign), ValueError, "fp16_compress_hook")
        errors["bad_kwarg"] = expect_error(lambda: register_gaussk(acc, model, densty=0.1), TypeError, "densty")
        from torch.distributed.fsdp import fully_shard

        sharded = fully_shard(nn.Linear(4, 4))
        errors["fsdp2"] = expect_error(lambda: register_gaussk(acc, sharded), ValueError, "FSDP")
        rec["errors"] = errors
    else:
        acc.load_state(ckpt)  # fresh processes: residuals wait until their bucket first runs
        rec["loaded_residuals"], rec["loaded_step"] = residuals(state), state.step
        train(acc, model, opt, state, STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE, log)
        rec["params_resumed"] = params(model)

        # ------------------------------------------------------------------ sync_each_batch
        acc.gradient_state.plugin_kwargs["sync_each_batch"] = True
        model2 = acc.prepare(net())
        opt2 = acc.prepare(torch.optim.SGD(model2.parameters(), lr=0.1))
        state2 = register_gaussk(acc, model2, density=0.1)
        log2: dict = {"grad_nnz": [], "hook_calls": [], "state_step": [], "losses": []}
        train(acc, model2, opt2, state2, 0, 3, log2)
        rec["sync_each_batch"] = {"hook_calls": state2.telemetry["hook_calls"], "step": state2.step, "log": log2}

        # ------------------------------------------------------------------ two models, one folder
        ckpt2 = os.path.join(a.out, "ckpt_two_models")
        acc.save_state(ckpt2)
        acc.wait_for_everyone()
        saved = [residuals(state), residuals(state2)]
        train(acc, model2, opt2, state2, 3, 1, log2)  # moves state2's residuals on
        acc.load_state(ckpt2)
        rec["two_models"] = {
            "files": sorted(os.listdir(ckpt2)),
            "saved": saved,
            "loaded": [residuals(state), residuals(state2)],
        }

    rec["log"] = log
    torch.save(rec, os.path.join(a.out, f"{a.mode}_rank{acc.process_index}.pt"))
    acc.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
