"""Soak tests (the long versions of tests/test_faults.py and of the memory test in tests/test_hook.py).

    python benchmarks/soak.py fits --launcher spawn --runs 50     # consecutive 2-process Lightning fits
    python benchmarks/soak.py fits --launcher popen --runs 50
    python benchmarks/soak.py raw --runs 50 --end exit --hook gaussk   # raw DDP, 2 spawned processes
    python benchmarks/soak.py memory --steps 1000                  # RSS of plain DDP vs the hook

``fits`` runs tests/scripts/lightning_fit.py with a ``--plan`` (2 CPU processes) and counts runs
whose processes did not all exit with status 0 (with popen, rank 0 waits for its child and fails
if the child did not exit with 0) and runs whose output says "terminate called" (a C++ abort at
teardown). ``--plan one`` (the default) is one short fit per run; ``--plan resume`` is the
checkpoint/resume plan of tests/test_faults.py and tests/test_strategy.py in one process pair: a
fit that checkpoints every 4 steps and saves at step 8, a fit resumed from that save, the
uninterrupted fit; ``--plan '<JSON list>'`` runs that plan (``{ckpt}`` in a value is the run's
folder). ``--strategy gaussk`` (GaussKDDPStrategy, ``--hierarchy auto|flat``) or ``ddp`` (plain
Lightning DDPStrategy, the same plan):

    python benchmarks/soak.py fits --plan resume --runs 30 --strategy gaussk --hierarchy auto
    python benchmarks/soak.py fits --plan resume --runs 30 --strategy ddp ``raw`` runs a short training
loop with torch DDP and ends it the way ``--end`` says: ``exit`` (just return: the interpreter
tears the process group down), ``destroy`` (``destroy_process_group()`` right away),
``barrier_destroy`` or ``idle_destroy`` (``state.wait_idle()`` first). ``memory`` trains the same model under plain DDP and under the hook and
samples each rank's RSS every 50 steps; it reports the growth after warm-up and the peak
overhead. Results are printed and, with ``--json``, appended to a file.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "lightning_fit.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import free_port  # noqa: E402


def _report(args: argparse.Namespace, result: dict) -> None:
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


# ------------------------------------------------------------------------------------------ fits
PLANS = {
    "one": [{"name": "fit", "max_steps": None}],
    # the checkpoint/resume plan fit (tests/test_faults.py's resumed/straight pair, test_strategy.py's save/resume)
    "resume": [
        {"name": "half", "max_steps": 8, "ckpt_every": 4, "ckpt_dir": "{ckpt}/ckpts", "save_ckpt": "{ckpt}/half.ckpt"},
        {"name": "resumed", "max_steps": 14, "resume": "{ckpt}/half.ckpt"},
        {"name": "straight", "max_steps": 14},
    ],
}


def _plan(args: argparse.Namespace, run_dir: Path) -> list[dict]:
    plan = PLANS[args.plan] if args.plan in PLANS else json.loads(args.plan)
    out = []
    for spec in plan:
        spec = {k: (v.replace("{ckpt}", str(run_dir)) if isinstance(v, str) else v) for k, v in spec.items()}
        spec.setdefault("launcher", args.launcher)
        if spec.get("max_steps", 0) is None:
            spec["max_steps"] = args.steps
        if args.strategy == "ddp":
            spec.update(strategy="ddp", density=None)
        else:
            spec.setdefault("density", 0.05)
            spec.setdefault("hierarchy", args.hierarchy)
        out.append(spec)
    return out


def fits(args: argparse.Namespace) -> None:
    work = Path(args.workdir or f"/tmp/soak_{args.launcher}_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    bad, aborted, codes, seconds = [], [], [], []
    for i in range(args.runs):
        run_dir = work / f"run{i}"
        run_dir.mkdir(parents=True, exist_ok=True)
        plan = _plan(args, run_dir)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, str(SCRIPT), "--out", str(run_dir / "out"), "--plan", json.dumps(plan)],
                cwd=run_dir, capture_output=True, text=True, timeout=args.timeout,
            )
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        seconds.append(round(time.monotonic() - t0, 1))
        ok = rc == 0 and all(len(list((run_dir / "out" / spec["name"]).glob("rank*.pt"))) == 2 for spec in plan)
        codes.append(rc)
        if "terminate called" in str(log):
            aborted.append(i)
        if not ok:
            bad.append(i)
        if not ok or i in aborted:
            (work / f"run{i}.log").write_text(str(log))
            tail = str(log).strip().splitlines()[-3:]
            print(f"run {i}: rc={rc} terminate_called={i in aborted} {tail}", flush=True)
        elif args.verbose:
            print(f"run {i}: ok {seconds[-1]} s", flush=True)
        if not args.keep and ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        if args.budget_s and sum(seconds) > args.budget_s:
            print(f"stopping after {i + 1} runs: budget of {args.budget_s} s spent", flush=True)
            break
    _report(args, {"kind": "fits", "plan": args.plan, "strategy": args.strategy,
                   "hierarchy": args.hierarchy if args.strategy != "ddp" else None, "launcher": args.launcher,
                   "runs": len(seconds), "failed": len(bad), "failed_runs": bad, "terminate_called": len(aborted),
                   "terminate_called_runs": aborted, "exit_codes": sorted(set(map(str, codes))),
                   "mean_s": round(sum(seconds) / len(seconds), 1)})


# ------------------------------------------------------------------------------------------ raw
class Net(nn.Module):
    def __init__(self, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _build(hook: str, width: int, depth: int, bucket_cap_mb: float):
    from lightning_gaussk import GaussKState, gaussk_hook

    torch.manual_seed(0)
    model = Net(width, depth)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = None
    if hook == "gaussk":
        state = GaussKState(density=0.01).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
    elif hook == "allreduce":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)
    return model, ddp, state


def _raw_worker(rank: int, world: int, port: int, hook: str, end: str, steps: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, ddp, state = _build(hook, 64, 3, 0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        opt.zero_grad()
        ddp(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
        opt.step()
    if end == "barrier_destroy":
        dist.barrier()
    if end == "idle_destroy" and state is not None:
        state.wait_idle()  # what docs/reliability.md asks of raw-DDP scripts
    if end in ("destroy", "barrier_destroy", "idle_destroy"):
        dist.destroy_process_group()


def raw(args: argparse.Namespace) -> None:

    bad, codes = [], []
    for i in range(args.runs):
        ctx = mp.start_processes(_raw_worker, args=(2, free_port(), args.hook, args.end, args.steps), nprocs=2, join=False,
                                 start_method="spawn")
        for p in ctx.processes:
            p.join(args.timeout)
        run_codes = [p.exitcode for p in ctx.processes]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
        codes.append(run_codes)
        if any(c != 0 for c in run_codes):
            bad.append(i)
            print(f"run {i}: exit codes {run_codes} (None = hung, killed after {args.timeout} s)", flush=True)
    _report(args, {"kind": "raw", "hook": args.hook, "end": args.end, "runs": args.runs, "failed": len(bad), "failed_runs": bad,
                   "codes": sorted({str(c) for c in codes})})


# ------------------------------------------------------------------------------------------ memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_worker(rank: int, world: int, port: int, hook: str, steps: int, width: int, depth: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = _rss()
    model, ddp, state = _build(hook, width, depth, 25.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(32, width, generator=g)
    samples = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
        if step % 50 == 0 or step in (1, 5, 10):
            samples.append((step, _rss()))
    state_bytes = 0
    if state is not None:  # public API: the store's bytes (buffers included), else the residuals alone
        store = getattr(state, "store", None)
        if store is not None and hasattr(store, "nbytes"):
            state_bytes = store.nbytes()
        else:
            state_bytes = sum(t.numel() * t.element_size() for t in state.residuals().values())
    params = sum(p.numel() for p in model.parameters())
    dist.barrier()
    Path(out, f"{hook}_rank{rank}.json").write_text(json.dumps({"base": base, "samples": samples, "state_bytes": state_bytes, "params": params}))
    dist.barrier()
    dist.destroy_process_group()


def memory(args: argparse.Namespace) -> None:

    out = Path(args.workdir or f"/tmp/soak_memory_{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for hook in ("none", "gaussk"):
        mp.start_processes(_memory_worker, args=(2, free_port(), hook, args.steps, args.width, args.depth, str(out)), nprocs=2,
                           join=True, start_method="spawn")
        recs = [json.loads(Path(out, f"{hook}_rank{r}.json").read_text()) for r in range(2)]
        peak = max(max(r for _, r in rec["samples"]) for rec in recs)
        after_warmup = [dict(rec["samples"])[100] for rec in recs]
        final = [rec["samples"][-1][1] for rec in recs]
        res[hook] = {
            "peak_rss_mb": round(peak / 2**20, 1),
            "growth_100_to_end_mb": [round((f - a) / 2**20, 2) for a, f in zip(after_warmup, final)],
            "state_mb": round(recs[0]["state_bytes"] / 2**20, 2),
            "params_mb_fp32": round(recs[0]["params"] * 4 / 2**20, 2),
            "rss_mb_by_step": [(s, round(r / 2**20, 1)) for s, r in recs[0]["samples"]],
        }
    res["peak_overhead_ratio"] = round(res["gaussk"]["peak_rss_mb"] / res["none"]["peak_rss_mb"], 3)
    res["peak_overhead_mb"] = round(res["gaussk"]["peak_rss_mb"] - res["none"]["peak_rss_mb"], 1)
    _report(args, {"kind": "memory", "steps": args.steps, "width": args.width, "depth": args.depth, **res})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fits", "raw", "memory"])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--launcher", choices=["spawn", "popen"], default="spawn")
    p.add_argument("--plan", default="one", help="fits: 'one', 'resume' (checkpoint/resume) or a JSON list of fit specs")
    p.add_argument("--strategy", choices=["gaussk", "ddp"], default="gaussk", help="fits: GaussKDDPStrategy or plain DDPStrategy")
    p.add_argument("--hierarchy", choices=["auto", "flat", "node"], default="auto", help="fits with gaussk")
    p.add_argument("--budget-s", type=float, default=None, help="fits: stop after this many seconds of runs")
    p.add_argument("--keep", action="store_true", help="fits: keep the folders of good runs")
    p.add_argument("--steps", type=int, default=None, help="fits: 5, raw: 10, memory: 1000")
    p.add_argument("--hook", choices=["gaussk", "allreduce", "none"], default="gaussk")
    p.add_argument("--end", choices=["exit", "destroy", "barrier_destroy", "idle_destroy"], default="exit")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--timeout", type=int, default=300, help="per run (hang guard)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="append the result to this file")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    a.steps = a.steps or {"fits": 5, "raw": 10, "memory": 1000}[a.what]
    {"fits": fits, "raw": raw, "memory": memory}[a.what](a)


if __name__ == "__main__":
    main()
