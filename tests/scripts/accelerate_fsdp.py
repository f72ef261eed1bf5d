"""The FSDP2 recipe under Accelerate (docs/fsdp.md#accelerate), run by tests/test_fsdp_accelerate.py
with torchrun on 4 CPU processes as 2 "nodes" x 2: the model sharded per node by hand, the
optimizer and data loader prepared, ``register_gaussk(accelerator, model, mesh=mesh)``, gradient
accumulation over 2 micro-batches (``set_requires_gradient_sync(accelerator.sync_gradients)``),
``save_state`` and ``load_state``. Every rank writes ``--out/rank{r}.pt``."""

import argparse
import os

import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_gaussk.frontends.accelerate import register_gaussk


def make_batch(i: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * i + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    rank = accelerator.process_index
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.Tanh(), torch.nn.Linear(48, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.01))
    state = register_gaussk(accelerator, model, mesh=mesh, density=0.05, dense_fallback="never")

    losses = []

    def train(micro_batches: range) -> None:
        for i in micro_batches:
            with accelerator.accumulate(model):
                model.set_requires_gradient_sync(accelerator.sync_gradients)
                x, y = make_batch(i, rank)
                loss = torch.nn.functional.mse_loss(model(x), y)
                losses.append(float(loss))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()

    train(range(0, 24))  # 12 optimizer steps
    calls_after_12 = state.telemetry["hook_calls"]
    folder = os.path.join(args.out, "ckpt")
    accelerator.save_state(folder)
    saved = {n: r.clone() for n, r in state.state_dict()["residuals"].items()}
    train(range(24, 28))
    moved = any(not torch.equal(saved[n], r) for n, r in state.state_dict()["residuals"].items())
    accelerator.load_state(folder)
    restored = state.state_dict()["residuals"]
    rec = {
        "losses": losses,
        "calls_after_12": calls_after_12,
        "moved": moved,
        "restored_equal": saved.keys() == restored.keys() and all(torch.equal(saved[n], restored[n]) for n in saved),
        "files": sorted(f for f in os.listdir(folder) if f.startswith("gaussk_")),
        "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "layout": state.layout.to_dict(),
        "bytes_inter": state.telemetry["bytes_inter"],
    }
    torch.save(rec, os.path.join(args.out, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
