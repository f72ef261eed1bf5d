"""``LocalSGDConfig``: every option of sparse local SGD, declared once.

Declared like :class:`~lightning_gaussk.config.GaussKConfig` (:mod:`lightning_gaussk.config.declare`):
each field carries its type, default, one-line doc and check, and from them come the validation
(``TypeError`` / ``ValueError`` naming the argument), the checkpoint form, the ``GAUSSK_*``
variables (``GAUSSK_SYNC_EVERY``, ``GAUSSK_OUTER_LR``, ...) and the documented keywords of
:class:`~lightning_gaussk.local_sgd.SparseLocalSGD` and the ``"gaussk_local"`` strategy (a
LightningCLI yaml key each). Options the per-step engine also has (``density``, ``selector``,
``exchange``, ``dense_fallback``, ``hierarchy``, ``ranks_per_node``, ``seed``) keep its names,
meanings and variables; only the defaults suit an outer step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_gaussk.comm.quant import BITS, MAX_CHUNK
from lightning_gaussk.comm.registry import available_exchanges
from lightning_gaussk.config import declare
from lightning_gaussk.config.declare import (
    ENV_PREFIX,
    boolean,
    in_range,
    integer,
    one_of,
    option,
    optional,
)
from lightning_gaussk.config.options import DENSE_FALLBACKS, HIERARCHIES
from lightning_gaussk.selection.selectors import available_selectors

__all__ = ["OUTERS", "LocalSGDConfig", "local_exchanges"]

#: the default of ``quantize``: 2-bit values (benchmarks/local_defaults.py measured it best)
_QUANTIZE_DEFAULT = 2

#: the outer steps: SparseLoCo's sparse step with error feedback, DiLoCo's dense Nesterov step
OUTERS = ("sparse", "dense")


def local_exchanges() -> list[str]:
    """The exchanges an outer step may name: every registered exchange but ``"dense"`` (the
    byte rule and ``outer="dense"`` choose that one)."""
    return [e for e in available_exchanges() if e != "dense"]


@dataclass(frozen=True)
class LocalSGDConfig:
    """The options of :class:`~lightning_gaussk.local_sgd.SparseLocalSGD`, validated at construction.

    Per outer step, with ``Delta_r = theta - theta_r`` rank ``r``'s pseudo-gradient::

        sparse:  e_r <- ef_decay e_r + Delta_r;  s_r = k entries of e_r;  theta <- theta - outer_lr mean_r s_r
        dense:   m <- outer_momentum m + mean_r Delta_r;  theta <- theta - outer_lr (mean_r Delta_r + outer_momentum m)

    with ``k = ceil(density * d)`` (per chunk of ``chunk`` entries). Build it from keywords,
    ``LocalSGDConfig.from_env()``, ``LocalSGDConfig.from_dict(saved)``, or change one option with
    ``cfg.replace(...)``.

    Raises:
        TypeError / ValueError: for an invalid option, naming it.
    """

    sync_every: int = option(16, "H, optimizer steps between outer steps (>= 1)", integer(1))
    density: float = option(
        0.02, "fraction of the entries sent per outer step, k = ceil(density * d) (per chunk with chunk), in (0, 1]; "
        "ignored by outer='dense'", in_range(0, 1, low_open=True),
    )  # fmt: skip
    outer_lr: float = option(1.5, "alpha, the outer learning rate (> 0)", in_range(0, math.inf, low_open=True, high_open=True))
    ef_decay: float = option(0.95, "beta, the decay of the error-feedback buffer, in [0, 1] (outer='sparse')", in_range(0, 1))
    outer: Literal["sparse", "dense"] = option(
        "sparse", "sparse (SparseLoCo: error feedback, k entries sent) or dense (DiLoCo: outer Nesterov momentum)", one_of(OUTERS)
    )
    chunk: int | None = option(
        4096, "entries per chunk of a chunk-wise exact top-k (None: one whole-tensor selection by selector); at most "
        f"{MAX_CHUNK} with quantize", optional(integer(1)),
    )  # fmt: skip
    quantize: int | None = option(
        _QUANTIZE_DEFAULT, f"None (fp32 values) or bits per sent value, one of {BITS}, with one fp32 scale per chunk (needs chunk and "
        "exchange='allgather'); the rounding error stays in the buffer; ignored by outer='dense'", optional(one_of(BITS)),
    )  # fmt: skip
    selector: str = option("gaussk", "the whole-tensor selection method (chunk=None): a registered selector", one_of(available_selectors))
    exchange: str = option(
        "allgather", "allgather, the bounded allreduce, or another registered sparse exchange", one_of(local_exchanges)
    )
    dense_fallback: Literal["auto", "never"] = option(
        "auto", "auto: the byte rule sends the step dense when sparse cannot move fewer bytes (everything delivered, the "
        "buffer emptied); never: always sparse", one_of(DENSE_FALLBACKS),
    )  # fmt: skip
    outer_momentum: float = option(0.9, "mu, the Nesterov momentum of outer='dense', in [0, 1)", in_range(0, 1, high_open=True))
    hierarchy: Literal["auto", "flat", "node"] = option(
        "auto", "flat, or node mode for the outer step (summed inside each node, one 1/L shard per rank across nodes); "
        "auto: node when the job spans several nodes of several ranks", one_of(HIERARCHIES),
    )  # fmt: skip
    ranks_per_node: int | None = option(
        None, "ranks per node L for node mode (None: from the launcher); must divide the world size", optional(integer(1))
    )
    seed: int = option(0, "seed of randomised selectors", integer())
    overlap_steps: int = option(
        0, "tau, inner steps an outer exchange runs in the background before its update is applied (0: the blocking "
        "outer step); in [0, sync_every)", integer(0),
    )  # fmt: skip
    fragments: int = option(
        1, "F, parameter groups split at module boundaries (balanced by size), each syncing at its own offset in the "
        "window (streaming); in [1, sync_every]", integer(1),
    )  # fmt: skip
    end_on_theta: bool = option(
        True, "at the end of a fit (Lightning, Accelerate's end_training), a last outer step over the partial window so "
        "every rank ends on theta; False: each rank keeps its local model", boolean(),
    )  # fmt: skip

    def __post_init__(self) -> None:
        declare.check_fields(self)
        if self.overlap_steps >= self.sync_every:
            raise ValueError(
                f"`overlap_steps` must be < sync_every={self.sync_every} (an exchange lands before its fragment's next "
                f"outer step), got {self.overlap_steps!r}"
            )
        if self.fragments > self.sync_every:
            raise ValueError(f"`fragments` must be <= sync_every={self.sync_every} (one offset each), got {self.fragments!r}")
        if self.quantize is not None and self.outer == "sparse":
            default = " (the default)" if self.quantize == _QUANTIZE_DEFAULT else ""
            if self.chunk is None or self.chunk > MAX_CHUNK:
                raise ValueError(
                    f"`quantize`={self.quantize!r}{default} needs `chunk` in [1, {MAX_CHUNK}] (one scale per chunk), got "
                    f"chunk={self.chunk!r}; pass quantize=None to send fp32 values"
                )
            if self.exchange != "allgather":
                raise ValueError(
                    f"`quantize`={self.quantize!r}{default} works with exchange='allgather' only, got "
                    f"exchange={self.exchange!r}; pass quantize=None to send fp32 values"
                )

    # ------------------------------------------------------------------ derived forms
    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, one per field."""
        return declare.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalSGDConfig:
        """Inverse of :meth:`to_dict` (missing fields take their defaults; unknown keys raise)."""
        return declare.from_dict(cls, data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> LocalSGDConfig:
        """Keywords > ``GAUSSK_*`` variables (:meth:`env_vars`) > defaults, validated; an invalid
        value that came from the environment is reported with its variable."""
        return declare.from_env(cls, os.environ if environ is None else environ, overrides)

    @classmethod
    def env_vars(cls) -> dict[str, str]:
        """Option name -> its environment variable (``GAUSSK_`` + the upper-cased name)."""
        return {f.name: ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)}

    def replace(self, **changes: Any) -> LocalSGDConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a front end needs to pass on)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}
