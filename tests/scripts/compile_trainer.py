"""The Trainer fits of tests/test_compile.py, on 2 CPU processes (popen), one after the other in the
same processes (Lightning's popen launcher re-runs ``sys.argv``, so run this as a subprocess):

- ``eager`` / ``compiled``: ``GaussKDDPStrategy`` fitting an MLP eager, then ``torch.compile``-d
  (inductor);
- ``local_eager`` / ``local_compiled``: ``GaussKLocalSGDStrategy(sync_every=2, ...)``, the same;
- ``compiled_autograd`` / ``local_compiled_autograd``: a compiled module with
  ``torch._dynamo.config.compiled_autograd = True`` under each strategy: what happens is recorded
  (Lightning calls ``backward`` outside the compiled ``training_step``);
- ``python_reducer`` (last: such a DDP sets inductor options for the rest of the process):
  ``GaussKDDPStrategy`` with DDP built under ``torch._dynamo.config.optimize_ddp = "python_reducer"``
  (compiled autograd's DDP): the fit must fail in the hook with its refusal (recorded, every rank).

Every rank writes ``--out/<case>/rank{r}.pt``: the nonzero entries of the gradients after the hook
per step, the hook's telemetry, the hook DDP names, the graphs handed to inductor, the parameters
at the end, and the error of a failed fit.
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
        state = getattr(strategy, "gaussk_state", None) or strategy.local_sgd
        telemetry = dict(state.telemetry)
        rec = {
            "nnz": self.nnz,
            "numel": sum(p.numel() for p in self.parameters()),
            "telemetry": telemetry,
            "hook_calls": telemetry.get("hook_calls"),
            "comm_hook": strategy.model._get_ddp_logging_data().get("comm_hook"),
            "graphs": list(GRAPHS),
            "params": torch.cat([p.detach().reshape(-1) for p in self.parameters()]).clone(),
            "error": None,
        }
        save(self.out, self.global_rank, rec)


def save(out: Path, rank: int, rec: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(rec, out / f"rank{rank}.pt")


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x[:, :1] - x[:, 1:2])), batch_size=16)


CASES = ("eager", "compiled", "local_eager", "local_compiled", "compiled_autograd", "local_compiled_autograd", "python_reducer")  # python_reducer last: DDP sets inductor options for good


def strategy_for(case: str) -> L.pytorch.strategies.Strategy:
    if case.startswith("local"):
        return lightning_gaussk.GaussKLocalSGDStrategy(sync_every=2, density=0.1, chunk=None, quantize=None, dense_fallback="never")
    return lightning_gaussk.GaussKDDPStrategy(density=0.05, dense_fallback="never")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    children = Children()
    for name in args.cases.split(","):
        torch._dynamo.reset()
        GRAPHS.clear()
        module = MLP(Path(args.out) / name)
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=strategy_for(name),
            max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        compiled = name.endswith(("compiled", "compiled_autograd"))
        patch = {"optimize_ddp": "python_reducer"} if name == "python_reducer" else {}
        if name.endswith("compiled_autograd"):
            patch = {"compiled_autograd": True}
        try:
            with torch._dynamo.config.patch(**patch):  # DDP is built inside fit: the python reducer is chosen there
                trainer.fit(torch.compile(module, backend=inductor) if compiled else module, data())
        except Exception as err:  # noqa: BLE001  (a refusal is what these cases record)
            if not patch:
                raise
            save(module.out, trainer.global_rank, {"error": f"{type(err).__name__}: {err}", "graphs": list(GRAPHS)})
        children.collect(trainer)
        print(f"CASE DONE: {name}", flush=True)
    children.finish("compile_trainer")


if __name__ == "__main__":
    main()
