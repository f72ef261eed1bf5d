"""The paper's gradient distribution study (Shi et al. 2019, figures 1-2), reproduced with
``GradientDistributionMonitor`` on three model families trained here with TopK-SGD:

* ``mlp``:  a 64-512-512-10 fully connected net,
* ``cnn``:  two 3x3 conv layers, max-pool and two linear layers,
* ``lstm``: a 1-layer LSTM reading the 8x8 image row by row, then a linear layer,

all on scikit-learn's ``load_digits``, one CPU process each, ``GaussKDDPStrategy`` with error
feedback, exact selection on CPU (``gaussk`` refined to exactly k) at ``--density`` (paper: 0.001),
the whole model in one DDP bucket (as the paper's reference code flattens it). The monitor
captures ``u = g + r`` before selection every ``--every`` steps.

Writes into ``--out`` (default ``docs/img``):

* ``study_distributions.png``  histograms of u with the fitted normal, rows = models, columns =
  early / middle / late snapshot (the paper's figure 1);
* ``study_contraction.png``   ||u - topk(u)||^2 / ||u||^2 over training per model, against the
  Random-k bound 1 - k/d and the paper's bound (1 - k/d)^2 (the paper's figure 2), and the kept
  energy on a log scale;
* ``study_gaussk_threshold.png``  Gaussian-k threshold / exact top-k threshold, and the fraction
  of entries above the Gaussian threshold / target density, over training;
* ``monitor_distribution_cnn.png``, ``monitor_contraction_cnn.png``  the monitor's own figures
  for the CNN run, as a user gets them in ``<log_dir>/gaussk_monitor/``;
* ``distribution_study.json``  the numbers behind the figures and a summary per model.

    python examples/distribution_study.py                   # about a minute on 2 CPU cores
    python examples/distribution_study.py --steps 200 --density 0.01 --out /tmp/study
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lightning_gaussk  # noqa: E402
from lightning_gaussk.observe.monitor import load_snapshot  # noqa: E402

MODELS = ("mlp", "cnn", "lstm")
TITLES = {"mlp": "MLP 64-512-512-10", "cnn": "CNN conv32-conv64-fc128", "lstm": "LSTM(8->128) rows"}


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 128, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(-1, 8, 8))
        return self.fc(out[:, -1])


def build(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )
    if kind == "lstm":
        return LSTMNet()
    raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")


class Classifier(L.LightningModule):
    def __init__(self, kind: str, lr: float) -> None:
        super().__init__()
        self.net = build(kind)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1500], perm[1500:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def run(kind: str, args: argparse.Namespace, workdir: str) -> dict:
    L.seed_everything(0, verbose=False)
    train, test = digits()
    model = Classifier(kind, args.lr)
    monitor = lightning_gaussk.GradientDistributionMonitor(
        every_n_steps=args.every, per_parameter=False, max_samples=20_000, bins=120, hist_range=5.0,
        save_dir=os.path.join(workdir, kind), plot=True,
    )
    trainer = L.Trainer(
        strategy=lightning_gaussk.GaussKDDPStrategy(density=args.density, selector="gaussk", bucket_cap_mb=1024,
                                                    process_group_backend="gloo"),
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        default_root_dir=workdir,
    )
    t0 = time.time()
    trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True))
    seconds = time.time() - t0
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        acc = float((model.net(x).argmax(1) == y).float().mean())
    numel = sum(p.numel() for p in model.parameters())
    rows = [r for r in monitor.history if r["group"] == "bucket0"]
    snaps = [load_snapshot(p) for p in monitor.snapshot_paths]
    return {"kind": kind, "numel": numel, "test_acc": acc, "seconds": seconds, "rows": rows, "snapshots": snaps,
            "figures": monitor.figure_paths}


# ------------------------------------------------------------------------------------ figures
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def draw_distributions(results: list[dict], path: str) -> None:
    fig = _figure(12, 3.0 * len(results) + 0.4)
    for i, res in enumerate(results):
        snaps = res["snapshots"]
        picks = sorted({0, len(snaps) // 2, len(snaps) - 1})
        for j, si in enumerate(picks):
            snap = snaps[si]
            g = snap["groups"]["bucket0"]
            st = g["stats"]
            ax = fig.add_subplot(len(results), 3, 3 * i + j + 1)
            counts = g["hist_counts"].double()
            lo, hi = g["hist_lo"], g["hist_hi"]
            width = (hi - lo) / counts.numel()
            edges = torch.linspace(lo, hi, counts.numel() + 1, dtype=torch.float64)
            ax.bar(edges[:-1].tolist(), (counts / (g["d"] * width)).tolist(), width=width, align="edge", color="#4c72b0",
                   alpha=0.75, label="u = g + r")
            xs = torch.linspace(lo, hi, 400, dtype=torch.float64)
            pdf = torch.exp(-0.5 * ((xs - st["mean"]) / st["std"]) ** 2) / (st["std"] * math.sqrt(2 * math.pi))
            ax.plot(xs.tolist(), pdf.tolist(), color="#dd4444", lw=1.3, label="fitted normal")
            ax.set_title(f"{TITLES[res['kind']]}, step {snap['step']}", fontsize=8)
            ax.text(0.02, 0.96, f"kurt {st['kurtosis']:.1f}\nskew {st['skewness']:.2f}\nKS {st['ks']:.3f}",
                    transform=ax.transAxes, va="top", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="upper right")
    fig.suptitle("Distribution of u = g + r (TopK-SGD, whole model as one vector) with the fitted normal", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def draw_contraction(results: list[dict], path: str) -> None:
    fig = _figure(12, 3.0 * len(results) + 0.4)
    for i, res in enumerate(results):
        rows = res["rows"]
        steps = [r["step"] for r in rows]
        left = fig.add_subplot(len(results), 2, 2 * i + 1)
        left.plot(steps, [r["contraction"] for r in rows], "o-", ms=2.5, lw=1.2, label="Top-k: ||u - topk(u)||^2 / ||u||^2")
        left.plot(steps, [r["bound_randk"] for r in rows], "--", color="gray", label="Random-k bound 1 - k/d")
        left.plot(steps, [r["bound_paper"] for r in rows], ":", color="black", label="paper bound (1 - k/d)^2")
        left.set_title(f"{TITLES[res['kind']]} (d = {res['numel']:,}, k/d = {rows[0]['density']:.4f})", fontsize=8)
        left.tick_params(labelsize=7)
        if i == 0:
            left.legend(fontsize=7)
        right = fig.add_subplot(len(results), 2, 2 * i + 2)
        right.semilogy(steps, [1 - r["contraction"] for r in rows], "o-", ms=2.5, lw=1.2, label="Top-k kept energy")
        right.semilogy(steps, [1 - r["bound_randk"] for r in rows], "--", color="gray", label="k/d (Random-k)")
        right.semilogy(steps, [1 - r["bound_paper"] for r in rows], ":", color="black", label="2k/d - (k/d)^2 (paper)")
        right.set_title("kept energy 1 - contraction (log scale)", fontsize=8)
        right.tick_params(labelsize=7)
        if i == 0:
            right.legend(fontsize=7)
        if i == len(results) - 1:
            left.set_xlabel("optimizer step")
            right.set_xlabel("optimizer step")
    fig.suptitle("Top-k contraction on real u vs the Random-k bound and the paper's bound", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def draw_thresholds(results: list[dict], path: str) -> None:
    fig = _figure(11, 3.6)
    left = fig.add_subplot(1, 2, 1)
    right = fig.add_subplot(1, 2, 2)
    for res in results:
        rows = res["rows"]
        steps = [r["step"] for r in rows]
        left.plot(steps, [r["threshold_gauss"] / r["threshold_topk"] for r in rows], "o-", ms=2.5, label=res["kind"])
        right.semilogy(steps, [max(r["frac_above_gauss"], 1e-7) / r["density"] for r in rows], "o-", ms=2.5, label=res["kind"])
    left.axhline(1.0, color="gray", lw=0.8)
    right.axhline(1.0, color="gray", lw=0.8)
    left.set_title("Gaussian-k threshold / exact top-k threshold", fontsize=9)
    right.set_title("entries above the Gaussian threshold / k  (1 = on target)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def summary(res: dict) -> dict:
    rows = res["rows"][1:] or res["rows"]  # skip the first snapshot (residual still building up)
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "model": res["kind"],
        "parameters": res["numel"],
        "k/d": rows[0]["density"],
        "test_acc": round(res["test_acc"], 4),
        "kurtosis": med("kurtosis"),
        "skewness": med("skewness"),
        "ks": med("ks"),
        "contraction": med("contraction"),
        "bound_randk": rows[0]["bound_randk"],
        "bound_paper": rows[0]["bound_paper"],
        "kept_over_kd": (1 - med("contraction")) / rows[0]["density"],
        "gauss_over_topk_threshold": med("threshold_gauss") / med("threshold_topk"),
        "frac_above_gauss_over_density": med("frac_above_gauss") / rows[0]["density"],
        "residual_ratio": med("residual_ratio"),
        "fit_seconds": round(res["seconds"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "img"))
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for kind in a.models.split(","):
            res = run(kind, a, work)
            print(f"{kind}: {res['numel']:,} parameters, test accuracy {res['test_acc']:.3f}, {res['seconds']:.0f} s", flush=True)
            results.append(res)
            if kind == "cnn":
                for f in res["figures"]:
                    name = os.path.basename(f)
                    if name.startswith("contraction"):
                        shutil.copy(f, os.path.join(a.out, "monitor_contraction_cnn.png"))
                    elif name.startswith("distribution") and f == res["figures"][-2]:  # the last snapshot's
                        shutil.copy(f, os.path.join(a.out, "monitor_distribution_cnn.png"))
    draw_distributions(results, os.path.join(a.out, "study_distributions.png"))
    draw_contraction(results, os.path.join(a.out, "study_contraction.png"))
    draw_thresholds(results, os.path.join(a.out, "study_gaussk_threshold.png"))
    table = [summary(r) for r in results]
    with open(os.path.join(a.out, "distribution_study.json"), "w") as f:
        json.dump({"command": "python examples/distribution_study.py " + " ".join(sys.argv[1:]), "args": vars(a) | {"out": "docs/img"},
                   "summary": table, "history": {r["kind"]: r["rows"] for r in results}}, f, indent=1)
    cols = ["model", "parameters", "k/d", "test_acc", "kurtosis", "ks", "contraction", "bound_paper", "bound_randk",
            "kept_over_kd", "gauss_over_topk_threshold", "frac_above_gauss_over_density", "residual_ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in table:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
