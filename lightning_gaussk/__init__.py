"""lightning_gaussk: TopK-SGD / Gaussian-k gradient sparsification for DDP, Lightning and Accelerate.

The algorithm (the layers :mod:`~lightning_gaussk.selection` up to
:mod:`~lightning_gaussk.checkpoint`: the engine, its three drivers, selection, configuration)
needs only torch. The Lightning parts (the strategies, the monitor and telemetry callbacks) are
imported when Lightning is installed, and ``import lightning_gaussk`` then registers ``"gaussk_ddp"`` and
its siblings (and ``"gaussk_fsdp"``) with Lightning's strategy registry.
"""

from typing import Any

from lightning_gaussk.config import GaussKConfig
from lightning_gaussk.engine.ddp_hook import gaussk_hook
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.selection.selectors import accumulate_select, available_selectors, get_selector, register_selector, select

_LIGHTNING_NAMES = ("GaussKDDPStrategy", "GaussKFSDPStrategy", "GaussKLocalSGDStrategy", "GaussKTelemetry", "GradientDistributionMonitor", "telemetry_figures")

try:
    from lightning.pytorch.strategies import StrategyRegistry as _registry
except ModuleNotFoundError as _err:  # raw torch or Accelerate without Lightning
    if not (_err.name or "").startswith(("lightning", "pytorch_lightning")):
        raise
    _missing_lightning: ModuleNotFoundError | None = _err
else:
    _missing_lightning = None
    from lightning_gaussk.observe.monitor import GradientDistributionMonitor
    from lightning_gaussk.frontends.lightning_fsdp import GaussKFSDPStrategy
    from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy
    from lightning_gaussk.frontends.lightning_ddp import GaussKDDPStrategy
    from lightning_gaussk.observe.telemetry import GaussKTelemetry, telemetry_figures

    GaussKDDPStrategy.register_strategies(_registry)  # makes Trainer(strategy="gaussk_ddp") resolve
    GaussKFSDPStrategy.register_strategies(_registry)  # "gaussk_fsdp"
    GaussKLocalSGDStrategy.register_strategies(_registry)  # "gaussk_local", "gaussk_local_spawn", "diloco"
    from lightning_gaussk.frontends.fabric import register_fabric_strategies

    register_fabric_strategies()  # the same names in Fabric's registry: L.Fabric(strategy="gaussk_ddp")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES and _missing_lightning is not None:
        raise ModuleNotFoundError(
            f"lightning_gaussk.{name} needs Lightning (`pip install lightning`): {_missing_lightning}", name="lightning"
        )
    raise AttributeError(f"module 'lightning_gaussk' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "GaussKConfig",
    "GaussKDDPStrategy",
    "GaussKFSDPStrategy",
    "GaussKLocalSGDStrategy",
    "GaussKState",
    "GaussKTelemetry",
    "GradientDistributionMonitor",
    "SparseLocalSGD",
    "accumulate_select",
    "available_selectors",
    "gaussk_hook",
    "get_selector",
    "register_selector",
    "select",
    "telemetry_figures",
]
