"""The worker of the torchrun elastic-restart recipe (tests/test_elastic.py,
benchmarks/elastic_restart.py): a small Lightning fit, started by ``torchrun`` on every host::

    torchrun --nnodes=1:2 --nproc-per-node=L --max-restarts=3 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST0:29400 --rdzv-id=job --rdzv-conf=... elastic_fit.py --strategy gaussk_ddp ...

Every attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT``) calls ``trainer.fit(..., ckpt_path="last")``:
the first finds no checkpoint and starts at step 0, a restart resumes from ``last.ckpt`` of the
shared ``--ckpt-dir`` (``ModelCheckpoint(every_n_train_steps=--ckpt-every, save_last=True)``).
The Trainer's layout comes from the launcher of THIS attempt, not from a fixed number of nodes:
``devices = LOCAL_WORLD_SIZE`` and ``num_nodes = WORLD_SIZE // LOCAL_WORLD_SIZE`` (Lightning's
torchelastic environment refuses ``devices * num_nodes != WORLD_SIZE``), so after a host is lost
the same command trains on the hosts that are left.

Every process appends JSON lines to ``--events/attempt{a}.rank{r}.jsonl`` (flushed per line):
``proc`` (interpreter start, before the imports), ``setup`` (process group up, before the
checkpoint is restored), ``train_start`` (restored: ``step`` is the global step it resumes at,
with ``world``, ``num_nodes``, ``devices``, ``group_rank`` and the strategy's ``layout`` and
``carried`` state, see :func:`gaussk_facts`), ``step`` (after each optimizer step:
the new global step), ``save`` (a checkpoint was written: its step), ``exception`` (the fit raised)
and ``end``. Times are ``time.time()`` (one clock: every emulated host is this machine).
``--step-sleep`` slows the steps down so that a kill lands in the middle of the run.
"""

import time

T_PROC = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from datetime import timedelta  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import lightning_gaussk  # noqa: E402,F401 (registers "gaussk_ddp" and "gaussk_local")
from lightning_gaussk.frontends.lightning_ddp import GaussKDDPStrategy  # noqa: E402
from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy  # noqa: E402

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
PER_NODE = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


class Events:
    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.f = open(os.path.join(folder, f"attempt{ATTEMPT}.rank{RANK}.jsonl"), "a", buffering=1)

    def __call__(self, event: str, **fields) -> None:
        self.f.write(json.dumps({"event": event, "t": time.time(), "attempt": ATTEMPT, "rank": RANK, **fields}) + "\n")
        self.f.flush()


class Record(Callback):
    def __init__(self, events: Events, step_sleep: float) -> None:
        self.events, self.step_sleep = events, step_sleep

    def setup(self, trainer, pl_module, stage) -> None:  # the process group is up; nothing restored yet
        self.events("setup")

    def on_train_start(self, trainer, pl_module) -> None:  # the checkpoint is restored
        self.events("train_start", step=trainer.global_step, world=trainer.world_size, num_nodes=trainer.num_nodes,
                    devices=trainer.num_devices, group_rank=int(os.environ.get("GROUP_RANK", "0")), **gaussk_facts(trainer))  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.events("step", step=trainer.global_step)
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.events("save", step=trainer.global_step)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.events("exception", error=f"{type(exception).__name__}: {str(exception)[:300]}")


def gaussk_facts(trainer) -> dict:
    """The strategy's layout and the size of the state it carries across steps (residuals of
    gaussk_ddp, error feedback of gaussk_local): non-zero after a resume that restored it."""
    strategy = trainer.strategy
    local = getattr(strategy, "local_sgd", None)
    if local is not None:
        return {"layout": local.layout.to_dict(), "carried": float(local.error_feedback().abs().sum()), "inner_step": local.inner_step}
    state = getattr(strategy, "gaussk_state", None)
    if state is None:
        return {}
    residuals = state.state_dict()["residuals"].values()
    return {"layout": state.layout.to_dict(), "carried": float(sum(r.abs().sum() for r in residuals))}


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1_000_003 * self.global_step + self.global_rank)
        x = torch.randn(32, 16, generator=g)
        return torch.nn.functional.mse_loss(self.net(x), x[:, :1] * 2 - x[:, 1:2])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def make_strategy(name: str, timeout_s: float):
    timeout = timedelta(seconds=timeout_s)  # the process group's: how long a collective waits for a silent peer
    if name == "gaussk_ddp":
        return GaussKDDPStrategy(density=0.1, timeout=timeout)
    if name == "gaussk_local":
        return GaussKLocalSGDStrategy(sync_every=3, density=0.1, chunk=64, timeout=timeout)
    raise SystemExit(f"elastic_fit.py: --strategy must be gaussk_ddp or gaussk_local, got {name!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--timeout-s", type=float, default=60.0)
    a = p.parse_args()
    events = Events(a.events)
    events("proc", t_proc=T_PROC, world=WORLD, per_node=PER_NODE)
    torch.set_num_threads(1)
    L.seed_everything(7, verbose=False)
    trainer = L.Trainer(
        strategy=make_strategy(a.strategy, a.timeout_s), accelerator="cpu",
        devices=PER_NODE, num_nodes=WORLD // PER_NODE,  # this attempt's world, whatever it was before
        max_steps=a.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=a.ckpt_dir, every_n_train_steps=a.ckpt_every, save_top_k=0, save_last=True),
                   Record(events, a.step_sleep)],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.zeros(1 << 12, 1), batch_size=1)
    trainer.fit(Net(), data, ckpt_path="last")
    events("end", step=trainer.global_step)


if __name__ == "__main__":
    main()
