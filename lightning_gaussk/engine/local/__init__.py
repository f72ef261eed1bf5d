"""Sparse local SGD in four small parts and a driver (torch's model averagers and
``PostLocalSGDOptimizer``, torchft's DiLoCo):

- :mod:`~lightning_gaussk.engine.local.schedule`: *when* a fragment syncs (every ``H`` optimizer
  steps; fragment ``f`` of ``F`` at its offset);
- :mod:`~lightning_gaussk.engine.local.fragment`: *what* syncs: a set of parameters with its own
  ``theta``, error feedback, update buffer, node-mode slot and per-name views;
- :mod:`~lightning_gaussk.engine.local.outer`: the outer optimizer (Nesterov, plain SGD), pluggable;
- :mod:`~lightning_gaussk.engine.local.exchange`: *how*: the selection, the exchange and the node
  topology, launched and finished apart;
- :mod:`~lightning_gaussk.engine.local.driver`: :class:`SparseLocalSGD`, which runs them from the
  optimizer's post-step hook; :mod:`~lightning_gaussk.engine.local.grad_hook`: the DDP comm hook
  that keeps each rank's gradient local.

The commit and the non-finite skip are the per-step engine's (:mod:`lightning_gaussk.engine.commit`).
"""
