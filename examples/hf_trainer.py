"""Hugging Face ``Trainer`` + GaussK: fine-tune a tiny GPT-2 (built from a config, nothing
downloaded) on generated text, with TopK gradient sparsification across the processes.

``register_gaussk(trainer, ...)`` after building the Trainer is the only GaussK line; options not
given come from ``GAUSSK_*`` environment variables, then the defaults. Launch one process per rank
(with the README's setup, ``bash scripts/setup.sh``)::

    torchrun --standalone --nproc-per-node 2 examples/hf_trainer.py --max-steps 60 --save-steps 30
    torchrun --standalone --nproc-per-node 2 examples/hf_trainer.py --max-steps 90 --resume     # from the last checkpoint
    torchrun --standalone --nproc-per-node 2 examples/hf_trainer.py --sync-every 4              # sparse local SGD instead

On CPU it trains with gloo (``use_cpu=True, ddp_backend="gloo"``); with GPUs, each rank takes one
(NCCL), the script unchanged. Each checkpoint folder ``hf_out/checkpoint-N`` holds every rank's
``gaussk_state_rank{r}.pt`` beside the Trainer's files, and the logs carry ``gaussk/*`` figures.
"""

import argparse
import random

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lightning_gaussk.transformers import register_gaussk

SEQ = 64


def sentences(n: int, seed: int) -> str:
    """Generated text of a small grammar (byte-level: the vocabulary is the 256 byte values)."""
    rng = random.Random(seed)
    det, adj = ["the", "a", "one", "every"], ["small", "large", "red", "blue", "quick", "lazy"]
    noun, verb = ["cat", "dog", "bird", "fish", "fox", "owl"], ["sees", "eats", "finds", "likes", "follows"]
    prep = ["near", "under", "over", "with", "behind"]

    def phrase() -> str:
        return f"{rng.choice(det)} {rng.choice(adj)} {rng.choice(noun)}"

    return "".join(f"{phrase()} {rng.choice(verb)} {phrase()} {rng.choice(prep)} {phrase()}. " for _ in range(n))


class ByteText(Dataset):
    """``SEQ``-byte samples of the generated text, as causal-LM inputs and labels."""

    def __init__(self, samples: int, seed: int) -> None:
        data = torch.tensor(list(sentences(samples * SEQ // 30 + 1, seed).encode()), dtype=torch.long)
        self.samples = data[: samples * SEQ].view(samples, SEQ)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.samples[i], "labels": self.samples[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--density", type=float, default=None, help="fraction sent per step (default: GAUSSK_DENSITY, else 0.001)")
    p.add_argument("--sync-every", type=int, default=None, help="sparse local SGD: average every N optimizer steps")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--save-steps", type=int, default=30)
    p.add_argument("--output-dir", default="hf_out")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    args = p.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    cpu = not torch.cuda.is_available()
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        optim="sgd", learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10,
        save_strategy="steps", save_steps=args.save_steps, eval_strategy="no", report_to="none", seed=0,
        use_cpu=cpu, ddp_backend="gloo" if cpu else None, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=ByteText(2048, seed=0), eval_dataset=ByteText(64, seed=1))

    options = {} if args.density is None else {"density": args.density}
    if args.sync_every is not None:
        options["sync_every"] = args.sync_every
    gaussk = register_gaussk(trainer, **options)  # the GaussK line; a bad option fails here

    trainer.train(resume_from_checkpoint=True if args.resume else None)
    loss = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        world = trainer.args.world_size
        print(f"Trainer on {world} process(es): eval loss {loss:.3f} after {trainer.state.global_step} steps")
        if gaussk.state is not None:
            sent, dense = gaussk.state.telemetry["bytes_sent"], gaussk.state.telemetry.get("bytes_dense")
            kind = type(gaussk.state).__name__
            print(f"rank 0 ({kind}): {sent:,} bytes sent" + (f" vs dense {dense:,}" if dense else "")
                  + f"; last logged figures: {', '.join(f'{k}={v:.4g}' for k, v in gaussk.last.items())}")  # fmt: skip
    trainer.end()  # ends the process group after everything that needs the other processes


if __name__ == "__main__":
    main()
