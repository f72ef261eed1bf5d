"""The Fabric runs of tests/test_fabric.py and tests/test_compile.py: one popen launch of 2 CPU
processes (gloo), several phases one after the other in the same processes, each with its own
``L.Fabric`` (the process group is reused). Run as a subprocess (Fabric's popen launcher re-runs
``sys.argv``, which must not be pytest's)::

    python fabric_phases.py --out DIR --phases ddp_eager,ddp_compiled,local_eager,local_compiled,refuse

Phases:

- ``ddp_eager`` / ``ddp_compiled``: ``L.Fabric(strategy="gaussk_ddp")`` by name, the options from
  ``GAUSSK_DENSITY`` / ``GAUSSK_DENSE_FALLBACK`` (the test sets them); an MLP in two DDP buckets
  (``ddp_compiled``: ``torch.compile``-d before ``fabric.setup``, inductor); 3 steps, ``fabric.save``,
  2 steps (the reference), ``fabric.load``, the same 2 steps again;
- ``local_eager`` / ``local_compiled``: ``GaussKFabricLocalSGDStrategy(sync_every=2, ...)``, the
  same plan (the save falls in the middle of a window);
- ``refuse``: compiled autograd refused at setup and at ``fabric.backward``.

Every training phase ends with the summary line: ``ddp_eager`` by ``fabric.strategy.teardown()``
alone, the others by ``fabric.strategy.log_summary()`` (its return value recorded) and then
``teardown()``, which must not log it again. The lines the ``lightning_gaussk`` logger printed in
the phase are recorded too (``summaries``: rank 0's; no other rank logs one).

Every rank writes ``--out/<phase>/rank{r}.pt``: per step the nonzero entries of the gradients the
optimizer sees, the hook's telemetry and DDP's logging data, the hook state at the save and after
the load, the parameters after the reference steps and after the replay, and every rank's
parameters at the end (``fabric.all_gather``). The batch is a function of (step, rank) only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

import lightning as L
import torch

import lightning_gaussk  # noqa: F401  (registers "gaussk_ddp" ... with Fabric)
from lightning_gaussk.fabric import GaussKFabricLocalSGDStrategy

SAVE_AT, REPLAY = 3, 2
GRAPHS: list[int] = []  # the ops of every graph handed to inductor (DDPOptimizer: one per bucket)
SUMMARIES: list[str] = []  # the summary lines the lightning_gaussk logger printed in this phase


class KeepSummaries(logging.StreamHandler):
    """Prints the ``lightning_gaussk`` messages (as its default handler would) and keeps the summary lines."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if "fit summary" in record.getMessage():
            SUMMARIES.append(record.getMessage())


def keep_summaries() -> None:
    handler = KeepSummaries()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("lightning_gaussk")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """Inductor, counting the graphs it gets (a backend callable: Fabric re-applies it over its wrapper)."""
    from torch._inductor.compile_fx import compile_fx

    GRAPHS.append(sum(node.op == "call_function" for node in gm.graph.nodes))
    return compile_fx(gm, example_inputs)


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(16, 32, generator=g)
    return x, torch.tanh(x[:, :1] * 2 - x[:, 1:2])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 262,144 weights in the middle: DDP's first bucket (1 MiB) closes after it, the first layer is a second bucket
    return torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1))


def unwrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    seen = module
    for _ in range(6):
        if isinstance(seen, torch.nn.parallel.DistributedDataParallel):
            return seen
        for attr in ("_forward_module", "_orig_mod", "module"):
            inner = getattr(seen, attr, None)
            if isinstance(inner, torch.nn.Module):
                seen = inner
                break
    raise AssertionError(f"no DDP inside {type(module).__name__}")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2's DTensors


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([full(p.detach()).reshape(-1) for p in module.parameters()]).clone()


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items()}


def hook_state_dict(strategy) -> dict:
    return strategy._gaussk_state.state_dict()


def train_phase(name: str, strategy, compiled: bool | str, out: Path, tmp: Path, devices: int = 2, num_nodes: int = 1) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    rank = fabric.global_rank
    model = make_model()
    GRAPHS.clear()
    SUMMARIES.clear()
    torch._dynamo.reset()  # every phase compiles afresh (GRAPHS counts what it hands to inductor)
    if compiled == "blocks":  # every child's forward compiled, then sharded (the parameter names stay)
        for child in model.children():
            child.forward = torch.compile(child.forward, backend=inductor)
    elif compiled:  # "reapply": Fabric removes the OptimizedModule and compiles its DDP / FSDP2 wrapper (its default);
        model = torch.compile(model, backend=inductor)  # True: DDP wraps the compiled module (_reapply_compile=False)
    reapply = compiled == "reapply"
    fsdp = name.startswith("fsdp")
    if fsdp:  # FSDP2: the optimizer over the sharded parameters
        model = fabric.setup_module(model, _reapply_compile=reapply)
        opt = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    else:
        model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), _reapply_compile=reapply)
    ddp = None if fsdp else unwrap_ddp(model)
    rec: dict = {"phase": name, "rank": rank, "nnz": [], "numel": sum(p.numel() for p in model.parameters()), "losses": []}
    rec["strategy"] = type(fabric.strategy).__name__
    rec["config"] = (getattr(fabric.strategy, "gaussk_config", None) or fabric.strategy.local_config).to_dict()
    rec["compiled_wrapper"] = type(model._forward_module).__name__
    rec["compiled"] = compiled

    def step(i: int) -> None:
        x, y = make_batch(i, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        grads = torch.cat([full(p.grad).reshape(-1) for p in model.parameters()])
        rec["nnz"].append(int(grads.count_nonzero()))
        rec["losses"].append(float(loss.detach()))
        opt.step()
        opt.zero_grad()

    for i in range(SAVE_AT):
        step(i)
    ckpt = tmp / f"{name}.ckpt"
    fabric.save(ckpt, {"model": model, "optimizer": opt, "step": SAVE_AT})
    rec["saved_state"] = hook_state_dict(fabric.strategy)
    rec["params_at_save"] = flat(model)
    shards = ckpt / "gaussk" if fsdp else Path(str(ckpt) + ".gaussk")
    rec["shards"] = sorted(p.name for p in shards.iterdir())
    rec["ckpt_keys"] = sorted(torch.load(ckpt / "meta.pt" if fsdp else ckpt, weights_only=True).keys())
    for i in range(SAVE_AT, SAVE_AT + REPLAY):
        step(i)
    rec["ref"] = flat(model)
    rec["ref_state"] = hook_state_dict(fabric.strategy)
    remainder = fabric.load(ckpt, {"model": model, "optimizer": opt})
    rec["remainder"] = sorted(remainder)
    rec["loaded_state"] = hook_state_dict(fabric.strategy)
    rec["params_at_load"] = flat(model)
    for i in range(SAVE_AT, SAVE_AT + REPLAY):
        step(i)
    rec["again"] = flat(model)
    rec["again_state"] = hook_state_dict(fabric.strategy)
    if isinstance(fabric.strategy, GaussKFabricLocalSGDStrategy):
        rec["window_position"] = fabric.strategy.local_sgd.window_position
        rec["before_finish"] = fabric.all_gather(flat(model)).clone()  # mid-window: every rank its own model
        rec["finished"] = fabric.strategy.finish()
    rec["all_ranks"] = fabric.all_gather(flat(model)).clone()
    rec["telemetry"] = dict(fabric.strategy._gaussk_state.telemetry)
    if ddp is not None:
        data = ddp._get_ddp_logging_data()
        rec["ddp_logging"] = {k: v for k, v in data.items() if k in ("comm_hook", "num_buckets_reduced")}
    rec["dynamo"] = dynamo_counters()
    rec["graphs"] = list(GRAPHS)
    rec["hook_step"] = getattr(fabric.strategy._gaussk_state, "step", None)
    if name != "ddp_eager":  # ddp_eager: the line at teardown alone
        rec["summary_line"] = fabric.strategy.log_summary()
    fabric.strategy.teardown()  # Fabric does not call it; it logs the line unless log_summary did
    rec["summaries"] = list(SUMMARIES)
    save(out, name, rank, rec)
    fabric.barrier()


def refuse_phase(name: str, out: Path) -> None:
    import torch._dynamo

    rec: dict = {"phase": name}
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="gaussk_ddp")
    fabric.launch()
    torch._dynamo.config.compiled_autograd = True
    try:
        fabric.setup(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1))
        rec["at_setup"] = None
    except RuntimeError as err:
        rec["at_setup"] = str(err)
    finally:
        torch._dynamo.config.compiled_autograd = False
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="gaussk_local")
    fabric.launch()
    model = make_model()
    model, _ = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    torch._dynamo.config.compiled_autograd = True
    try:
        fabric.backward(model(torch.randn(2, 32)).sum())
        rec["at_backward"] = None
    except RuntimeError as err:
        rec["at_backward"] = str(err)
    finally:
        torch._dynamo.config.compiled_autograd = False
    save(out, name, fabric.global_rank, rec)
    fabric.barrier()


def save(out: Path, name: str, rank: int, rec: dict) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rec, folder / f"rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phases", default="ddp_eager,ddp_compiled,local_eager,local_compiled,refuse")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    args = parser.parse_args()
    keep_summaries()
    out = Path(args.out)
    tmp = out / "ckpt"
    tmp.mkdir(parents=True, exist_ok=True)
    local = {"sync_every": 2, "density": 0.1, "chunk": None, "quantize": None, "dense_fallback": "never"}
    for name in args.phases.split(","):
        compiled = {"eager": False, "compiled": True, "reapply": "reapply", "blocks": "blocks"}[name.split("_")[-1]] if "_" in name else None
        try:
            if name.startswith("ddp_"):
                train_phase(name, "gaussk_ddp", compiled, out, tmp)  # by name
            elif name.startswith("local_"):
                train_phase(name, GaussKFabricLocalSGDStrategy(**local), compiled, out, tmp)
            elif name.startswith("fsdp_"):  # run once per node, --devices 1 --num-nodes 2
                train_phase(name, "gaussk_fsdp", compiled, out, tmp, args.devices, args.num_nodes)
            elif name == "refuse":
                refuse_phase(name, out)
            else:
                raise SystemExit(f"unknown phase {name}")
        except Exception:
            traceback.print_exc()
            print(f"PHASE FAILED: {name} (rank {os.environ.get('LOCAL_RANK', '0')})", file=sys.stderr, flush=True)
            raise
        print(f"PHASE DONE: {name}", flush=True)


if __name__ == "__main__":
    main()
