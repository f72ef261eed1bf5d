"""The golden runs: flat on 2 ranks and node mode on 2 x 2, several steps each, through raw DDP.

``python tests/golden/cases.py record`` writes ``tests/golden/{flat,node}.pt`` (run it only when
a change of numbers is intended and said in the CHANGELOG); ``tests/test_golden.py`` runs the same
cases and asserts that parameters, residuals and velocities equal the files bit for bit.

Each case trains ``Net`` (three linear layers, several DDP buckets) for ``STEPS`` SGD steps with one
selector, optionally with DGC momentum correction and/or a changing loss scale (the loss is
multiplied by ``S``, the hook is told ``S``, the gradients are unscaled before the step, as a
GradScaler does).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 5
SCALES = (1024.0, 512.0, 2048.0, 2048.0, 256.0)
# (name, options): every case runs in flat mode and in node mode
CASES: list[tuple[str, dict[str, Any]]] = [
    ("gaussk", {"selector": "gaussk"}),
    ("topk", {"selector": "topk"}),
    ("randk", {"selector": "randk", "seed": 3}),
    ("gaussk-momentum", {"selector": "gaussk", "momentum_correction": 0.9}),
    ("topk-scale", {"selector": "topk", "loss_scale": True}),
    ("gaussk-momentum-scale", {"selector": "gaussk", "momentum_correction": 0.9, "loss_scale": True}),
    ("topk-warmup", {"selector": "topk", "warmup_steps": 3, "warmup_density": 0.5}),
]
MODES = {"flat": ({"hierarchy": "flat"}, 2), "node": ({"hierarchy": "node", "ranks_per_node": 2}, 4)}
HERE = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 40)
        self.b = nn.Linear(40, 30)
        self.c = nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(100 * step + rank))


def run_case(rank: int, mode_options: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Train one case on this rank; return its parameters, residuals and velocities (CPU copies)."""
    from lightning_gaussk import GaussKState, gaussk_hook

    options = dict(options)
    scaled = options.pop("loss_scale", False)
    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=0.002)  # several buckets
    state = GaussKState(density=0.05, dense_fallback="never", **mode_options, **options).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(STEPS):
        scale = SCALES[step] if scaled else 1.0
        if scaled:
            state.set_loss_scale(scale)
        opt.zero_grad()
        (ddp(_batch(step, rank)).pow(2).mean() * scale).backward()
        if scaled:
            for p in ddp.parameters():
                p.grad.div_(scale)
        opt.step()
    state.wait_idle()
    sd = state.state_dict()
    return {
        "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
        "residuals": sd["residuals"],
        "velocity": sd.get("velocity", {}),
        "step": sd["step"],
    }


def _worker(rank: int, world: int, mode: str, out: str) -> None:
    import torch.distributed as dist

    mode_options, _ = MODES[mode]
    results = {name: run_case(rank, mode_options, options) for name, options in CASES}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)


def golden_path(mode: str) -> str:
    return os.path.join(HERE, f"{mode}.pt")


def run_mode(mode: str, out: str) -> None:
    """Run every case of ``mode`` on its ranks (gloo, spawned) and save ``[rank] -> {case: result}``."""
    sys.path.insert(0, os.path.dirname(HERE))
    from _dist import run_distributed

    _, world = MODES[mode]
    run_distributed(_worker, mode, out, world=world)


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/golden/cases.py record")
    sys.path.insert(0, HERE)
    for m in MODES:
        run_mode(m, golden_path(m))
        print("recorded", golden_path(m))
