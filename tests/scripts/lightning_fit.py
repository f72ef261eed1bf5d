"""A small Lightning fit used by the multi-process tests (run as a subprocess: the popen
launcher re-runs sys.argv). Every rank writes what it saw to ``--out/rank{r}.pt``."""

import argparse
import os

import lightning as L
import torch

import lightning_gaussk


class Regression(L.LightningModule):
    """An MLP on a fixed synthetic regression task; records what the optimizer sees."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        self.lr = lr
        self.momentum = momentum
        self.losses: list[float] = []
        self.batch_sums: list[float] = []
        self.grad_nnz: list[int] = []
        self.hook_calls: list[int] = []
        self.loss_scales: list[tuple[float, float]] = []  # (GradScaler's scale, the hook's), per step

    def training_step(self, batch, batch_idx):
        # the batch is a function of (optimizer step, micro-batch, rank) only, so a resumed run
        # sees exactly the data of an uninterrupted one whatever the dataloader does on resume
        x, y = make_batch(self.global_step, batch_idx % self.trainer.accumulate_grad_batches, self.global_rank)
        x, y = x.to(batch.dtype), y.to(batch.dtype)
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y.float())
        self.losses.append(float(loss))
        self.batch_sums.append(float(x.sum()))
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        state = getattr(self.trainer.strategy, "gaussk_state", None)
        if scaler is not None and state is not None:
            self.loss_scales.append((scaler.get_scale(), state.loss_scale))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.grad_nnz.append(sum(int((p.grad != 0).sum()) for p in self.parameters()))
        state = self.trainer.strategy.gaussk_state if hasattr(self.trainer.strategy, "gaussk_state") else None
        self.hook_calls.append(state.telemetry["hook_calls"] if state is not None else -1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def on_train_end(self):
        state = getattr(self.trainer.strategy, "gaussk_state", None)
        torch.save(
            {
                "losses": self.losses,
                "batch_sums": self.batch_sums,
                "grad_nnz": self.grad_nnz,
                "hook_calls": self.hook_calls,
                "loss_scales": self.loss_scales,
                "params": {n: p.detach().float().clone() for n, p in self.named_parameters()},
                "numel": sum(p.numel() for p in self.parameters()),
                "state": state.state_dict() if state is not None else None,
                "world_size": self.trainer.world_size,
                "global_step": self.trainer.global_step,
            },
            os.path.join(os.environ["FIT_OUT"], f"rank{self.global_rank}.pt"),
        )


def make_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + rank)
    x = torch.randn(32, 16, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])
    return x, y


def data(n: int = 1 << 14) -> torch.utils.data.DataLoader:
    """Placeholders: training_step builds its batch from the step (see make_batch)."""
    return torch.utils.data.DataLoader(torch.zeros(n, 1), batch_size=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="gaussk_ddp_spawn")
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--selector", default="gaussk")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--precision", default="32-true", help="or 16-mixed-cpu: fp16 autocast with a CPU GradScaler")
    p.add_argument("--save-ckpt", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.environ["FIT_OUT"] = a.out
    L.seed_everything(7, workers=True)
    strategy = a.strategy
    if a.density is not None:  # the class form, with explicit arguments
        start = "spawn" if strategy.endswith("_spawn") else "popen"
        strategy = lightning_gaussk.GaussKDDPStrategy(density=a.density, selector=a.selector, start_method=start)
    plugins, precision = [], a.precision
    if a.precision == "16-mixed-cpu":  # a GradScaler that grows every step, so the scale keeps changing
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        plugins, precision = [MixedPrecision("16-mixed", "cpu", scaler=scaler)], None
    trainer = L.Trainer(
        strategy=strategy,
        plugins=plugins,
        accelerator="cpu",
        devices=a.devices,
        max_steps=a.max_steps,
        accumulate_grad_batches=a.accumulate,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=True,
    )
    model = Regression(lr=a.lr, momentum=a.momentum)
    trainer.fit(model, data(), ckpt_path=a.resume)
    if a.save_ckpt:
        trainer.save_checkpoint(a.save_ckpt)


if __name__ == "__main__":
    main()
