"""Pre-flight: will sparsification pay on this cluster, for this model?

Run it under the launcher the training job will use, with the same ranks::

    torchrun --nnodes 4 --nproc-per-node 8 ... -m lightning_gaussk.observe.preflight --model mypkg.models:build
    srun -N 4 --ntasks-per-node 8 gaussk-preflight --params 1.2e9 --step-ms 350 --json preflight.json

It measures, on the real backend (NCCL with CUDA, gloo otherwise), in well under a minute:

- the inter-node link: all-gathers and all-reduces among the ranks that share a local rank (the
  groups node mode exchanges in, built as the hook builds them; only local rank 0's group runs, so
  the figure is one node's NIC), at sizes up to the model's largest DDP bucket; ``alpha`` and
  ``bandwidth`` by :func:`lightning_gaussk.costs.planning.fit_link`; ``--repeats`` times
  (:func:`~lightning_gaussk.costs.probe.probe_repeats`), so the run-to-run spread of the fit is seen;
- the intra-node link the same way, inside node 0 (none with one rank per node);
- the selection cost on this device: :func:`~lightning_gaussk.selection.selectors.accumulate_select` on a
  bucket-sized tensor at three ``k``, fitted by :func:`~lightning_gaussk.costs.planning.fit_host_costs`.

Rank 0 then prints (and nothing else: the engine's own log lines are held back, :func:`engine_quiet`)
the predicted communication (and host) time per step of the model's DDP buckets
(:func:`ddp_bucket_groups`) for dense, flat and node mode with each exchange at densities 0.001,
0.01 and 0.05 on the median links, with the spread of each row's speedup over the repeats
(:func:`predict_spread`, costmodel functions only); a per-step recommendation (:func:`recommend`):
keyword arguments of the strategy it names (:data:`RECOMMENDED_STRATEGY`, the per-step
``gaussk_ddp``: ``GaussKDDPStrategy(**recommended)``, or ``register_gaussk``), made only when the
speedup holds at the pessimistic end of the spread, else "stay dense"; and local SGD advice
(:func:`local_sgd_advice`): ``GaussKLocalSGDStrategy(**local_sgd["recommended"])`` settings that
keep the outer exchange hidden behind ``overlap_steps`` inner steps of ``--step-ms``
(:func:`~lightning_gaussk.costs.planning.plan_local_sgd`).
``--json PATH`` writes all of it (see docs/preflight.md, which lists every key).

``measure_link`` is also what ``GaussKConfig(link_gbit="measure")`` runs at setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.costs import planning
from lightning_gaussk.costs.probe import _groups, median_seconds, probe_repeats

__all__ = [
    "DENSITIES",
    "LOCAL_STRATEGY",
    "RECOMMENDED_STRATEGY",
    "REPEATS",
    "assemble",
    "ddp_bucket_groups",
    "deciding_row",
    "engine_quiet",
    "local_sgd_advice",
    "main",
    "measure_select",
    "median_link",
    "model_numels",
    "nominal_gbit",
    "params_numels",
    "predict_spread",
    "predict_table",
    "recommend",
    "render",
]

DENSITIES = (0.001, 0.01, 0.05)
EXCHANGE_ROWS = ("allgather", "allreduce", "auto")
PARAMS_PER_TENSOR = 2**20  # --params N is modelled as tensors of this many entries (layers), and the rest
MARGIN = 1.1  # sparse must be predicted at least this much faster than dense to be recommended
#: the registered strategy the recommendation is for: it takes every key of it (per-step options
#: of ``GaussKConfig``; local SGD and FSDP2 refuse ``link_gbit`` / ``hierarchy``)
RECOMMENDED_STRATEGY = "gaussk_ddp"
#: the registered strategy the local SGD advice is for (``GaussKLocalSGDStrategy(**local_sgd["recommended"])``)
LOCAL_STRATEGY = "gaussk_local"
REPEATS = 3  # link measurements per group (--repeats): the verdict holds at the pessimistic end of their spread


# ------------------------------------------------------------------------------------- buckets
def ddp_bucket_groups(numels: Sequence[int], first_bucket_bytes: int | None = None, cap_bytes: int = 25 * 2**20) -> list[list[int]]:
    """DDP's buckets after its rebuild, as the numels of the parameters in each, asked of torch
    itself (``torch.distributed._compute_bucket_assignment_by_size`` on meta tensors of those
    sizes, fp32): ``numels`` in registration order, buckets in gradient-ready order (reverse
    registration; first bucket capped at ``dist._DEFAULT_FIRST_BUCKET_BYTES``, the others at
    ``cap_bytes``). One bucket of everything if the private API is missing."""
    params = [torch.empty(n, device="meta") for n in reversed(numels)]
    first = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 2**20) if first_bucket_bytes is None else first_bucket_bytes
    try:
        groups, _ = dist._compute_bucket_assignment_by_size(params, [first, cap_bytes])
    except (AttributeError, TypeError, RuntimeError):  # private API: one bucket
        groups = [list(range(len(params)))]
    return [[params[i].numel() for i in g] for g in groups]


def model_numels(spec: str) -> list[int]:
    """The trainable parameters' numels of the module ``package.module:factory()`` returns, built
    on the meta device when the factory allows it (no memory), else on the CPU.
    ``ValueError`` naming ``--model`` for anything that does not resolve to an ``nn.Module``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import module {mod_name!r}: {e}") from e
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable (a factory returning an nn.Module)")
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # noqa: BLE001 (a factory that computes on its tensors: build it for real)
        try:
            model = factory()
        except Exception as e:
            raise ValueError(f"--model {spec!r}: calling {attr}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    if not numels or sum(numels) == 0:
        raise ValueError(f"--model {spec!r}: the module has no trainable parameters")
    return numels


def params_numels(n: int) -> list[int]:
    """``--params N`` as tensors of :data:`PARAMS_PER_TENSOR` entries and the rest (DDP buckets
    them like the layers of a real model)."""
    full, rest = divmod(n, PARAMS_PER_TENSOR)
    return [PARAMS_PER_TENSOR] * full + ([rest] if rest else [])


# ------------------------------------------------------------------------------------- measuring
def measure_select(d: int, device: torch.device, selector: str = "gaussk", densities: Sequence[float] = DENSITIES,
                   reps: int = 3) -> tuple[costmodel.HostCosts, dict[str, Any]]:  # fmt: skip
    """Selection cost on ``device``: a streaming pass (``pass_s``) and
    :func:`~lightning_gaussk.selection.selectors.accumulate_select` on ``d`` (and ``d/4``) entries at each
    density's ``k``, fitted by :func:`~lightning_gaussk.costs.planning.fit_host_costs` on top of the
    device's defaults. Returns the costs and the raw timings."""
    from lightning_gaussk.selection.selectors import accumulate_select

    base = costmodel.HostCosts.for_device("cuda" if device.type == "cuda" else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(d, generator=gen).to(device)

    def timed(fn: Any) -> float:
        return median_seconds(fn, device, reps)

    pass_s = timed(lambda: torch.dot(x, x)) / d
    samples, raw = [], []
    for dd in sorted({d, max(d // 4, 1024)} if d > 4096 else {d}):
        r, g, out = torch.zeros(dd, device=device), x[:dd].clone(), torch.empty(dd, device=device)
        for rho in densities:
            k = costmodel.bucket_k(rho, dd)
            if k >= dd:
                continue
            t = timed(lambda: accumulate_select(r, g, out, k, selector))
            samples.append(planning.HostSample(dd, k, 1, t))
            raw.append({"d": dd, "k": k, "ms": round(t * 1e3, 4)})
    try:
        host = planning.fit_host_costs(pass_s, samples, base=base) if samples else base
    except ValueError:
        host = base
    return host, {"pass_ns_per_entry": pass_s * 1e9, "select": raw}


# ------------------------------------------------------------------------------------- predicting
def predict_table(buckets: Sequence[int], nodes: int, ranks_per_node: int, intra: costmodel.Link | None,
                  inter: costmodel.Link | None, host: costmodel.HostCosts,
                  densities: Sequence[float] = DENSITIES) -> list[dict[str, Any]]:  # fmt: skip
    """Predicted seconds per step (communication and host work of every bucket) of each way to
    send the model's ``buckets`` on ``nodes`` x ``ranks_per_node`` ranks, by the cost model:

    - ``dense``: ring all-reduce of every bucket among all ranks (:func:`costmodel.dense_bucket_time`);
    - ``flat`` + exchange: :func:`planning.bucket_time` among all ranks (the hook's dense
      fallback included; ``auto`` = :func:`~lightning_gaussk.costs.policy.pick_exchange` per bucket);
    - ``node`` + exchange: :func:`planning.hierarchical_bucket_time` (only with several nodes of
      several ranks); ``node`` + ``dense`` is its all-dense form (a hierarchical all-reduce).

    Flat mode runs on the inter-node link when there are several nodes, on the intra-node one
    otherwise. Rows: ``{"mode", "exchange", "density", "ms", "vs_dense"}`` with
    ``vs_dense = T_dense / T_row`` (``T_dense``: the faster dense row, the one sparse has to
    beat; > 1 is faster), rounded once to 2 decimals: the figure printed and the one the
    recommendation compares with ``margin``. ``ms`` is rounded to 4 decimals."""
    world = nodes * ranks_per_node
    flat_link = inter if nodes > 1 else intra
    if world < 2 or flat_link is None:
        return []
    rows: list[dict[str, Any]] = []
    dense = sum(costmodel.dense_bucket_time(d, world, flat_link, host) for d in buckets)
    rows.append({"mode": "dense", "exchange": "dense", "density": None, "s": dense})
    node = nodes > 1 and ranks_per_node > 1 and intra is not None and inter is not None
    if node:  # dense in node mode: reduce-scatter, all-reduce of the shard between nodes, all-gather
        assert intra is not None and inter is not None
        t = sum(planning.hierarchical_bucket_time(d, 1.0, nodes, ranks_per_node, intra, inter, host, "dense") for d in buckets)
        rows.append({"mode": "node", "exchange": "dense", "density": None, "s": t})
    for rho in densities:
        for ex in EXCHANGE_ROWS:
            t = sum(planning.bucket_time(d, costmodel.bucket_k(rho, d), world, flat_link, host, ex) for d in buckets)
            rows.append({"mode": "flat", "exchange": ex, "density": rho, "s": t})
        if node:
            assert intra is not None and inter is not None
            for ex in EXCHANGE_ROWS:
                t = sum(planning.hierarchical_bucket_time(d, rho, nodes, ranks_per_node, intra, inter, host, ex) for d in buckets)
                rows.append({"mode": "node", "exchange": ex, "density": rho, "s": t})
    fastest_dense = min(r["s"] for r in rows if r["density"] is None)
    return [{"mode": r["mode"], "exchange": r["exchange"], "density": r["density"], "ms": round(r["s"] * 1e3, 4),
             "vs_dense": round(fastest_dense / r["s"], 2)} for r in rows]  # fmt: skip


def median_link(links: Sequence[costmodel.Link | None]) -> costmodel.Link | None:
    """The link of repeated fits: the median ``alpha`` and the median bandwidth (None when no
    repeat has a fit)."""
    got = [x for x in links if x is not None]
    if not got:
        return None
    return costmodel.Link(alpha=statistics.median(x.alpha for x in got), bandwidth=statistics.median(x.bandwidth for x in got))


def predict_spread(buckets: Sequence[int], nodes: int, ranks_per_node: int,
                   repeats: Sequence[tuple[costmodel.Link | None, costmodel.Link | None]], host: costmodel.HostCosts,
                   densities: Sequence[float] = DENSITIES) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`predict_table` for repeated link measurements ``repeats`` (``(intra, inter)`` per
    repeat): ``ms`` and ``vs_dense`` on the median links (:func:`median_link`), and
    ``vs_dense_min`` / ``vs_dense_max``, the least and largest ``vs_dense`` over the median links and
    every repeat's own (each repeat's table compares with its own faster dense row)."""
    center = (median_link([r[0] for r in repeats]), median_link([r[1] for r in repeats]))
    table = predict_table(buckets, nodes, ranks_per_node, center[0], center[1], host, densities)
    others = [predict_table(buckets, nodes, ranks_per_node, a, b, host, densities) for a, b in repeats]
    others = [t for t in others if len(t) == len(table)]
    for i, row in enumerate(table):
        xs = [row["vs_dense"], *(t[i]["vs_dense"] for t in others)]
        row["vs_dense_min"], row["vs_dense_max"] = min(xs), max(xs)
    return table


def nominal_gbit(link: costmodel.Link) -> float:
    """The ``link_gbit`` whose :meth:`costmodel.Link.from_gbit` has ``link``'s bandwidth (the
    payload figure over its 0.95 efficiency), to 3 significant digits."""
    g = link.gbit / 0.95
    return float(f"{g:.3g}")


# the one way each figure is written (the table, the reasons and the summary lines all use these)
def fmt_x(v: float) -> str:
    """A speedup as printed: ``1.24x``."""
    return f"{v:.2f}x"


def fmt_ms(v: float) -> str:
    """Milliseconds as printed: ``12.29 ms``."""
    return f"{v:.2f} ms"


def fmt_range(lo: float, hi: float, unit: str = "x", digits: int = 2) -> str:
    """A spread as printed: ``0.95-1.21x``."""
    return f"{lo:.{digits}f}-{hi:.{digits}f}{unit}"


def row_name(row: Mapping[str, Any]) -> str:
    """A table row in words: ``DDP's dense all-reduce``, ``node mode's hierarchical dense
    all-reduce``, ``flat mode with exchange='allgather'``."""
    if row["density"] is None:
        return "DDP's dense all-reduce" if row["mode"] == "dense" else "node mode's hierarchical dense all-reduce"
    return f"{row['mode']} mode with exchange={row['exchange']!r}"


def _lo(row: Mapping[str, Any]) -> float:
    return row.get("vs_dense_min", row["vs_dense"])


def _hi(row: Mapping[str, Any]) -> float:
    return row.get("vs_dense_max", row["vs_dense"])


def deciding_row(table: Sequence[dict[str, Any]], margin: float = MARGIN) -> tuple[dict[str, Any] | None, bool]:
    """``(row, pays)``: the sparse row the verdict is about and whether it pays.

    A row pays when its speedup holds at the pessimistic end of the spread:
    ``vs_dense_min >= margin`` (``vs_dense`` for a table without spread). The paying row is, at
    the densest density where one pays, the fastest paying row (ties: flat before node, fixed
    exchanges before ``auto``). When none pays, the row with the largest ``vs_dense`` (the one
    that came closest)."""
    sparse = [r for r in table if r["density"] is not None]
    if not sparse:
        return None, False
    for rho in sorted({r["density"] for r in sparse}, reverse=True):
        paying = [r for r in sparse if r["density"] == rho and _lo(r) >= margin]
        if paying:
            return min(paying, key=lambda r: (r["ms"], r["mode"] != "flat", r["exchange"] == "auto")), True
    return max(sparse, key=lambda r: (r["vs_dense"], _lo(r), r["density"], -r["ms"])), False


def recommend(table: Sequence[dict[str, Any]], link: costmodel.Link | None, margin: float = MARGIN,
              link_repeats: Sequence[costmodel.Link] = ()) -> tuple[dict[str, Any] | None, str]:  # fmt: skip
    """``(keyword arguments, why)``, or ``(None, why)`` to stay dense. The keyword arguments are
    ``GaussKConfig`` options that :data:`RECOMMENDED_STRATEGY` (``gaussk_ddp``) takes, every one.

    Sparse is recommended only when some row pays at the pessimistic end of the measured spread
    (:func:`deciding_row`): with ``S_i = T_dense,i / T_row,i`` the predicted speedup on link
    measurement ``i`` (and on the median links), ``min_i S_i >= margin``. Among the paying rows it
    takes the densest density (a higher density converges closer to dense training) and there the
    fastest row. ``T_dense`` is the faster dense row (DDP's all-reduce, or node mode's hierarchical
    dense: node mode with every bucket falling back to dense is not a reason to sparsify).
    ``link_repeats``: the verdict's link as measured each time (quoted in ``why``). Every figure
    in ``why`` is the table's, written as the table writes it."""
    denses = [r for r in table if r["density"] is None]
    dense = min(denses, key=lambda r: r["ms"]) if denses else None
    if dense is None or link is None:
        return None, "one rank (or no link measured): nothing to send"
    row, pays = deciding_row(table, margin)
    if row is None:
        return None, "stay dense: no sparse configuration to compare"
    n = max(1, len(link_repeats))
    over = f"{n} link measurement{'s' if n > 1 else ''}"
    spread = f"{fmt_range(_lo(row), _hi(row))} over {over}"
    at = (f"{row_name(row)} at density {row['density']:g} is predicted {fmt_ms(row['ms'])}/step against "
          f"{fmt_ms(dense['ms'])}/step for {row_name(dense)}: {fmt_x(row['vs_dense'])}")  # fmt: skip
    if pays:
        rec = {"hierarchy": row["mode"], "exchange": row["exchange"], "density": row["density"], "link_gbit": nominal_gbit(link)}
        return rec, f"{at} ({spread}; at least {fmt_x(margin)} needed at the pessimistic end)"
    links = ""
    if len(link_repeats) > 1:
        a = planning.spread(x.alpha * 1e6 for x in link_repeats)
        g = planning.spread(x.gbit for x in link_repeats)
        links = f"; fitted latency {fmt_range(a[0], a[2], ' us', 1)}, bandwidth {fmt_range(g[0], g[2], ' Gbit/s', 3)}"
    if row["vs_dense"] >= margin:
        return None, (f"stay dense: {at} at the median link, but only {fmt_x(_lo(row))} at the pessimistic end of the "
                      f"spread ({spread}{links}), below the margin {fmt_x(margin)}")  # fmt: skip
    return None, (f"stay dense: no sparse configuration is predicted {fmt_x(margin)} faster than {row_name(dense)} "
                  f"({fmt_ms(dense['ms'])}/step); the closest, {at} ({spread}{links})")  # fmt: skip


def format_table(table: Sequence[dict[str, Any]]) -> str:
    """The table as printed: one row per line, ``vs dense`` and its spread written by :func:`fmt_x`
    and :func:`fmt_range` (the same strings the recommendation quotes)."""
    lines = [f"{'mode':<6} {'exchange':<10} {'density':>8} {'ms/step':>10} {'vs dense':>9}  spread"]
    for r in table:
        rho = "-" if r["density"] is None else f"{r['density']:g}"
        lines.append(f"{r['mode']:<6} {r['exchange']:<10} {rho:>8} {r['ms']:>10.2f} {fmt_x(r['vs_dense']):>9}  "
                     f"{fmt_range(_lo(r), _hi(r)):<12}".rstrip())  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- local SGD
def local_sgd_advice(numels: Sequence[int], nodes: int, ranks_per_node: int, mode: str,
                     repeats: Sequence[tuple[costmodel.Link | None, costmodel.Link | None]], step_ms: float | None,
                     table: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:  # fmt: skip
    """The JSON's ``local_sgd`` section: :func:`~lightning_gaussk.costs.planning.plan_local_sgd`
    on the measured links (``repeats``: ``(intra, inter)`` per link measurement) and the job's
    time per optimizer step ``step_ms``, for each layout ``gaussk_local`` can take here: ``"node"``
    (``mode`` is node mode: the ranks of a node sum their pseudo-gradients, reduce-scatter and
    all-gather on the intra-node link, which the outer step waits on, and each rank exchanges its
    shard among the ``nodes`` on the inter-node link its node's ranks share) and ``"flat"`` (all
    ranks exchange the whole model, on the inter-node link with several nodes, else the
    intra-node one).

    ``recommended``: keyword arguments of ``GaussKLocalSGDStrategy`` (the plan's and
    ``hierarchy``), or None (no step time, one rank, no link). Between layouts: a hidden exchange
    first, then the least exposed communication per window, then node mode (``hierarchy="auto"``'s
    choice)."""
    world = nodes * ranks_per_node
    dense_row = next((r for r in table if r["mode"] == "dense"), None)
    out: dict[str, Any] = {
        "strategy": LOCAL_STRATEGY,
        "step_ms": step_ms,
        "dense_bytes_per_step": costmodel.BYTES_PER_ENTRY * sum(numels),
        "ddp_ms_per_step": None if dense_row is None else dense_row["ms"],
        "candidates": [],
        "recommended": None,
        "reason": "",
    }
    step_s = None if step_ms is None else step_ms * 1e-3
    layouts: list[tuple[str, planning.LocalPlan | None, list[planning.LocalPlan], int]] = []
    if mode == "node" and all(a is not None for a, b in repeats if b is not None):
        links = [b for _, b in repeats if b is not None]
        intras = [a for a, b in repeats if b is not None]
        if links:
            layouts.append(("node", *planning.plan_local_sgd(numels, nodes, links, step_s, gpus_per_node=ranks_per_node,
                                                               intras=intras), len(links)))  # fmt: skip
    flat_links = [x for x in ((b if nodes > 1 else a) for a, b in repeats) if x is not None]
    if world > 1 and flat_links:
        layouts.append(("flat", *planning.plan_local_sgd(numels, world, flat_links, step_s), len(flat_links)))
    if world < 2 or not layouts:
        out["reason"] = "one rank (or no link measured): nothing to exchange"
        return out
    for hierarchy, _, plans, _ in layouts:
        for p in plans:
            out["candidates"].append({
                "hierarchy": hierarchy, "sync_every": p.sync_every, "density": p.density, "quantize": p.quantize,
                "exchange": p.exchange, "outer_bytes": p.message_bytes,
                "bytes_per_inner_step": round(p.bytes_per_inner_step, 1), "fewer_bytes_than_ddp": round(p.fewer_bytes, 1),
                "outer_ms": dict(zip(("min", "median", "max"), (round(t * 1e3, 4) for t in p.background_s))),
                "blocking_ms": round(p.blocking_s * 1e3, 4), "overlap_steps": p.overlap_steps,
                "exposed_ms_per_window": None if p.exposed_s is None else round(p.exposed_s * 1e3, 4), "hidden": p.hidden,
            })  # fmt: skip

    def pick(i: int) -> tuple[bool, float, int]:
        choice = layouts[i][1]
        assert choice is not None and choice.exposed_s is not None
        return (not choice.hidden, choice.exposed_s, i)

    def row(hierarchy: str, plan: planning.LocalPlan) -> dict[str, Any]:
        return next(c for c in out["candidates"] if c["hierarchy"] == hierarchy and
                    (c["sync_every"], c["density"], c["quantize"]) == (plan.sync_every, plan.density, plan.quantize))  # fmt: skip

    if step_s is None:
        hierarchy, _, plans, n = layouts[0]
        c = row(hierarchy, plans[0])
        t = c["outer_ms"]
        out["reason"] = (f"needs --step-ms (the job's time per optimizer step): in {hierarchy} mode the outer exchange of "
                         f"sync_every={c['sync_every']}, density={c['density']}, quantize={c['quantize']} takes "
                         f"{fmt_ms(t['max'])} at the pessimistic end ({fmt_range(t['min'], t['max'], ' ms')} over "
                         f"{_plural(n, 'link measurement')}); overlap_steps = ceil(that / step time) hides it")  # fmt: skip
        return out
    hierarchy, choice, _, n = layouts[min(range(len(layouts)), key=pick)]
    assert choice is not None
    c = row(hierarchy, choice)
    out["recommended"] = {**choice.kwargs(), "hierarchy": hierarchy}
    t = c["outer_ms"]
    exchange = (f"in {hierarchy} mode the outer exchange of sync_every={c['sync_every']}, density={c['density']}, "
                f"quantize={c['quantize']} takes {fmt_ms(t['max'])} at the pessimistic end "
                f"({fmt_range(t['min'], t['max'], ' ms')} over {_plural(n, 'link measurement')})")  # fmt: skip
    saves = (f"{c['bytes_per_inner_step']:,.0f} bytes per inner step against DDP's {out['dense_bytes_per_step']:,} "
             f"({c['fewer_bytes_than_ddp']:,.0f}x fewer)")  # fmt: skip
    blocking = f", of which {fmt_ms(c['blocking_ms'])} the intra-node stages it waits on" if hierarchy == "node" else ""
    exposed = f"{fmt_ms(c['exposed_ms_per_window'])} exposed per window of {c['sync_every']} steps{blocking}"
    if c["hidden"]:
        out["reason"] = (f"{exchange}; overlap_steps={c['overlap_steps']} ({_plural(c['overlap_steps'], 'inner step')} of "
                         f"{step_ms:g} ms) hides it: {exposed}; {saves}")  # fmt: skip
    else:
        out["reason"] = (f"no setting hides the exchange behind fewer than sync_every inner steps of {step_ms:g} ms: "
                         f"{exchange}; with overlap_steps={c['overlap_steps']}, {exposed}; {saves}")  # fmt: skip
    return out


def format_local(section: Mapping[str, Any]) -> str:
    """The local SGD section as printed."""
    lines = []
    ddp = "" if section["ddp_ms_per_step"] is None else f", predicted {fmt_ms(section['ddp_ms_per_step'])}/step (dense row)"
    lines.append(f"Local SGD (strategy={section['strategy']!r}; outer exchange by the cost model, communication only): DDP "
                 f"all-reduces {section['dense_bytes_per_step']:,} bytes per step{ddp}")  # fmt: skip
    if section["candidates"]:
        lines.append(f"{'layout':<6} {'H':>3} {'density':>8} {'bits':>5} {'outer ms':>9}  {'spread':<16} {'bytes/step':>11} "
                     f"{'vs DDP':>10} {'overlap':>8} {'exposed/window':>15}")  # fmt: skip
        for c in section["candidates"]:
            t = c["outer_ms"]
            tau = "-" if c["overlap_steps"] is None else str(c["overlap_steps"])
            exp = "-" if c["exposed_ms_per_window"] is None else fmt_ms(c["exposed_ms_per_window"])
            lines.append(f"{c['hierarchy']:<6} {c['sync_every']:>3} {c['density']:>8g} {c['quantize']!s:>5} {t['median']:>9.2f}  "
                         f"{fmt_range(t['min'], t['max'], ' ms'):<16} {c['bytes_per_inner_step']:>11,.0f} "
                         f"{c['fewer_bytes_than_ddp']:>9,.0f}x {tau:>8} {exp:>15}")  # fmt: skip
    rec = section["recommended"]
    if rec:
        kw = ", ".join(f"{k}={v!r}" for k, v in rec.items())
        lines.append(f"Local SGD recommendation: {kw}\n  (GaussKLocalSGDStrategy(**local_sgd['recommended']); {section['reason']})")
    else:
        lines.append(f"Local SGD recommendation: none ({section['reason']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the command
def _positive_float(name: str) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number > 0, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a number > 0, got {text!r}")
        return v

    return parse


def _positive_int(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number >= 1, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number >= 1, got {text!r}")
        return v

    return parse


def _params(text: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--params must be a number of parameters >= 1 (e.g. 25e6), got {text!r}") from None
    if not (math.isfinite(v) and v >= 1 and v == int(v)):
        raise argparse.ArgumentTypeError(f"--params must be a whole number of parameters >= 1 (e.g. 25e6), got {text!r}")
    return int(v)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gaussk-preflight",
        description="Measure this cluster's links and selection cost, predict the communication time per step of "
        "dense and sparse training for a model, and recommend GaussKConfig options and gaussk_local (local SGD) settings. Run it under the job's launcher "
        "(torchrun, srun, a Lightning multi-node job's environment).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="a callable returning the nn.Module (built on the meta device when possible)")
    what.add_argument("--params", type=_params, metavar="N", help="a model of N trainable parameters (e.g. 1.2e9), as layers of 2^20")
    p.add_argument("--bucket-cap-mb", type=_positive_float("--bucket-cap-mb"), default=25.0, help="DDP's bucket_cap_mb (default 25)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="ranks per node (default: the launcher's LOCAL_WORLD_SIZE)")
    p.add_argument("--selector", default="gaussk", help="the selector to time (default gaussk)")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl with CUDA, gloo otherwise")
    p.add_argument("--margin", type=_positive_float("--margin"), default=MARGIN,
                   help=f"sparse must be predicted this many times faster than dense (default {MARGIN})")  # fmt: skip
    p.add_argument("--repeats", type=_positive_int("--repeats"), default=REPEATS,
                   help=f"link measurements per group; sparse is recommended only if it pays at the pessimistic end of "
                   f"their spread (default {REPEATS})")  # fmt: skip
    p.add_argument("--step-ms", type=_positive_float("--step-ms"), default=None, metavar="MS",
                   help="your job's measured time per optimizer step (forward, backward, optimizer), for the local SGD "
                   "advice (overlap_steps); without it that advice gives the exchange time only")  # fmt: skip
    p.add_argument("--json", metavar="PATH", default=None, help="write the figures, table and recommendation here (rank 0)")
    return p


def _slurm_env(environ: dict[str, str]) -> None:
    """Fill torchrun's variables from SLURM's (srun) where they are missing."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ.setdefault("WORLD_SIZE", environ.get("SLURM_NTASKS", "1"))
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        environ.setdefault("LOCAL_WORLD_SIZE", per_node)
    if "MASTER_ADDR" not in environ and environ.get("SLURM_JOB_NODELIST"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]], capture_output=True,
                                 text=True, timeout=10).stdout.split()  # fmt: skip
            if out:
                environ["MASTER_ADDR"] = out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    environ.setdefault("MASTER_PORT", "29500")


def _init(backend: str | None) -> str:
    environ = os.environ
    _slurm_env(environ)  # type: ignore[arg-type]
    if "RANK" not in environ or int(environ.get("WORLD_SIZE", "1")) < 2:
        return "none"
    if "MASTER_ADDR" not in environ:
        raise SystemExit("gaussk-preflight: MASTER_ADDR is not set (torchrun sets it; under srun export it, e.g. the first host)")
    environ.setdefault("MASTER_PORT", "29500")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=3))
    return backend


@contextmanager
def engine_quiet() -> Iterator[None]:
    """The engine's own messages off while pre-flight builds its parts: the ``lightning_gaussk``
    logger (the startup line :class:`~lightning_gaussk.GaussKState` logs at ``setup_layout``, via
    :func:`~lightning_gaussk.utils.log.rank_zero_info`) gets a null handler and stops
    propagating, so the report is the only thing pre-flight prints; restored afterwards."""
    log = logging.getLogger("lightning_gaussk")
    saved = (log.handlers[:], log.propagate, log.level)
    log.handlers = [logging.NullHandler()]
    log.propagate = False
    try:
        yield
    finally:
        log.handlers, log.propagate = saved[0], saved[1]
        log.setLevel(saved[2])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything but the argument parsing; returns the report (every rank; rank 0's is the one
    printed, the others' is empty). The engine's logging is off meanwhile (:func:`engine_quiet`)."""
    with engine_quiet():
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_gaussk.engine.state import GaussKState

    t_start = time.perf_counter()
    numels = model_numels(args.model) if args.model is not None else params_numels(args.params)
    cap = int(args.bucket_cap_mb * 2**20)
    buckets = [sum(g) for g in ddp_bucket_groups(numels, cap_bytes=cap)]
    max_bytes = 4 * max(buckets)
    repeats = getattr(args, "repeats", REPEATS)
    backend = _init(args.backend)
    distributed = backend != "none"
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    state = GaussKState(hierarchy="auto", ranks_per_node=args.ranks_per_node)
    layout = state.setup_layout()  # node mode's groups exactly as the hook builds them (world only with W > 1)
    topo = state.topology
    rpn = layout.ranks_per_node or (world if (args.ranks_per_node or _launcher_rpn()) == world else 1)
    nodes = world // rpn
    links: dict[str, list[costmodel.Link | None]] = {"intra": [None] * repeats, "inter": [None] * repeats}
    samples: dict[str, list[dict[str, Any]]] = {"intra": [], "inter": []}
    if distributed:
        intra_g, in_intra, inter_g, in_inter = _groups(topo)
        if layout.mode == "flat" and rpn == world:  # one node: the world is the intra-node link
            intra_g, in_intra, inter_g, in_inter = None, True, None, False
        for key, group, member in (("intra", intra_g, in_intra), ("inter", inter_g, in_inter)):
            if member and (key == "inter" or rpn > 1):
                got = probe_repeats(group, device, max_bytes, repeats)
                samples[key] = [{"repeat": i, "kind": x.kind, "world": x.world, "bytes": x.nbytes, "ms": round(x.seconds * 1e3, 4)}
                                for i, (s, _) in enumerate(got) for x in s]  # fmt: skip
                links[key] = [fit for _, fit in got]
            dist.barrier()
    host, select_raw = measure_select(min(max(buckets), 2**24), device, args.selector) if rank == 0 else (None, {})
    if distributed:
        dist.barrier()
    report: dict[str, Any] = {}
    if rank == 0:
        assert host is not None
        report = assemble(
            numels=numels, buckets=buckets, bucket_cap_mb=args.bucket_cap_mb, nodes=nodes, ranks_per_node=rpn,
            mode=layout.mode, backend=backend, device=str(device), intra=links["intra"], inter=links["inter"],
            host=host, select=select_raw, samples=samples, margin=args.margin, step_ms=getattr(args, "step_ms", None),
        )  # fmt: skip
        report["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    if distributed:
        dist.barrier()
    return report


def _stats(values: Sequence[float], digits: int) -> dict[str, float]:
    lo, mid, hi = planning.spread(values)
    return {"min": round(lo, digits), "median": round(mid, digits), "max": round(hi, digits)}


def _link_spread(links: Sequence[costmodel.Link | None]) -> dict[str, Any] | None:
    got = [x for x in links if x is not None]
    if not got:
        return None
    return {"latency_us": _stats([x.alpha * 1e6 for x in got], 1), "gbit": _stats([x.gbit for x in got], 4)}


def assemble(*, numels: Sequence[int], buckets: Sequence[int], bucket_cap_mb: float, nodes: int, ranks_per_node: int,
             mode: str, backend: str, device: str, intra: Sequence[costmodel.Link | None],
             inter: Sequence[costmodel.Link | None], host: costmodel.HostCosts, select: Mapping[str, Any] | None = None,
             samples: Mapping[str, Any] | None = None, margin: float = MARGIN,
             step_ms: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The report from the measurements (pure: the measuring is :func:`run`'s). ``intra`` /
    ``inter``: the link's fit of each repeat (None where not measured), paired by position.

    Every figure is computed here once and rounded once; :func:`render` only formats them."""
    repeats = max(len(intra), len(inter))
    intra = list(intra) + [None] * (repeats - len(intra))
    inter = list(inter) + [None] * (repeats - len(inter))
    pairs = list(zip(intra, inter))
    intra_link, inter_link = median_link(intra), median_link(inter)
    table = predict_spread(buckets, nodes, ranks_per_node, pairs, host)
    verdict_links = [x for x in (inter if nodes > 1 else intra) if x is not None]
    link = inter_link if nodes > 1 else intra_link
    rec, why = recommend(table, link, margin, verdict_links)
    row, _ = deciding_row(table, margin)
    speedup = None
    if row is not None and link is not None:
        speedup = {"row": {"mode": row["mode"], "exchange": row["exchange"], "density": row["density"]},
                   "min": row["vs_dense_min"], "median": row["vs_dense"], "max": row["vs_dense_max"]}  # fmt: skip
    return {
        "world_size": nodes * ranks_per_node,
        "nodes": nodes,
        "ranks_per_node": ranks_per_node,
        "backend": backend,
        "device": device,
        "params": sum(numels),
        "buckets": list(buckets),
        "bucket_cap_mb": bucket_cap_mb,
        "repeats": repeats,
        "margin": margin,
        "inter_node_gbit": _gbit(inter_link),
        "inter_node_latency_us": _us(inter_link),
        "intra_node_gbit": _gbit(intra_link),
        "intra_node_latency_us": _us(intra_link),
        "links": {"inter": _fit(inter_link), "intra": _fit(intra_link)},
        "link_repeats": {"inter": [_fit(v) for v in inter], "intra": [_fit(v) for v in intra]},
        "spread": {"inter": _link_spread(inter), "intra": _link_spread(intra), "speedup": speedup},
        "samples": dict(samples or {"intra": [], "inter": []}),
        "host_costs": dataclasses.asdict(host),
        "select": dict(select or {}),
        "densities": list(DENSITIES),
        "table": table,
        "recommended": rec,
        "recommended_strategy": RECOMMENDED_STRATEGY if rec else None,
        "verdict": "sparse" if rec else "dense",
        "reason": why,
        "local_sgd": local_sgd_advice(numels, nodes, ranks_per_node, mode, pairs, step_ms, table),
        "elapsed_s": 0.0,
    }


def _fit(link: costmodel.Link | None) -> dict[str, float] | None:
    """A fit as the JSON holds it."""
    return None if link is None else {"alpha_s": link.alpha, "bandwidth_bytes_s": link.bandwidth}


def _launcher_rpn() -> int | None:
    from lightning_gaussk.comm.layout import launcher_ranks_per_node

    return launcher_ranks_per_node()


def _gbit(link: costmodel.Link | None) -> float | None:
    return None if link is None else round(link.gbit, 4)


def _us(link: costmodel.Link | None) -> float | None:
    return None if link is None else round(link.alpha * 1e6, 1)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _link_line(r: Mapping[str, Any], key: str) -> str:
    gbit, us, spread = r[f"{key}_node_gbit"], r[f"{key}_node_latency_us"], r["spread"][key]
    if gbit is None:
        none = "one node" if key == "inter" else "one rank per node"
        return f"  {key}-node: none ({none})"
    line = f"  {key}-node: {gbit:.3f} Gbit/s, latency {us:.1f} us"
    if r["repeats"] > 1 and spread is not None:
        g, a = spread["gbit"], spread["latency_us"]
        line += (f" (median of {r['repeats']} measurements: {fmt_range(g['min'], g['max'], ' Gbit/s', 3)}, "
                 f"latency {fmt_range(a['min'], a['max'], ' us', 1)})")  # fmt: skip
    return line


def render(r: Mapping[str, Any]) -> str:
    """The report as printed (rank 0's stdout, nothing else)."""
    head = (f"GaussK pre-flight: {_plural(r['world_size'], 'rank')} = {_plural(r['nodes'], 'node')} x {r['ranks_per_node']}, "
            f"backend {r['backend']} on {r['device']}; model {r['params']:,} parameters in "
            f"{_plural(len(r['buckets']), 'DDP bucket')} (cap {r['bucket_cap_mb']:g} MB)")  # fmt: skip
    lines = [head, _link_line(r, "inter"), _link_line(r, "intra")]
    h = r["host_costs"]
    if h:
        lines.append(f"  selection: {h['select_passes']:.2f} passes of {h['pass_s'] * 1e9:.3f} ns/entry + "
                     f"{h['select_per_k_s'] * 1e9:.2f} ns per selected entry")  # fmt: skip
    if r["table"]:
        lines.append(f"Predicted communication + host time per step (cost model, median link; spread: the least and "
                     f"largest vs dense over {_plural(r['repeats'], 'link measurement')}):")  # fmt: skip
        lines.append(format_table(r["table"]))
    rec = r["recommended"]
    if rec:
        kw = ", ".join(f"{k}={v!r}" for k, v in rec.items())
        lines.append(f"Recommendation: {kw}\n  (for strategy={r['recommended_strategy']!r}: GaussKDDPStrategy(**recommended); "
                     f"{r['reason']})")  # fmt: skip
    else:
        lines.append(f"Recommendation: {r['reason']}" if r["reason"].startswith("stay dense") else
                     f"Recommendation: stay dense ({r['reason']})")  # fmt: skip
    if r["local_sgd"]["candidates"] or r["world_size"] > 1:
        lines.append(format_local(r["local_sgd"]))
    lines.append(f"(pre-flight took {r['elapsed_s']:.1f} s)")
    return "\n".join(lines)


def print_report(r: Mapping[str, Any]) -> None:
    """Print :func:`render`'s text."""
    print(render(r))


def main(argv: Sequence[str] | None = None) -> int:
    """The command (``python -m lightning_gaussk.observe.preflight``, ``gaussk-preflight``): parse
    ``argv`` (bad input exits with status 2 and a message naming the argument, on every rank,
    before any collective), measure, and on rank 0 print the report and write ``--json``."""
    args = parser().parse_args(argv)
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            parser().error(f"--json {args.json!r}: directory {parent!r} does not exist")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        parser().error(f"--ranks-per-node must be an int >= 1, got {args.ranks_per_node}")
    try:
        if args.model is not None:
            model_numels(args.model)  # bad input fails on every rank, before any collective
    except ValueError as e:
        parser().error(str(e))
    try:
        report = run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if report:
        print_report(report)
        if args.json is not None:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
