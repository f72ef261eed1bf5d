"""``GradientDistributionMonitor``: the paper's gradient distribution study, for your own model.

Every ``every_n_steps`` optimizer steps the callback looks at ``u``, the vector that is (or would
be) sparsified on this rank:

- with :class:`~lightning_gaussk.GaussKDDPStrategy`: ``u = grad + residual`` of every DDP
  bucket, copied by the comm hook *before* selection (``GaussKState.capture_next_step``), and
  the indices the configured selector actually chose;
- with any other strategy (plain ``"ddp"``, single device, ...): ``u`` is this rank's local
  gradient, copied by a ``post_accumulate_grad`` hook on each parameter while it is accumulated,
  i.e. before DDP averages it (by the time ``on_before_optimizer_step`` runs, ``p.grad`` already
  holds the average over ranks). All parameters are concatenated into one group named
  ``model`` (the paper's reference code sparsified the whole model as one vector), and the
  selector named by ``selector`` is run on it by the monitor.

For each group (bucket, ``model``, and every parameter when ``per_parameter=True``) it computes
the figures of :func:`~lightning_gaussk.observe.distribution_stats.group_statistics`, logs them through
the trainer's loggers, saves a compact snapshot (histogram counts and a bounded random sample,
never whole gradients; :func:`load_snapshot` reads it back) and, at the end of fit, draws PNG
figures (:mod:`lightning_gaussk.observe.distribution_plots`). The statistics are plain functions of
tensors, usable without Lightning (:mod:`lightning_gaussk.observe.distribution_stats`). Nothing is done,
and nothing is asked of the hook, on steps that are not due.

The statistics and figures were defined here before; they are still importable from this module.
"""

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gaussk.config import bucket_k
from lightning_gaussk.observe.distribution_plots import plot_contraction, plot_distribution
from lightning_gaussk.observe.distribution_stats import (
    group_statistics,
    histogram,
)
from lightning_gaussk.selection.selectors import get_selector, select

__all__ = ["SNAPSHOT_FORMAT", "GradientDistributionMonitor", "load_snapshot"]

SNAPSHOT_FORMAT = "lightning_gaussk.monitor_snapshot/1"
HISTORY_FORMAT = "lightning_gaussk.monitor_history/1"
SUBDIR = "gaussk_monitor"


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """Load a snapshot written by the monitor (``torch.load(weights_only=True)``; no pickled code)."""
    snap = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"load_snapshot: {os.fspath(path)!r} is not a {SNAPSHOT_FORMAT!r} file")
    return snap


# ============================================================================================
# the callback
# ============================================================================================
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")
    return value


class GradientDistributionMonitor(Callback):
    """Measure, every ``every_n_steps`` optimizer steps, how Gaussian the sparsified vector
    ``u`` is and how much Top-k keeps of it (Shi et al. 2019, sections 3-4), for your model.

    Args:
        every_n_steps: analyse the optimizer steps ``s`` with ``(s + 1) % every_n_steps == 0``
            (Lightning's ``log_every_n_steps`` convention; step 0 is skipped unless ``n = 1``).
        ranks: ``"zero"``: only global rank 0 captures and analyses (other ranks do nothing);
            ``"all"``: every rank analyses its own ``u``; the figures are gathered to rank 0
            for logging (one small collective per due step) and names get a ``rank{r}/`` part.
        per_parameter: also analyse each parameter's slice of ``u``
            (``<prefix>/param/<name>/<figure>``).
        max_samples: entries of ``u`` kept per group in the snapshot (uniform random, with
            replacement), and used for the KS distance when ``d > max_samples``.
        bins: histogram bins per group, on ``mean +- hist_range * std``.
        save_dir: where snapshots and figures go; default ``<trainer.log_dir>/gaussk_monitor``.
        plot: draw PNG figures at the end of fit (matplotlib, Agg canvas; pyplot untouched).
        density: ``k/d`` to analyse when the strategy is not GaussK (default 0.001, the paper's);
            with ``GaussKDDPStrategy`` the hook's own ``k`` is used and this must be None.
        selector: selector compared with exact top-k when the strategy is not GaussK (default
            ``"gaussk"``); with ``GaussKDDPStrategy`` the configured one is used (must be None).
        hist_range: half width of the histogram range in standard deviations (> 0).
        log_histograms: also log the sample as a histogram to TensorBoard loggers.
        save_snapshots: write ``snapshots/rank{r}_step{s:07d}.pt`` on due steps.
        prefix: first part of every logged name.
        seed: seeds the random samples (with the step and rank).
        max_plot_groups: at most this many panels in the distribution figure.

    Logged names: ``<prefix>/[rank{r}/]<group>/<figure>`` where ``<group>`` is ``bucket{i}``
    (DDP's bucket index; note DDP rebuilds buckets after its first iteration), ``model``
    (non-GaussK strategies), or ``param/<parameter name>``; figures as in
    :func:`group_statistics` (plus ``selected_density`` for parameters under GaussK). Scalars
    go straight to ``trainer.loggers`` at the due step (not through ``self.log``, whose
    ``log_every_n_steps`` cadence would drop them); ``history`` keeps them in memory.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        ranks: str = "zero",
        per_parameter: bool = False,
        max_samples: int = 8192,
        bins: int = 100,
        save_dir: str | os.PathLike | None = None,
        plot: bool = True,
        *,
        density: float | None = None,
        selector: str | None = None,
        hist_range: float = 5.0,
        log_histograms: bool = True,
        save_snapshots: bool = True,
        prefix: str = "gaussk",
        seed: int = 0,
        max_plot_groups: int = 12,
    ) -> None:
        super().__init__()
        self.every_n_steps = _check_int("every_n_steps", every_n_steps, 1)
        if not isinstance(ranks, str):
            raise TypeError(f"`ranks` must be 'zero' or 'all', got {type(ranks).__name__} {ranks!r}")
        if ranks not in ("zero", "all"):
            raise ValueError(f"`ranks` must be 'zero' or 'all', got {ranks!r}")
        self.ranks = ranks
        self.per_parameter = _check_bool("per_parameter", per_parameter)
        self.max_samples = _check_int("max_samples", max_samples, 2)
        self.bins = _check_int("bins", bins, 1)
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise TypeError(f"`save_dir` must be a path or None, got {type(save_dir).__name__} {save_dir!r}")
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.plot = _check_bool("plot", plot)
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)):
                raise TypeError(f"`density` must be a float in (0, 1] or None, got {type(density).__name__} {density!r}")
            if not 0.0 < density <= 1.0:
                raise ValueError(f"`density` must be in (0, 1] or None, got {density!r}")
        self.density = None if density is None else float(density)
        if selector is not None:
            if not isinstance(selector, str):
                raise TypeError(f"`selector` must be a selector name or None, got {type(selector).__name__} {selector!r}")
            try:
                get_selector(selector)
            except ValueError as e:
                raise ValueError(f"`selector`: {e}") from None
        self.selector = selector
        if isinstance(hist_range, bool) or not isinstance(hist_range, (int, float)):
            raise TypeError(f"`hist_range` must be a number > 0, got {type(hist_range).__name__} {hist_range!r}")
        if not (hist_range > 0 and math.isfinite(hist_range)):
            raise ValueError(f"`hist_range` must be a finite number > 0, got {hist_range!r}")
        self.hist_range = float(hist_range)
        self.log_histograms = _check_bool("log_histograms", log_histograms)
        self.save_snapshots = _check_bool("save_snapshots", save_snapshots)
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"`prefix` must be a non-empty str, got {prefix!r}")
        self.prefix = prefix.rstrip("/")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self.max_plot_groups = _check_int("max_plot_groups", max_plot_groups, 1)

        self.history: list[dict[str, Any]] = []  # this rank's rows: step, rank, group, figures
        self.snapshot_paths: list[str] = []
        self.figure_paths: list[str] = []
        self.dirpath: str | None = None
        self.mode: str | None = None  # "gaussk" (hook capture) or "local" (gradient hooks)
        self._active = False
        self._requested: int | None = None
        self._handles: list[Any] = []
        self._local: dict[int, Tensor] = {}
        self._plotted: list[dict[str, Any]] = []  # first and last snapshot, for the figures
        self._warned_empty = False

    # ---------------------------------------------------------------- lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank reads it
        base = self.save_dir if self.save_dir is not None else os.path.join(log_dir or trainer.default_root_dir, SUBDIR)
        self.dirpath = base
        self._active = self.ranks == "all" or trainer.global_rank == 0

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        state = getattr(trainer.strategy, "gaussk_state", None)
        self.mode = "gaussk" if state is not None else "local"
        if self.mode == "gaussk":
            for name in ("density", "selector"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"GradientDistributionMonitor: `{name}` is for non-GaussK strategies; under GaussKDDPStrategy "
                        "the hook's own density and selector are analysed (pass None)"
                    )
        if self._active and self.dirpath is not None:
            os.makedirs(self.dirpath, exist_ok=True)

    def _due(self, step: int) -> bool:
        return (step + 1) % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._active or self._requested == step or not self._due(step):
            return  # the common case: two comparisons
        self._requested = step
        if self.mode == "gaussk":
            trainer.strategy.gaussk_state.capture_next_step()
        else:
            self._local = {}
            for p in pl_module.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grab))

    def _grab(self, p: Tensor) -> None:
        # runs while autograd accumulates p.grad, before DDP's reducer averages it; with gradient
        # accumulation the last micro-batch's call sees the whole local sum
        if p.grad is not None:
            self._local[id(p)] = p.grad.detach().to(torch.float32, copy=True)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        if self._requested is None or self._requested != trainer.global_step:
            return
        self._requested = -1  # once per step, even with several optimizers
        step = trainer.global_step
        self._remove_handles()
        groups = self._groups(trainer, pl_module)
        if not groups:
            if not self._warned_empty:
                warnings.warn(f"GradientDistributionMonitor: nothing was captured at step {step} (no gradients?)", stacklevel=2)
                self._warned_empty = True
            results: dict[str, Any] = {}
        else:
            results = self._analyse(groups, step, trainer.global_rank)
        self._publish(trainer, step, results)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_handles()
        if not self._active or not self.history or self.dirpath is None:
            return
        rank = trainer.global_rank
        path = os.path.join(self.dirpath, f"history_rank{rank}.pt")
        torch.save({"format": HISTORY_FORMAT, "rank": rank, "rows": self.history}, path)
        if self.plot:
            self.figure_paths += self._draw(rank)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_handles()
        state = getattr(trainer.strategy, "gaussk_state", None)
        if state is not None:
            state.cancel_requests()

    def _remove_handles(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---------------------------------------------------------------- analysis
    def _groups(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[dict[str, Any]]:
        """[{name, u, k, selected, grad, params: [(name, offset, numel)]}] for this step."""
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups: list[dict[str, Any]] = []
        if self.mode == "gaussk":
            state = trainer.strategy.gaussk_state
            captured, state.captured = state.captured, {}
            for index in sorted(captured):
                cap = captured[index]
                # flat: parameters back to back; node mode: this rank's chunk of each, at "places"
                places = cap.get("places") or list(zip(itertools.accumulate([0] + [p.numel() for p in cap["parameters"]]),
                                                       [p.numel() for p in cap["parameters"]]))  # fmt: skip
                layout = [(names.get(id(p), f"param{i}"), off, n) for i, (p, (off, n)) in enumerate(zip(cap["parameters"], places))]
                groups.append(
                    {"name": f"bucket{index}", "u": cap["u"], "k": cap["k"], "selected": cap["indices"], "grad": cap.get("grad"), "params": layout}
                )
            return groups
        local, self._local = self._local, {}
        parts, layout, off = [], [], 0
        for n, p in pl_module.named_parameters():
            g = local.get(id(p))
            if g is None:
                continue
            parts.append(g.reshape(-1))
            layout.append((n, off, g.numel()))
            off += g.numel()
        if not parts:
            return []
        u = torch.cat(parts)
        d = u.numel()
        density = self.density if self.density is not None else 0.001
        k = bucket_k(density, d)
        selected = select(u, k, self.selector or "gaussk", seed=self.seed, step=trainer.global_step)[1] if k < d else None
        return [{"name": "model", "u": u, "k": k, "selected": selected, "grad": None, "params": layout}]

    def _analyse(self, groups: list[dict[str, Any]], step: int, rank: int) -> dict[str, Any]:
        """Figures, histograms and samples of every group (and parameter); saves the snapshot."""
        out: dict[str, Any] = {}
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + rank * 104_729) % (1 << 63))
        for g in groups:
            u, k = g["u"], g["k"]
            out[g["name"]] = self._one(u, k, g["selected"], g["grad"], gen, [n for n, _, _ in g["params"]])
            if self.per_parameter:
                rho = k / u.numel()
                sel = g["selected"]
                for pname, off, n in g["params"]:
                    up = u[off : off + n]
                    gp = g["grad"][off : off + n] if g["grad"] is not None else None
                    rec = self._one(up, bucket_k(rho, n), None, gp, gen, [pname])
                    if sel is not None and self.mode == "gaussk":
                        inside = ((sel >= off) & (sel < off + n)).sum()
                        rec["stats"]["selected_density"] = float(inside) / n
                    out[f"param/{pname}"] = rec
        if self.save_snapshots and self.dirpath is not None:
            snap_dir = os.path.join(self.dirpath, "snapshots")
            os.makedirs(snap_dir, exist_ok=True)
            path = os.path.join(snap_dir, f"rank{rank}_step{step:07d}.pt")
            torch.save(
                {
                    "format": SNAPSHOT_FORMAT,
                    "step": step,
                    "rank": rank,
                    "mode": self.mode,
                    "hist_range_std": self.hist_range,
                    "groups": out,
                },
                path,
            )
            self.snapshot_paths.append(path)
        for name, rec in out.items():
            self.history.append({"step": step, "rank": rank, "group": name, **rec["stats"]})
        keep = {"step": step, "groups": out}
        self._plotted = [self._plotted[0], keep] if self._plotted else [keep]
        return out

    def _one(self, u: Tensor, k: int, selected: Tensor | None, grad: Tensor | None, gen: torch.Generator, params: Sequence[str]) -> dict[str, Any]:
        u = u.detach().reshape(-1)
        d = u.numel()
        if d > self.max_samples:
            idx = torch.randint(0, d, (self.max_samples,), generator=gen).to(u.device)
            sample = u[idx]
        else:
            sample = u
        stats = group_statistics(u, k, selected=selected if (selected is not None and k < d) else None, grad=grad, ks_sample=sample)
        mean, std = stats["mean"], stats["std"]
        half = self.hist_range * std if math.isfinite(std) and std > 0 else 1.0
        lo, hi = mean - half, mean + half
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi = -1.0, 1.0
        counts, under, over = histogram(u, self.bins, lo, hi)
        return {
            "d": d,
            "k": k,
            "parameters": list(params),
            "stats": stats,
            "hist_counts": counts,
            "hist_lo": lo,
            "hist_hi": hi,
            "underflow": under,
            "overflow": over,
            "sample": sample.detach().to("cpu", torch.float32, copy=True),
        }

    def _draw(self, rank: int) -> list[str]:
        assert self.dirpath is not None
        paths = []
        for snap in self._plotted:
            names = sorted(snap["groups"], key=lambda n: n.startswith("param/"))  # buckets first (stable)
            groups = {n: snap["groups"][n] for n in names[: self.max_plot_groups]}
            path = os.path.join(self.dirpath, f"distribution_rank{rank}_step{snap['step']:07d}.png")
            plot_distribution(groups, path, title=f"u on rank {rank} at step {snap['step']} ({self.mode})")
            paths.append(path)
        rows = [r for r in self.history if not r["group"].startswith("param/")] or self.history
        path = os.path.join(self.dirpath, f"contraction_rank{rank}.png")
        plot_contraction(rows, path, title=f"Top-k contraction on rank {rank}")
        paths.append(path)
        return paths

    # ---------------------------------------------------------------- logging
    def _publish(self, trainer: "pl.Trainer", step: int, results: dict[str, Any]) -> None:
        """Send the figures to the loggers on rank 0 (gathering them first when ranks='all')."""
        if self.ranks == "all":
            world = trainer.world_size
            light = {name: {"stats": rec["stats"], "sample": rec["sample"]} for name, rec in results.items()}
            per_rank: list[Any] = [light]
            if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                per_rank = [None] * world
                torch.distributed.all_gather_object(per_rank, light)
            if trainer.global_rank != 0:
                return
            named = {f"rank{r}/{name}": rec for r, res in enumerate(per_rank) for name, rec in (res or {}).items()}
        else:
            if trainer.global_rank != 0:
                return
            named = results
        metrics = {
            f"{self.prefix}/{name}/{key}": float(v)
            for name, rec in named.items()
            for key, v in rec["stats"].items()
            if math.isfinite(v)  # e.g. the std of a 1-entry parameter: kept in history, not logged
        }
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if self.log_histograms and isinstance(logger, TensorBoardLogger):
                for name, rec in named.items():
                    logger.experiment.add_histogram(f"{self.prefix}/{name}/u", rec["sample"].numpy(), global_step=step)
