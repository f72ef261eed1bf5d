"""FSDP2 across nodes: ``register_gaussk_fsdp(model, mesh, **options)`` and its shard checkpoints
(the public path; the driver lives in :mod:`lightning_gaussk.engine.fsdp`, the checkpoints in
:mod:`lightning_gaussk.checkpoint.protocol`)."""

from lightning_gaussk.checkpoint.protocol import restore_fsdp_shards, save_fsdp_shards
from lightning_gaussk.engine.fsdp import MESH_DIMS, GaussKFSDPState, register_gaussk_fsdp

__all__ = ["MESH_DIMS", "GaussKFSDPState", "register_gaussk_fsdp", "restore_fsdp_shards", "save_fsdp_shards"]
