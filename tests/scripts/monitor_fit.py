"""A 2-process Lightning fit with GradientDistributionMonitor and GaussKTelemetry, used by
tests/test_monitor.py (run as a subprocess: the popen launcher re-runs sys.argv).

The model's gradients are known exactly: the loss is ``sum(a * xa) + sum(b * xb)``, so the
gradient of ``a`` is ``xa`` (scaled by Lightning's 1/accumulate), whatever the weights are, and
``known_grads(step, micro, rank)`` is all a test needs to replay what the hook saw.
Every rank writes what it recorded to ``--out/rank{r}.pt``.
"""

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import lightning_gaussk

D_A, D_B = 3000, 1000  # a: normal with an offset; b: Laplace at 1/20 of the scale


def known_grads(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + 17 * rank + 5)
    xa = torch.randn(D_A, generator=g) + 0.1
    e1 = torch.empty(D_B).exponential_(generator=g)
    e2 = torch.empty(D_B).exponential_(generator=g)
    xb = 0.05 * (e1 - e2)
    return xa, xb


class Known(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(D_A))
        self.b = torch.nn.Parameter(torch.zeros(D_B))

    def training_step(self, batch, batch_idx):
        xa, xb = known_grads(self.global_step, batch_idx % self.trainer.accumulate_grad_batches, self.global_rank)
        return (self.a * xa).sum() + (self.b * xb).sum() + 0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Recorder(L.Callback):
    """Keeps the telemetry callback's figures of every step."""

    def __init__(self, telemetry: lightning_gaussk.GaussKTelemetry) -> None:
        self.telemetry = telemetry
        self.steps: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.steps.append((trainer.global_step - 1, dict(self.telemetry.last)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="gaussk")  # gaussk | ddp
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--selector", default=None)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--ranks", default="all")
    p.add_argument("--per-parameter", action="store_true")
    p.add_argument("--norms-every", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    L.seed_everything(3)
    if a.strategy == "gaussk":
        strategy = lightning_gaussk.GaussKDDPStrategy(density=a.density, selector=a.selector or "gaussk")
        monitor = lightning_gaussk.GradientDistributionMonitor(
            every_n_steps=a.every, ranks=a.ranks, per_parameter=a.per_parameter, max_samples=512, bins=40
        )
    else:
        strategy = "ddp"
        monitor = lightning_gaussk.GradientDistributionMonitor(
            every_n_steps=a.every, ranks=a.ranks, per_parameter=a.per_parameter, max_samples=512, bins=40,
            density=a.density, selector=a.selector,
        )
    telemetry = lightning_gaussk.GaussKTelemetry(prog_bar=True, residual_norm_every_n_steps=a.norms_every)
    recorder = Recorder(telemetry)
    loggers = [CSVLogger(a.out, name="csv", version=0), TensorBoardLogger(a.out, name="tb", version=0)]
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=a.max_steps,
        accumulate_grad_batches=a.accumulate,
        logger=loggers,
        log_every_n_steps=1,
        callbacks=[monitor, telemetry, recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Known(), torch.utils.data.DataLoader(torch.zeros(4096, 1), batch_size=1))
    rank = trainer.global_rank
    torch.save(
        {
            "rank": rank,
            "global_step": trainer.global_step,
            "mode": monitor.mode,
            "dirpath": monitor.dirpath,
            "history": monitor.history,
            "snapshots": monitor.snapshot_paths,
            "figures": monitor.figure_paths,
            "telemetry": recorder.steps,
            "counters": dict(trainer.strategy.gaussk_state.telemetry) if a.strategy == "gaussk" else None,
        },
        os.path.join(a.out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
