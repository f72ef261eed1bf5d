"""Sparse local SGD in raw torch: :class:`SparseLocalSGD` (the public path; the driver lives in
:mod:`lightning_gaussk.engine.local_sgd`)."""

from lightning_gaussk.engine.local_sgd import LOCAL_SGD_COUNTERS, SparseLocalSGD, local_grad_hook

__all__ = ["LOCAL_SGD_COUNTERS", "SparseLocalSGD", "local_grad_hook"]
