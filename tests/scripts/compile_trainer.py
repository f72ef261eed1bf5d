"""The Trainer fits of tests/test_compile.py: ``Trainer(strategy="gaussk_ddp")`` on 2 CPU processes
(popen), an MLP fitted eager, then ``torch.compile``-d (inductor) in the same processes.

Run as a subprocess (the popen launcher re-runs ``sys.argv``). Every rank writes
``--out/<eager|compiled>/rank{r}.pt``: the nonzero entries of the gradients after the hook per step,
the hook's calls, the hook DDP names, the graphs handed to inductor and the parameters at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from _launched import Children
from torch.utils.data import DataLoader, TensorDataset

import lightning_gaussk

GRAPHS: list[int] = []


def inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    from torch._inductor.compile_fx import compile_fx

    GRAPHS.append(sum(node.op == "call_function" for node in gm.graph.nodes))
    return compile_fx(gm, example_inputs)


class MLP(L.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
        self.out = out
        self.nnz: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:  # after the backward: what the hook delivered
        self.nnz.append(int(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).count_nonzero()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_end(self) -> None:
        strategy = self.trainer.strategy
        rec = {
            "nnz": self.nnz,
            "numel": sum(p.numel() for p in self.parameters()),
            "hook_calls": strategy.gaussk_state.telemetry["hook_calls"],
            "comm_hook": strategy.model._get_ddp_logging_data().get("comm_hook"),
            "graphs": list(GRAPHS),
            "params": torch.cat([p.detach().reshape(-1) for p in self.parameters()]).clone(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(rec, self.out / f"rank{self.global_rank}.pt")


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x[:, :1] - x[:, 1:2])), batch_size=16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    children = Children()
    for name in ("eager", "compiled"):
        torch._dynamo.reset()
        GRAPHS.clear()
        module = MLP(Path(args.out) / name)
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=lightning_gaussk.GaussKDDPStrategy(density=0.05, dense_fallback="never"),
            max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(torch.compile(module, backend=inductor) if name == "compiled" else module, data())
        children.collect(trainer)
    children.finish("compile_trainer")


if __name__ == "__main__":
    main()
