"""Pre-flight: will sparsification pay on this cluster, for this model?

Run it under the launcher the training job will use, with the same ranks::

    torchrun --nnodes 4 --nproc-per-node 8 ... -m lightning_gaussk.observe.preflight --model mypkg.models:build
    srun -N 4 --ntasks-per-node 8 gaussk-preflight --params 1.2e9 --json preflight.json

It measures, on the real backend (NCCL with CUDA, gloo otherwise), in well under a minute:

- the inter-node link: all-gathers and all-reduces among the ranks that share a local rank (the
  groups node mode exchanges in, built as the hook builds them; only local rank 0's group runs, so
  the figure is one node's NIC), at sizes up to the model's largest DDP bucket; ``alpha`` and
  ``bandwidth`` by :func:`lightning_gaussk.costs.planning.fit_link`;
- the intra-node link the same way, inside node 0 (none with one rank per node);
- the selection cost on this device: :func:`~lightning_gaussk.selection.selectors.accumulate_select` on a
  bucket-sized tensor at three ``k``, fitted by :func:`~lightning_gaussk.costs.planning.fit_host_costs`.

Rank 0 then prints the predicted communication (and host) time per step of the model's DDP buckets
(:func:`ddp_bucket_groups`) for dense, flat and node mode with each exchange at densities 0.001,
0.01 and 0.05 (:func:`predict_table`, costmodel functions only), and a recommendation
(:func:`recommend`): keyword arguments of the strategy it names (:data:`RECOMMENDED_STRATEGY`,
the per-step ``gaussk_ddp``: ``GaussKDDPStrategy(**recommended)``, or ``register_gaussk``), or
"stay dense" when nothing pays.
``--json PATH`` writes all of it (see docs/preflight.md).

``measure_link`` is also what ``GaussKConfig(link_gbit="measure")`` runs at setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.costs import planning
from lightning_gaussk.costs.probe import _groups, fit, median_seconds, time_collectives

__all__ = [
    "DENSITIES",
    "RECOMMENDED_STRATEGY",
    "ddp_bucket_groups",
    "main",
    "measure_select",
    "model_numels",
    "nominal_gbit",
    "params_numels",
    "predict_table",
    "recommend",
]

DENSITIES = (0.001, 0.01, 0.05)
EXCHANGE_ROWS = ("allgather", "allreduce", "auto")
PARAMS_PER_TENSOR = 2**20  # --params N is modelled as tensors of this many entries (layers), and the rest
MARGIN = 1.1  # sparse must be predicted at least this much faster than dense to be recommended
#: the registered strategy the recommendation is for: it takes every key of it (per-step options
#: of ``GaussKConfig``; local SGD and FSDP2 refuse ``link_gbit`` / ``hierarchy``)
RECOMMENDED_STRATEGY = "gaussk_ddp"


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
    otherwise. Rows: ``{"mode", "exchange", "density", "ms", "vs_dense"}`` (``vs_dense``: dense
    time / this time, > 1 is faster)."""
    world = nodes * ranks_per_node
    flat_link = inter if nodes > 1 else intra
    if world < 2 or flat_link is None:
        return []
    dense = sum(costmodel.dense_bucket_time(d, world, flat_link, host) for d in buckets)
    rows = [{"mode": "dense", "exchange": "dense", "density": None, "ms": dense * 1e3, "vs_dense": 1.0}]
    node = nodes > 1 and ranks_per_node > 1 and intra is not None and inter is not None
    if node:  # dense in node mode: reduce-scatter, all-reduce of the shard between nodes, all-gather
        assert intra is not None and inter is not None
        t = sum(planning.hierarchical_bucket_time(d, 1.0, nodes, ranks_per_node, intra, inter, host, "dense") for d in buckets)
        rows.append({"mode": "node", "exchange": "dense", "density": None, "ms": t * 1e3, "vs_dense": dense / t})
    for rho in densities:
        for ex in EXCHANGE_ROWS:
            t = sum(planning.bucket_time(d, costmodel.bucket_k(rho, d), world, flat_link, host, ex) for d in buckets)
            rows.append({"mode": "flat", "exchange": ex, "density": rho, "ms": t * 1e3, "vs_dense": dense / t})
        if node:
            assert intra is not None and inter is not None
            for ex in EXCHANGE_ROWS:
                t = sum(planning.hierarchical_bucket_time(d, rho, nodes, ranks_per_node, intra, inter, host, ex) for d in buckets)
                rows.append({"mode": "node", "exchange": ex, "density": rho, "ms": t * 1e3, "vs_dense": dense / t})
    for r in rows:
        r["ms"] = round(r["ms"], 4)
        r["vs_dense"] = round(r["vs_dense"], 3)
    return rows


def nominal_gbit(link: costmodel.Link) -> float:
    """The ``link_gbit`` whose :meth:`costmodel.Link.from_gbit` has ``link``'s bandwidth (the
    payload figure over its 0.95 efficiency), to 3 significant digits."""
    g = link.gbit / 0.95
    return float(f"{g:.3g}")


def recommend(table: Sequence[dict[str, Any]], link: costmodel.Link | None, margin: float = MARGIN) -> tuple[dict[str, Any] | None, str]:
    """``(keyword arguments, why)``, or ``(None, why)`` to stay dense. The keyword arguments are
    ``GaussKConfig`` options that :data:`RECOMMENDED_STRATEGY` (``gaussk_ddp``) takes, every one.

    The densest of the table's densities at which some sparse row is predicted at least
    ``margin`` times faster than the fastest dense row (DDP's all-reduce, or node mode's
    hierarchical dense: node mode with every bucket falling back to dense is not a reason to
    sparsify), as a higher density converges closer to dense training; and at it the fastest row
    (ties: flat before node, fixed exchanges before ``auto``)."""
    denses = [r for r in table if r["density"] is None]
    dense = min(denses, key=lambda r: r["ms"]) if denses else None
    if dense is None or link is None:
        return None, "one rank (or no link measured): nothing to send"
    for rho in sorted({r["density"] for r in table if r["density"] is not None}, reverse=True):
        rows = [r for r in table if r["density"] == rho]
        best = min(rows, key=lambda r: (r["ms"], r["mode"] != "flat", r["exchange"] == "auto"))
        if best["ms"] * margin <= dense["ms"]:
            rec = {"hierarchy": best["mode"], "exchange": best["exchange"], "density": rho, "link_gbit": nominal_gbit(link)}
            why = (f"at density {rho} {best['mode']} mode with exchange={best['exchange']!r} is predicted "
                   f"{best['ms']:.1f} ms/step vs {dense['mode']} dense {dense['ms']:.1f} ms "
                   f"({dense['ms'] / best['ms']:.2f}x)")  # fmt: skip
            return rec, why
    lo = min(r["density"] for r in table if r["density"] is not None)
    best = min((r for r in table if r["density"] == lo), key=lambda r: r["ms"])
    return None, (f"stay dense: no sparse configuration is predicted {margin:g}x faster than {dense['mode']} dense "
                  f"({dense['ms']:.1f} ms/step; best at density {lo}: {best['ms']:.1f} ms)")  # fmt: skip


def format_table(table: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'mode':<6} {'exchange':<10} {'density':>8} {'ms/step':>10} {'vs dense':>9}"]
    for r in table:
        rho = "-" if r["density"] is None else f"{r['density']:g}"
        lines.append(f"{r['mode']:<6} {r['exchange']:<10} {rho:>8} {r['ms']:>10.2f} {r['vs_dense']:>8.2f}x")
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
        "dense and sparse training for a model, and recommend GaussKConfig options. Run it under the job's launcher "
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything but the argument parsing; returns the report (every rank; rank 0's is the one
    printed)."""
    from lightning_gaussk.engine.state import GaussKState

    t_start = time.perf_counter()
    numels = model_numels(args.model) if args.model is not None else params_numels(args.params)
    cap = int(args.bucket_cap_mb * 2**20)
    buckets = [sum(g) for g in ddp_bucket_groups(numels, cap_bytes=cap)]
    max_bytes = 4 * max(buckets)
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
    intra_link = inter_link = None
    samples: dict[str, list[dict[str, Any]]] = {"intra": [], "inter": []}
    if distributed:
        intra_g, in_intra, inter_g, in_inter = _groups(topo)
        if layout.mode == "flat" and rpn == world:  # one node: the world is the intra-node link
            intra_g, in_intra, inter_g, in_inter = None, True, None, False
        for key, group, member in (("intra", intra_g, in_intra), ("inter", inter_g, in_inter)):
            if member and (key == "inter" or rpn > 1):
                s = time_collectives(group, device, max_bytes)
                samples[key] = [{"kind": x.kind, "world": x.world, "bytes": x.nbytes, "ms": round(x.seconds * 1e3, 4)} for x in s]
                link = fit(s)
                if key == "intra":
                    intra_link = link
                else:
                    inter_link = link
            dist.barrier()
    host, select_raw = measure_select(min(max(buckets), 2**24), device, args.selector) if rank == 0 else (None, {})
    if distributed:
        dist.barrier()
    report: dict[str, Any] = {}
    if rank == 0:
        assert host is not None
        table = predict_table(buckets, nodes, rpn, intra_link, inter_link, host)
        link = inter_link if nodes > 1 else intra_link
        rec, why = recommend(table, link, args.margin)
        report = {
            "world_size": world,
            "nodes": nodes,
            "ranks_per_node": rpn,
            "backend": backend,
            "device": str(device),
            "params": sum(numels),
            "buckets": buckets,
            "bucket_cap_mb": args.bucket_cap_mb,
            "inter_node_gbit": _gbit(inter_link),
            "inter_node_latency_us": _us(inter_link),
            "intra_node_gbit": _gbit(intra_link),
            "intra_node_latency_us": _us(intra_link),
            "links": {k: None if v is None else {"alpha_s": v.alpha, "bandwidth_bytes_s": v.bandwidth}
                      for k, v in (("inter", inter_link), ("intra", intra_link))},  # fmt: skip
            "samples": samples,
            "host_costs": dataclasses.asdict(host),
            "select": select_raw,
            "densities": list(DENSITIES),
            "table": table,
            "recommended": rec,
            "recommended_strategy": RECOMMENDED_STRATEGY if rec else None,
            "verdict": "sparse" if rec else "dense",
            "reason": why,
            "elapsed_s": round(time.perf_counter() - t_start, 2),
        }
    if distributed:
        dist.barrier()
    return report


def _launcher_rpn() -> int | None:
    from lightning_gaussk.comm.layout import launcher_ranks_per_node

    return launcher_ranks_per_node()


def _gbit(link: costmodel.Link | None) -> float | None:
    return None if link is None else round(link.gbit, 4)


def _us(link: costmodel.Link | None) -> float | None:
    return None if link is None else round(link.alpha * 1e6, 1)


def print_report(r: dict[str, Any]) -> None:
    def g(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f} Gbit/s"

    print(f"GaussK pre-flight: {r['world_size']} ranks = {r['nodes']} nodes x {r['ranks_per_node']}, backend {r['backend']} "
          f"on {r['device']}; model {r['params']:,} parameters in {len(r['buckets'])} DDP buckets "
          f"(cap {r['bucket_cap_mb']:g} MB)")  # fmt: skip
    print(f"  inter-node: {g(r['inter_node_gbit'])}, latency {r['inter_node_latency_us']} us")
    print(f"  intra-node: {g(r['intra_node_gbit'])}, latency {r['intra_node_latency_us']} us")
    h = r["host_costs"]
    if h:
        print(f"  selection: {h['select_passes']:.2f} passes of {h['pass_s'] * 1e9:.3f} ns/entry + "
              f"{h['select_per_k_s'] * 1e9:.2f} ns per selected entry")  # fmt: skip
    if r["table"]:
        print("Predicted communication + host time per step (cost model):")
        print(format_table(r["table"]))
    rec = r["recommended"]
    if rec:
        kw = ", ".join(f"{k}={v!r}" for k, v in rec.items())
        print(f"Recommendation: {kw}\n  (for strategy={r['recommended_strategy']!r}: GaussKDDPStrategy(**recommended); "
              f"{r['reason']})")  # fmt: skip
    else:
        print(f"Recommendation: stay dense ({r['reason']})")
    print(f"(pre-flight took {r['elapsed_s']:.1f} s)")


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
