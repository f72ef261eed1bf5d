"""Sparse local SGD in raw torch: :class:`SparseLocalSGD` (the public path; the driver and its
parts live in :mod:`lightning_gaussk.engine.local`), and its checkpoints on any layout:
:func:`save_local_sgd` / :func:`restore_local_sgd` (:mod:`lightning_gaussk.checkpoint.protocol`)."""

from lightning_gaussk.checkpoint.protocol import restore_local_sgd, save_local_sgd
from lightning_gaussk.engine.counters import LOCAL_SGD_COUNTERS
from lightning_gaussk.engine.local.driver import SparseLocalSGD
from lightning_gaussk.engine.local.grad_hook import local_grad_hook

__all__ = ["LOCAL_SGD_COUNTERS", "SparseLocalSGD", "local_grad_hook", "restore_local_sgd", "save_local_sgd"]
