"""The outer optimizer: how ``theta`` moves on the averaged update of an outer step.

``update`` is ``g = (1/P) sum_r s_r``: the mean of what the ranks delivered (the sparse step's
selections, or DiLoCo's whole pseudo-gradients). Two are built in::

    OuterSGD        theta <- theta - alpha g                              (the sparse outer step)
    OuterNesterov   m <- mu m + g;  theta <- theta - alpha (g + mu m)     (DiLoCo)

Any object with ``step(theta, update)``, ``state_dict()`` and ``load_state_dict()``
(:class:`OuterOptimizer`) can take their place. Its state is a flat tensor per name, the
fragment's ``d`` entries in model order; checkpoints store it cut per parameter name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["OuterNesterov", "OuterOptimizer", "OuterSGD"]


@runtime_checkable
class OuterOptimizer(Protocol):
    """What the driver needs of an outer optimizer (one per fragment)."""

    def step(self, theta: Tensor, update: Tensor) -> None:
        """Move ``theta`` (fp32, ``d``) by the averaged ``update`` (fp32, ``d``; may be overwritten)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Its state: name -> a live flat tensor of ``d`` entries (copied by the caller)."""
        ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (flat tensors of ``d`` entries; missing names keep their value)."""
        ...


class OuterSGD:
    """``theta <- theta - lr * update``; no state.

    Args:
        lr: ``alpha``, the outer learning rate (> 0).
    """

    def __init__(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"OuterSGD: `lr` must be > 0, got {lr!r}")
        self.lr = float(lr)

    def step(self, theta: Tensor, update: Tensor) -> None:
        theta.sub_(update, alpha=self.lr)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        return None


class OuterNesterov:
    """Nesterov momentum on the averaged update (DiLoCo's outer step)::

        m <- mu m + g
        theta <- theta - lr (g + mu m)

    Args:
        lr: ``alpha``, the outer learning rate (> 0).
        momentum: ``mu``, in [0, 1).
        numel: ``d``, the entries of ``theta``.
        device: where ``theta`` lives (``m`` is allocated there, once, at zero).

    ``update`` is overwritten with ``g + mu m``. The state is ``{"momentum": m}``.
    """

    def __init__(self, lr: float, momentum: float, numel: int, device: torch.device | str = "cpu") -> None:
        if not lr > 0:
            raise ValueError(f"OuterNesterov: `lr` must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"OuterNesterov: `momentum` must be in [0, 1), got {momentum!r}")
        self.lr, self.mu = float(lr), float(momentum)
        self.momentum = torch.zeros(numel, dtype=torch.float32, device=device)

    def step(self, theta: Tensor, update: Tensor) -> None:
        self.momentum.mul_(self.mu).add_(update)
        update.add_(self.momentum, alpha=self.mu)  # Nesterov: g + mu m
        theta.sub_(update, alpha=self.lr)

    def state_dict(self) -> dict[str, Tensor]:
        return {"momentum": self.momentum}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if "momentum" in state:
            self.momentum.copy_(state["momentum"].reshape(-1))
