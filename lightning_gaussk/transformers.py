"""Hugging Face Transformers: ``register_gaussk(trainer, **options)`` after building a
``transformers.Trainer`` (the public path; the wiring lives in
:mod:`lightning_gaussk.frontends.transformers`)."""

from lightning_gaussk.frontends.transformers import FSDP_RECIPE, LOG_PREFIX, GaussKCallback, register_gaussk

__all__ = ["FSDP_RECIPE", "LOG_PREFIX", "GaussKCallback", "register_gaussk"]
