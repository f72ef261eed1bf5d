"""Lightning Fabric: ``L.Fabric(strategy="gaussk_ddp")`` (and ``"gaussk_local"``, ``"diloco"``,
``"gaussk_fsdp"``, ...) after ``import lightning_gaussk``; the strategy classes (the public path;
the wiring lives in :mod:`lightning_gaussk.frontends.fabric`)."""

from lightning_gaussk.frontends.fabric import (
    GaussKFabricDDPStrategy,
    GaussKFabricFSDPStrategy,
    GaussKFabricLocalSGDStrategy,
    refuse_compiled_autograd,
    register_fabric_strategies,
    shard_children,
)

__all__ = [
    "GaussKFabricDDPStrategy",
    "GaussKFabricFSDPStrategy",
    "GaussKFabricLocalSGDStrategy",
    "refuse_compiled_autograd",
    "register_fabric_strategies",
    "shard_children",
]
