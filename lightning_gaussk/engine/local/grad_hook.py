"""The DDP comm hook of local SGD: each rank keeps its own gradient (nothing is communicated)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["local_grad_hook"]


def local_grad_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """A DDP comm hook that communicates nothing: every rank keeps its own gradient (local SGD
    averages models every ``sync_every`` steps instead of gradients every step).

    Under compiled autograd with ``optimize_ddp="python_reducer"`` DDP calls the hook once per
    parameter with ``(grad, param)`` and ignores what it returns (a hook there updates
    ``param.grad`` in place): keeping the rank's own gradient is then doing nothing.

    Example::

        ddp.register_comm_hook(None, local_grad_hook)
    """
    if isinstance(bucket, tuple):  # the python reducer's (grad, param): the gradient stays as it is
        return None  # type: ignore[return-value]
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# DDP checks the hook's annotations against the real classes (this module's are strings)
local_grad_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
