"""Hugging Face Accelerate: ``register_gaussk(accelerator, model, **options)`` after
``accelerator.prepare(...)`` (the public path; the wiring lives in
:mod:`lightning_gaussk.frontends.accelerate`)."""

from lightning_gaussk.frontends.accelerate import (
    DISABLE_VAR,
    ENV_VARS,
    FSDP_RECIPE,
    config_from_env,
    find_ddp_module,
    register_gaussk,
)

__all__ = ["DISABLE_VAR", "ENV_VARS", "FSDP_RECIPE", "config_from_env", "find_ddp_module", "register_gaussk"]
