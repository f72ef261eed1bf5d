"""The golden runs of the other two drivers: sparse local SGD and FSDP2, on 4 gloo processes.

``python tests/golden/engines.py record`` writes ``tests/golden/{local,fsdp}.pt`` (run it only when
a change of numbers is intended and said in the CHANGELOG); ``tests/test_golden.py`` runs the same
cases and asserts that parameters, theta, error feedback and residuals equal the files bit for bit.

Local SGD (``SparseLocalSGD``, ``sync_every=3``, the other options pinned in ``LOCAL_PINNED``
(``overlap_steps=0, fragments=1``: the blocking outer step), ``STEPS_LOCAL = 10`` AdamW steps, so three outer
steps and a run that ends one step into a window): the chunk-wise all-gather, the whole-tensor
selection by a selector, 2-bit values, DiLoCo's dense step, node mode 2 x 2, and the bounded
all-reduce. FSDP2 (``register_gaussk_fsdp`` on a 2 x 2 mesh ``("replicate", "shard")``, five SGD
steps) with the all-gather and with the bounded all-reduce.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

STEPS_LOCAL = 10
STEPS_FSDP = 5
WORLD = 4
LOCAL_CASES: list[tuple[str, dict[str, Any]]] = [
    ("chunked-allgather", {"density": 0.1, "chunk": 64, "hierarchy": "flat"}),
    ("whole-tensor-gaussk", {"density": 0.1, "chunk": None, "selector": "gaussk", "hierarchy": "flat"}),
    ("quantize-2", {"density": 0.1, "chunk": 64, "quantize": 2, "outer_lr": 2.0, "hierarchy": "flat"}),
    ("diloco", {"outer": "dense", "outer_lr": 0.7, "hierarchy": "flat"}),
    ("node-2x2", {"density": 0.1, "chunk": 64, "hierarchy": "node", "ranks_per_node": 2}),
    ("node-2x2-quantize-2", {"density": 0.1, "chunk": 64, "quantize": 2, "hierarchy": "node", "ranks_per_node": 2}),
    ("bounded-allreduce", {"density": 0.1, "chunk": 64, "exchange": "allreduce", "hierarchy": "flat"}),
]
FSDP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("allgather", {"density": 0.2, "selector": "gaussk"}),
    ("allreduce", {"density": 0.2, "selector": "topk", "exchange": "allreduce"}),
]
#: the options the local SGD files were recorded with, pinned: a change of a default (or a new option:
#: ``overlap_steps=0, fragments=1`` is the blocking outer step) must not change the golden runs
LOCAL_PINNED: dict[str, Any] = {
    "sync_every": 3, "density": 0.02, "outer_lr": 1.0, "ef_decay": 0.95, "chunk": 4096, "quantize": None,
    "overlap_steps": 0, "fragments": 1,
}  # fmt: skip
HERE = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    """Odd sizes (FSDP2 pads the last shard; chunks do not divide the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 23)
        self.b = nn.Linear(23, 17)
        self.c = nn.Linear(17, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(1000 * step + rank))


def run_local(rank: int, options: dict[str, Any]) -> dict[str, Any]:
    """One local SGD case on this rank: parameters, theta, error feedback, the saved residuals."""
    from lightning_gaussk.local_sgd import SparseLocalSGD

    torch.manual_seed(rank)  # different starts: the construction's broadcast must make them one
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    local = SparseLocalSGD(net, opt, **{**LOCAL_PINNED, **options})
    for step in range(STEPS_LOCAL):
        net(_batch(step, rank)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    sd = local.state_dict(local=False)
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "theta": {"theta": local.global_params()},
        "error_feedback": {"e": local.error_feedback()},
        "residuals": sd["residuals"],
        "momentum": sd.get("momentum", {}),
        "inner_step": sd["inner_step"],
    }


def run_fsdp(rank: int, options: dict[str, Any]) -> dict[str, Any]:
    """One FSDP2 case on this rank: its parameter shards and its residual shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_gaussk.fsdp import register_gaussk_fsdp

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    net = Net()
    for child in (net.a, net.b, net.c):
        fully_shard(child, mesh=mesh["shard"])
    fully_shard(net, mesh=mesh["shard"])
    state = register_gaussk_fsdp(net, mesh, dense_fallback="never", **options)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(STEPS_FSDP):
        net(_batch(step, rank)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {
        "params": {n: p.to_local().detach().clone() for n, p in net.named_parameters()},
        "residuals": {n: r.detach().clone() for n, r in state.residuals().items()},
        "step": state.step,
    }


def _worker(rank: int, world: int, engine: str, out: str) -> None:
    import torch.distributed as dist

    if engine == "local":
        results = {name: run_local(rank, options) for name, options in LOCAL_CASES}
    else:
        results = {name: run_fsdp(rank, options) for name, options in FSDP_CASES}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)


ENGINES = {"local": LOCAL_CASES, "fsdp": FSDP_CASES}


def golden_path(engine: str) -> str:
    return os.path.join(HERE, f"{engine}.pt")


def run_engine(engine: str, out: str) -> None:
    """Run every case of ``engine`` on 4 ranks (gloo, spawned); save ``[rank] -> {case: result}``."""
    sys.path.insert(0, os.path.dirname(HERE))
    from _dist import run_distributed

    run_distributed(_worker, engine, out, world=WORLD)


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/golden/engines.py record")
    sys.path.insert(0, HERE)
    for e in ENGINES:
        run_engine(e, golden_path(e))
        print("recorded", golden_path(e))
