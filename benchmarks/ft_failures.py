"""SparseLocalSGD under torchft: a run with a replica group killed every few outer steps, against
one without failures (issue 28): final quality and wall-clock time, on CPU.

Three replica groups (one process each: tests/scripts/ft_replica.py, the library's default
options, so 2-bit values; an MLP 32-256-256-1 of 74,753 parameters on a smooth regression, each
group its own data stream) around an in-process torchft lighthouse (``min_replicas=2``), both runs
to the same number of outer steps from the same seeds:

- ``baseline``: nobody fails;
- ``failures``: every ``--kill-every`` outer steps (counted once the last restarted group has
  rejoined), one group, in turn, is SIGKILLed wherever it is (mid-window, mid-exchange) and a
  new process with the same replica id is started ``--restart-after`` seconds later (3); it heals
  from a live peer and rejoins.

Each group is a process forked from a server that imported torch, torchft and the package once
(``multiprocessing``'s forkserver), so a restart costs the Manager's start and the heal, not
Python's imports (15-30 s on a loaded 2-core machine); ``--subprocess`` starts every group as a
new interpreter instead (cold restarts: most of a short run then has 2 participants).

Reported per run: the final eval MSE of ``theta`` (held-out batch; every group that finished holds
the same ``theta``, checked), the wall-clock from the launch of the groups to the last one done, the
outer steps with 2 and with 3 participants (as a group that never died saw them), kills and heals.
The groups share 2 cores here: a killed group frees CPU for the others, so the wall-clock ratio is
what this machine shows, not what separate hosts would.

    .venv/bin/python benchmarks/ft_failures.py            # about 2 to 3 minutes
    .venv/bin/python benchmarks/ft_failures.py --quick    # a smoke run

Writes benchmarks/out/ft_failures.json (or ``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ft_replica.py"
sys.path.insert(0, str(SCRIPT.parent))
NAMES = ("R0", "R1", "R2")


def _progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run(kind: str, args: argparse.Namespace, tmp: Path) -> dict:
    from torchft.coordination import LighthouseServer

    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchft", "lightning_gaussk.local_sgd", "ft_replica"])
    from ft_replica import main as replica_main

    # join_timeout_ms: a group late to a quorum by up to 2 s (a loaded machine) is waited for, not left out;
    # a dead group stops heartbeating and is given up after heartbeat_timeout_ms
    lh = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=2000, heartbeat_timeout_ms=1000)
    procs: dict[str, Any] = {}
    gen: dict[str, int] = dict.fromkeys(NAMES, 0)
    files = lambda name: (tmp / f"{kind}_{name}_{gen[name]}.json", tmp / f"{kind}_{name}_{gen[name]}.pt")

    def start(name: str) -> None:
        prog, out = files(name)
        seed = NAMES.index(name) + 10 * gen[name]
        argv = ["--lighthouse", lh.address(), "--replica", name, "--seed", str(seed),
               "--who", str(NAMES.index(name)), "--model", "bench", "--batch", str(args.batch), "--out", str(out),
               "--progress", str(prog), "--end", str(args.steps), "--sync-every", str(args.sync_every),
               "--density", str(args.density), "--outer-lr", str(args.outer_lr), "--lr", str(args.lr), "--records", "0",
               "--log", str(tmp / f"{kind}_{name}_{gen[name]}.log")]  # fmt: skip
        if args.subprocess:  # a cold start: python, torch, torchft and the package imported anew
            procs[name] = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=ROOT)
        else:  # a new process forked from the server that imported them once
            procs[name] = ctx.Process(target=replica_main, args=(argv,), daemon=True)
            procs[name].start()

    def poll(name: str) -> int | None:
        p = procs[name]
        return p.poll() if isinstance(p, subprocess.Popen) else p.exitcode

    def hard_kill(name: str) -> None:
        p = procs[name]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10) if isinstance(p, subprocess.Popen) else p.join(10)

    kills: list[dict] = []
    t0, t_first = time.monotonic(), None
    try:
        for name in NAMES:
            start(name)
        next_kill, victim, restart_at = args.kill_every, 0, None
        rejoined = True
        while True:
            progs = {n: _progress(files(n)[0]) for n in NAMES}
            for n, p in progs.items():
                if "error" in p:
                    raise RuntimeError(f"{kind}: replica {n} failed:\n{p['error']}")
            done = [n for n in NAMES if progs[n].get("done")]
            if done:  # the end step is reached: the others that are in the quorum finish the same step
                wall = time.monotonic() - t0
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and any(poll(n) is None for n in NAMES):
                    time.sleep(0.05)
                break
            step = max(p.get("step", 0) for p in progs.values())
            if step and t_first is None:
                t_first = time.monotonic() - t0  # the first outer step committed: start-up is over
            if kind == "failures":
                if not rejoined and kills and restart_at is None:
                    back = kills[-1]["replica"]
                    rejoined = len(progs[back].get("seen", [])) >= 1
                    if rejoined:
                        kills[-1]["rejoined_at_step"] = progs[back]["seen"][0][0]
                        kills[-1]["rejoined_after_s"] = round(time.monotonic() - kills[-1]["t"], 2)
                        next_kill = step + args.kill_every
                if rejoined and step >= next_kill and step < args.steps - 2:
                    name = NAMES[victim % len(NAMES)]
                    victim += 1
                    hard_kill(name)  # wherever it is: mid-window, mid-exchange
                    kills.append({"replica": name, "at_step": step, "t": time.monotonic()})
                    gen[name] += 1
                    restart_at, rejoined = time.monotonic() + args.restart_after, False
                if kills and restart_at is not None and time.monotonic() >= restart_at:
                    start(kills[-1]["replica"])  # a new process, the same replica id, another init
                    restart_at = None
            if time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"{kind}: not done after {args.timeout} s: {progs}")
            time.sleep(0.02)
    finally:
        for name in procs:
            if poll(name) is None:
                hard_kill(name)  # only the processes this benchmark started (a restarted group that had not rejoined)
        lh.shutdown()
    outs = {n: torch.load(files(n)[1], weights_only=False) for n in NAMES if files(n)[1].exists()}
    thetas = [o["theta"] for o in outs.values()]
    same = all(torch.equal(t, thetas[0]) for t in thetas)
    never = [n for n in NAMES if gen[n] == 0 and n in outs]
    ref = outs[never[0]] if never else next(iter(outs.values()))
    per_step: dict[int, int] = {}  # participants of each outer step, as any group in it saw them
    for name in NAMES:
        for g in range(gen[name] + 1):
            for seen in _progress(tmp / f"{kind}_{name}_{g}.json").get("seen", []):
                per_step[seen[0]] = max(per_step.get(seen[0], 0), seen[1])
    parts = list(per_step.values())
    gaps = []  # seconds between one outer step and the next, as each group saw them
    for o in outs.values():
        times = [r["t"] for r in o["rec"]]
        gaps += [b - a for a, b in zip(times, times[1:])]
    for k in kills:
        k.pop("t")
    return {
        "run": kind,
        "kills_n": len(kills),
        "final_eval_mse": ref["loss"][1],
        "initial_eval_mse": ref["loss"][0],
        "wall_s": round(wall, 2),
        "train_s": round(wall - (t_first or 0.0), 2),  # from the first committed outer step to the end
        "longest_outer_step_s": round(max(gaps), 2),
        "median_outer_step_s": round(sorted(gaps)[len(gaps) // 2], 3),
        "outer_steps": ref["step"],
        "steps_with_3": parts.count(3),
        "steps_with_2": parts.count(2),
        "uncommitted": {n: o["ft"]["uncommitted"] for n, o in outs.items()},
        "finished": sorted(outs),
        "same_theta": same,
        "kills": kills,
        "heals": {n: o["ft"]["heals"] for n, o in outs.items()},
        "outer_bytes": ref["outer_bytes"],
        "quantize": ref["quantize"],
        "d": ref["d"],
        "k": ref["k"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="outer steps of each run")
    ap.add_argument("--kill-every", type=int, default=15, help="outer steps between a rejoin and the next kill")
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--outer-lr", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per run")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30 outer steps, a kill every 8")
    ap.add_argument("--subprocess", action="store_true", help="cold restarts: each group a new python process")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each kind, interleaved")
    ap.add_argument("--restart-after", type=float, default=3.0, help="seconds between a kill and the restart")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "ft_failures.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.kill_every, args.restart_after, args.repeats = 30, 8, 1.0, 1
    torch.set_num_threads(1)
    if not args.subprocess:  # the forkserver and its imports, before any clock starts
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torchft", "lightning_gaussk.local_sgd", "ft_replica"])
        warm = ctx.Process(target=time.sleep, args=(0,))
        warm.start()
        warm.join()
    with tempfile.TemporaryDirectory(prefix="ft_failures_") as tmp:
        # interleaved, so that a change in the machine's load hits both kinds alike
        results = [run(kind, args, Path(tmp) / f"{kind}{i}") for i in range(args.repeats) for kind in ("baseline", "failures")]
    median = lambda kind, key: statistics.median(r[key] for r in results if r["run"] == kind)
    base = {key: median("baseline", key) for key in ("wall_s", "train_s", "final_eval_mse")}
    fail = {key: median("failures", key) for key in ("wall_s", "train_s", "final_eval_mse")}
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": f"{os.cpu_count()} CPU cores, 3 replica processes, torch {torch.__version__}",
        "runs": results,
        "median": {"baseline": base, "failures": fail},
        "wall_ratio": round(fail["wall_s"] / base["wall_s"], 3),
        "train_ratio": round(fail["train_s"] / base["train_s"], 3),
        "mse_ratio": round(fail["final_eval_mse"] / base["final_eval_mse"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("| run | kills | outer steps (3 / 2 participants) | final eval MSE (start) | wall-clock s | training s (longest step) | same theta |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['run']} | {len(r['kills'])} | {r['outer_steps']} ({r['steps_with_3']} / {r['steps_with_2']}) | "
            f"{r['final_eval_mse']:.4f} ({r['initial_eval_mse']:.3f}) | {r['wall_s']:.1f} | {r['train_s']:.1f} "
            f"({r['longest_outer_step_s']:.2f}) | {r['same_theta']} |"
        )
    print(
        f"\nfailures / baseline (medians of {args.repeats}): wall-clock x{summary['wall_ratio']}, training "
        f"x{summary['train_ratio']}, final MSE x{summary['mse_ratio']}; {args.out}"
    )


if __name__ == "__main__":
    main()
