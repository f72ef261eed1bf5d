"""The main job: a small CNN on scikit-learn's digits, trained on 2 CPU processes twice —
plain DDP (allreduce) and ``gaussk_ddp`` (TopK-SGD) — with accuracy, bytes sent and time side by side.

    python examples/digits.py                  # 2 processes, density 0.01, 12 epochs
    python examples/digits.py --density 0.001 --epochs 20 --devices 2 --accelerator gpu
"""

import argparse
import time

import lightning as L
import torch
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gaussk


class DigitsCNN(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x).argmax(1), y)
        self.log("val_acc", self.val_acc, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class BytesSent(L.Callback):
    """Logs the bytes each rank put on the wire per optimizer step (dense: the whole gradient)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = getattr(trainer.strategy, "gaussk_state", None)
        if state is not None and state.telemetry["hook_calls"]:
            t = state.telemetry
            steps = max(trainer.global_step, 1)
            pl_module.log("bytes_per_step", float(t["bytes_sent"] / steps), sync_dist=True)
            pl_module.log("dense_bytes_per_step", float(t["bytes_dense"] / steps), sync_dist=True)
        else:
            n = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
            pl_module.log("bytes_per_step", float(n), sync_dist=True)
            pl_module.log("dense_bytes_per_step", float(n), sync_dist=True)


def loaders(batch_size: int) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()  # 1,797 8x8 images shipped with scikit-learn: no download
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1500], perm[1500:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def run(strategy, args: argparse.Namespace) -> dict[str, float]:
    L.seed_everything(0, workers=True)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        max_epochs=args.epochs,
        callbacks=[BytesSent()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = loaders(args.batch_size)
    start = time.perf_counter()
    trainer.fit(DigitsCNN(lr=args.lr), train, val)
    m = trainer.callback_metrics  # spawn sends rank 0's metrics back to this process
    return {
        "val_acc": float(m["val_acc"]),
        "bytes_per_step": float(m["bytes_per_step"]),
        "dense_bytes_per_step": float(m["dense_bytes_per_step"]),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--selector", default="gaussk", choices=lightning_gaussk.available_selectors())
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args()

    dense = run("ddp_spawn", args)
    sparse = run(
        lightning_gaussk.GaussKDDPStrategy(density=args.density, selector=args.selector, start_method="spawn"),
        args,
    )
    print(f"\ndigits CNN, {args.devices} processes, {args.epochs} epochs")
    print(f"{'':24}{'val acc':>10}{'bytes/step/rank':>18}{'time (s)':>10}")
    print(f"{'ddp (allreduce)':24}{dense['val_acc']:>10.4f}{dense['bytes_per_step']:>18,.0f}{dense['seconds']:>10.1f}")
    name = f"gaussk_ddp d={args.density}"
    print(f"{name:24}{sparse['val_acc']:>10.4f}{sparse['bytes_per_step']:>18,.0f}{sparse['seconds']:>10.1f}")
    print(
        f"gaussk_ddp sent {sparse['bytes_per_step'] / sparse['dense_bytes_per_step']:.4f} of the dense gradient bytes "
        f"({args.selector} selection, error feedback); accuracy difference "
        f"{100 * (sparse['val_acc'] - dense['val_acc']):+.2f} points"
    )


if __name__ == "__main__":
    main()
