"""Lightning fits with the "gaussk_local" strategy, for tests/test_local_sgd.py (2 CPU processes,
popen launcher: run as a subprocess; the launcher re-runs ``sys.argv``).

Two fits in the same processes: ``ref`` (8 optimizer steps of 2 accumulated micro-batches,
sync_every=3, 2-bit values, a checkpoint every 4 optimizer steps, ``GaussKTelemetry`` logging) and ``resumed`` (from the
checkpoint of step 4, in the middle of a window, to step 8); then the same two with ``overlap_steps=1,
fragments=2`` (``ref-overlap``, ``resumed-overlap``: at step 4 fragment 1's exchange is in flight). Every rank writes what it saw to
``--out/<name>/rank{r}.pt`` (at the module's ``on_train_end``, before the strategy's last outer
step) and ``--out/<name>/final_rank{r}.pt`` (after ``fit``). Batches are a function of (optimizer step, micro-batch, rank).
"""

import argparse
import os

import lightning as L
import torch
import torch.distributed as dist
from _launched import Children, record_group_at_exit
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_gaussk  # noqa: F401 (registers "gaussk_local")
from lightning_gaussk import GaussKTelemetry
from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy

H = 3


def make_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Net(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        self.losses: list[float] = []
        self.synced_equal: bool | None = None
        self.position: int | None = None
        self.in_flight_at_save: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = make_batch(self.global_step, batch_idx % self.trainer.accumulate_grad_batches, self.global_rank)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_start(self) -> None:
        self.position = self.trainer.strategy.local_sgd.window_position

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step == 2 * H and self.synced_equal is None:  # right after the second outer step
            mine = flat(self)
            got = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(got, mine)
            self.synced_equal = all(torch.equal(got[0], g) for g in got)

    def on_save_checkpoint(self, checkpoint) -> None:  # before the strategy writes the shards
        self.in_flight_at_save.append(self.trainer.strategy.local_sgd.in_flight)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)

    def on_train_end(self) -> None:
        local = self.trainer.strategy.local_sgd
        tel = local.telemetry
        logged = next(cb for cb in self.trainer.callbacks if isinstance(cb, GaussKTelemetry))
        rec = {
            "params": flat(self).clone(), "inner_steps": tel["inner_steps"], "outer_steps": tel["outer_steps"],
            "loss_first": sum(self.losses[:4]) / 4, "loss_last": sum(self.losses[-4:]) / 4,
            "synced_equal": self.synced_equal, "resumed_position": self.position, "outer_bytes": local.outer_bytes,
            "telemetry_last": dict(logged.last), "in_flight_at_save": self.in_flight_at_save,
            "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("gaussk/")},
        }  # fmt: skip
        os.makedirs(self.out, exist_ok=True)
        torch.save(rec, os.path.join(self.out, f"rank{self.global_rank}.pt"))


def fit(out: str, ckpt_dir: str, resume: str | None, **options) -> L.Trainer:
    L.seed_everything(7)
    strategy = GaussKLocalSGDStrategy(sync_every=H, density=0.1, chunk=64, quantize=2, hierarchy="flat", **options)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_steps=8, accumulate_grad_batches=2, logger=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1, filename="{step}"), GaussKTelemetry()],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.zeros(1 << 10, 1), batch_size=1)
    trainer.fit(Net(out), data, ckpt_path=resume)
    # after fit: the strategy's last outer step (end_on_theta, the default) has run on every rank
    final = {"params": flat(trainer.lightning_module).clone(), "on_theta": strategy.local_sgd.on_theta,
             "outer_steps": strategy.local_sgd.telemetry["outer_steps"], "position": strategy.local_sgd.window_position}  # fmt: skip
    torch.save(final, os.path.join(out, f"final_rank{trainer.global_rank}.pt"))
    return trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    record_group_at_exit(a.out)
    children = Children()
    ckpts = os.path.join(a.out, "ckpt")
    children.collect(fit(os.path.join(a.out, "ref"), ckpts, None))
    fit(os.path.join(a.out, "resumed"), os.path.join(a.out, "ckpt2"), os.path.join(ckpts, "step=4.ckpt"))
    overlap = {"overlap_steps": 1, "fragments": 2}
    fit(os.path.join(a.out, "ref-overlap"), os.path.join(a.out, "ckpt3"), None, **overlap)
    fit(os.path.join(a.out, "resumed-overlap"), os.path.join(a.out, "ckpt4"), os.path.join(a.out, "ckpt3", "step=4.ckpt"), **overlap)
    children.finish("local_fit")


if __name__ == "__main__":
    main()
