"""The Lightning fits of tests/test_fsdp_lightning.py: ``strategy="gaussk_fsdp"`` on ``--num-nodes``
nodes of ``--devices`` CPU ranks, an MLP of three blocks, each ``fully_shard``-ed over the
strategy's ``device_mesh["shard"]`` in ``configure_model`` (the two lines docs/fsdp.md shows).

Run once per node (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` set), as a job script does;
``--plan`` is a JSON list of fits run one after the other in the same processes::

    {"name": "straight", "max_steps": 12, "density": 0.05, "save_ckpt": "path", "resume": "path",
     "single_file": false}   # true: save_distributed_checkpoint=False (one file, shards beside it)

Every rank writes ``--out/<name>/rank{r}.pt``: losses, full parameters, the hook's state dict at
the start and the end, its layout and telemetry, the global step. Local rank 0 waits for the
launcher's other processes and exits with 3 if any did not exit with 0. The batch is a function of
(optimizer step, rank) only, so a resumed fit sees exactly the data of an uninterrupted one.
"""

import argparse
import json
import os

import lightning as L
import torch
from _launched import Children, record_group_at_exit
from torch.distributed.fsdp import fully_shard

import lightning_gaussk  # noqa: F401  (registers "gaussk_fsdp")


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.5 * torch.sin(3 * x[:, 2:3])


class Blocks(L.LightningModule):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.Tanh()),
             torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Tanh()),
             torch.nn.Linear(48, 1)]
        )  # fmt: skip
        self.losses: list[float] = []
        self.start_state = None

    def configure_model(self) -> None:
        for block in self.blocks:
            fully_shard(block, mesh=self.device_mesh["shard"])
        fully_shard(self, mesh=self.device_mesh["shard"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def training_step(self, batch, batch_idx):
        x, y = make_batch(self.global_step, self.global_rank)
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def on_train_start(self) -> None:
        self.start_state = self.trainer.strategy.gaussk_state.state_dict()

    def on_train_end(self) -> None:
        state = self.trainer.strategy.gaussk_state
        rec = {
            "losses": self.losses,
            "params": {n: p.full_tensor().detach().clone() for n, p in self.named_parameters()},
            "state": state.state_dict(),
            "start_state": self.start_state,
            "layout": state.layout.to_dict(),
            "telemetry": dict(state.telemetry),
            "global_step": self.trainer.global_step,
            "world_size": self.trainer.world_size,
        }
        out = os.path.join(self.spec["out"], self.spec["name"])
        os.makedirs(out, exist_ok=True)
        torch.save(rec, os.path.join(out, f"rank{self.global_rank}.pt"))


def fit(spec: dict, devices: int, num_nodes: int) -> L.Trainer:
    data = torch.utils.data.DataLoader(torch.zeros(10_000, 1), batch_size=1)
    trainer = L.Trainer(
        strategy=lightning_gaussk.GaussKFSDPStrategy(
            density=spec.get("density", 0.05), dense_fallback="never", save_distributed_checkpoint=not spec.get("single_file")
        ),
        accelerator="cpu", devices=devices, num_nodes=num_nodes, max_steps=spec["max_steps"],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = Blocks(spec)
    trainer.fit(model, data, ckpt_path=spec.get("resume"))
    if spec.get("save_ckpt"):
        trainer.save_checkpoint(spec["save_ckpt"])
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--plan", required=True)
    args = parser.parse_args()
    record_group_at_exit(args.out)
    children = Children()  # local rank 0 of each node: the launcher's processes must exit with 0 too
    for spec in json.loads(args.plan):
        children.collect(fit({**spec, "out": args.out}, args.devices, args.num_nodes))
    children.finish("fsdp_fit")


if __name__ == "__main__":
    main()
