"""The wire format of a selection: ``[values | int32 index bits | flag]`` in ONE fp32 tensor.

A message of ``k`` entries has ``2k + 1`` fp32 words: ``k`` values, the ``k`` indices as int32
bit patterns (so one collective carries both, and the size is known before the step), and a
``flag``: 0 when the sender's ``u`` was finite, NaN otherwise. Messages stacked as rows (an
all-gather, an all-to-all) decode row-wise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["message_words", "pack", "unpack"]


def message_words(k: int) -> int:
    """fp32 words of a message of ``k`` entries: ``2k + 1``."""
    return 2 * k + 1


def pack(msg: Tensor, values: Tensor, indices: Tensor, flag: Tensor) -> Tensor:
    """Write ``values`` (k), ``indices`` (k, stored as int32 bits) and ``flag`` (0-d) into
    ``msg`` (``2k + 1`` fp32 words, reused between steps); returns ``msg``."""
    k = values.numel()
    msg[:k].copy_(values)
    msg[k : 2 * k].view(torch.int32).copy_(indices)
    msg[2 * k].copy_(flag)
    return msg


def unpack(rows: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``R`` messages of ``k`` entries, stacked (``R (2k + 1)`` words) -> ``(values, indices,
    flags)``: ``R k`` values, ``R k`` int32 indices and ``R`` flags."""
    rows = rows.view(-1, 2 * k + 1)
    return rows[:, :k].reshape(-1), rows[:, k : 2 * k].reshape(-1).view(torch.int32), rows[:, 2 * k]
