"""Run a function on 2 CPU processes with gloo (torch.multiprocessing spawn)."""

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # nobody tears down while a peer still talks
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; a failure on any rank raises."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
