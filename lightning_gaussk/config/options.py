"""``GaussKConfig``: every option of the hook, declared once.

Each field carries its type, its default and a one-line doc (``field.metadata["doc"]``, declared by
:func:`~lightning_gaussk.config.declare.option`). The rest is derived from the fields, by the
helpers of :mod:`lightning_gaussk.config.declare` that every options class shares:

- validation (:meth:`GaussKConfig.__post_init__`): ``TypeError``/``ValueError`` naming the
  argument, the value and what is allowed;
- checkpoints (:meth:`~GaussKConfig.to_dict`, :meth:`~GaussKConfig.from_dict`);
- environment variables (:func:`env_var`: ``GAUSSK_`` + the upper-cased name, parsed by the
  field's type, :meth:`~GaussKConfig.from_env`);
- the documented keyword arguments of :class:`~lightning_gaussk.GaussKDDPStrategy` and of
  :func:`~lightning_gaussk.frontends.accelerate.register_gaussk` (a test checks that the strategy's
  signature, the fields and the variables agree).

The one rule that turns a density into a count of entries, :func:`bucket_k`, lives in the pure
:mod:`lightning_gaussk.costs.model` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_gaussk.config import declare
from lightning_gaussk.config.declare import ENV_PREFIX, option
from lightning_gaussk.costs.model import bucket_k  # the one formula of k (re-exported here)

__all__ = [
    "DENSE_FALLBACKS",
    "HIERARCHIES",
    "REMEDIES",
    "ADAM_REMEDIES",
    "GaussKConfig",
    "bucket_k",
    "config_fields",
    "env_options",
    "env_var",
    "unknown_env_vars",
]

DENSE_FALLBACKS = ("auto", "never")
HIERARCHIES = ("auto", "flat", "node")
REMEDIES = ("auto", "all", "none")
ADAM_REMEDIES = ("freeze", "amsgrad", "none")


@dataclass(frozen=True)
class GaussKConfig:
    """The options of :func:`~lightning_gaussk.gaussk_hook`, validated at construction.

    ``k = ceil(density * d)`` entries of each bucket of ``d`` entries are sent per step
    (:func:`bucket_k`). Build it from keywords, ``GaussKConfig.from_env()``,
    ``GaussKConfig.from_dict(checkpoint_config)``, or change one option with ``cfg.replace(...)``.
    """

    density: float = option(0.001, "fraction of each gradient bucket sent per step, k / d, in (0, 1]")
    selector: str = option("gaussk", "selection method: gaussk, topk, dgc, randk or a name registered with register_selector")
    error_feedback: bool = option(True, "carry what was not sent over to the next step (TopK-SGD); False drops it")
    warmup_steps: int = option(0, "optimizer steps over which density decays geometrically from warmup_density (0: none)")
    warmup_density: float | None = option(None, "density at step 0 when warmup_steps > 0, in [density, 1]")
    seed: int = option(0, "seed of randomised selectors, combined with the step and the bucket index")
    dense_fallback: Literal["auto", "never"] = option(
        "auto", "auto: a bucket goes dense when sparse cannot be cheaper (the byte rule of costs.policy, and the cost model "
        "with link_gbit); never: always sparse"
    )
    link_gbit: float | Literal["measure"] | None = option(
        None, "inter-node link bandwidth in Gbit/s for the cost model of dense_fallback and exchange='auto' (None: byte "
        "rule only); 'measure': timed once at setup with real collectives (lightning_gaussk.preflight), rank 0's "
        "figure used by every rank"
    )
    exchange: str = option(
        "allgather", "how selections are combined: allgather (every rank's k entries to every rank, ~2k(P-1) words per "
        "rank; the update holds up to P k entries), allreduce (bounded sparse all-reduce, at most ~6k(P-1)/P words per "
        "rank whatever P; the update holds ~1.5k entries), auto (per bucket, the cheaper by the cost model; dense "
        "where that is cheaper still), or a name registered with comm.registry.register_exchange"
    )
    hierarchy: Literal["auto", "flat", "node"] = option(
        "auto", "flat: every rank sparsifies its whole bucket; node: reduce-scatter inside a node, sparsify a 1/L shard "
        "across nodes; auto: node when the job spans several nodes of several ranks"
    )
    ranks_per_node: int | None = option(None, "ranks per node L for node mode (None: from the launcher); must divide the world size")
    remedies: Literal["auto", "all", "none"] = option(
        "auto", "auto: the strategy (or remedies.wrap_optimizer) adapts recognised optimizers: Adam/AdamW get "
        "adam_remedy; all: also SGD momentum moves into the hook (momentum_correction; measured mixed, docs/convergence.md); "
        "none: optimizers run unchanged"
    )
    momentum_correction: float | None = option(
        None, "DGC momentum correction: the hook keeps a velocity u = m u + g per entry, accumulates it in the residual "
        "and zeroes it where sent (factor masking); the optimizer must then run without momentum (None: off)"
    )
    momentum_masking: bool = option(
        True, "with momentum_correction: zero the velocity where an entry is sent (DGC's factor masking); False keeps it, "
        "so every gradient contributes 1 / (1 - m) in total, as in dense momentum SGD"
    )
    adam_remedy: Literal["freeze", "amsgrad", "none"] = option(
        "none", "Adam/AdamW under remedies='auto': none (measured best over 1600 steps), freeze (second moment frozen "
        "after variance_freeze_steps, 1-bit Adam style), amsgrad (max of the second moment)"
    )
    variance_freeze_steps: int | None = option(
        None, "optimizer steps after which adam_remedy='freeze' freezes Adam's second moment (None: warmup_steps, or "
        "100 with a density warm-up from 1.0 added over them when there is none)"
    )

    def __post_init__(self) -> None:
        self._validate()
        for name in ("density", "warmup_density", "link_gbit", "momentum_correction"):  # ints given for floats become floats
            value = getattr(self, name)
            if value is not None and value != "measure":
                object.__setattr__(self, name, float(value))

    def _validate_exchange(self) -> None:
        from lightning_gaussk.comm.registry import available_exchanges

        choices = ["auto", *(e for e in available_exchanges() if e != "dense")]
        if not isinstance(self.exchange, str) or self.exchange not in choices:
            raise ValueError(f"`exchange` must be one of {choices}, got {self.exchange!r}")

    def _validate(self) -> None:
        density, warmup_density, warmup_steps = self.density, self.warmup_density, self.warmup_steps
        if self.dense_fallback not in DENSE_FALLBACKS:
            raise ValueError(f"`dense_fallback` must be one of {DENSE_FALLBACKS}, got {self.dense_fallback!r}")
        link = self.link_gbit
        if link is not None and link != "measure" and (isinstance(link, bool) or not isinstance(link, (int, float)) or not 0 < link < math.inf):
            raise ValueError(f"`link_gbit` must be a number of Gbit/s > 0, 'measure' or None, got {link!r}")
        if link is not None and self.dense_fallback == "never":
            raise ValueError(
                f"`link_gbit` = {link!r} has no effect with `dense_fallback` = 'never' (the cost model only decides "
                "under 'auto'): set `dense_fallback` = 'auto' or leave `link_gbit` None"
            )
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"`density` must be a float in (0, 1], got {type(density).__name__} {density!r}")
        if not (0.0 < density <= 1.0):  # also rejects NaN
            raise ValueError(f"`density` must be in (0, 1], got {density!r}")
        self._validate_exchange()
        from lightning_gaussk.selection.selectors import available_selectors, get_selector

        if not isinstance(self.selector, str):
            raise TypeError(f"`selector` must be a str, one of {available_selectors()}, got {self.selector!r}")
        get_selector(self.selector)  # ValueError listing the choices
        if not isinstance(self.error_feedback, bool):
            raise TypeError(f"`error_feedback` must be a bool, got {self.error_feedback!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}")
        if warmup_density is not None:
            if isinstance(warmup_density, bool) or not isinstance(warmup_density, (int, float)):
                raise TypeError(f"`warmup_density` must be a float or None, got {warmup_density!r}")
            if not (density <= warmup_density <= 1.0):
                raise ValueError(
                    f"`warmup_density` must be in [density, 1] = [{density}, 1] (warm-up starts denser), got {warmup_density!r}"
                )
        if warmup_steps > 0 and warmup_density is None:
            raise ValueError(
                f"`warmup_steps` = {warmup_steps} > 0 needs `warmup_density` (the density at step 0, in [density, 1]), got None"
            )
        if warmup_steps == 0 and warmup_density is not None:
            raise ValueError(
                f"`warmup_density` = {warmup_density!r} has no effect with `warmup_steps` = 0: "
                "set `warmup_steps` > 0 or leave `warmup_density` None"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}")
        if self.hierarchy not in HIERARCHIES:
            raise ValueError(f"`hierarchy` must be one of {HIERARCHIES}, got {self.hierarchy!r}")
        rpn = self.ranks_per_node
        if rpn is not None and (isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1):
            raise ValueError(f"`ranks_per_node` must be an int >= 1 (dividing the world size) or None, got {rpn!r}")
        if self.remedies not in REMEDIES:
            raise ValueError(f"`remedies` must be one of {REMEDIES}, got {self.remedies!r}")
        if self.adam_remedy not in ADAM_REMEDIES:
            raise ValueError(f"`adam_remedy` must be one of {ADAM_REMEDIES}, got {self.adam_remedy!r}")
        mc = self.momentum_correction
        if mc is not None:
            if isinstance(mc, bool) or not isinstance(mc, (int, float)) or not 0.0 <= mc < 1.0:
                raise ValueError(f"`momentum_correction` must be a momentum factor in [0, 1) or None, got {mc!r}")
        if not isinstance(self.momentum_masking, bool):
            raise TypeError(f"`momentum_masking` must be a bool, got {self.momentum_masking!r}")
        vfs = self.variance_freeze_steps
        if vfs is not None and (isinstance(vfs, bool) or not isinstance(vfs, int) or vfs < 0):
            raise ValueError(f"`variance_freeze_steps` must be an int >= 0 or None, got {vfs!r}")

    # ------------------------------------------------------------------ derived forms
    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, one per field (what checkpoints store)."""
        return declare.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GaussKConfig:
        """Inverse of :meth:`to_dict`. Fields missing from ``data`` (a checkpoint written before
        they existed) take their defaults; unknown keys raise ``ValueError`` naming them."""
        return declare.from_dict(cls, data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GaussKConfig:
        """Keywords > ``GAUSSK_*`` variables (:func:`env_options`) > defaults, validated; an
        invalid value that came from the environment is reported with its variable."""
        return declare.from_env(cls, os.environ if environ is None else environ, overrides)

    def replace(self, **changes: Any) -> GaussKConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def freeze_step(self) -> int:
        """The optimizer step from which ``adam_remedy="freeze"`` keeps Adam's second moment fixed."""
        if self.variance_freeze_steps is not None:
            return self.variance_freeze_steps
        return self.warmup_steps if self.warmup_steps > 0 else 100

    def density_at(self, step: int) -> float:
        """``density`` after warm-up; before it ``warmup_density * (density / warmup_density)^(step / warmup_steps)``."""
        if step >= self.warmup_steps or self.warmup_density is None:
            return self.density
        return self.warmup_density * (self.density / self.warmup_density) ** (step / self.warmup_steps)


def config_fields() -> dict[str, dataclasses.Field[Any]]:
    """The options, in declaration order: name -> dataclass field (type, default, ``metadata["doc"]``)."""
    return {f.name: f for f in dataclasses.fields(GaussKConfig)}


def env_var(name: str) -> str:
    """The environment variable of option ``name``: ``GAUSSK_`` + ``name.upper()``."""
    if name not in config_fields():
        raise ValueError(f"`name` must be a GaussKConfig option, one of {list(config_fields())}, got {name!r}")
    return ENV_PREFIX + name.upper()


def env_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """The options set by ``GAUSSK_*`` variables in ``environ``, parsed by each field's type
    (unvalidated; ``ValueError`` naming the variable for text that does not parse)."""
    return declare.env_values(GaussKConfig, environ)


def unknown_env_vars(environ: Mapping[str, str], also_known: tuple[str, ...] = ()) -> list[str]:
    """``GAUSSK_*`` names in ``environ`` that are no option's variable (likely typos)."""
    known = {env_var(n) for n in config_fields()} | set(also_known)
    return sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known)


def warn_unknown_env_vars(environ: Mapping[str, str], also_known: tuple[str, ...] = ()) -> None:
    """Warn, listing the known ones, about ``GAUSSK_*`` variables that name no option (a typo
    would otherwise be ignored without a word)."""
    unknown = unknown_env_vars(environ, also_known)
    if unknown:
        known = sorted({env_var(n) for n in config_fields()} | set(also_known))
        warnings.warn(f"Unknown GaussK environment variable(s) {unknown} ignored; known: {known}", stacklevel=3)
