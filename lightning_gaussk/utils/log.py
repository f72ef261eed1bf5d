"""Messages for the user, once, from rank 0: the algorithm's own helper, so the core imports
neither Lightning nor Accelerate (Lightning's ``rank_zero_*`` do the same for its own code).

The rank is torch.distributed's when a group is up, else the launchers' ``RANK`` (torchrun,
Accelerate, Lightning) or ``SLURM_PROCID``; 0 without any.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch.distributed as dist

__all__ = ["global_rank", "rank_zero_info", "rank_zero_warn"]

log = logging.getLogger("lightning_gaussk")


def global_rank() -> int:
    """This process's global rank (0 when nothing says otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        raw = os.environ.get(var)
        if raw is not None and raw.strip().isdigit():
            return int(raw)
    return 0


def rank_zero_info(message: str) -> None:
    """Log ``message`` at INFO on rank 0 (the ``lightning_gaussk`` logger; shown by default, as
    Lightning shows its own rank-zero messages)."""
    if global_rank() == 0:
        if not log.handlers and not logging.getLogger().handlers:
            _default_handler()
        log.info(message)


def rank_zero_warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` on rank 0 only."""
    if global_rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def _default_handler() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
