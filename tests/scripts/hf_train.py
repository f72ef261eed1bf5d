"""transformers.Trainer + register_gaussk on 2 CPU processes, for tests/test_transformers.py. Launch with

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/hf_train.py --out DIR

A tiny GPT-2 built from a config (nothing downloaded) on generated text, SGD, ``TrainingArguments(use_cpu=True,
ddp_backend="gloo")``; each run ``STEPS`` steps from the same initial model on a new Trainer: dense DDP;
``register_gaussk(trainer, density=0.01)`` with a checkpoint every ``SAVE`` steps; local SGD (``sync_every=4``)
likewise; then both GaussK runs again, resumed from their ``checkpoint-SAVE`` folders
(``trainer.train(resume_from_checkpoint=...)``), and a per-step run resumed from local SGD's checkpoint (no shards
of its kind). Two micro-batches per optimizer step (``no_sync`` on the first). Every rank writes what it saw to
``DIR/rank{r}.pt``.
"""

import argparse
import json
import os
import random
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from lightning_gaussk.transformers import register_gaussk

STEPS = 12
SAVE = 6  # checkpoint-6 is resumed from; 6 is mid-window for sync_every=4
SEQ = 32
DET, ADJ, NOUN = ["the", "a", "one", "every"], ["small", "large", "red", "blue"], ["cat", "dog", "bird", "fish"]
VERB, PREP = ["sees", "eats", "finds", "likes"], ["near", "under", "over", "with"]


def text(n: int, seed: int) -> list[str]:
    """Generated sentences of a small grammar: learnable structure, nothing downloaded."""
    rng = random.Random(seed)

    def phrase() -> str:
        return f"{rng.choice(DET)} {rng.choice(ADJ)} {rng.choice(NOUN)}"

    return [f"{phrase()} {rng.choice(VERB)} {phrase()} {rng.choice(PREP)} {phrase()}. " for _ in range(n)]


class Bytes(Dataset):
    """Byte-level tokens (vocab 256) of the generated text, cut into SEQ-long samples."""

    def __init__(self, n: int, seed: int) -> None:
        data = torch.tensor(list("".join(text(n * 2, seed)).encode()), dtype=torch.long)
        self.samples = data[: n * SEQ].view(n, SEQ)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.samples[i], "labels": self.samples[i]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=SEQ, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def arguments(folder: str, save: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=folder, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=STEPS,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=2, seed=0,
        save_strategy="steps" if save else "no", save_steps=SAVE, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip


class Snapshots(TrainerCallback):
    """After GaussK's callback: the hook state as saved (on_save) and as restored (on_train_begin)."""

    def __init__(self, gaussk) -> None:
        self.gaussk = gaussk
        self.saved: dict[int, dict] = {}
        self.begin: dict | None = None
        self.begin_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = _flat(self.gaussk.state.state_dict())
        self.begin_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = _flat(self.gaussk.state.state_dict())


def _flat(tree, prefix="") -> dict:
    """Nested state dicts as one level of ``a/b/c`` keys, tensors cloned (torch.load(weights_only=True) reads it)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}/"))
    elif isinstance(tree, torch.Tensor):
        out[prefix.rstrip("/")] = tree.detach().clone()
    else:
        out[prefix.rstrip("/")] = json.dumps(tree, default=str)
    return out


def eval_loss(m) -> float:
    batch = Bytes(16, seed=99).samples
    m.eval()
    with torch.no_grad():
        return float(m(input_ids=batch, labels=batch).loss)


def flat_params(m) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()]).clone()


def run(out: str, name: str, options: dict | None, resume: str | None = None) -> dict:
    folder = os.path.join(out, name)
    trainer = Trainer(model=model(), args=arguments(folder, save=options is not None), train_dataset=Bytes(256, seed=0))
    rec: dict = {"initial_loss": eval_loss(trainer.model)}
    snaps = None
    if options is not None:
        gaussk = register_gaussk(trainer, **options)
        snaps = Snapshots(gaussk)
        trainer.add_callback(snaps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    rec["warnings"] = [str(w.message) for w in caught]
    ddp = trainer.model_wrapped
    rec["wrapper"] = type(ddp).__name__
    rec["comm_hook"] = str(ddp._get_ddp_logging_data().get("comm_hook", ""))
    rec["params"] = flat_params(trainer.model)
    rec["eval_loss"] = eval_loss(trainer.model)
    rec["log_history"] = json.dumps(trainer.state.log_history)
    if snaps is not None:
        rec["state_kind"] = type(gaussk.state).__name__
        rec["telemetry"] = json.dumps(dict(gaussk.state.telemetry))
        rec["saved"] = {str(k): v for k, v in snaps.saved.items()}
        rec["begin"] = snaps.begin
        rec["begin_step"] = snaps.begin_step
        rec["files"] = {
            step: sorted(os.listdir(os.path.join(folder, f"checkpoint-{step}")))
            for step in (SAVE, STEPS) if os.path.isdir(os.path.join(folder, f"checkpoint-{step}"))
        }  # fmt: skip
    dist.barrier()
    return rec


def fsdp_refusal(out: str) -> str:
    """What register_gaussk says to a Trainer with FSDP (last: FSDP changes Accelerate's shared state)."""
    args = TrainingArguments(output_dir=os.path.join(out, "fsdp"), use_cpu=True, ddp_backend="gloo", fsdp="full_shard",
                             report_to="none")  # fmt: skip
    trainer = Trainer(model=model(), args=args, train_dataset=Bytes(16, seed=0))
    try:
        register_gaussk(trainer, density=0.01)
    except ValueError as err:
        return str(err)
    return "accepted"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    records = {"dense": run(a.out, "dense", None)}
    for name, options in (("gaussk", {"density": 0.01}), ("local", {"sync_every": 4})):
        records[name] = run(a.out, name, options)
    for name, options in (("gaussk", {"density": 0.01}), ("local", {"sync_every": 4})):  # new Trainers and models
        resume = os.path.join(a.out, name, f"checkpoint-{SAVE}")
        records[name + "_resumed"] = run(a.out, name + "_resumed", options, resume=resume)
    # a Trainer checkpoint without GaussK's per-step shards (local SGD's): a warning, residuals from zero
    other = os.path.join(a.out, "local", f"checkpoint-{SAVE}")
    records["gaussk_from_local"] = run(a.out, "gaussk_from_local", {"density": 0.01}, resume=other)
    records["fsdp_refusal"] = fsdp_refusal(a.out)
    torch.save(records, os.path.join(a.out, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main()
