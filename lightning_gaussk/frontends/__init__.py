"""Layer 8, the front ends: the Lightning strategies and Accelerate, wiring over the drivers.

Every front end uses one wiring module, :mod:`~lightning_gaussk.frontends.wiring`: the options and
``GAUSSK_*`` variables, the deferred restore, the step and loss scale, the checkpoint adapter and
the teardown; the strategies are short lifecycle overrides over it.

Imports: every layer below. The public modules at the package root (``lightning_gaussk``,
``lightning_gaussk.accelerate``, ``lightning_gaussk.local_sgd``, ``lightning_gaussk.fsdp``,
``lightning_gaussk.preflight``) re-export from here and from the engine.
"""
