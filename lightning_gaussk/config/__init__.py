"""Option declarations, beside the bottom of the stack: every layer may read them; they read only
the registries below them (selectors, exchanges) and the formula of ``k``.

- :mod:`~lightning_gaussk.config.declare`: how an option is declared (default, doc, check) and
  what is derived from it (validation, checkpoint form, ``GAUSSK_*`` environment variables);
- :mod:`~lightning_gaussk.config.options`: :class:`GaussKConfig`, the per-step engine's options;
- :mod:`~lightning_gaussk.config.local`: :class:`LocalSGDConfig`, local SGD's options.
"""

from lightning_gaussk.config.declare import ENV_PREFIX, parse_env
from lightning_gaussk.config.local import OUTERS, LocalSGDConfig
from lightning_gaussk.config.options import (
    ADAM_REMEDIES,
    DENSE_FALLBACKS,
    HIERARCHIES,
    REMEDIES,
    GaussKConfig,
    bucket_k,
    config_fields,
    env_options,
    env_var,
    unknown_env_vars,
    warn_unknown_env_vars,
)

__all__ = [
    "ADAM_REMEDIES",
    "DENSE_FALLBACKS",
    "ENV_PREFIX",
    "HIERARCHIES",
    "OUTERS",
    "REMEDIES",
    "GaussKConfig",
    "LocalSGDConfig",
    "bucket_k",
    "config_fields",
    "env_options",
    "env_var",
    "parse_env",
    "unknown_env_vars",
    "warn_unknown_env_vars",
]
