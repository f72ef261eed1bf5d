"""The Lightning fits of tests/test_fit_summary.py: two nodes of one CPU device each (started once
per node with ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``; one device per node, so the popen
launcher starts no further process), every fit in the same two processes:

- ``ddp``: ``gaussk_ddp`` flat, 6 steps, ``GaussKTelemetry(residual_norm_every_n_steps=2)`` and a
  ``CSVLogger``; a checkpoint at its end;
- ``resumed``: ``gaussk_ddp`` from that checkpoint to step 9 (the summary counts 3 steps);
- ``node``: ``gaussk_ddp`` with ``hierarchy="node"`` (2 nodes x 1 rank), 4 steps;
- ``fsdp``: ``gaussk_fsdp`` on the mesh (2 nodes, 1 rank), 4 steps;
- ``local``: ``gaussk_local`` with ``sync_every=3``, 9 steps, ``GaussKTelemetry`` and a ``CSVLogger``;
- ``diloco``: ``diloco`` with ``sync_every=3``, 6 steps.

Every rank writes ``--out/<name>/rank{r}.pt``: the ``lightning_gaussk`` log lines of the fit
(the end-of-fit summary is logged at teardown, after the fit's hooks), the hook state's
telemetry, layout and sizes, the global step; CSV logs go to ``--out/<name>/csv/version_0``.
"""

import argparse
import logging
import os

import lightning as L
import torch
from _launched import record_group_at_exit
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import StrategyRegistry
from torch.distributed.fsdp import fully_shard

import lightning_gaussk
from lightning_gaussk import GaussKTelemetry

LINES: list[str] = []


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LINES.append(record.getMessage())


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(16, 16, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


class Net(L.LightningModule):
    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shard = shard
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh()), torch.nn.Linear(64, 1)])

    def configure_model(self) -> None:
        if self.shard:
            for block in self.blocks:
                fully_shard(block, mesh=self.device_mesh["shard"])
            fully_shard(self, mesh=self.device_mesh["shard"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def training_step(self, batch, batch_idx):
        x, y = make_batch(self.global_step, self.global_rank)
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def strategy(name: str):
    if name in ("ddp", "resumed"):
        return lightning_gaussk.GaussKDDPStrategy(density=0.05, hierarchy="flat", dense_fallback="never")
    if name == "node":
        return lightning_gaussk.GaussKDDPStrategy(density=0.05, hierarchy="node", dense_fallback="never")
    if name == "fsdp":
        return lightning_gaussk.GaussKFSDPStrategy(density=0.05, dense_fallback="never")
    if name == "local":
        return lightning_gaussk.GaussKLocalSGDStrategy(sync_every=3, density=0.1, chunk=64, hierarchy="flat")
    entry = StrategyRegistry["diloco"]
    return entry["strategy"](**{**entry["init_params"], "sync_every": 3, "hierarchy": "flat"})


def fit(name: str, out: str, steps: int, resume: str | None = None, save: str | None = None) -> None:
    csv = name in ("ddp", "local")
    callbacks = [GaussKTelemetry(residual_norm_every_n_steps=2 if name == "ddp" else 0)] if csv else []
    trainer = L.Trainer(
        strategy=strategy(name), accelerator="cpu", devices=1, num_nodes=2, max_steps=steps, log_every_n_steps=1,
        logger=CSVLogger(os.path.join(out, name), name="csv", version=0) if csv else False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.zeros(1000, 1), batch_size=1)
    LINES.clear()
    trainer.fit(Net(shard=name == "fsdp"), data, ckpt_path=resume)
    lines = list(LINES)  # the fit's, its teardown (the summary) included
    if save:
        trainer.save_checkpoint(save)
    s = trainer.strategy
    state = s.local_sgd if name in ("local", "diloco") else s.gaussk_state
    rec = {
        "lines": lines, "telemetry": dict(state.telemetry), "layout": state.layout.to_dict(),
        "global_step": trainer.global_step, "numel": sum(p.numel() for p in Net().parameters()),
    }  # fmt: skip
    if name in ("local", "diloco"):
        rec.update(dense_bytes_per_step=state.dense_bytes_per_step, outer_bytes=state.outer_bytes)
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    torch.save(rec, os.path.join(folder, f"rank{trainer.global_rank}.pt"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    record_group_at_exit(a.out)
    log = logging.getLogger("lightning_gaussk")
    log.addHandler(_Keep())
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    ckpt = os.path.join(a.out, "ddp.ckpt")
    fit("ddp", a.out, 6, save=ckpt)
    fit("resumed", a.out, 9, resume=ckpt)
    fit("node", a.out, 4)
    fit("fsdp", a.out, 4)
    fit("local", a.out, 9)
    fit("diloco", a.out, 6)


if __name__ == "__main__":
    main()
