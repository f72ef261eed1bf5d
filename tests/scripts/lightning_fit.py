"""The Lightning fit of the multi-process tests (tests/test_strategy.py, tests/test_faults.py) and
of benchmarks/soak.py: an MLP on a fixed synthetic regression task, 2 CPU processes by default.

Run as a subprocess (the popen launcher re-runs ``sys.argv``, which must not be pytest's). Two
ways to call it:

- one fit from flags (``--strategy``, ``--density``, ``--max-steps``, ``--precision``, ...): every
  rank writes what it saw to ``--out/rank{r}.pt``;
- ``--plan``: a JSON list of fits run one after the other in the same processes (with popen the
  process group is reused, which saves the start-up cost of a new pair of processes per fit);
  each writes ``--out/<name>/rank{r}.pt``.

A fit spec (all keys optional except ``name``; the flags set the same keys)::

    {"name": "ref", "mode": "auto" | "manual2", "num_nodes": 1,
     "strategy": "gaussk" | "ddp" | a registered name such as "gaussk_ddp_spawn",
     "density": 0.05, "selector": "gaussk", "launcher": "popen" | "spawn", "timeout_s": 120,
     "max_steps": 14, "accumulate": 1, "precision": "32-true", "lr": 0.05, "momentum": 0.9,
     "ckpt_every": 4, "ckpt_dir": "...", "save_top_k": -1, "resume": "path.ckpt", "save_ckpt": "path.ckpt",
     "nonfinite": [[batch_idx, rank, "nan" | "inf"]]}

Strategy: ``"gaussk"`` (or any name with a ``density``) is ``GaussKDDPStrategy(density, selector)``,
``"ddp"`` plain ``DDPStrategy``; another name is looked up in Lightning's registry as it is. The
launcher is ``spawn`` for names ending in ``_spawn``, else ``popen``, unless ``launcher`` says.

``num_nodes`` (flag ``--num-nodes``, the default of every fit of a plan): Lightning's
``Trainer(num_nodes=...)``; run the script once per node with ``MASTER_ADDR``, ``MASTER_PORT``
and ``NODE_RANK`` set, as a multi-node job does (tests/test_multinode.py). Every record carries
the hook's ``layout`` (``Layout.to_dict()``) and ``telemetry``.

``mode="auto"``: automatic optimization, SGD with momentum; the batch is a function of (optimizer
step, micro-batch, rank) only, so a resumed run sees exactly the data of an uninterrupted one.
``precision="16-mixed-cpu"``: fp16 autocast with a CPU GradScaler that grows every step.
``mode="manual2"``: manual optimization with two optimizers (SGD for the first layer, Adam for the
second) and a GradScaler-like skip: a step whose synchronised gradient is not finite is not
applied. It records the sum of this rank's local gradients and of the applied (averaged)
gradients over applied steps, for the conservation check.

The environment variables ``FIT_KILL_STEP`` and ``FIT_KILL_RANK`` make that rank SIGKILL itself at
the start of that optimizer step (``trainer.global_step``; automatic optimization).

On the popen launcher rank 0 waits for its child processes at the end and exits with status 3
if any of them did not exit with 0 (a child's abort at teardown would otherwise go unseen).
"""

import argparse
import copy
import json
import os
import signal
from datetime import timedelta

import lightning as L
import torch
from _launched import Children
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

import lightning_gaussk

# children of the popen launcher of the first fit (rank 0 only)
_CHILDREN = Children()


def make_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + rank)
    x = torch.randn(32, 16, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])
    return x, y


def _state(module: L.LightningModule):
    return getattr(module.trainer.strategy, "gaussk_state", None)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class Base(L.LightningModule):
    """The model and what every fit records at the end of training."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        self.losses: list[float] = []
        self.start_state = None

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
            "numel": sum(p.numel() for p in self.parameters()),
            "state": state.state_dict() if state is not None else None,
            "start_state": self.start_state,
            "world_size": self.trainer.world_size,
            "global_step": self.trainer.global_step,
            "layout": state.layout.to_dict() if getattr(state, "layout", None) is not None else None,
            "telemetry": dict(state.telemetry) if state is not None else None,
            **self.record(),
        }
        out = os.path.join(self.spec["out"], self.spec["name"]) if self.spec.get("name") else self.spec["out"]
        os.makedirs(out, exist_ok=True)
        torch.save(rec, os.path.join(out, f"rank{self.global_rank}.pt"))


class Regression(Base):
    """Automatic optimization; records what the optimizer and the hook see."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.batch_sums: list[float] = []
        self.grad_nnz: list[int] = []
        self.hook_calls: list[int] = []
        self.loss_scales: list[tuple[float, float]] = []  # (GradScaler's scale, the hook's), per step

    def _maybe_die(self) -> None:
        kill_step = os.environ.get("FIT_KILL_STEP")
        if kill_step is not None and self.global_step == int(kill_step) and self.global_rank == int(os.environ.get("FIT_KILL_RANK", "1")):
            os.kill(os.getpid(), signal.SIGKILL)

    def training_step(self, batch, batch_idx):
        self._maybe_die()
        # the batch is a function of (optimizer step, micro-batch, rank) only, so a resumed run
        # sees exactly the data of an uninterrupted one whatever the dataloader does on resume
        x, y = make_batch(self.global_step, batch_idx % self.trainer.accumulate_grad_batches, self.global_rank)
        x, y = x.to(batch.dtype), y.to(batch.dtype)
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y.float())
        self.losses.append(float(loss))
        self.batch_sums.append(float(x.sum()))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        state = _state(self)
        if scaler is not None and state is not None:
            self.loss_scales.append((scaler.get_scale(), state.loss_scale))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.grad_nnz.append(sum(int((p.grad != 0).sum()) for p in self.parameters()))
        state = _state(self)
        self.hook_calls.append(state.telemetry["hook_calls"] if state is not None else -1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.spec.get("lr", 0.05), momentum=self.spec.get("momentum", 0.9))

    def record(self) -> dict:
        return {"batch_sums": self.batch_sums, "grad_nnz": self.grad_nnz, "hook_calls": self.hook_calls, "loss_scales": self.loss_scales}


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
        x, y = make_batch(batch_idx, 0, self.global_rank)
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


def make_strategy(spec: dict):
    name = spec.get("strategy", "gaussk")
    launcher = spec.get("launcher") or ("spawn" if name.endswith("_spawn") else "popen")
    timeout = {"timeout": timedelta(seconds=spec["timeout_s"])} if "timeout_s" in spec else {}
    if name == "ddp":
        return DDPStrategy(start_method=launcher, **timeout)
    if name == "gaussk" or spec.get("density") is not None:  # the class form, with explicit arguments
        return lightning_gaussk.GaussKDDPStrategy(
            density=spec.get("density", 0.05), selector=spec.get("selector", "gaussk"), start_method=launcher,
            hierarchy=spec.get("hierarchy", "auto"), remedies=spec.get("remedies", "auto"), **timeout,
        )
    return name  # a registered name, with its registered settings


def run_fit(spec: dict, devices: int) -> L.Trainer:
    L.seed_everything(7, workers=True)
    strategy = make_strategy(spec)
    plugins, precision = [], spec.get("precision", "32-true")
    if precision == "16-mixed-cpu":  # a GradScaler that grows every step, so the scale keeps changing
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        plugins, precision = [MixedPrecision("16-mixed", "cpu", scaler=scaler)], None
    callbacks = []
    if spec.get("ckpt_every"):
        callbacks.append(
            ModelCheckpoint(dirpath=spec["ckpt_dir"], every_n_train_steps=spec["ckpt_every"], save_top_k=spec.get("save_top_k", -1),
                            filename="{step}")
        )
    trainer = L.Trainer(
        strategy=strategy,
        plugins=plugins,
        accelerator="cpu",
        devices=devices,
        num_nodes=spec.get("num_nodes", 1),
        max_steps=spec.get("max_steps", 14),
        accumulate_grad_batches=spec.get("accumulate", 1),
        precision=precision,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=True,
    )
    model = (Manual2 if spec.get("mode", "auto") == "manual2" else Regression)(spec)
    trainer.fit(model, data(), ckpt_path=spec.get("resume"))
    if spec.get("save_ckpt"):
        trainer.save_checkpoint(spec["save_ckpt"])
    _CHILDREN.collect(trainer)
    return trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", default=None, help="JSON list of fit specs (then the single-fit flags are ignored)")
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1, help="Trainer(num_nodes=...): run once per node with NODE_RANK set")
    p.add_argument("--strategy", default="gaussk_ddp_spawn")
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--selector", default="gaussk")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--precision", default="32-true", help="or 16-mixed-cpu: fp16 autocast with a CPU GradScaler")
    p.add_argument("--save-ckpt", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    a = p.parse_args()
    if a.plan is not None:
        plan = [{"timeout_s": 120, **spec} for spec in json.loads(a.plan)]
    else:
        plan = [
            {
                "strategy": a.strategy, "density": a.density, "selector": a.selector, "max_steps": a.max_steps,
                "accumulate": a.accumulate, "precision": a.precision, "save_ckpt": a.save_ckpt, "resume": a.resume,
                "lr": a.lr, "momentum": a.momentum,
            }
        ]  # fmt: skip
    for spec in plan:
        spec["out"] = a.out
        spec.setdefault("num_nodes", a.num_nodes)
        run_fit(spec, a.devices)
    _CHILDREN.finish("lightning_fit")  # popen, rank 0: every child must exit with status 0 too


if __name__ == "__main__":
    main()
