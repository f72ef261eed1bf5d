"""Why the sparse all-reduce (``exchange="allreduce"``) is built the way it is, measured.

Single process, CPU, under a minute. ``P`` = 2, 4, 8, 16 simulated ranks train a small CNN on
sklearn's ``load_digits`` (each rank its own shard of the data, plain SGD on the mean gradient).
Every step, each rank's ``u = g + residual`` (one bucket: the whole flattened gradient, several
layers of very different sizes) goes through the exchange's math, at density 0.01, for:

- ``allgather``: every rank's top-k, all delivered (the reference; its update holds up to P k entries);
- ``allreduce`` with regions *interleaved* (entry g in region g mod P, as built) or *contiguous*
  (region j = [j R, (j+1) R)), stage-1 capacity ``c1 = ceil(f1 k / P)`` and stage-2 ``c2 = ceil(f2 k / P)``:
  Ok-Topk's split (f1, f2) = (2, 1), as first built, against (1.5, 1.5), as built now (the same words per
  rank, an update of ~1.5k entries), plus (1, 1) and (2, 2) for scale.

:func:`exchange` is the math of ``lightning_gaussk.comm.sparse_allreduce`` without processes (for
the built variant it gives the same update and delivered masks as the real exchange on gloo).

Each variant keeps its own residuals (error feedback: ``residual = u - delivered``); the model
follows the dense mean gradient so every variant sees the same gradients. Reported, averaged over
the steps: the fraction of the selected entries delivered, the fraction of the true global top-k of
the mean ``u`` (by magnitude) that is in the update, the update's entries, its cosine with the
dense sum of ``u``, and the words each rank sends per bucket (ring collectives) against the
all-gather's. ``allgather at equal words`` is the all-gather with the per-rank ``k'`` that costs the
built all-reduce's words (the issue's "equal bytes" comparison).

    python benchmarks/exchange_choice.py        # prints a table, writes benchmarks/out/exchange_choice.json
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from torch import nn

from lightning_gaussk.comm.sparse_allreduce import SparseAllReduce

DENSITY = 0.01
PEERS = (2, 4, 8, 16)
STEPS = 30
BATCH = 32
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
# (name, layout, stage-1 capacity factor f1, stage-2 factor f2): c1 = ceil(f1 k / P), c2 = ceil(f2 k / P);
# layout None: the all-gather (f1 "equal": with the k' that costs the built all-reduce's words)
VARIANTS = (
    ("allgather", None, None, None),
    ("allgather at equal words", None, "equal", None),
    ("allreduce interleaved 2 / 1 (Ok-Topk split)", "interleaved", 2, 1),
    ("allreduce interleaved cap1", "interleaved", 1, 1),
    ("allreduce contiguous cap2", "contiguous", 2, 1),
    ("allreduce contiguous cap1", "contiguous", 1, 1),
    ("allreduce interleaved cap2, 2k out", "interleaved", 2, 2),  # an update of ~2k entries
    ("allreduce interleaved 1.5 / 1.5 (built)", "interleaved", 1.5, 1.5),  # the same words, an update of ~1.5k
)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def regions(d: int, P: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(region of each entry, its local position, region size R) for the layout."""
    g = torch.arange(d)
    if layout == "interleaved":
        return g % P, g // P, -(-d // P)
    R = -(-d // P)
    return g // R, g % R, R


def exchange(us: torch.Tensor, k: int, layout: str, cap: float = 2, out_factor: float = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The sparse all-reduce's math on ``us`` (P, d): returns (update sum, selected indices (P, k),
    delivered (P, k), wire words per rank). Same rules as lightning_gaussk.comm.sparse_allreduce:
    per region keep the ``c1`` largest of each rank's selection, sum, keep the exact top-``c2`` of
    each reduced region (positions nobody sent never win)."""
    P, d = us.shape
    region, local, R = regions(d, P, layout)
    c1, c2 = min(math.ceil(cap * k / P), R), min(math.ceil(out_factor * k / P), R)
    idx = us.abs().topk(k, dim=1).indices  # (P, k), largest first
    kept = torch.zeros(P, k, dtype=torch.bool)
    acc = torch.zeros(d)
    touched = torch.zeros(d, dtype=torch.bool)
    for r in range(P):
        reg = region[idx[r]]
        # rank of each entry within its region, largest first (idx[r] is sorted by magnitude)
        order = torch.sort(reg, stable=True)
        starts = torch.searchsorted(order.values, torch.arange(P))
        rank_in = torch.empty(k, dtype=torch.long)
        rank_in[order.indices] = torch.arange(k) - starts[order.values]
        kept[r] = rank_in < c1
        acc.index_add_(0, idx[r][kept[r]], us[r, idx[r][kept[r]]])
        touched[idx[r][kept[r]]] = True
    score = torch.where(touched, acc.abs(), torch.tensor(-0.5))
    final = torch.zeros(d, dtype=torch.bool)
    for j in range(P):
        pos = (region == j).nonzero().flatten()
        if pos.numel():
            top = score[pos].topk(min(c2, pos.numel())).indices
            final[pos[top]] = True
    final &= touched
    delivered = kept & final[idx]
    update = torch.where(final, acc, torch.zeros(()))
    words = (P - 1) * (2 * c1 + 1) + (P - 1) * (2 * c2 + 1)
    return update, idx, delivered, words


def built_words(k: int, d: int, P: int) -> int:
    """Wire words per rank of the exchange as built (lightning_gaussk.comm.sparse_allreduce)."""
    return SparseAllReduce().wire_bytes(k, d, P) // 4


def run(P: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = net()
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    k = max(1, math.ceil(DENSITY * d))
    shards = torch.randperm(len(x)).chunk(P)  # each rank its own data
    gens = [torch.Generator().manual_seed(100 + r) for r in range(P)]
    residual = {name: torch.zeros(P, d) for name, *_ in VARIANTS}
    acc = {name: {"delivered": 0.0, "recall": 0.0, "entries": 0.0, "cosine": 0.0} for name, *_ in VARIANTS}
    words = {}
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(STEPS):
        grads = torch.empty(P, d)
        for r in range(P):
            b = shards[r][torch.randint(len(shards[r]), (BATCH,), generator=gens[r])]
            model.zero_grad()
            loss_fn(model(x[b]), y[b]).backward()
            grads[r] = torch.cat([p.grad.flatten() for p in params])
        for name, layout, cap, out_factor in VARIANTS:
            us = grads + residual[name]
            truth = us.mean(0).abs().topk(k).indices  # the global top-k of the mean u
            if layout is None:  # all-gather: every rank's top-k, all delivered
                kk = k if cap is None else min(d, max(1, round(built_words(k, d, P) / (P - 1) / 2 - 0.5)))
                idx = us.abs().topk(kk, dim=1).indices
                delivered = torch.ones(P, kk, dtype=torch.bool)
                in_update = torch.zeros(d, dtype=torch.bool)
                in_update[idx.flatten()] = True
                update = torch.zeros(d).index_add_(0, idx.flatten(), us.gather(1, idx).flatten())
                words[name] = (P - 1) * (2 * kk + 1)
            else:
                update, idx, delivered, words[name] = exchange(us, k, layout, cap, out_factor)
                in_update = update != 0
            sent = torch.zeros(P, d)
            sent.scatter_(1, idx, torch.where(delivered, us.gather(1, idx), torch.zeros(())))
            residual[name] = us - sent  # exact error feedback
            acc[name]["delivered"] += float(delivered.float().mean()) / STEPS
            acc[name]["recall"] += float(in_update[truth].float().mean()) / STEPS
            acc[name]["entries"] += float(in_update.sum()) / STEPS
            acc[name]["cosine"] += float(torch.cosine_similarity(update, us.sum(0), dim=0)) / STEPS
        with torch.no_grad():  # the model follows the dense mean gradient (the same for every variant)
            flat = grads.mean(0)
            offset = 0
            for p in params:
                p -= 0.1 * flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    ag_words = words["allgather"]
    return {
        name: {**acc[name], "words": words[name], "words_vs_allgather": words[name] / ag_words, "k": k, "d": d}
        for name, *_ in VARIANTS
    }


def main() -> None:
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    t0 = time.time()
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    results = {P: run(P, x, y) for P in PEERS}
    d, k = results[PEERS[0]]["allgather"]["d"], results[PEERS[0]]["allgather"]["k"]
    print(f"digits CNN, one bucket of d = {d} entries, density {DENSITY} (k = {k}), {STEPS} steps, error feedback per variant")
    print(f"{'P':>3}  {'exchange':<36} {'delivered':>9} {'top-k recall':>12} {'entries':>8} {'cosine':>7} {'words/rank':>10} {'vs allgather':>12}")
    for P, rows in results.items():
        for name, r in rows.items():
            print(f"{P:>3}  {name:<36} {r['delivered']:>9.3f} {r['recall']:>12.3f} {r['entries']:>8.0f} {r['cosine']:>7.3f} {r['words']:>10d} {r['words_vs_allgather']:>12.2f}")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "exchange_choice.json")
    with open(path, "w") as f:
        json.dump({"density": DENSITY, "steps": STEPS, "d": d, "k": k, "results": {str(P): rows for P, rows in results.items()}}, f, indent=1)
    print(f"wrote {path} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
