"""Per-step telemetry of the GaussK comm hook: ``telemetry_figures`` and the ``GaussKTelemetry`` callback.

The hook keeps cumulative integer counters in ``GaussKState.telemetry`` (saved with the state,
so they continue across a resume; declared, with local SGD's, in
:mod:`lightning_gaussk.engine.counters`). A step's figures are differences of two readings::

    before = dict(strategy.gaussk_state.telemetry)
    ...  # one optimizer step
    figures = telemetry_figures(before, strategy.gaussk_state.telemetry, world_size)

Cost per bucket and step when nothing else is asked: a few integer additions and, on CPU
buckets, three host clock reads and one lock. Times are not measured for accelerator buckets
(host clocks would only time kernel launches and would need a synchronisation to mean more).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning_gaussk.engine.counters import counter_diff
from lightning_gaussk.engine.timing import fold as fold_device_times

__all__ = ["EVENT_FIGURES", "FIGURES", "LOCAL_FIGURES", "GaussKTelemetry", "local_sgd_figures", "telemetry_figures"]

FIGURES = (
    "bytes_sent",
    "bytes_dense",
    "compression",
    "traffic_vs_allreduce",
    "density",
    "select_ms",
    "comm_ms",
    "hook_ms",
    "hook_calls",
    "skipped_buckets",
    "residual_ratio",
    "bytes_intra",
    "bytes_inter",
    "intra_ms",
    "inter_ms",
    "decode_ms",
)
#: figures of local SGD (``"gaussk_local"``), see :func:`local_sgd_figures`
LOCAL_FIGURES = (
    "outer_steps",
    "skipped_outer_steps",
    "bytes_per_inner_step",
    "bytes_dense",
    "compression",
    "outer_ms",
    "exposed_ms",
    "hidden_ms",
    "window_position",
)
#: figures present only on some steps: logged straight to the loggers at those steps (see :class:`GaussKTelemetry`)
EVENT_FIGURES = ("outer_ms", "exposed_ms", "hidden_ms", "residual_ratio")
_DEFAULT_PROG_BAR = ("density", "compression", "select_ms", "bytes_per_inner_step")


def telemetry_figures(before: Mapping[str, int], after: Mapping[str, int], world_size: int,
                      nodes: int | None = None) -> dict[str, float]:  # fmt: skip
    """Figures of the steps between two readings of ``GaussKState.telemetry``.

    - ``bytes_sent``: bytes this rank contributed to the all-gather (``(2k + 1) * 4`` per bucket);
    - ``bytes_dense``: bytes of the dense buckets they replace;
    - ``compression``: ``bytes_dense / bytes_sent``;
    - ``traffic_vs_allreduce`` (``world_size > 1``): bytes this rank receives in the all-gather,
      ``(W - 1) * bytes_sent``, over what a ring all-reduce moves, ``2 (W - 1) / W * bytes_dense``;
      above 1 the sparse exchange moves more data than dense DDP would;
    - ``density``: entries sent over entries (``sum k / sum d``);
    - ``select_ms``, ``comm_ms``, ``hook_ms`` (CPU buckets only; absent otherwise): wall time in
      selection, from issuing the all-gather to its completion callback (waiting for the slowest
      rank included), and in the hook body;
    - ``hook_calls``, ``skipped_buckets``: buckets compressed, and buckets whose residual update
      was skipped for a non-finite ``u``.

    Node mode (``nodes`` = N given, the hook counted intra-node bytes): ``bytes_intra`` and
    ``bytes_inter`` (this rank's bytes inside its node and to other nodes, ``= bytes_sent``),
    ``intra_ms``, ``inter_ms``, ``decode_ms`` (CPU buckets); ``traffic_vs_allreduce`` then counts
    the ``N - 1`` messages a rank receives from other nodes, ``(N - 1) * bytes_sent``, over the
    ring all-reduce's ``2 (W - 1) / W * bytes_dense``.
    Empty when the hook did not run in between.
    """
    diff = counter_diff(before, after)
    calls = diff.get("hook_calls", 0)
    if calls <= 0:
        return {}
    sent, dense = diff.get("bytes_sent", 0), diff.get("bytes_dense", 0)
    out: dict[str, float] = {"bytes_sent": float(sent), "bytes_dense": float(dense)}
    out["compression"] = dense / sent if sent > 0 else math.inf
    node_mode = nodes is not None and diff.get("bytes_intra", 0) > 0
    peers = nodes if node_mode and nodes is not None else world_size
    if world_size > 1 and dense > 0:
        out["traffic_vs_allreduce"] = ((peers - 1) * sent) / (2 * (world_size - 1) / world_size * dense)
    if diff.get("entries_total", 0) > 0:
        out["density"] = diff["entries_sent"] / diff["entries_total"]
    if diff.get("hook_ns", 0) > 0:  # timed (host clocks on CPU, CUDA events on a GPU)
        out["select_ms"] = diff.get("select_ns", 0) / 1e6
        out["comm_ms"] = diff.get("comm_ns", 0) / 1e6
        out["hook_ms"] = diff["hook_ns"] / 1e6
    if node_mode:
        out["bytes_intra"] = float(diff["bytes_intra"])
        out["bytes_inter"] = float(diff.get("bytes_inter", 0))
        if diff.get("hook_ns", 0) > 0:
            for key in ("intra", "inter", "decode"):
                out[f"{key}_ms"] = diff.get(f"{key}_ns", 0) / 1e6
    out["hook_calls"] = float(calls)
    out["skipped_buckets"] = float(diff.get("skipped_buckets", 0))
    return out


def local_sgd_figures(
    before: Mapping[str, int], after: Mapping[str, int], window_position: int, dense_bytes_per_step: int | None = None
) -> dict[str, float]:
    """Figures of local SGD (:class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` ``.telemetry``)
    between two readings taken around optimizer steps:

    - ``outer_steps``, ``skipped_outer_steps``: run so far (skipped: a rank's pseudo-gradient was
      non-finite, nothing of the step kept);
    - ``bytes_per_inner_step``: this rank's outer-step message bytes so far over its optimizer
      steps so far (what per-step data parallelism would compare against);
    - ``bytes_dense`` (with ``dense_bytes_per_step``, ``SparseLocalSGD.dense_bytes_per_step``):
      what dense DDP would have all-reduced over the same optimizer steps so far,
      ``dense_bytes_per_step * inner_steps``;
    - ``compression`` (with ``dense_bytes_per_step``, once an outer step has sent bytes):
      ``bytes_dense`` over this rank's outer-step bytes so far (``bytes_sent``), the factor fewer;
    - ``outer_ms``: host time of the outer step(s) in between (launches, landings), present only
      when one ran;
    - ``exposed_ms`` / ``hidden_ms`` (present only when an exchange finished in between): the host's
      wait for outer exchanges, and their time behind inner steps (``overlap_steps > 0``; launch
      to completion, seen at the next optimizer step);
    - ``window_position``: optimizer steps into the current window (0 right after an outer step).

    Empty when no optimizer step was taken in between."""
    diff = counter_diff(before, after)
    if diff.get("inner_steps", 0) == 0:
        return {}
    inner = int(after.get("inner_steps", 0))
    out = {
        "outer_steps": float(after.get("outer_steps", 0)),
        "skipped_outer_steps": float(after.get("skipped_outer_steps", 0)),
        "bytes_per_inner_step": int(after.get("bytes_sent", 0)) / inner if inner else 0.0,
        "window_position": float(window_position),
    }
    if dense_bytes_per_step is not None:
        out["bytes_dense"] = float(dense_bytes_per_step * inner)
        sent = int(after.get("bytes_sent", 0))
        if sent > 0:
            out["compression"] = out["bytes_dense"] / sent
    if diff.get("outer_steps", 0) > 0 or diff.get("outer_ns", 0) > 0:  # a launch, or only a landing
        out["outer_ms"] = diff.get("outer_ns", 0) / 1e6
    if diff.get("outer_exposed_ns", 0) > 0:
        out["exposed_ms"] = diff["outer_exposed_ns"] / 1e6
        out["hidden_ms"] = diff.get("outer_hidden_ns", 0) / 1e6
    return out


class GaussKTelemetry(Callback):
    """Log the GaussK hook's per-step telemetry (see :func:`telemetry_figures`) with ``self.log``;
    under ``"gaussk_local"`` (local SGD), the outer loop's figures (:func:`local_sgd_figures`)
    after each optimizer step.

    Args:
        prog_bar: show figures in the progress bar: True for ``density``, ``compression`` and
            ``select_ms`` (local SGD: ``bytes_per_inner_step``), or a sequence of figure names.
        residual_norm_every_n_steps: every n optimizer steps also measure
            ``residual_ratio = ||residual|| / ||grad||`` over all buckets (two extra read passes per
            bucket on that step, no host sync in the hook; the value is read when logged). 0 = never.
        prefix: first part of the logged names (``<prefix>/<figure>``).

    Figures are this rank's (rank 0's reach the logger); they follow ``log_every_n_steps`` like any
    ``self.log`` value. The figures of :data:`EVENT_FIGURES`, present only on some steps
    (``outer_ms`` on the steps that ran an outer step, ``residual_ratio`` on the steps it was
    measured), go straight to ``trainer.loggers`` at those steps instead (whatever
    ``log_every_n_steps``; rank 0; the step Lightning's own rows of that step carry): ``self.log``
    would send a value logged on one step again on every later logging step of the epoch
    (Lightning keeps each key's last value until the epoch ends). They also go to
    ``trainer.callback_metrics`` and the progress bar (``self.log(..., logger=False)``), where the
    latest value stays. The latest figures are in ``last`` on every rank. Under a strategy without
    GaussK hook state (e.g. plain ``"ddp"``) it warns once and logs nothing.
    """

    def __init__(
        self,
        prog_bar: bool | Sequence[str] = False,
        residual_norm_every_n_steps: int = 0,
        prefix: str = "gaussk",
    ) -> None:
        super().__init__()
        if isinstance(prog_bar, bool):
            self.prog_bar: tuple[str, ...] = _DEFAULT_PROG_BAR if prog_bar else ()
        elif isinstance(prog_bar, Sequence) and not isinstance(prog_bar, str) and all(isinstance(x, str) for x in prog_bar):
            unknown = [x for x in prog_bar if x not in FIGURES + LOCAL_FIGURES]
            if unknown:
                raise ValueError(f"`prog_bar`: unknown figures {unknown}; choose from {list(FIGURES + LOCAL_FIGURES)}")
            self.prog_bar = tuple(prog_bar)
        else:
            raise TypeError(f"`prog_bar` must be a bool or a sequence of figure names, got {prog_bar!r}")
        n = residual_norm_every_n_steps
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"`residual_norm_every_n_steps` must be an int >= 0, got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"`residual_norm_every_n_steps` must be an int >= 0, got {n!r}")
        self.residual_norm_every_n_steps = n
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"`prefix` must be a non-empty str, got {prefix!r}")
        self.prefix = prefix.rstrip("/")
        self.last: dict[str, float] = {}
        self._before: dict[str, int] | None = None
        self._norms_step: int | None = None

    @staticmethod
    def _state(trainer: "pl.Trainer") -> Any:
        return getattr(trainer.strategy, "gaussk_state", None)

    @staticmethod
    def _local(trainer: "pl.Trainer") -> Any:
        return getattr(trainer.strategy, "local_sgd", None)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._before = None
        state = self._state(trainer) or self._local(trainer)
        if state is None:
            rank_zero_warn(
                f"GaussKTelemetry: strategy {type(trainer.strategy).__name__} has no GaussK hook state; "
                "no telemetry is logged (use gaussk_ddp, gaussk_fsdp or gaussk_local)."
            )
            return
        if self.residual_norm_every_n_steps and self._state(trainer) is None:
            rank_zero_warn("GaussKTelemetry: `residual_norm_every_n_steps` has no residual to measure under local SGD; it is not used.")
        self._before = dict(state.telemetry)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        local = self._local(trainer)
        if self._before is None or local is None:
            return
        now = dict(local.telemetry)
        figures = local_sgd_figures(self._before, now, local.window_position, dense_bytes_per_step=local.dense_bytes_per_step)
        if figures:  # an optimizer step (and maybe the outer step) ran in this batch
            self._before = now
            self._log(pl_module, figures)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        n = self.residual_norm_every_n_steps
        if n and self._before is not None and self._state(trainer) is not None and self._norms_step != trainer.global_step and (trainer.global_step + 1) % n == 0:
            self._norms_step = trainer.global_step
            self._state(trainer).measure_norms_next_step()

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        state = self._state(trainer)
        if self._before is None or state is None:
            return
        fold_device_times(state)  # GPU stage times whose CUDA events are complete (no sync)
        now = dict(state.telemetry)
        figures = telemetry_figures(self._before, now, trainer.world_size, nodes=state.layout.nodes)
        self._before = now
        if not figures:
            return
        if self._norms_step == trainer.global_step and state.norms:
            r2 = sum(r.double().square() for r, _ in state.norms.values())
            g2 = sum(g.double().square() for _, g in state.norms.values())
            figures["residual_ratio"] = float(torch.sqrt(r2 / g2)) if float(g2) > 0 else float("nan")
            state.norms = {}
        self._log(pl_module, figures)

    def _log(self, pl_module: "pl.LightningModule", figures: dict[str, float]) -> None:
        self.last = figures
        events: dict[str, float] = {}
        for name, value in figures.items():
            if not math.isfinite(value):
                continue
            event = name in EVENT_FIGURES
            if event:
                events[f"{self.prefix}/{name}"] = value
            pl_module.log(
                f"{self.prefix}/{name}", value, on_step=True, on_epoch=False, prog_bar=name in self.prog_bar, logger=not event
            )
        if events:
            _log_now(pl_module.trainer, events)


def _log_now(trainer: "pl.Trainer", metrics: dict[str, float]) -> None:
    """``metrics`` to every logger now, on rank 0, at the step Lightning's rows of this optimizer
    step carry (its ``_batches_that_stepped``, as Lightning's ``LearningRateMonitor`` logs);
    nothing when logging is off (``log_every_n_steps=0``, no logger)."""
    if not trainer.is_global_zero or not trainer.loggers or trainer.log_every_n_steps == 0:
        return
    step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", trainer.global_step)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
