"""TopK-SGD as a DDP communication hook: ``gaussk_hook`` and its state, ``GaussKState``.

The hook is a thin adapter: a DDP bucket is one call of the core entry
(:func:`lightning_gaussk.engine.pipeline.reduce`), keyed by the bucket's index, over the bucket's
parameters and flat buffer. One bucket, one step, in flat mode (``d`` entries, ``W`` ranks,
``k = ceil(density * d)``)::

    u        = grad + residual                      fp32 work buffer, reused between steps
    idx, val = select(u, k)                         exactly k entries (selector by name)
                                                    (one fused pass on CPU: accumulate_select)
    msg      = [val | idx as int32 bits | flag]     ONE fp32 tensor of 2k + 1 entries
    all_gather(msg)                                 ONE async collective of fixed size
    grad     = scatter_add(idx_r, val_r) / W        duplicate indices across ranks add up
    residual = u with u[idx] := 0                   so sent + residual == u, bit for bit

``flag`` is 0 when ``u`` is finite, NaN otherwise (``0 * sum(u)``, or ``0 * sum(val)`` where the
selection is an exact top-k, which always picks non-finite entries first). The gathered flags are
added to the first entry of the result, so a non-finite gradient on any rank shows up on every
rank (as with plain DDP, letting a GradScaler skip the step), and no rank commits its residual for
that step: one bad step cannot poison the error feedback.

Node mode (:mod:`lightning_gaussk.comm.topology`) reduces the bucket inside each node first and
exchanges 1/L of it between nodes. Residuals are kept per parameter (the bucket buffer is the
concatenation of ``bucket.parameters()``), so they survive DDP's bucket rebuild after the first
iteration, ``static_graph``, ``find_unused_parameters`` and any ``bucket_cap_mb``.

Compiled autograd's DDP (``torch._dynamo.config.optimize_ddp = "python_reducer"``) calls comm hooks
once per parameter with a tuple ``(grad, param)`` instead of a bucket; the hook refuses that with a
``RuntimeError`` saying what to do (one ``isinstance`` check per call, nothing else).
"""


from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.config import GaussKConfig
from lightning_gaussk.engine.pipeline import reduce
from lightning_gaussk.engine.state import GaussKState

__all__ = ["gaussk_hook", "validate_config"]


def validate_config(
    density: Any,
    selector: Any,
    error_feedback: Any,
    warmup_steps: Any,
    warmup_density: Any,
    seed: Any,
    dense_fallback: Any = "auto",
    link_gbit: Any = None,
    **options: Any,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument, the value and what is allowed
    (the checks of :class:`~lightning_gaussk.config.GaussKConfig`, which own them)."""
    GaussKConfig(
        density=density, selector=selector, error_feedback=error_feedback, warmup_steps=warmup_steps,
        warmup_density=warmup_density, seed=seed, dense_fallback=dense_fallback, link_gbit=link_gbit, **options,
    )  # fmt: skip


#: the refusal of a comm hook called per parameter (``{hook}``: the hook's name)
PER_PARAMETER_REFUSAL = (
    "{hook}: DDP called the comm hook with (grad, param) for one parameter instead of a GradBucket: this is compiled "
    "autograd's DDP (torch._dynamo.config.optimize_ddp='python_reducer', which calls comm hooks once per parameter). "
    "TopK-SGD selects over whole gradient buckets in DDP's eager reducer, so it cannot run there. Use torch.compile "
    "without compiled autograd (leave torch._dynamo.config.compiled_autograd False), or build DDP with "
    "torch._dynamo.config.optimize_ddp='ddp_optimizer' (the default), which keeps the eager reducer and calls the hook "
    "per bucket. See docs/fabric.md (torch.compile)."
)


def gaussk_hook(state: GaussKState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """TopK-SGD with error feedback for one DDP bucket (see the module docstring).

    1. The bucket is one call of the core entry, keyed by its index.
    2. After the last bucket of a backward pass, the state counts the step and drops served
       monitor requests.

    Register with ``ddp_model.register_comm_hook(state, gaussk_hook)``.

    Raises:
        RuntimeError: when called per parameter with ``(grad, param)`` (compiled autograd's DDP,
            ``optimize_ddp="python_reducer"``) instead of a bucket, saying what to use instead.

    Example::

        state = GaussKState(density=0.01).bind(ddp_model)
        ddp_model.register_comm_hook(state, gaussk_hook)
    """
    if isinstance(bucket, tuple):  # not a GradBucket: compiled autograd's python reducer, per parameter
        raise RuntimeError(PER_PARAMETER_REFUSAL.format(hook="gaussk_hook"))
    fut = reduce(state, bucket.index(), bucket.parameters(), bucket.buffer())
    if bucket.is_last():
        state.end_backward()
    return fut
