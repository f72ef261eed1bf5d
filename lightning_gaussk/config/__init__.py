"""Option declarations, beside the bottom of the stack: every layer may read them; they read only
the registries below them (selectors, exchanges) and the formula of ``k``.

- :mod:`~lightning_gaussk.config.options`: :class:`GaussKConfig`, the per-step engine's options,
  and the ``GAUSSK_*`` environment variables.
"""

from lightning_gaussk.config.options import (
    ADAM_REMEDIES,
    DENSE_FALLBACKS,
    ENV_PREFIX,
    HIERARCHIES,
    REMEDIES,
    GaussKConfig,
    bucket_k,
    config_fields,
    env_options,
    env_var,
    parse_env,
    unknown_env_vars,
    warn_unknown_env_vars,
)

__all__ = [
    "ADAM_REMEDIES",
    "DENSE_FALLBACKS",
    "ENV_PREFIX",
    "HIERARCHIES",
    "REMEDIES",
    "GaussKConfig",
    "bucket_k",
    "config_fields",
    "env_options",
    "env_var",
    "parse_env",
    "unknown_env_vars",
    "warn_unknown_env_vars",
]
