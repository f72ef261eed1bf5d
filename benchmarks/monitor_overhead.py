"""Cost of GradientDistributionMonitor on steps where no snapshot is due.

Two measurements, both on one CPU process with the GaussK comm hook (a world of 1: the hook runs
exactly as on every rank of a larger job; its all-gather is a local copy), an MLP (1.3M
parameters by default), density 0.01, one torch thread:

1. ``paired`` (the figure to quote): raw ``DistributedDataParallel`` + ``gaussk_hook``; optimizer
   steps alternate between "monitor attached" (the monitor's per-step callbacks are called, with
   ``every_n_steps=E``, exactly as Lightning would call them) and "no monitor", in ABBA order,
   so drift on a shared machine hits both alike. Per step it records the time in the hook body
   (``GaussKState.telemetry["hook_ns"]``, summed over buckets) and the CPU time of the training
   thread for the whole step (callbacks, forward, backward, hook, optimizer). Due steps (where
   the monitor does capture) are run but excluded. Reported: medians, the ratio
   with/without, and as the noise floor the same ratio between two interleaved halves of the
   "no monitor" steps.
2. ``lightning``: whole Lightning fits with ``GaussKDDPStrategy`` (devices=1), without and with the
   monitor, alternating fits (``--rounds`` each); the same figures from a ``GaussKTelemetry``
   callback. Fits are seconds apart, so this one carries the machine's drift (see its noise floor).

Also the direct cost of the monitor's two callbacks on a non-due step, timed in isolation.

Usage::

    python benchmarks/monitor_overhead.py                 # ~2 minutes on 2 cores
    python benchmarks/monitor_overhead.py --paired-steps 800 --rounds 0 --json out.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, load_average, machine_description  # noqa: E402
import lightning as L  # noqa: E402

from lightning_gaussk import GaussKDDPStrategy, GaussKTelemetry, GradientDistributionMonitor  # noqa: E402


class MLP(L.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StepTimer(L.Callback):
    def __init__(self, telemetry: GaussKTelemetry) -> None:
        self.telemetry = telemetry
        self.rows: list[tuple[int, float, float, float]] = []  # (step, step_ms, step_cpu_ms, hook_ms)
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()
        self._c0 = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cpu_ms = (time.thread_time() - self._c0) * 1e3
        step_ms = (time.perf_counter() - self._t0) * 1e3
        self.rows.append((trainer.global_step - 1, step_ms, cpu_ms, self.telemetry.last.get("hook_ms", float("nan"))))


def run_fit(width: int, steps: int, density: float, monitor_every: int | None, tmp: str) -> list[tuple[int, float, float, float]]:
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    y = torch.randint(0, 10, (4096,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=False)
    telemetry = GaussKTelemetry()
    timer = StepTimer(telemetry)
    callbacks: list[L.Callback] = [telemetry, timer]
    if monitor_every is not None:
        callbacks.insert(0, GradientDistributionMonitor(every_n_steps=monitor_every, save_dir=os.path.join(tmp, "mon"), plot=False))
    trainer = L.Trainer(
        strategy=GaussKDDPStrategy(density=density, process_group_backend="gloo"),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp,
    )
    trainer.fit(MLP(width), loader)
    return timer.rows


def paired(width: int, steps: int, density: float, every: int, skip: int) -> dict:
    """Steps alternating with/without the monitor's callbacks around raw DDP + gaussk_hook."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_gaussk import GaussKState, gaussk_hook

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    module = MLP(width)
    ddp = DDP(module)
    state = GaussKState(density=density).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    mon = GradientDistributionMonitor(every_n_steps=every, plot=False, save_snapshots=False)
    mon._active, mon.mode = True, "gaussk"
    trainer = SimpleNamespace(global_step=0, global_rank=0, strategy=SimpleNamespace(gaussk_state=state), loggers=[], world_size=1)
    x = torch.randn(64, 256)
    y = torch.randint(0, 10, (64,))
    rows = []  # (attached, step, hook_ms, cpu_ms)
    for i in range(steps):
        attached = (i % 4) in (1, 2)  # ABBA ABBA ...
        trainer.global_step = i
        state.set_step(i)
        before = state.telemetry["hook_ns"]
        c0 = time.thread_time()
        if attached:
            mon.on_train_batch_start(trainer, module, None, i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        if attached:
            mon.on_before_optimizer_step(trainer, module, opt)
        opt.step()
        cpu_ms = (time.thread_time() - c0) * 1e3
        rows.append((attached, i, (state.telemetry["hook_ns"] - before) / 1e6, cpu_ms))
    keep = [r for r in rows if r[1] >= skip and (r[1] + 1) % every != 0]
    out = {"steps_used": {"with": sum(r[0] for r in keep), "without": sum(not r[0] for r in keep)},
           "due_steps_captured": len({h["step"] for h in mon.history})}
    for j, name in ((2, "hook"), (3, "step_cpu")):
        with_ = [r[j] for r in keep if r[0]]
        without = [r[j] for r in keep if not r[0]]
        half_a = [r[j] for r in keep if not r[0] and r[1] % 4 == 0]
        half_b = [r[j] for r in keep if not r[0] and r[1] % 4 == 3]
        out[name] = {
            "median_ms_without_monitor": statistics.median(without),
            "median_ms_with_monitor_non_due": statistics.median(with_),
            "ratio_with_over_without": statistics.median(with_) / statistics.median(without),
            "noise_floor_ratio_two_halves_without": statistics.median(half_b) / statistics.median(half_a),
        }
    return out


def instrumentation_cost(repeats: int = 100_000) -> float:
    """Microseconds per bucket of the telemetry bookkeeping the hook does on CPU buckets (clock
    reads, counter additions, the lock; the same statements as in gaussk_hook), in isolation."""
    from lightning_gaussk.engine.timing import LOCK as _TELEMETRY_LOCK

    tel = {"hook_calls": 0, "bytes_sent": 0, "bytes_dense": 0, "entries_sent": 0, "entries_total": 0,
           "select_ns": 0, "hook_ns": 0, "comm_ns": 0}
    capture = norms = False
    t0 = time.perf_counter()
    for _ in range(repeats):
        a = time.perf_counter_ns()
        b = time.perf_counter_ns()
        c = time.perf_counter_ns()
        if capture or norms:
            pass
        tel["hook_calls"] += 1
        tel["bytes_sent"] += 4
        tel["bytes_dense"] += 4
        tel["entries_sent"] += 1
        tel["entries_total"] += 1
        d = time.perf_counter_ns()
        with _TELEMETRY_LOCK:
            tel["select_ns"] += c - b
            tel["hook_ns"] += time.perf_counter_ns() - a
        e = time.perf_counter_ns() - d  # in the completion callback
        with _TELEMETRY_LOCK:
            tel["comm_ns"] += e
    return (time.perf_counter() - t0) / repeats * 1e6


def callback_cost(every: int, repeats: int = 20000) -> float:
    """Microseconds per non-due step spent in the monitor's two per-step callbacks."""
    from types import SimpleNamespace

    from lightning_gaussk import GaussKState

    mon = GradientDistributionMonitor(every_n_steps=every, plot=False)
    mon._active, mon.mode = True, "gaussk"
    state = GaussKState()
    trainer = SimpleNamespace(global_step=0, global_rank=0, strategy=SimpleNamespace(gaussk_state=state))
    module = torch.nn.Linear(2, 2)
    t0 = time.perf_counter()
    for i in range(repeats):
        trainer.global_step = (i % (every - 1))  # never due
        mon.on_train_batch_start(trainer, module, None, 0)
        mon.on_before_optimizer_step(trainer, module, None)
    return (time.perf_counter() - t0) / repeats * 1e6


def lightning_fits(a: argparse.Namespace) -> dict:
    series = {m: {"A0": [], "A1": [], "B": []} for m in ("hook", "step", "step_cpu")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for config in ("A", "B") if r % 2 == 0 else ("B", "A"):
                rows = run_fit(a.width, a.steps, a.density, a.every if config == "B" else None, tmp)
                key = config if config == "B" else f"A{r % 2}"
                for s, step_ms, cpu_ms, hook_ms in rows:
                    if s < a.skip or (s + 1) % a.every == 0:  # warm-up, and steps due in B (same in A)
                        continue
                    series["hook"][key].append(hook_ms)
                    series["step"][key].append(step_ms)
                    series["step_cpu"][key].append(cpu_ms)
                print(f"round {r} {config}: median hook {statistics.median(series['hook'][key]):.3f} ms, "
                      f"step cpu {statistics.median(series['step_cpu'][key]):.3f} ms", flush=True)
    out: dict = {"samples": {k: len(v) for k, v in series["hook"].items()}}
    for m, by in series.items():
        none = statistics.median(by["A0"] + by["A1"])
        mon = statistics.median(by["B"])
        out[m] = {
            "median_ms_without_monitor": none,
            "median_ms_with_monitor_non_due": mon,
            "ratio_with_over_without": mon / none,
            "noise_floor_ratio_A_odd_rounds_over_A_even_rounds": (statistics.median(by["A1"]) / statistics.median(by["A0"]))
            if by["A1"] else None,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024, help="MLP hidden width (1024: 1.33M parameters)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2, help="Lightning fits of each kind (0: skip that part)")
    p.add_argument("--paired-steps", type=int, default=600, help="steps of the paired measurement (0: skip it)")
    p.add_argument("--every", type=int, default=25, help="monitor every_n_steps (due steps are excluded)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    numel = sum(q.numel() for q in MLP(a.width).parameters())
    result = {
        "machine": machine_description(f"torch {torch.__version__}", f"threads {a.threads}") + f"; load average at start {load_average():.2f}",
        "config": vars(a) | {"parameters": numel},
        "monitor_callbacks_us_per_non_due_step": callback_cost(a.every),
        "hook_telemetry_bookkeeping_us_per_bucket": instrumentation_cost(),
    }
    if a.paired_steps:
        result["paired"] = paired(a.width, a.paired_steps, a.density, a.every, a.skip)
        print("paired:", json.dumps(result["paired"], indent=1), flush=True)
    if a.rounds:
        result["lightning"] = lightning_fits(a)
    print(json.dumps(result, indent=2))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
