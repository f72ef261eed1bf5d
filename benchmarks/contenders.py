"""The one contender naming format and registry of the benchmarks.

A contender is named ``HOOK`` or ``SELECTOR@DENSITY[/TAG]...``:

- ``ddp`` (plain DDP, no hook; ``dense`` is the same), ``fp16`` (torch's ``fp16_compress_hook``),
  ``powersgd`` (torch's ``powerSGD_hook``, rank 4, error feedback, warm start);
- ``gaussk@0.01``, ``topk@0.001``, ``randk@0.01``: the GaussK hook with that selector and density;
- tags after ``/`` set options of the hook by name (:data:`TAGS`): ``/flat`` and ``/node``
  (``hierarchy``; ``/node`` takes ``ranks_per_node`` from the caller), ``/allgather`` and
  ``/allreduce`` (``exchange``), ``/nodense`` (``dense_fallback="never"``). A script may add its
  own tags (convergence.py's remedies) by passing ``tags=`` to :func:`options`.

Older names still parse (their JSON results keep them): ``flat@RHO`` = ``gaussk@RHO/flat`` and
``node@RHO`` = ``gaussk@RHO/node`` (scaleout.py's first runs).

Standard library only at import (the harness tests use :func:`parse` without torch).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PLAIN = ("ddp", "dense", "fp16", "powersgd")  # contenders without the GaussK hook
TAGS: dict[str, dict[str, Any]] = {
    "flat": {"hierarchy": "flat"},
    "node": {"hierarchy": "node"},
    "allgather": {"exchange": "allgather"},
    "allreduce": {"exchange": "allreduce"},
    "nodense": {"dense_fallback": "never"},  # never switch a bucket to dense (benchmarks of the sparse exchanges)
}
_LEGACY = {"flat": "flat", "node": "node"}  # old "MODE@RHO" names: gaussk in that mode


@dataclass(frozen=True)
class Contender:
    """A parsed name: ``hook`` ("ddp", "fp16", "powersgd" or "gaussk"), the selector and density
    of a GaussK contender, and its tags."""

    name: str
    hook: str
    selector: str | None = None
    density: float | None = None
    tags: tuple[str, ...] = ()

    @property
    def mode(self) -> str | None:
        """``"flat"`` or ``"node"`` when a tag says so, else None (the hook's default)."""
        return next((t for t in self.tags if t in ("flat", "node")), None)

    @property
    def canonical(self) -> str:
        """The name in today's format (``node@0.01`` -> ``gaussk@0.01/node``)."""
        if self.hook != "gaussk":
            return self.hook
        return "/".join([f"{self.selector}@{self.density:g}", *self.tags])


def parse(name: str) -> Contender:
    """The :class:`Contender` a name stands for (see the module docstring); ValueError otherwise."""
    if name in PLAIN:
        return Contender(name, "ddp" if name == "dense" else name)
    head, *tags = name.split("/")
    selector, sep, rho = head.partition("@")
    if not sep or not selector or not rho:
        raise ValueError(f"contender must be one of {PLAIN} or SELECTOR@DENSITY[/TAG...], got {name!r}")
    try:
        density = float(rho)
    except ValueError:
        raise ValueError(f"contender {name!r}: density {rho!r} is not a number") from None
    if not 0 < density <= 1:
        raise ValueError(f"contender {name!r}: density must be in (0, 1], got {density}")
    if selector in _LEGACY:
        selector, tags = "gaussk", [_LEGACY[selector], *tags]
    return Contender(name, "gaussk", selector, density, tuple(tags))


def options(c: Contender, tags: Mapping[str, Mapping[str, Any]] = TAGS, **extra: Any) -> dict[str, Any]:
    """``GaussKState`` keywords of a GaussK contender: density, selector, each tag's options
    (from ``tags``; an unknown tag is a ValueError), then ``extra`` (the script's own settings)."""
    if c.hook != "gaussk":
        raise ValueError(f"{c.name!r} has no GaussK options")
    out: dict[str, Any] = {"density": c.density, "selector": c.selector}
    for t in c.tags:
        if t not in tags:
            raise ValueError(f"contender {c.name!r}: unknown tag {t!r} (known: {sorted(tags)})")
        out.update(tags[t])
    out.update(extra)
    return out


def register(ddp: Any, name: str, ranks_per_node: int | None = None, tags: Mapping[str, Mapping[str, Any]] = TAGS,
             **extra: Any) -> Any:  # fmt: skip
    """Attach contender ``name``'s communication hook to the DDP module ``ddp``; returns its state
    (None for plain DDP and fp16). ``ranks_per_node`` goes to a ``/node`` contender; ``tags`` and
    ``extra`` as in :func:`options`."""
    c = parse(name)
    if c.hook == "ddp":
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if c.hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if c.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, use_error_feedback=True, warm_start=True, start_powerSGD_iter=2
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    from lightning_gaussk import GaussKState, gaussk_hook

    opts = options(c, tags, **extra)
    if c.mode == "node" and ranks_per_node is not None:
        opts["ranks_per_node"] = ranks_per_node
    state = GaussKState(**opts).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    return state
