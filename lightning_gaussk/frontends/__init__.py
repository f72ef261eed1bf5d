"""Layer 8, the front ends: the Lightning strategies and Accelerate, wiring over the drivers.

Imports: every layer below. The public modules at the package root (``lightning_gaussk``,
``lightning_gaussk.accelerate``, ``lightning_gaussk.local_sgd``, ``lightning_gaussk.fsdp``,
``lightning_gaussk.preflight``) re-export from here and from the engine.
"""
