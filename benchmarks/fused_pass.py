"""What the fused ``accumulate_select`` pass saves, measured in training steps.

Two CPU processes (gloo on loopback: the link is free, so only host work differs), one torch
thread each, the 25M-parameter MLP of ``benchmarks/throughput.py``, batch 32 per rank, SGD with
momentum. Contenders, all ``DistributedDataParallel(gradient_as_bucket_view=True)`` from the same
weights, taking turns step by step (order reversed every other turn, each step after a barrier):

- ``compute``: the same model and step without DDP;
- ``noop``: DDP with a hook that returns the bucket untouched (DDP's own cost with a hook);
- ``fused``: ``gaussk_hook`` with selector "gaussk" (``accumulate_select``'s fused CPU pass);
- ``unfused``: the same selector registered under another name, so the hook runs the plain
  sequence ``torch.add`` -> ``select`` -> ``0 * sum(u)`` -> zero the bucket (what it did before).

Both hook contenders select exactly the same entries (tested in tests/test_hook.py), so the
difference is the cost of the passes only. Prints median step times and the hooks' overhead over
``noop`` and their ratio.

    python benchmarks/fused_pass.py [--steps 16] [--density 0.001 0.01]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import free_port, load_average, machine_description  # noqa: E402


def _noop(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _worker(rank: int, world: int, port: int, density: float, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from throughput import make_batch, make_model

    from lightning_gaussk import GaussKState, gaussk_hook, register_selector
    from lightning_gaussk.selection.selectors import gaussk_selector

    register_selector("gaussk_unfused", gaussk_selector, override=True)  # not fused: another name
    torch.manual_seed(0)
    base = make_model("mlp25m")
    x, y = make_batch("mlp25m", 32, rank)
    contenders: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for name in ("compute", "noop", "fused", "unfused"):
        model = copy.deepcopy(base)
        if name != "compute":
            model = DDP(model, gradient_as_bucket_view=True)
            if name == "noop":
                model.register_comm_hook(None, _noop)
            else:
                selector = "gaussk" if name == "fused" else "gaussk_unfused"
                model.register_comm_hook(GaussKState(density=density, selector=selector).bind(model), gaussk_hook)
        contenders[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for turn in range(warmup + steps):
        for name in names if turn % 2 else names[::-1]:
            model, opt = contenders[name]
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if turn >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    if rank == 0:
        fused, unfused = med["fused"] - med["noop"], med["unfused"] - med["noop"]
        print(
            f"density {density}: " + ", ".join(f"{n} {v:.0f} ms" for n, v in med.items())
            + f" | hook overhead over noop: fused {fused:.0f} ms, unfused {unfused:.0f} ms,"
            f" fused/unfused {fused / unfused:.2f}; step unfused/fused {med['unfused'] / med['fused']:.2f}",
            flush=True,
        )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--density", type=float, nargs="+", default=[0.001, 0.01])
    a = p.parse_args()
    print(f"{machine_description(f'torch {torch.__version__}')}; load average {load_average():.2f}", flush=True)
    for density in a.density:
        mp.spawn(_worker, args=(2, free_port(), density, a.steps, a.warmup), nprocs=2)


if __name__ == "__main__":
    main()
