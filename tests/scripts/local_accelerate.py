"""Accelerate + register_gaussk(sync_every=...) on 2 CPU processes, for tests/test_local_sgd.py::

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/scripts/local_accelerate.py --out DIR

Trains 8 optimizer steps of 2 accumulated micro-batches (sync_every=3), save_state after step 4
(mid-window), load_state after step 8 and trains steps 5-8 again: the result must be the same.
Every rank writes what it saw to ``DIR/rank{r}.pt``. ``--overlap``: with ``overlap_steps=1,
fragments=2`` (at the save, fragment 1's exchange is in flight).
"""

import argparse
import os

import torch
import torch.distributed as dist
from _launched import record_group_at_exit
from accelerate import Accelerator
from torch import nn

from lightning_gaussk.frontends.accelerate import register_gaussk


def make_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--overlap", action="store_true")
    a = p.parse_args()
    record_group_at_exit(a.out)  # register_gaussk destroys the group at exit (no end_training here)
    acc = Accelerator(gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    model, opt = acc.prepare(model, opt)
    extra = {"overlap_steps": 1, "fragments": 2} if a.overlap else {}
    local = register_gaussk(acc, model, sync_every=3, density=0.1, chunk=64, quantize=8, hierarchy="flat", **extra)
    rank = acc.process_index
    rec: dict = {"losses": [], "grads_local": True, "synced_equal": None}

    def train(first: int, last: int) -> None:
        for step in range(first, last):
            for micro in range(2):
                with acc.accumulate(model):
                    x, y = make_batch(step, micro, rank)
                    loss = nn.functional.mse_loss(model(x), y)
                    acc.backward(loss)
                    if acc.sync_gradients:  # the hook returned this rank's gradient: ranks differ
                        g = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
                        got = [torch.empty_like(g) for _ in range(2)]
                        dist.all_gather(got, g)
                        rec["grads_local"] &= not torch.equal(got[0], got[1])
                    rec["losses"].append(float(loss.detach()))
                    opt.step()
                    opt.zero_grad()
            if step + 1 == 6 and rec["synced_equal"] is None:  # right after the second outer step
                mine = local.global_params() if a.overlap else flat(model)  # overlap: theta, the models differ
                got = [torch.empty_like(mine) for _ in range(2)]
                dist.all_gather(got, mine)
                rec["synced_equal"] = torch.equal(got[0], got[1])

    train(0, 4)
    rec["in_flight_at_save"] = local.in_flight
    acc.save_state(os.path.join(a.out, "state"))
    train(4, 8)
    first = flat(model).clone()
    rec.update(inner_steps=local.telemetry["inner_steps"], outer_steps=local.telemetry["outer_steps"])
    rec.update(loss_first=sum(rec["losses"][:4]) / 4, loss_last=sum(rec["losses"][-4:]) / 4)
    acc.load_state(os.path.join(a.out, "state"))
    train(4, 8)
    rec["restored_equal"] = torch.equal(first, flat(model))
    torch.save(rec, os.path.join(a.out, f"rank{rank}.pt"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
