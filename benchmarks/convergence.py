"""Convergence with the optimizers people use: dense DDP against gaussk at densities 0.01 and
0.001, with and without the remedies of :mod:`lightning_gaussk.frontends.remedies`, at equal steps.

Families (each with its natural optimizer; every data set is local, nothing is downloaded):

* ``lm-adamw`` / ``lm-sgd``: a character-level 2-layer LSTM language model (141k parameters) on
  the concatenated source of the Python standard library of the running interpreter (the first
  ~1.5 MB of ``Lib/*.py``; the last 10% held out), AdamW (lr 3e-3) or SGD with momentum 0.9
  (lr 1.0); gradient-norm clipping 0.5 (the clip runs on the averaged, decoded gradient). Metric:
  validation bits per character.
* ``cnn-sgd``: a small CNN on scikit-learn's 8x8 digits (1,500 train / 297 validation),
  SGD momentum 0.9. Metric: validation loss (nats) and accuracy.
* ``mlp-adamw``: an MLP (64-256-256-20) on a synthetic 20-class problem
  (``sklearn.datasets.make_classification``, 12,000 samples, fixed seed), AdamW. Metric:
  validation loss and accuracy.

Every run trains in this process tree on 2 gloo ranks (raw DDP, one thread each) from the same
initial weights and the same data order for a given seed. Methods: ``dense`` (DDP allreduce);
``gaussk@rho/<remedy>`` with remedies ``off`` (optimizer unchanged), ``mc`` (momentum correction,
SGD), ``freeze`` (Adam's second moment frozen from step 100), ``warm+freeze`` (density warm-up
from 1.0 over 100 steps, then frozen), ``amsgrad``.

Time: each step's compute time is measured on rank 0 (forward, backward with the hook and the
loopback exchange, optimizer); the time on a 1 Gbit/s link adds, per step, the communication time
that :mod:`lightning_gaussk.costs.model` gives for the messages actually sent on 2 ranks (ring
all-reduce of each dense bucket, all-gather of each sparse message, 50 us per hop; no overlap of
communication with compute is credited to either method). The median step time of a run is used
(the machine is shared), times the steps.

    python benchmarks/convergence.py                  # all families, seed 0, then seeds 1-2 of the headline rows
    python benchmarks/convergence.py --families lm-adamw --steps 100   # a quick look
    python benchmarks/convergence.py --report         # tables and plots from benchmarks/out/convergence.json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import contenders as registry  # noqa: E402

sys.path.insert(0, _common.ROOT)
OUT = os.path.join(_common.OUT, "convergence.json")
DOC = os.path.join(_common.ROOT, "docs", "convergence.md")
LINK_GBIT = 1.0
FREEZE = 100  # variance_freeze_steps and the warm-up length of "warm+freeze"

FAMILIES: dict[str, dict[str, Any]] = {
    "lm-adamw": {"steps": 400, "opt": "adamw", "lr": 3e-3, "clip": 0.5, "remedies": ["off", "freeze", "warm+freeze", "amsgrad"]},
    "lm-sgd": {"steps": 400, "opt": "sgd", "lr": 1.0, "clip": 0.5, "remedies": ["off", "mc", "mc-nomask"]},
    "cnn-sgd": {"steps": 300, "opt": "sgd", "lr": 0.05, "clip": None, "remedies": ["off", "mc", "mc-nomask"]},
    "mlp-adamw": {"steps": 300, "opt": "adamw", "lr": 1e-3, "clip": None, "remedies": ["off", "freeze", "warm+freeze", "amsgrad"]},
}
DENSITIES = (0.01, 0.001)
EVAL_EVERY = 20



# The remedy of a contender "gaussk@RHO/REMEDY" (benchmarks/contenders.py), as GaussKState options.
REMEDY_TAGS: dict[str, dict[str, Any]] = {
    "off": {"remedies": "none"},
    "freeze": {"remedies": "auto", "adam_remedy": "freeze", "variance_freeze_steps": FREEZE},
    "warm+freeze": {"remedies": "auto", "adam_remedy": "freeze", "variance_freeze_steps": FREEZE, "warmup_steps": FREEZE,
                    "warmup_density": 1.0},
    "amsgrad": {"remedies": "auto", "adam_remedy": "amsgrad"},
    "mc": {"remedies": "all"},
    "mc-nomask": {"remedies": "all", "momentum_masking": False},
}

def methods(family: str) -> list[str]:
    return ["dense"] + [f"gaussk@{rho}/{r}" for rho in DENSITIES for r in FAMILIES[family]["remedies"]]


# ============================================================================== data and models
def python_source(max_bytes: int = 1_500_000) -> bytes:
    """The first ``max_bytes`` of the standard library's top-level ``*.py`` files, sorted by name."""
    lib = sysconfig.get_paths()["stdlib"]
    out = bytearray()
    for path in sorted(glob.glob(os.path.join(lib, "*.py"))):
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def make_task(family: str) -> dict[str, Any]:
    import torch
    from torch import nn

    if family.startswith("lm"):
        data = torch.frombuffer(bytearray(python_source()), dtype=torch.uint8).long().clamp_(max=127)
        cut = int(len(data) * 0.9)
        train, val = data[:cut], data[cut:]
        seq = 64
        nval = 64
        g = torch.Generator().manual_seed(1234)
        starts = torch.randint(0, len(val) - seq - 1, (nval,), generator=g)
        vx = torch.stack([val[s : s + seq + 1] for s in starts.tolist()])

        class LM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(128, 32)
                self.rnn = nn.LSTM(32, 96, 2, batch_first=True)
                self.head = nn.Linear(96, 128)

            def forward(self, x: Any) -> Any:
                return self.head(self.rnn(self.emb(x))[0])

        def batch(gen: Any) -> tuple[Any, Any]:
            s = torch.randint(0, len(train) - seq - 1, (16,), generator=gen)
            x = torch.stack([train[i : i + seq + 1] for i in s.tolist()])
            return x[:, :-1], x[:, 1:]

        def loss_fn(model: Any, x: Any, y: Any) -> Any:
            return nn.functional.cross_entropy(model(x).reshape(-1, 128), y.reshape(-1))

        def evaluate(model: Any) -> dict[str, float]:
            with torch.no_grad():
                loss = float(loss_fn(model, vx[:, :-1], vx[:, 1:]))
            return {"loss": loss / math.log(2), "metric": loss / math.log(2)}  # bits per character

        return {"model": LM, "batch": batch, "loss": loss_fn, "eval": evaluate, "metric": "val bits/char"}

    from sklearn.datasets import load_digits, make_classification

    if family.startswith("cnn"):
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(d.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        tx, ty, vx, vy = x[:1500], y[:1500], x[1500:], y[1500:]

        def model() -> Any:
            return nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(),
                nn.Linear(128, 10),
            )  # fmt: skip

        bs = 32
    else:
        xs, ys = make_classification(
            n_samples=12000, n_features=64, n_informative=40, n_redundant=8, n_classes=20, n_clusters_per_class=2,
            class_sep=1.2, flip_y=0.02, random_state=0,
        )  # fmt: skip
        x = torch.tensor(xs, dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(ys)
        tx, ty, vx, vy = x[:10000], y[:10000], x[10000:], y[10000:]

        def model() -> Any:
            return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 20))

        bs = 64

    def batch(gen: Any) -> tuple[Any, Any]:
        i = torch.randint(0, len(ty), (bs,), generator=gen)
        return tx[i], ty[i]

    def loss_fn(m: Any, xb: Any, yb: Any) -> Any:
        return nn.functional.cross_entropy(m(xb), yb)

    def evaluate(m: Any) -> dict[str, float]:
        with torch.no_grad():
            out = m(vx)
            return {"loss": float(nn.functional.cross_entropy(out, vy)), "metric": float((out.argmax(1) == vy).float().mean())}

    return {"model": model, "batch": batch, "loss": loss_fn, "eval": evaluate, "metric": "val accuracy"}


# ============================================================================== one run
def train_one(rank: int, world: int, family: str, method: str, seed: int, task: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_gaussk import GaussKState, gaussk_hook
    from lightning_gaussk.costs import model as cm
    from lightning_gaussk.frontends.remedies import describe, wrap_optimizer

    fam = FAMILIES[family]
    torch.manual_seed(seed)
    model = task["model"]()
    ddp = DDP(model)
    link = cm.Link.from_gbit(LINK_GBIT)
    comm_log: list[float] = []  # modelled communication seconds of this step

    state = None
    if method != "dense":
        opts = registry.options(registry.parse(method), {**registry.TAGS, **REMEDY_TAGS}, seed=seed)  # "gaussk@0.01/warm+freeze/allreduce"
        state = GaussKState(**opts).bind(ddp)

        def hook(st: Any, bucket: Any) -> Any:
            d = bucket.buffer().numel()
            before = st.telemetry["dense_buckets"]
            k = st.k_for(d)
            fut = gaussk_hook(st, bucket)
            if st.telemetry["dense_buckets"] > before:
                comm_log.append(cm.allreduce_time(4 * d, world, link))
            else:
                comm_log.append(cm.allgather_time(cm.sparse_message_bytes(k), world, link))
            return fut

        hook.__annotations__ = {"st": GaussKState, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
        ddp.register_comm_hook(state, hook)
    params = list(ddp.parameters())
    if fam["opt"] == "adamw":
        opt = torch.optim.AdamW(params, lr=fam["lr"])
    else:
        opt = torch.optim.SGD(params, lr=fam["lr"], momentum=0.9)
    if state is not None:
        wrap_optimizer(opt, state, log=False)
    remedy_text = describe(opt) if state is not None else "dense"
    dense_comm = sum(cm.allreduce_time(4 * p.numel(), world, link) for p in [torch.cat([q.detach().reshape(-1) for q in params])])
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    curve: list[dict[str, float]] = []
    step_times: list[float] = []
    comm_times: list[float] = []

    def record(step: int) -> None:
        ev = task["eval"](model)
        curve.append({"step": step, **ev})

    record(0)
    for step in range(1, steps + 1):
        x, y = task["batch"](gen)
        t0 = time.perf_counter()
        comm_log.clear()
        opt.zero_grad(set_to_none=True)
        loss = task["loss"](ddp, x, y)
        loss.backward()
        if fam["clip"]:
            torch.nn.utils.clip_grad_norm_(params, fam["clip"])
        opt.step()
        step_times.append(time.perf_counter() - t0)
        comm_times.append(sum(comm_log) if state is not None else dense_comm)
        if not math.isfinite(float(loss)):
            break
        if step % EVAL_EVERY == 0 or step == steps:
            record(step)
    hook_s = 0.0
    if state is not None:
        state.wait_idle()
        hook_s = state.telemetry["hook_ns"] * 1e-9 / max(len(step_times), 1)
    dist.barrier()
    return {
        "family": family, "method": method, "seed": seed, "steps": steps, "curve": curve, "remedy": remedy_text,
        "step_median_s": statistics.median(step_times), "comm_s": comm_times, "hook_s": hook_s, "params": sum(p.numel() for p in params),
        "world": world, "bytes_wire_per_step": state.telemetry["bytes_wire"] / max(len(step_times), 1) if state is not None else None,
    }  # fmt: skip


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, int, int]], out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tasks: dict[str, Any] = {}
    try:
        for family, method, seed, steps in jobs:
            task = tasks.setdefault(family, make_task(family))
            t = time.perf_counter()
            res = train_one(rank, world, family, method, seed, task, steps)
            if rank == 0:
                res["wall_s"] = time.perf_counter() - t
                _append(out_path, res)
                last = res["curve"][-1]
                print(f"{family:10s} {method:26s} seed {seed}: loss {last['loss']:.4f} metric {last['metric']:.4f} "
                      f"({res['wall_s']:.0f}s, {res['step_median_s'] * 1e3:.1f} ms/step) [{res['remedy']}]", flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _append(path: str, res: dict[str, Any]) -> None:
    results = _load(path)
    results = [r for r in results if (r["family"], r["method"], r["seed"]) != (res["family"], res["method"], res["seed"])]
    results.append(res)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


def _load(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def run(jobs: list[tuple[str, str, int, int]], out_path: str, world: int = 2) -> None:
    import torch.multiprocessing as mp

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    mp.spawn(_worker, args=(world, _common.free_port(), jobs, out_path), nprocs=world, join=True)


# ============================================================================== report
def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (family, method): final loss / metric (mean over seeds), steps and emulated time to dense's final loss."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["family"], r["method"]), []).append(r)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (family, method), runs in by.items():
        dense_runs = {r["seed"]: r for r in by.get((family, "dense"), [])}
        finals, metrics, gaps, to_steps, to_times = [], [], [], [], []
        for r in runs:
            last = r["curve"][-1]
            finals.append(last["loss"])
            metrics.append(last["metric"])
            d = dense_runs.get(r["seed"])
            if d is None:
                continue
            target = d["curve"][-1]["loss"]
            gaps.append(100.0 * (last["loss"] - target) / target)
            hit = next((c["step"] for c in r["curve"] if c["step"] > 0 and c["loss"] <= target), None)
            to_steps.append(hit)
            to_times.append(None if hit is None else emulated_time(r, hit, d))
        rows[(family, method)] = {
            "seeds": sorted(r["seed"] for r in runs),
            "loss": statistics.mean(finals), "loss_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "metric": statistics.mean(metrics), "gap_pct": statistics.mean(gaps) if gaps else float("nan"),
            "steps_to": to_steps, "time_to": to_times, "remedy": runs[0]["remedy"],
            "step_ms": 1e3 * statistics.mean(compute_step_s(r, dense_runs.get(r["seed"])) for r in runs),
            "comm_ms": 1e3 * statistics.mean(statistics.mean(r["comm_s"]) for r in runs),
        }  # fmt: skip
    return rows


def compute_step_s(run: dict[str, Any], dense: dict[str, Any] | None) -> float:
    """One step's compute: the dense run's median step time (same family and seed) plus this run's
    measured hook time per step (selection, message, decode); the run's own median without a dense run.
    (The machine is shared: one common compute figure per family keeps other users' load out of the comparison.)"""
    if dense is None:
        return run["step_median_s"]
    return dense["step_median_s"] + run.get("hook_s", 0.0)


def emulated_time(run: dict[str, Any], steps: int, dense: dict[str, Any] | None = None) -> float:
    """Seconds to ``steps`` on the emulated link: compute per step (:func:`compute_step_s`) + modelled communication per step."""
    return steps * compute_step_s(run, dense) + sum(run["comm_s"][:steps])


def report(out_path: str = OUT, doc_path: str = DOC, section: str = "convergence") -> str:
    """Tables into the ``<!-- {section}:begin/end -->`` block of ``doc_path`` and plots
    ``img/{section}_{family}.png`` from the results in ``out_path``."""
    results = _load(out_path)
    body = render(results)
    _plots(results, section)
    if os.path.exists(doc_path):
        with open(doc_path) as f:
            doc = f.read()
        b, e = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
        if b in doc and e in doc:
            doc = doc[: doc.index(b) + len(b)] + "\n" + body + "\n" + doc[doc.index(e) :]
            with open(doc_path, "w") as f:
                f.write(doc)
    return body


def render(results: list[dict[str, Any]], machine: str | None = None) -> str:
    """The tables of :func:`report` (no files written); ``machine``: the line's machine, this one by default."""
    rows = summarise(results)
    lines = []
    machine = machine or _common.machine_description("2 gloo ranks, 1 thread each")
    lines.append(f"Measured on {machine}. Equal steps for all methods of a family; seed 0 unless more seeds are listed "
                 "(then means, ± the standard deviation of the final loss). Time: median measured step time + "
                 f"cost-model communication on a {LINK_GBIT:g} Gbit/s link (2 ranks).\n")  # fmt: skip
    for family in FAMILIES:
        fam_rows = [(m, rows[(family, m)]) for m in methods(family) if (family, m) in rows]
        if not fam_rows:
            continue
        metric = "val bits/char" if family.startswith("lm") else "val accuracy"
        steps = max(r["steps"] for r in results if r["family"] == family)  # a --steps run's, not the family's default
        lines.append(f"**{family}** ({steps} steps; loss = {'bits/char' if family.startswith('lm') else 'nats'})\n")
        lines.append(f"| method | seeds | final val loss | {metric} | vs dense | steps to dense's final loss | "
                     "time to it, 1 Gbit/s | step ms (compute + comm) |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|")
        for m, r in fam_rows:
            sd = f" ± {r['loss_sd']:.3f}" if len(r["seeds"]) > 1 else ""
            met = f"{r['metric']:.3f}" if family.startswith("lm") else f"{100 * r['metric']:.1f}%"
            gap = "—" if m == "dense" else f"{r['gap_pct']:+.1f}%"
            st = _fmt_hits(r["steps_to"], lambda v: f"{v:.0f}")
            tt = _fmt_hits(r["time_to"], lambda v: f"{v:.1f} s")
            seeds = ",".join(map(str, r["seeds"]))
            lines.append(f"| {m} | {seeds} | {r['loss']:.3f}{sd} | {met} | {gap} | {st} | {tt} | "
                         f"{r['step_ms']:.1f} + {r['comm_ms']:.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _fmt_hits(values: list[Any], fmt: Any) -> str:
    if not values:
        return "—"
    hit = [v for v in values if v is not None]
    if not hit:
        return "not reached"
    text = fmt(statistics.mean(hit)) if len(hit) > 1 else fmt(hit[0])
    return text if len(hit) == len(values) else f"{text} ({len(hit)}/{len(values)} seeds)"


def _plots(results: list[dict[str, Any]], section: str = "convergence") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    os.makedirs(_common.IMG, exist_ok=True)
    for family in FAMILIES:
        runs = [r for r in results if r["family"] == family and r["seed"] == 0]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        order = {m: i for i, m in enumerate(methods(family))}
        for r in sorted(runs, key=lambda r: order.get(r["method"], 99)):
            xs = [c["step"] for c in r["curve"]]
            ys = [c["loss"] for c in r["curve"]]
            dense = next((q for q in runs if q["method"] == "dense"), None)
            ts = [emulated_time(r, s, dense) for s in xs]
            style = "-" if "0.01/" in r["method"] or r["method"] == "dense" else "--"
            lw = 2.5 if r["method"] == "dense" else 1.2
            axes[0].plot(xs, ys, style, lw=lw, label=r["method"])
            axes[1].plot(ts, ys, style, lw=lw, label=r["method"])
        unit = "bits/char" if family.startswith("lm") else "nats"
        axes[0].set(xlabel="step", ylabel=f"validation loss ({unit})", title=f"{family}: loss vs steps")
        axes[1].set(xlabel=f"emulated time on a {LINK_GBIT:g} Gbit/s link (s)", title=f"{family}: loss vs time")
        lo = min(c["loss"] for r in runs for c in r["curve"])
        hi = sorted(c["loss"] for r in runs for c in r["curve"])[int(0.6 * sum(len(r["curve"]) for r in runs))]
        for ax in axes:
            ax.set_ylim(lo * 0.97, hi)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(_common.IMG, f"{section}_{family}.png"), dpi=90)
        plt.close(fig)


HEADLINE = {  # (family, methods) re-run with seeds 1 and 2
    "lm-adamw": ["dense", "gaussk@0.01/off", "gaussk@0.01/warm+freeze", "gaussk@0.001/off", "gaussk@0.001/warm+freeze"],
    "lm-sgd": ["dense", "gaussk@0.01/off", "gaussk@0.01/mc", "gaussk@0.001/off", "gaussk@0.001/mc"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all of the family)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--headline-seeds", nargs="*", type=int, default=[1, 2], help="extra seeds of the HEADLINE rows")
    ap.add_argument("--steps", type=int, default=None, help="override the steps of every family (quick looks)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--report", action="store_true", help="only rebuild tables and plots from --out")
    ap.add_argument("--skip-done", action="store_true", help="skip (family, method, seed) already in --out")
    ap.add_argument("--section", default="convergence",
                    help="docs block <!-- SECTION:begin/end --> and image prefix (e.g. convergence_long for a --steps run)")
    ap.add_argument("--world", type=int, default=2, help="gloo ranks on loopback (the docs' tables are for 2)")
    ap.add_argument("--no-report", action="store_true", help="write only --out: no docs block, no plots")
    args = ap.parse_args()
    if args.steps:
        for fam in FAMILIES.values():
            fam["steps"] = args.steps
    if not args.report:
        jobs = [(f, m, s) for s in args.seeds for f in args.families for m in (args.methods or methods(f))]
        jobs += [(f, m, s) for s in args.headline_seeds for f in args.families if f in HEADLINE for m in HEADLINE[f]
                 if not args.methods or m in args.methods]  # fmt: skip
        if args.skip_done:
            done = {(r["family"], r["method"], r["seed"]) for r in _load(args.out)}
            jobs = [j for j in jobs if j not in done]
        run([(f, m, s, FAMILIES[f]["steps"]) for f, m, s in jobs], args.out, args.world)
    if not args.no_report:
        print(report(args.out, section=args.section))


if __name__ == "__main__":
    main()
