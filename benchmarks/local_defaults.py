"""Choosing the defaults of sparse local SGD (issue 27, point 3): a one-factor-at-a-time grid of
``outer_lr``, ``quantize``, ``density``, ``sync_every`` (``H``) and ``ef_decay`` around a centre,
against dense DDP and the defaults before they were chosen here, on several tasks and seeds, 2 gloo ranks.

Tasks (benchmarks/convergence.py's families, each with its own optimizer, data and model):

- ``lm``: ``lm-adamw``, the character-level 2-layer LSTM (141k parameters) on the standard
  library's source, AdamW lr 3e-3, clipping 0.5, 16 sequences of 64 characters per rank and step.
  Metric: validation bits per character.
- ``mlp``: ``mlp-adamw``, an MLP 64-256-256-20 (87k parameters) on a synthetic 20-class problem,
  AdamW lr 1e-3, 64 samples per rank and step. Metric: validation loss (nats) and accuracy.
- ``digits``: ``cnn-sgd``, a small CNN on scikit-learn's 8x8 digits, SGD momentum 0.9 lr 0.05,
  32 samples per rank and step. Metric: validation loss (nats) and accuracy. (The check with SGD
  inside: ``outer_lr`` 2 and 3 diverge there.)

Contenders: ``dense`` (DDP all-reduce every step, benchmarks/convergence.py's ``train_one``) and
the local SGD names of benchmarks/local_sgd.py (``sparse@<rho>/H<h>[/q2][/a<alpha>][/b<beta>]``,
chunks of 4096, ``ef_decay`` 0.95 and ``outer_lr`` 1 unless tagged; ``diloco/H<h>``). Every
contender of a (task, seed) starts from the same weights and sees the same data per rank and step;
local SGD runs the plain module and clips its local gradients (the LM). The final model is
evaluated at the last step, a multiple of every ``H`` (all ranks then hold ``theta``).

Per run: the final validation metric, its gap to dense of the same seed (in %, of the loss), the
message bytes per rank per inner step (``SparseLocalSGD.bytes_per_inner_step``; dense: ``4 d``)
and the factor fewer than dense.

    python benchmarks/local_defaults.py --grid --tasks lm mlp --seeds 0 1      # the grid, 2 tasks x 2 seeds
    python benchmarks/local_defaults.py --tasks digits --seeds 0 1 --methods dense sparse@0.02/H16 \
        sparse@0.02/H16/q2 sparse@0.02/H16/q2/a1.5 sparse@0.02/H16/q2/a2 sparse@0.02/H16/q2/a3 sparse@0.02/H16/a2
    python benchmarks/local_defaults.py --report                               # the table into docs/local-sgd.md

Diverged runs (final validation loss not finite or not below the initial one) read "diverged".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import convergence  # noqa: E402
import local_sgd  # noqa: E402

sys.path.insert(0, _common.ROOT)
OUT = os.path.join(_common.OUT, "local_defaults.json")
DOC = os.path.join(_common.ROOT, "docs", "local-sgd.md")
EVAL_EVERY = 32

TASKS: dict[str, dict[str, Any]] = {
    "lm": {"family": "lm-adamw", "steps": 800, "unit": "bits/char"},
    "mlp": {"family": "mlp-adamw", "steps": 800, "unit": "nats"},
    "digits": {"family": "cnn-sgd", "steps": 800, "unit": "nats"},
}

TODAY = "sparse@0.02/H16"  # the old defaults: density 0.02, H 16, outer_lr 1, ef_decay 0.95, no quantisation
CENTRE = "sparse@0.02/H16/q2/a2"  # the centre of the grid
RECOMMENDED = "sparse@0.02/H16/q2/a1.5"  # the recommended defaults (bold in the table)


def variant(density: float = 0.02, h: int = 16, q: bool = True, alpha: float = 2.0, beta: float = 0.95) -> str:
    """The contender name of one point of the grid (local_sgd.parse reads it)."""
    name = f"sparse@{density:g}/H{h}"
    if q:
        name += "/q2"
    if alpha != 1.0:
        name += f"/a{alpha:g}"
    if beta != 0.95:
        name += f"/b{beta:g}"
    return name


# one factor at a time around CENTRE (density 0.02, H 16, 2-bit values, outer_lr 2, ef_decay 0.95)
GRID = list(dict.fromkeys([
    "dense", TODAY, "diloco/H16",
    *(variant(alpha=a) for a in (1.0, 1.5, 2.0, 3.0)),
    variant(q=False),
    *(variant(density=r) for r in (0.01, 0.05)),
    *(variant(h=h) for h in (8, 32)),
]))  # fmt: skip


def train_local(rank: int, world: int, task_name: str, method: str, seed: int, task: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from lightning_gaussk.engine.local.driver import SparseLocalSGD

    fam = convergence.FAMILIES[TASKS[task_name]["family"]]
    torch.manual_seed(seed)
    model = task["model"]()
    params = list(model.parameters())
    if fam["opt"] == "adamw":
        opt = torch.optim.AdamW(params, lr=fam["lr"])
    else:
        opt = torch.optim.SGD(params, lr=fam["lr"], momentum=0.9)
    options = local_sgd.parse(method)
    local = SparseLocalSGD(model, opt, hierarchy="flat", **options)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    curve: list[dict[str, float]] = [{"step": 0, **task["eval"](model)}]
    step_times: list[float] = []
    h = local.sync_every
    for step in range(1, steps + 1):
        x, y = task["batch"](gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task["loss"](model, x, y)
        loss.backward()
        if fam["clip"]:
            torch.nn.utils.clip_grad_norm_(params, fam["clip"])
        opt.step()  # every H-th: the outer step
        if step % h:
            step_times.append(time.perf_counter() - t0)
        if (step % EVAL_EVERY == 0 and step % h == 0) or step == steps:
            curve.append({"step": step, **task["eval"](model)})
    dist.barrier()
    return {
        "inner_median_s": statistics.median(step_times), "outer_s": local.outer_seconds, "curve": curve,
        "params": local.d, "k": local.k, "sparse": local.sparse, "options": options,
        "bytes_per_step": local.bytes_per_inner_step, "outer_bytes": local.outer_bytes,
        "dense_bytes_per_step": local.dense_bytes_per_step,
        "skipped_outer_steps": local.telemetry["skipped_outer_steps"],
    }  # fmt: skip


def train_dense(rank: int, world: int, task_name: str, method: str, seed: int, task: dict[str, Any], steps: int) -> dict[str, Any]:
    convergence.EVAL_EVERY = EVAL_EVERY
    res = convergence.train_one(rank, world, TASKS[task_name]["family"], "dense", seed, task, steps)
    d = res["params"]
    return {"curve": res["curve"], "params": d, "inner_median_s": res["step_median_s"], "bytes_per_step": 4 * d,
            "dense_bytes_per_step": 4 * d}  # fmt: skip


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, int, int]], out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tasks: dict[str, Any] = {}
    commit = _commit()  # the code the workers imported
    try:
        for task_name, method, seed, steps in jobs:
            task = tasks.setdefault(task_name, convergence.make_task(TASKS[task_name]["family"]))
            t = time.perf_counter()
            train = train_dense if method == "dense" else train_local
            res = train(rank, world, task_name, method, seed, task, steps)
            if rank == 0:
                res.update(task=task_name, family=TASKS[task_name]["family"], method=method, seed=seed, steps=steps,
                           world=world, wall_s=time.perf_counter() - t, commit=commit,
                           machine=_common.machine_description(f"{world} gloo ranks, 1 thread each"))  # fmt: skip
                _append(out_path, res)
                last = res["curve"][-1]
                print(f"{task_name:6s} {method:26s} seed {seed} {steps} steps: loss {last['loss']:.4f} metric "
                      f"{last['metric']:.4f}, {res['bytes_per_step']:.0f} B/step ({res['wall_s']:.0f}s)", flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", _common.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", _common.ROOT, "status", "--porcelain", "lightning_gaussk"], capture_output=True, text=True, check=False).stdout.strip()
        return head + ("+dirty package" if dirty else "")
    except OSError:  # pragma: no cover
        return "unknown"


def _key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return (r["task"], r["method"], r["seed"], r["steps"])


def _append(path: str, res: dict[str, Any]) -> None:
    results = [r for r in _load(path) if _key(r) != _key(res)]
    results.append(res)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)


def _load(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


# ============================================================================== report
def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Per (task, steps, method): final loss and metric per seed, the gap to dense of the same seed
    (% of dense's final loss), bytes per inner step and the factor fewer than dense."""
    by: dict[tuple[str, int, str], dict[int, dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["task"], r["steps"], r["method"]), {})[r["seed"]] = r
    rows = {}
    for (task, steps, method), runs in by.items():
        dense = by.get((task, steps, "dense"), {})
        seeds = sorted(s for s in runs if s in dense)
        if not seeds:
            continue
        ok = [not diverged(runs[s]) for s in seeds]  # None marks a diverged seed in every list below
        loss = [runs[s]["curve"][-1]["loss"] if o else None for s, o in zip(seeds, ok)]
        metric = [runs[s]["curve"][-1]["metric"] if o else None for s, o in zip(seeds, ok)]
        gap = [100.0 * (runs[s]["curve"][-1]["loss"] / dense[s]["curve"][-1]["loss"] - 1.0) if o else None
               for s, o in zip(seeds, ok)]  # fmt: skip
        dmetric = [runs[s]["curve"][-1]["metric"] - dense[s]["curve"][-1]["metric"] if o else None for s, o in zip(seeds, ok)]
        b = runs[seeds[0]]["bytes_per_step"]
        rows[(task, steps, method)] = {
            "seeds": seeds, "loss": loss, "metric": metric, "gap_pct": gap, "dmetric": dmetric,
            "bytes_per_step": b, "fewer": dense[seeds[0]]["bytes_per_step"] / b,
        }  # fmt: skip
    return rows


def diverged(run: dict[str, Any]) -> bool:
    """A run diverged when its final validation loss is not finite or not below its initial one."""
    first, last = run["curve"][0]["loss"], run["curve"][-1]["loss"]
    return not math.isfinite(last) or last >= first


def _mean_spread(xs: list[float | None], fmt: str, unit: str = "") -> str:
    """``mean (a / b)``: the mean over seeds and each seed's value (two seeds: the spread in full);
    a diverged seed (``None``) reads "diverged" and leaves the mean out."""
    each = ["diverged" if x is None else format(x, fmt) + unit for x in xs]
    if len(xs) == 1:
        return each[0]
    m = "diverged" if None in xs else format(statistics.mean(xs), fmt) + unit  # type: ignore[arg-type]
    return f"{m} ({' / '.join(each)})"


def _order(method: str) -> tuple[int, str]:
    return (GRID.index(method), "") if method in GRID else (len(GRID), method)


def render(results: list[dict[str, Any]]) -> str:
    rows = summarise(results)
    lines = []
    machine = next((r["machine"] for r in results), "")
    for task, steps in sorted({(t, s) for t, s, _ in rows}, key=lambda ts: (list(TASKS).index(ts[0]), ts[1])):
        spec = TASKS[task]
        lm = spec["unit"] == "bits/char"
        trows = sorted(((m, r) for (t, s, m), r in rows.items() if (t, s) == (task, steps)), key=lambda mr: _order(mr[0]))
        seeds = sorted({s for _, r in trows for s in r["seeds"]})
        lines.append(f"**{task}** (`{spec['family']}`, {steps} inner steps, 2 ranks, seeds {', '.join(map(str, seeds))}). "
                     "Each cell: the mean over seeds, then each seed's value in parentheses.\n")  # fmt: skip
        if lm:
            lines.append("| contender | val bits/char | gap to dense | bytes per step per rank | fewer bytes than dense |")
            lines.append("|---|---|---|---|---|")
        else:
            lines.append("| contender | val loss (nats) | gap to dense | val accuracy | accuracy vs dense (points) | "
                         "bytes per step per rank | fewer bytes than dense |")  # fmt: skip
            lines.append("|---|---|---|---|---|---|---|")
        for m, r in trows:
            name = f"**{m}** (the defaults)" if m == RECOMMENDED else f"{m} (the old defaults)" if m == TODAY else m
            name += " (centre)" if m == CENTRE else ""
            gap = "—" if m == "dense" else _mean_spread(r["gap_pct"], "+.1f", "%")
            fewer = "1x" if m == "dense" else f"{r['fewer']:,.0f}x"
            cells = [name, _mean_spread(r["loss"], ".3f"), gap]
            if not lm:
                acc = _mean_spread([None if x is None else 100 * x for x in r["metric"]], ".1f")
                dacc = "—" if m == "dense" else _mean_spread([None if x is None else 100 * x for x in r["dmetric"]], "+.1f")
                cells += [acc, dacc]
            cells += [local_sgd._fmt_bytes(r["bytes_per_step"]), fewer]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if machine:
        lines.append(f"Measured on {machine}.\n")
    return "\n".join(lines)


def report(out_path: str = OUT) -> str:
    body = render(_load(out_path))
    if os.path.exists(DOC):
        with open(DOC) as f:
            doc = f.read()
        b, e = "<!-- local_defaults:begin -->", "<!-- local_defaults:end -->"
        if b in doc and e in doc:
            doc = doc[: doc.index(b) + len(b)] + "\n" + body + "\n" + doc[doc.index(e) :]
            with open(DOC, "w") as f:
                f.write(doc)
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", action="store_true", help="every contender of GRID")
    ap.add_argument("--methods", nargs="*", default=None, help="contenders (default: GRID)")
    ap.add_argument("--tasks", nargs="*", default=["lm", "mlp"], choices=list(TASKS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="override every task's steps (a multiple of every H)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--report", action="store_true", help="only rebuild the table from --out")
    ap.add_argument("--no-report", action="store_true", help="write only --out")
    ap.add_argument("--skip-done", action="store_true", help="skip (task, method, seed, steps) already in --out")
    args = ap.parse_args()
    if not args.report:
        import torch.multiprocessing as mp

        methods = args.methods or GRID
        jobs = [(t, m, s, args.steps or TASKS[t]["steps"]) for t in args.tasks for s in args.seeds for m in methods]
        if args.skip_done:
            done = {_key(r) for r in _load(args.out)}
            jobs = [j for j in jobs if j not in done]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        if jobs:
            mp.spawn(_worker, args=(args.world, _common.free_port(), jobs, args.out), nprocs=args.world, join=True)
    if not args.no_report:
        print(report(args.out))


if __name__ == "__main__":
    main()
