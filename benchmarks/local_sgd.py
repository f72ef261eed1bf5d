"""Sparse local SGD against per-step compression and DiLoCo, on the LSTM language model of
benchmarks/convergence.py (``lm-adamw``: AdamW lr 3e-3, gradient clipping 0.5, 16 sequences of 64
characters per rank and step), 4 gloo ranks, the same number of inner steps for every contender.

Contenders (names):

- ``dense``: DDP all-reduce every step;
- ``gaussk@0.01``: the per-step GaussK hook at density 0.01 (error feedback, no remedy);
- ``diloco/H<h>[/a<alpha>]``: :class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD` with
  ``outer="dense"`` (outer Nesterov, momentum 0.9, outer lr 0.7 or ``alpha``);
- ``sparse@<rho>/H<h>[/q2][/a<alpha>][/b<beta>]``: ``outer="sparse"``, chunk-wise exact top-k over
  chunks of 4096, ``ef_decay`` 0.95 (or ``beta``), ``outer_lr`` 1 (or ``alpha``), optionally 2-bit
  values (``/q2``).

Every contender starts from the same weights and sees the same data per rank and step. Local SGD
contenders run the plain module (no DDP) and clip their local gradients. Evaluation (validation
bits per character of rank 0's model) every 32 steps, which is a multiple of every ``H``: the
ranks then hold the same model.

Bytes: message bytes per rank per inner step (dense: ``4 d``; gaussk: ``4 (2k + 1)``; local SGD:
the outer step's message bytes / ``H``). Time at an emulated 100 Mbit/s: each run's median measured
compute time per inner step (forward, backward, optimizer; the hook or the amortised outer step's
host work included) plus the cost model's communication time (:mod:`lightning_gaussk.costs.model`,
50 us per hop, 95% payload) for the bytes actually sent on 4 ranks; no overlap is credited.

    python benchmarks/local_sgd.py                       # all contenders, 1600 steps
    python benchmarks/local_sgd.py --steps 3200 --methods dense sparse@0.02/H16 --out benchmarks/out/local_sgd-3200.json
    python benchmarks/local_sgd.py --report              # table and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import convergence  # noqa: E402

sys.path.insert(0, _common.ROOT)
OUT = os.path.join(_common.OUT, "local_sgd.json")
DOC = os.path.join(_common.ROOT, "docs", "local-sgd.md")
FAMILY = "lm-adamw"
LINK_GBIT = 0.1
EVAL_EVERY = 32
CHUNK = 4096
METHODS = [
    "dense", "gaussk@0.01", "diloco/H16", "diloco/H32",
    "sparse@0.02/H16", "sparse@0.02/H16/q2", "sparse@0.02/H32", "sparse@0.02/H32/q2",
]  # fmt: skip


def parse(method: str) -> dict[str, Any]:
    """Options of :class:`SparseLocalSGD` for a local SGD name (``diloco/H16``, ``sparse@0.02/H32/q2``)."""
    head, *tags = method.split("/")
    h = next(int(t[1:]) for t in tags if t.startswith("H"))
    alpha = next((float(t[1:]) for t in tags if t.startswith("a")), None)  # "/a1.2": outer_lr
    if head == "diloco":
        return {"outer": "dense", "sync_every": h, "outer_lr": alpha or 0.7, "outer_momentum": 0.9}
    density = float(head.split("@")[1])
    alpha = alpha or 1.0
    beta = next((float(t[1:]) for t in tags if t.startswith("b")), 0.95)  # "/b0.9": ef_decay
    return {
        "outer": "sparse", "sync_every": h, "density": density, "outer_lr": alpha, "ef_decay": beta, "chunk": CHUNK,
        "quantize": 2 if "q2" in tags else None,
    }  # fmt: skip


def train_local(rank: int, world: int, method: str, seed: int, task: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from lightning_gaussk.costs import model as cm
    from lightning_gaussk.engine.local.driver import SparseLocalSGD

    fam = convergence.FAMILIES[FAMILY]
    torch.manual_seed(seed)
    model = task["model"]()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=fam["lr"])
    local = SparseLocalSGD(model, opt, hierarchy="flat", **parse(method))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    curve: list[dict[str, float]] = [{"step": 0, **task["eval"](model)}]
    step_times: list[float] = []
    for step in range(1, steps + 1):
        x, y = task["batch"](gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task["loss"](model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, fam["clip"])
        opt.step()  # every H-th: the outer step
        if step % local.sync_every:
            step_times.append(time.perf_counter() - t0)
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append({"step": step, **task["eval"](model)})
    dist.barrier()
    link = cm.Link.from_gbit(LINK_GBIT)
    return {
        "method": method, "seed": seed, "steps": steps, "curve": curve, "world": world, "params": local.d,
        "inner_median_s": statistics.median(step_times), "outer_s": local.outer_seconds,
        "step_compute_s": statistics.median(step_times) + local.outer_seconds / local.sync_every,
        "extra_s": local.outer_seconds / local.sync_every,
        "comm_s_per_step": local.predicted_outer_time(link) / local.sync_every,
        "bytes_per_step": local.bytes_per_inner_step, "outer_bytes": local.outer_bytes, "k": local.k,
        "sparse": local.sparse, "options": parse(method),
    }  # fmt: skip


def train_ddp(rank: int, world: int, method: str, seed: int, task: dict[str, Any], steps: int) -> dict[str, Any]:
    from lightning_gaussk.costs import model as cm

    convergence.EVAL_EVERY = EVAL_EVERY
    res = convergence.train_one(rank, world, FAMILY, "dense" if method == "dense" else f"{method}/off", seed, task, steps)
    d = res["params"]
    link = cm.Link.from_gbit(LINK_GBIT)
    if method == "dense":
        nbytes, comm = 4 * d, cm.allreduce_time(4 * d, world, link)
    else:
        k = cm.bucket_k(float(method.split("@")[1]), d)  # one bucket (141k parameters < DDP's 25 MiB)
        nbytes, comm = cm.sparse_message_bytes(k), cm.allgather_time(cm.sparse_message_bytes(k), world, link)
    return {
        "method": method, "seed": seed, "steps": steps, "curve": res["curve"], "world": world, "params": d,
        "step_compute_s": res["step_median_s"], "extra_s": res["hook_s"], "comm_s_per_step": comm, "bytes_per_step": nbytes,
    }  # fmt: skip


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, int, int]], out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    task = convergence.make_task(FAMILY)
    try:
        for method, seed, steps in jobs:
            t = time.perf_counter()
            train = train_ddp if method == "dense" or method.startswith("gaussk") else train_local
            res = train(rank, world, method, seed, task, steps)
            if rank == 0:
                res["wall_s"] = time.perf_counter() - t
                res["machine"] = _common.machine_description(f"{world} gloo ranks, 1 thread each")
                _append(out_path, res)
                print(f"{method:22s} seed {seed} {steps} steps: {res['curve'][-1]['metric']:.3f} bits/char, "
                      f"{res['bytes_per_step']:.0f} B/step ({res['wall_s']:.0f}s)", flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _append(path: str, res: dict[str, Any]) -> None:
    results = [r for r in _load(path) if (r["method"], r["seed"], r["steps"]) != (res["method"], res["seed"], res["steps"])]
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
def compute_s(run: dict[str, Any], dense: dict[str, Any] | None) -> float:
    """One inner step's compute: the dense run's median step time (same steps) plus this run's own
    extra host work per step (the hook's time; the outer step's time / H), as
    benchmarks/convergence.py does: the machine is shared, and one common figure keeps other
    users' load out of the comparison. Without a dense run (or the extra measured): the run's own median."""
    extra = run.get("extra_s")
    if extra is None and "outer_s" in run:
        extra = run["outer_s"] / run["options"]["sync_every"]
    if run is dense:
        extra = 0.0
    if dense is None or extra is None:
        return run["step_compute_s"]
    return dense["step_compute_s"] + extra


def render(results: list[dict[str, Any]]) -> str:
    """The table of the docs: final bits/char, gap to dense, bytes per step and the reduction,
    emulated time at 100 Mbit/s."""
    lines = []
    for steps, seed in sorted({(r["steps"], r["seed"]) for r in results}):
        runs = {r["method"]: r for r in results if r["steps"] == steps and r["seed"] == seed}
        dense = runs.get("dense")
        machine = next(iter(runs.values()))["machine"]
        lines.append(f"**{steps} inner steps**, 4 ranks, seed {seed}. Measured on {machine}. Time: compute per inner step "
                     "(dense's median measured step + each method's own measured hook or outer-step time per step) + "
                     f"cost-model communication at {LINK_GBIT * 1000:g} Mbit/s.\n")  # fmt: skip
        lines.append("| contender | val bits/char | gap to dense | bytes per step per rank | fewer bytes than dense | "
                     "compute + comm per step (ms) | time at 100 Mbit/s |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|")
        order = [m for m in METHODS if m in runs] + sorted(m for m in runs if m not in METHODS)
        for m in order:
            r = runs[m]
            bpc = r["curve"][-1]["metric"]
            gap = "—" if dense is None or m == "dense" else f"{bpc - dense['curve'][-1]['metric']:+.3f}"
            ratio = "1x" if dense is None or m == "dense" else f"{dense['bytes_per_step'] / r['bytes_per_step']:.0f}x"
            c = compute_s(r, dense)
            t = steps * (c + r["comm_s_per_step"])
            lines.append(f"| {m} | {bpc:.3f} | {gap} | {_fmt_bytes(r['bytes_per_step'])} | {ratio} | "
                         f"{1e3 * c:.1f} + {1e3 * r['comm_s_per_step']:.2f} | {t:.0f} s |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB" if b >= 1e3 else f"{b:.0f} B"


def plots(results: list[dict[str, Any]], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["steps"] == steps and r["seed"] == 0]
    dense = next((r for r in runs if r["method"] == "dense"), None)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for r in sorted(runs, key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else 99):
        xs = [c["step"] for c in r["curve"]]
        ys = [c["metric"] for c in r["curve"]]
        style = "-" if r["method"] in ("dense", "gaussk@0.01") else ("--" if r["method"].startswith("diloco") else ":")
        lw = 2.5 if r["method"] == "dense" else 1.3
        axes[0].plot(xs, ys, style, lw=lw, label=r["method"])
        axes[1].plot([max(s, 1) * r["bytes_per_step"] for s in xs], ys, style, lw=lw, label=r["method"])
        per_step = compute_s(r, dense) + r["comm_s_per_step"]
        axes[2].plot([s * per_step for s in xs], ys, style, lw=lw, label=r["method"])
    axes[0].set(xlabel="inner step", ylabel="validation bits/char", title="loss vs inner steps")
    axes[1].set(xlabel="bytes sent per rank (cumulative)", xscale="log", title="loss vs bytes", xlim=(1e4, None))
    axes[2].set(xlabel=f"emulated time at {LINK_GBIT * 1000:g} Mbit/s (s)", xscale="log", title="loss vs time")
    lo = min(c["metric"] for r in runs for c in r["curve"])
    for ax in axes:
        ax.set_ylim(lo * 0.97, 4.2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(out_path: str = OUT) -> str:
    """Table (into docs/local-sgd.md) and plots from ``out_path`` and every ``local_sgd-*.json``
    beside it (longer runs): one table per number of steps, one plot each
    (``img/local_sgd_lm.png`` for 1600 steps, ``img/local_sgd_lm_<steps>.png`` otherwise)."""
    import glob

    paths = [out_path] + sorted(p for p in glob.glob(os.path.join(os.path.dirname(out_path), "local_sgd-*.json")) if p != out_path)
    results = [r for p in paths for r in _load(p)]
    body = render(results)
    if os.path.exists(DOC):
        with open(DOC) as f:
            doc = f.read()
        b, e = "<!-- local_sgd:begin -->", "<!-- local_sgd:end -->"
        if b in doc and e in doc:
            doc = doc[: doc.index(b) + len(b)] + "\n" + body + "\n" + doc[doc.index(e) :]
            with open(DOC, "w") as f:
                f.write(doc)
    try:
        for steps in sorted({r["steps"] for r in results}):
            name = "local_sgd_lm.png" if steps == 1600 else f"local_sgd_lm_{steps}.png"
            plots(results, os.path.join(_common.IMG, name), steps)
    except ImportError:  # pragma: no cover
        pass
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--report", action="store_true", help="only rebuild the table and plot from --out")
    ap.add_argument("--skip-done", action="store_true")
    args = ap.parse_args()
    if not args.report:
        import torch.multiprocessing as mp

        jobs = [(m, s, args.steps) for s in args.seeds for m in args.methods]
        if args.skip_done:
            done = {(r["method"], r["seed"], r["steps"]) for r in _load(args.out)}
            jobs = [j for j in jobs if j not in done]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        mp.spawn(_worker, args=(args.world, _common.free_port(), jobs, args.out), nprocs=args.world, join=True)
    print(report(OUT))


if __name__ == "__main__":
    main()
