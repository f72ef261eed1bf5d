"""lightning_gaussk: TopK-SGD / Gaussian-k gradient sparsification for DDP, Lightning and Accelerate."""

from lightning_gaussk.config import GaussKConfig
from lightning_gaussk.hook import GaussKState, gaussk_hook
from lightning_gaussk.monitor import GradientDistributionMonitor
from lightning_gaussk.selectors import accumulate_select, available_selectors, get_selector, register_selector, select
from lightning_gaussk.strategy import GaussKDDPStrategy
from lightning_gaussk.telemetry import GaussKTelemetry, telemetry_figures

from lightning.pytorch.strategies import StrategyRegistry as _registry

GaussKDDPStrategy.register_strategies(_registry)  # makes Trainer(strategy="gaussk_ddp") resolve

__version__ = "0.1.0"

__all__ = [
    "GaussKConfig",
    "GaussKDDPStrategy",
    "GaussKState",
    "GaussKTelemetry",
    "GradientDistributionMonitor",
    "accumulate_select",
    "available_selectors",
    "gaussk_hook",
    "get_selector",
    "register_selector",
    "select",
    "telemetry_figures",
]
