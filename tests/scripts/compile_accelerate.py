"""The Accelerate runs of tests/test_compile.py: ``register_gaussk`` on a model prepared by
Accelerate, eager and ``torch.compile``-d (inductor), on 2 CPU processes. Launch with

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/scripts/compile_accelerate.py --out DIR

One ``Accelerator``, two models one after the other (the same initial weights, batches and
optimizer), each with its own hook state:

- ``eager``: ``accelerator.prepare(model)``;
- ``compiled``: ``accelerator.prepare(torch.compile(model))``: Accelerate wraps the compiled
  module in DDP, DDPOptimizer splits its graph at the bucket boundaries and DDP's eager reducer
  calls the hook per bucket.

Every rank writes ``DIR/<case>/rank{r}.pt``: per step the nonzero entries of the gradients the
optimizer sees and the loss, the hook's calls, the hook DDP names, the graphs handed to inductor,
the parameters at the end and every rank's (all-gathered).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from lightning_gaussk.frontends.accelerate import find_ddp_module, register_gaussk

STEPS = 4
GRAPHS: list[int] = []


def inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    from torch._inductor.compile_fx import compile_fx

    GRAPHS.append(sum(node.op == "call_function" for node in gm.graph.nodes))
    return compile_fx(gm, example_inputs)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 1))


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(16, 32, generator=g)
    return x, torch.tanh(x[:, :1] - x[:, 1:2])


def run(acc: Accelerator, case: str) -> dict:
    torch._dynamo.reset()
    GRAPHS.clear()
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = acc.prepare(torch.compile(model, backend=inductor) if case == "compiled" else model, opt)
    state = register_gaussk(acc, model, density=0.05, dense_fallback="never")
    ddp = find_ddp_module(model)
    rec: dict = {"wrapper": type(model).__name__, "inner": type(ddp.module).__name__, "nnz": [], "losses": []}
    rec["numel"] = sum(p.numel() for p in model.parameters())
    for step in range(STEPS):
        x, y = make_batch(step, acc.process_index)
        loss = nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        rec["nnz"].append(int(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).count_nonzero()))
        rec["losses"].append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    rows = [torch.empty_like(flat) for _ in range(acc.num_processes)]
    dist.all_gather(rows, flat)
    rec.update(
        params=flat, all_ranks=torch.stack(rows), graphs=list(GRAPHS), hook_calls=state.telemetry["hook_calls"],
        comm_hook=ddp._get_ddp_logging_data().get("comm_hook"), buckets=ddp._get_ddp_logging_data().get("num_buckets_reduced"),
    )  # fmt: skip
    state.wait_idle()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    acc = Accelerator()
    for case in ("eager", "compiled"):
        rec = run(acc, case)
        folder = Path(args.out) / case
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rec, folder / f"rank{acc.process_index}.pt")
        acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
