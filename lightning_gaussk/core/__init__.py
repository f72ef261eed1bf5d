"""The algorithm, free of DDP, Lightning and Accelerate: one pipeline of parts with one job each.

- :mod:`~lightning_gaussk.core.log`: rank-zero messages without Lightning;
- :mod:`~lightning_gaussk.core.codec`: the ``[values | int32 index bits | flag]`` message;
- :mod:`~lightning_gaussk.core.exchange`: how selections become the averaged update (all-gather,
  dense all-reduce, the bounded sparse all-reduce), each reporting what it delivered;
- :mod:`~lightning_gaussk.core.store`: residuals and velocities per parameter or shard;
- :mod:`~lightning_gaussk.core.pipeline`: the core entry, gather u -> topology in -> select ->
  exchange -> commit -> topology out.

Drivers (the DDP comm hook, and later FSDP2 and local SGD) turn their own world into calls of the
core entry; integrations (the Lightning strategy, Accelerate) are wiring on top of the drivers.
"""
