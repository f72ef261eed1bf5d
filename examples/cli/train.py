"""LightningCLI + GaussK: a small CNN on scikit-learn's digits, configured by a yaml file.

    python examples/cli/train.py fit --config examples/cli/config.yaml
    python examples/cli/train.py fit --config examples/cli/config.yaml --print_config

``import lightning_gaussk`` below registers the strategy names, so ``strategy: gaussk_ddp`` works
as a plain string in a config too; the ``class_path`` form in config.yaml imports the package by
itself and takes the strategy's arguments (``density``, ``selector``, ...).
"""

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gaussk  # registers "gaussk_ddp", "topk_ddp", ... for string configs


class DigitsData(L.LightningDataModule):
    """scikit-learn's 1,797 8x8 digits (no download): 1,500 for training, 297 for validation.

    Args:
        batch_size: per process.
    """

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        self.train_set = TensorDataset(x[perm[:1500]], y[perm[:1500]])
        self.val_set = TensorDataset(x[perm[1500:]], y[perm[1500:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A small CNN; prints what the GaussK strategy did at the end of fit (rank 0).

    Args:
        lr: SGD learning rate (momentum 0.9).
    """

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip
        self.max_grad_nnz = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.max_grad_nnz = max(self.max_grad_nnz, sum(int((p.grad != 0).sum()) for p in self.parameters()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def on_fit_end(self) -> None:
        strategy = self.trainer.strategy
        state = getattr(strategy, "gaussk_state", None)
        acc = float(self.trainer.callback_metrics.get("val_acc", float("nan")))
        if self.trainer.is_global_zero:
            numel = sum(p.numel() for p in self.parameters())
            print(f"strategy {type(strategy).__name__} on {self.trainer.world_size} processes; "
                  f"{self.trainer.global_step} optimizer steps; val_acc {acc:.3f}")  # fmt: skip
            if state is not None:
                cfg, t = state.state_dict()["config"], state.telemetry
                print(f"GaussK density {cfg['density']}, selector {cfg['selector']!r}: bytes sent {t['bytes_sent']:,} "
                      f"vs dense {t['bytes_dense']:,} ({t['bytes_sent'] / max(t['bytes_dense'], 1):.1%})")  # fmt: skip
                print(f"max nonzero gradient entries seen by the optimizer: {self.max_grad_nnz} of {numel}")
            for cb in self.trainer.callbacks:
                if isinstance(cb, lightning_gaussk.GradientDistributionMonitor) and cb.history:
                    row = cb.history[-1]
                    print(f"GradientDistributionMonitor ({len(cb.history)} analyses, files in {cb.dirpath}); "
                          f"step {row['step']} {row['group']}: KS distance to a Gaussian {row.get('ks', float('nan')):.3f}, "
                          f"threshold Gaussian {row.get('threshold_gauss', float('nan')):.4f} "
                          f"vs exact top-k {row.get('threshold_topk', float('nan')):.4f}")  # fmt: skip


def main() -> None:
    LightningCLI(DigitsClassifier, DigitsData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
