"""Sparse local SGD in raw torch: :class:`SparseLocalSGD` (the public path; the driver and its
parts live in :mod:`lightning_gaussk.engine.local`)."""

from lightning_gaussk.engine.counters import LOCAL_SGD_COUNTERS
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.engine.local.grad_hook import local_grad_hook

__all__ = ["LOCAL_SGD_COUNTERS", "SparseLocalSGD", "local_grad_hook"]
