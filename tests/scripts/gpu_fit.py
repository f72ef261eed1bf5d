"""A tiny Lightning fit with ``strategy="gaussk_ddp"`` on GPUs, for tests/test_cuda.py.

Run as a subprocess (Lightning's popen launcher re-runs sys.argv). Every rank writes what it saw
to ``--out/rank{r}.pt``: losses, the loss scales (GradScaler's and the hook's), the hook's
counters, whether the parameters stayed finite. ``--accelerator cpu`` lets the script itself be
checked on a machine without a GPU (precisions "32-true" / "bf16-true").
"""

import argparse
import os

import lightning as L
import torch

import lightning_gaussk  # noqa: F401  (registers "gaussk_ddp")


class Regression(L.LightningModule):
    """A 2-layer MLP on a fixed synthetic regression task (``y`` a smooth function of ``x``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
        self.losses: list[float] = []
        self.scales: list[tuple[float, float]] = []

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1_000_003 * self.global_step + self.global_rank)
        x = torch.randn(64, 16, generator=g)
        y = x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])
        x, y = x.to(self.device, self.param_dtype), y.to(self.device)
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(float(loss.detach()))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append((float(scaler.get_scale()), self.trainer.strategy.gaussk_state.loss_scale))
        return loss

    @property
    def param_dtype(self) -> torch.dtype:  # bf16 under "bf16-true"
        return next(self.parameters()).dtype

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02)

    def on_train_end(self):
        state = self.trainer.strategy.gaussk_state
        torch.save(
            {
                "losses": self.losses,
                "scales": self.scales,
                "telemetry": dict(state.telemetry),
                "finite": all(bool(torch.isfinite(p).all()) for p in self.parameters()),
                "param_dtype": str(self.param_dtype),
                "device": str(self.device),
                "world_size": self.trainer.world_size,
            },
            os.path.join(os.environ["FIT_OUT"], f"rank{self.global_rank}.pt"),
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default="16-mixed")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.environ["FIT_OUT"] = a.out
    L.seed_everything(7)
    trainer = L.Trainer(
        strategy="gaussk_ddp",
        accelerator=a.accelerator,
        devices=a.devices,
        precision=a.precision,
        max_steps=a.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.DataLoader(torch.zeros(1 << 14, 1), batch_size=1)  # placeholders
    trainer.fit(Regression(), data)


if __name__ == "__main__":
    main()
