"""Plain PyTorch DDP with the TopK-SGD comm hook: ``GaussKState`` + ``gaussk_hook``, no Lightning.

A small CNN on scikit-learn's digits (shipped with the package: no download), one process per
rank started with ``torch.multiprocessing.spawn``; gloo on CPU, NCCL with one GPU per rank when
there are enough GPUs. Each rank saves its OWN hook state (residuals differ per rank) and can
resume from it.

    python examples/raw_ddp.py --world-size 2 --epochs 2 --save-dir ckpt
    python examples/raw_ddp.py --world-size 2 --epochs 1 --resume-from ckpt
"""

import argparse
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_gaussk import GaussKState, gaussk_hook


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def digits() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[perm[:1500]], y[perm[:1500]]), TensorDataset(x[perm[1500:]], y[perm[1500:]])


def worker(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.cpu
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        train(rank, world, device, args)
        dist.barrier()  # nothing in flight when the group goes away
    finally:
        dist.destroy_process_group()


def train(rank: int, world: int, device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = cnn().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- the two lines that turn DDP's allreduce into TopK-SGD with error feedback ----
    state = GaussKState(density=args.density, selector=args.selector).bind(ddp)  # bind: names for state_dict
    ddp.register_comm_hook(state, gaussk_hook)

    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    start_epoch = 0
    if args.resume_from:  # every rank reads its own file: residuals are per rank
        ckpt = torch.load(Path(args.resume_from) / f"rank{rank}.pt", map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state.load_state_dict(ckpt["gaussk"])  # residuals placed when their bucket first runs
        start_epoch = ckpt["epoch"]

    train_set, test_set = digits()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    tic = time.perf_counter()
    max_nnz = 0
    for epoch in range(start_epoch, start_epoch + args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x.to(device)), y.to(device)).backward()  # the hook runs here
            max_nnz = max(max_nnz, sum(int((p.grad != 0).sum()) for p in ddp.parameters()))
            opt.step()
    elapsed = time.perf_counter() - tic

    if args.save_dir:  # each rank writes its own file (a shared folder or a per-node disk both work)
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "gaussk": state.state_dict(),
             "epoch": start_epoch + args.epochs},
            Path(args.save_dir) / f"rank{rank}.pt",
        )  # fmt: skip

    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors
        acc = (model(x.to(device)).argmax(1) == y.to(device)).float().mean().item()
    numel = sum(p.numel() for p in model.parameters())
    t = state.telemetry
    lines = [
        f"rank {rank}: steps {state.step} (hook calls {t['hook_calls']}), residual norm "
        f"{sum(float(r.float().norm() ** 2) for r in state.residuals().values()) ** 0.5:.4f}"
    ]
    report = [None] * world
    dist.all_gather_object(report, lines[0])
    if rank == 0:
        print(f"raw DDP + gaussk_hook on {world} x {device.type} ({dist.get_backend()}), density {args.density}, "
              f"selector {args.selector!r}, epochs {start_epoch}..{start_epoch + args.epochs}"
              + (f" (resumed from {args.resume_from})" if args.resume_from else ""))  # fmt: skip
        print(f"test accuracy {acc:.3f}; time {elapsed:.1f} s")
        print(f"bytes sent per rank {t['bytes_sent']:,} vs dense {t['bytes_dense']:,} "
              f"({t['bytes_sent'] / max(t['bytes_dense'], 1):.1%})")  # fmt: skip
        print(f"max nonzero gradient entries seen by the optimizer: {max_nnz} of {numel} "
              f"(<= world * k = {world * state.k_for(numel)} per bucket)")  # fmt: skip
        for line in report:
            print(line)
        if args.save_dir:
            print(f"saved one file per rank to {args.save_dir}/rank{{0..{world - 1}}}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="processes (one GPU each when there are enough GPUs)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--density", type=float, default=0.01, help="fraction of each bucket sent per step")
    p.add_argument("--selector", default="gaussk", help="gaussk, topk, dgc, randk")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--save-dir", default=None, help="write model, optimizer and each rank's hook state here")
    p.add_argument("--resume-from", default=None, help="a --save-dir of an earlier run")
    p.add_argument("--cpu", action="store_true", help="use CPU processes even when GPUs are present")
    args = p.parse_args()
    mp.spawn(worker, args=(args.world_size, args, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
