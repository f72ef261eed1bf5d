"""Layer 5, the engine: one pipeline of parts under three drivers (above :mod:`lightning_gaussk.config`).

- :mod:`~lightning_gaussk.engine.store`: residuals and velocities per parameter or shard;
- :mod:`~lightning_gaussk.engine.state`: :class:`GaussKState`, the parts and clocks of one rank;
- :mod:`~lightning_gaussk.engine.pipeline`: the core entry, gather u -> topology in -> select ->
  exchange -> commit -> topology out;
- :mod:`~lightning_gaussk.engine.timing`: stage clocks;
- the drivers: :mod:`~lightning_gaussk.engine.ddp_hook` (a DDP bucket per call),
  :mod:`~lightning_gaussk.engine.fsdp` (an FSDP2 shard per call),
  :mod:`~lightning_gaussk.engine.local` (a pseudo-gradient every ``H`` steps);
- :mod:`~lightning_gaussk.engine.commit`: the commit and the non-finite skip, shared by all three;
- :mod:`~lightning_gaussk.engine.counters`: the telemetry counters of every engine.

Imports: the layers below; never Lightning or Accelerate.
"""
