"""Lightning fits for the fault and hardening tests (tests/test_hardening.py, benchmarks/soak.py).

Run as a subprocess (the popen launcher re-runs ``sys.argv``). ``--plan`` is a JSON list of fits
run one after the other in the same processes (with popen the process group is reused, which
saves the start-up cost of a new pair of processes per fit). Each fit writes what every rank saw
to ``--out/<name>/rank{r}.pt`` at the end of training.

A fit spec (all keys optional except ``name``)::

    {"name": "ref", "mode": "auto" | "manual2", "strategy": "gaussk" | "ddp", "density": 0.05,
     "launcher": "popen" | "spawn", "max_steps": 14, "ckpt_every": 4, "ckpt_dir": "...",
     "resume": "path.ckpt", "save_ckpt": "path.ckpt", "nonfinite": [[batch_idx, rank, "nan"|"inf"]],
     "timeout_s": 60}

``mode="auto"``: automatic optimization, SGD with momentum (the model of lightning_fit.py).
``mode="manual2"``: manual optimization with two optimizers (SGD for the first layer, Adam for
the second) and a GradScaler-like skip: a step whose synchronised gradient is not finite is not
applied. It records the sum of this rank's local gradients and of the applied (averaged)
gradients over applied steps, for the conservation check.

The environment variables ``HARDENING_KILL_STEP`` and ``HARDENING_KILL_RANK`` make that rank
SIGKILL itself at the start of that optimizer step (``trainer.global_step``).

On the popen launcher rank 0 waits for its child processes at the end and exits with status 3
if any of them did not exit with 0 (a child's abort at teardown would otherwise go unseen).
"""

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

import lightning_gaussk

# children of the popen launcher of the first fit (rank 0 only)
_CHILDREN: list = []


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(32, 16, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])
    return x, y


def _state(module: L.LightningModule):
    return getattr(module.trainer.strategy, "gaussk_state", None)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class Base(L.LightningModule):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        self.losses: list[float] = []
        self.start_state = None

    def _maybe_die(self) -> None:
        kill_step = os.environ.get("HARDENING_KILL_STEP")
        if kill_step is not None and self.global_step == int(kill_step) and self.global_rank == int(os.environ.get("HARDENING_KILL_RANK", "1")):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_start(self) -> None:
        state = _state(self)
        self.start_state = state.state_dict() if state is not None else None  # residuals restored on resume
        self.init_params = {n: p.detach().clone() for n, p in self.named_parameters()}

    def record(self) -> dict:
        return {}

    def on_train_end(self) -> None:
        state = _state(self)
        rec = {
            "losses": self.losses,
            "params": {n: p.detach().float().clone() for n, p in self.named_parameters()},
            "init_params": self.init_params,
            "state": state.state_dict() if state is not None else None,
            "start_state": self.start_state,
            "world_size": self.trainer.world_size,
            "global_step": self.trainer.global_step,
            **self.record(),
        }
        out = os.path.join(self.spec["out"], self.spec["name"])
        os.makedirs(out, exist_ok=True)
        torch.save(rec, os.path.join(out, f"rank{self.global_rank}.pt"))


class Auto(Base):
    """Automatic optimization; the batch is a function of (optimizer step, rank) only, so a
    resumed run sees the data of an uninterrupted one."""

    def training_step(self, batch, batch_idx):
        self._maybe_die()
        x, y = make_batch(self.global_step, self.global_rank)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Manual2(Base):
    """Manual optimization, two optimizers, skip of non-finite steps (as a GradScaler would)."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.automatic_optimization = False
        self.applied: list[int] = []
        self.skipped: list[int] = []
        self.residuals_finite: list[bool] = []
        self.residuals_kept_on_skip: list[bool] = []
        self.local_sum: torch.Tensor | None = None
        self.applied_sum: torch.Tensor | None = None

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(self.net[2].parameters(), lr=0.01),
        ]

    def training_step(self, batch, batch_idx):
        # global_step does not move on a skipped step: the data follows batch_idx instead
        x, y = make_batch(batch_idx, self.global_rank)
        for b, r, kind in self.spec.get("nonfinite", []):
            if b == batch_idx and r == self.global_rank:
                x[0, 0] = float(kind)  # "nan" or "inf": this rank's gradient becomes non-finite
        # this rank's own gradient, from a copy outside DDP (for the conservation check)
        ref = copy.deepcopy(self.net)
        local = _flat(torch.autograd.grad(torch.nn.functional.mse_loss(ref(x), y), list(ref.parameters())))
        state = _state(self)
        before = {n: r.clone() for n, r in state.residuals().items()} if state is not None else None

        opts = self.optimizers()
        for o in opts:
            o.zero_grad()
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.manual_backward(loss)
        grads = _flat(p.grad for p in self.parameters())
        if bool(torch.isfinite(grads).all()):
            for o in opts:
                o.step()
            self.applied.append(batch_idx)
            self.local_sum = local if self.local_sum is None else self.local_sum + local
            self.applied_sum = grads if self.applied_sum is None else self.applied_sum + grads
            self.losses.append(float(loss.detach()))
        else:
            self.skipped.append(batch_idx)
            if before is not None:
                after = state.residuals()
                self.residuals_kept_on_skip.append(all(torch.equal(after[n], before[n]) for n in before))
        if state is not None:
            self.residuals_finite.append(all(bool(torch.isfinite(r).all()) for r in state.residuals().values()))

    def record(self) -> dict:
        return {
            "applied": self.applied,
            "skipped": self.skipped,
            "residuals_finite": self.residuals_finite,
            "residuals_kept_on_skip": self.residuals_kept_on_skip,
            "local_sum": self.local_sum,
            "applied_sum": self.applied_sum,
            "param_order": [n for n, _ in self.named_parameters()],
        }


def data(n: int = 1 << 14) -> torch.utils.data.DataLoader:
    """Placeholders: training_step builds its batch from the step (see make_batch)."""
    return torch.utils.data.DataLoader(torch.zeros(n, 1), batch_size=1)


def run_fit(spec: dict, devices: int) -> L.Trainer:
    L.seed_everything(7, workers=True)
    launcher = spec.get("launcher", "popen")
    timeout = timedelta(seconds=spec.get("timeout_s", 120))
    if spec.get("strategy", "gaussk") == "ddp":
        strategy = DDPStrategy(start_method=launcher, timeout=timeout)
    else:
        strategy = lightning_gaussk.GaussKDDPStrategy(
            density=spec.get("density", 0.05), selector=spec.get("selector", "gaussk"), start_method=launcher, timeout=timeout
        )
    callbacks = []
    if spec.get("ckpt_every"):
        callbacks.append(
            ModelCheckpoint(dirpath=spec["ckpt_dir"], every_n_train_steps=spec["ckpt_every"], save_top_k=-1, filename="{step}")
        )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=spec.get("max_steps", 14),
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = (Manual2 if spec.get("mode", "auto") == "manual2" else Auto)(spec)
    trainer.fit(model, data(), ckpt_path=spec.get("resume"))
    if spec.get("save_ckpt"):
        trainer.save_checkpoint(spec["save_ckpt"])
    launcher_obj = getattr(trainer.strategy, "_launcher", None)
    if not _CHILDREN and spec.get("launcher", "popen") == "popen":
        _CHILDREN.extend(p for p in getattr(launcher_obj, "procs", []) if isinstance(p, subprocess.Popen))
    return trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True, help="JSON list of fit specs")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    for spec in json.loads(a.plan):
        spec["out"] = a.out
        run_fit(spec, a.devices)
    if _CHILDREN:  # popen, rank 0: every child must exit with status 0 too
        codes = [proc.wait(timeout=120) for proc in _CHILDREN]
        print(f"hardening_fit: child exit codes {codes}", flush=True)
        if any(codes):
            sys.exit(3)


if __name__ == "__main__":
    main()
