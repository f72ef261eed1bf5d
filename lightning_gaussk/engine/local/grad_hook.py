"""The DDP comm hook of local SGD: each rank keeps its own gradient (nothing is communicated)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["local_grad_hook"]


def local_grad_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """A DDP comm hook that communicates nothing: every rank keeps its own gradient (local SGD
    averages models every ``sync_every`` steps instead of gradients every step).

    Example::

        ddp.register_comm_hook(None, local_grad_hook)
    """
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# DDP checks the hook's annotations against the real classes (this module's are strings)
local_grad_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
