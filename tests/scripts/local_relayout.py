"""A "gaussk_local" fit on ``--devices`` CPU processes that may resume a checkpoint saved on another
number of processes, for tests/test_local_reshard.py (popen launcher: run as a subprocess).

Every rank writes ``--out/rank{r}.pt``: its error feedback and theta right after the resume
(``on_train_start``), whether every rank held the same model right after the first outer step of
this fit, and its error feedback and theta at the end (before the strategy's last outer step), with
the checkpoint of step ``--save-at`` kept in ``--out/ckpt``.
"""

import argparse
import os

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_gaussk  # noqa: F401 (registers "gaussk_local")
from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy

H = 3


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Net(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.rec: dict = {}

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1_000_003 * self.global_step + self.global_rank)
        x = torch.randn(32, 16, generator=g)
        return torch.nn.functional.mse_loss(self.net(x), x[:, :1] * 2 - x[:, 1:2])

    def on_train_start(self) -> None:
        local = self.trainer.strategy.local_sgd
        self.rec.update(start_step=local.inner_step, e_start=local.error_feedback(), theta_start=local.global_params(),
                        position_start=local.window_position, on_theta_start=torch.equal(flat(self), local.global_params()))  # fmt: skip

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        local = self.trainer.strategy.local_sgd
        if "agree_after_first_outer" not in self.rec and local.window_position == 0 and local.inner_step > self.rec["start_step"]:
            mine = flat(self)
            got = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(got, mine)
            self.rec["agree_after_first_outer"] = all(torch.equal(got[0], g) for g in got)

    def on_train_end(self) -> None:  # before the strategy's last outer step: the state of the last save
        local = self.trainer.strategy.local_sgd
        self.rec.update(e_end=local.error_feedback(), theta_end=local.global_params(), step_end=local.inner_step)
        torch.save(self.rec, os.path.join(self.out, f"rank{self.global_rank}.pt"))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--resume", default=None)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    L.seed_everything(7)
    trainer = L.Trainer(
        strategy=GaussKLocalSGDStrategy(sync_every=H, density=0.1, chunk=64, ef_decay=0.9, hierarchy="flat"),
        accelerator="cpu", devices=a.devices, max_steps=a.max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=os.path.join(a.out, "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}")],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.zeros(1 << 10, 1), batch_size=1)
    trainer.fit(Net(a.out), data, ckpt_path=a.resume)


if __name__ == "__main__":
    main()
