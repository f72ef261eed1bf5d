"""The commit: what one step keeps of ``u``, and the skip when any rank saw a non-finite value.

Written once for every engine (the residual store of the DDP and FSDP2 hooks, local SGD's error
feedback). Per rank, with ``sent`` what this rank delivered into the update::

    kept := u - sent                    so that  sent + kept == u, bit for bit
    kept := 0                           everything was delivered (a dense exchange)

``sent`` is exact entries of ``u`` (the selected values; the delivered entries of ``u`` are then
zeroed, ``u_i - u_i == 0``), or lossy values (the quantised exchange's dequantised values, then
subtracted: the rounding error stays in ``kept``). Only entries ``delivered`` count: an exchange
that dropped part of a selection leaves those entries in ``kept``.

The skip: the step commits only when the agreed flag (the sum of every rank's flag, 0 or NaN) is
finite; otherwise ``kept`` keeps its value from before the step, on every rank alike. The
decision is a host ``bool`` where the flag was read (CPU, or local SGD's one read per outer
step), or a 0-d bool on the device (:func:`agreed`, no host sync) chosen by ``torch.where``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["agreed", "commit", "take_delivered"]


def agreed(flag: Tensor) -> Tensor:
    """Whether a step commits: ``isfinite(flag)`` for the agreed flag(s), on the flag's device
    (no host read; read it with ``bool()`` / ``tolist()`` where a host decision is wanted)."""
    return torch.isfinite(flag)


def take_delivered(u: Tensor, indices: Tensor | None, delivered: Tensor | None, sent: Tensor | None = None) -> None:
    """``u := u - sent`` at ``indices``, in place, where ``delivered`` (everywhere when None).

    ``sent`` None: the exact entries of ``u`` were sent, so they are zeroed; otherwise ``sent``
    (``k`` values, e.g. dequantised) is subtracted. ``indices`` None: nothing was taken. Fixed
    sizes, no host sync."""
    if indices is None:
        return
    if sent is not None:
        taken = sent if delivered is None else torch.where(delivered, sent, 0.0)
        u.index_add_(0, indices, taken, alpha=-1.0)
    elif delivered is None:
        u.index_fill_(0, indices, 0.0)
    else:
        idx = indices.long()
        u.index_put_((idx,), torch.where(delivered, 0.0, u.index_select(0, idx)))


def commit(
    kept: Tensor, work: Tensor, indices: Tensor | None, delivered: Tensor | None, ok: bool | Tensor, *,
    sent: Tensor | None = None, everything: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Commit one step of a buffer pair (see the module docstring); returns the new ``(kept, work)``.

    Args:
        kept: the buffer kept across steps (a residual, an error feedback, a velocity).
        work: this step's ``u`` (overwritten: it becomes the spare buffer).
        indices, delivered, sent: this rank's selection, what of it reached the update, and what
            was sent (:func:`take_delivered`).
        ok: :func:`agreed`'s answer, a host bool or a 0-d bool on the device.
        everything: the whole of ``u`` was delivered (dense): ``kept := 0``.

    On a host ``ok`` the buffers are swapped instead of copying ``d`` entries; on a device ``ok``
    the choice is made in place in ``kept`` (``torch.where``, ``masked_fill_``), without a sync."""
    if ok is False:
        return kept, work
    if everything:
        if ok is True:
            kept.zero_()
        else:
            kept.masked_fill_(ok, 0.0)
        return kept, work
    take_delivered(work, indices, delivered, sent)
    if ok is True:
        return work, kept
    torch.where(ok, work, kept, out=kept)
    return kept, work
