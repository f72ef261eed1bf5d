"""Lightning Fabric with TopK-SGD: ``L.Fabric(strategy="gaussk_ddp")`` by name, after ``import lightning_gaussk``.

A small MLP on scikit-learn's digits (shipped with the package: no download), one process per
device; gloo on CPU. The hook's options come from ``GAUSSK_*`` variables (``GAUSSK_DENSITY=0.01``),
as with the Trainer. ``fabric.save`` writes every rank's residuals next to the checkpoint
(``<ckpt>.gaussk/rank{r}.pt``) and ``fabric.load`` gives every rank its own back.

    fabric run --accelerator cpu --devices 2 examples/fabric_train.py --epochs 2 --save ckpt/fabric.ckpt
    python examples/fabric_train.py --devices 2 --epochs 1 --resume ckpt/fabric.ckpt   # Fabric launches the 2nd process
    GAUSSK_SYNC_EVERY=8 python examples/fabric_train.py --devices 2 --strategy gaussk_local
    python examples/fabric_train.py --devices 2 --compile                             # torch.compile (inductor)

A checkpoint of a compiled run resumes a compiled run (its names carry torch.compile's ``_orig_mod.``).
"""

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gaussk  # noqa: F401  (registers "gaussk_ddp", "gaussk_local", "diloco", ... with Fabric)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def datasets() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1500], order[1500:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="auto", help="processes (CPU devices); `fabric run --devices` sets it too")
    parser.add_argument("--strategy", default="gaussk_ddp", choices=["gaussk_ddp", "topk_ddp", "gaussk_local", "diloco"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--save", type=Path, help="fabric.save the model, optimizer and hook state here at the end")
    parser.add_argument("--resume", type=Path, help="fabric.load them from here first")
    args = parser.parse_args()
    if args.strategy in ("gaussk_ddp", "topk_ddp"):
        os.environ.setdefault("GAUSSK_DENSITY", "0.01")  # the example's default; the strategy reads GAUSSK_* variables

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    fabric = L.Fabric(accelerator="cpu", devices=devices, strategy=args.strategy)
    if not os.environ.get("LT_CLI_USED"):  # `fabric run` has started the processes already
        fabric.launch()
    fabric.seed_everything(0)

    model = mlp()
    if args.compile:  # DDP wraps the compiled module: DDPOptimizer splits it at the buckets, the hook runs per bucket
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer, _reapply_compile=False)  # see docs/fabric.md, torch.compile
    train, test = datasets()
    loader = fabric.setup_dataloaders(DataLoader(train, batch_size=args.batch_size, shuffle=True))

    start_epoch = 0
    if args.resume:
        remainder = fabric.load(args.resume, {"model": model, "optimizer": optimizer})
        start_epoch = remainder["epoch"]

    t0 = time.perf_counter()
    for epoch in range(start_epoch, start_epoch + args.epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)  # the hook sparsifies and averages each DDP bucket
            optimizer.step()
    strategy = fabric.strategy
    if hasattr(strategy, "finish"):  # local SGD: a last outer step, so every rank ends on theta
        strategy.finish()

    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = bool((fabric.all_gather(flat) == flat).all())
    state = getattr(strategy, "gaussk_state", None) or strategy.local_sgd
    fabric.print(f"{args.strategy} on {fabric.world_size} x cpu{' (compiled)' if args.compile else ''}, epochs {start_epoch}..{start_epoch + args.epochs}")
    fabric.print(f"test accuracy {accuracy:.3f}; time {time.perf_counter() - t0:.1f} s; ranks identical: {same}")
    t = state.telemetry
    if "hook_calls" in t:
        fabric.print(f"hook calls {t['hook_calls']}, bytes sent per rank {t['bytes_sent']:,} vs dense {t['bytes_dense']:,}")
    else:
        fabric.print(f"inner steps {t['inner_steps']}, outer steps {t['outer_steps']}")
    strategy.log_summary()  # rank 0: the end-of-fit line (optimizer steps, bytes against dense, communication time)
    if args.save:
        fabric.save(args.save, {"model": model, "optimizer": optimizer, "epoch": start_epoch + args.epochs})
        fabric.print(f"saved {args.save} and {args.save}.gaussk/ (one hook state per rank)")


if __name__ == "__main__":
    main()
