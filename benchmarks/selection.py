"""Selection benchmark: speed and quality of every selection method, in one run.

For every d, density and input family it times each method (median over repeats, the methods
interleaved so that drift on a shared machine hits them alike) and reports

* ``ms``         median time of one call (CPU time of the calling thread with one torch
                 thread, so that other processes on a shared machine do not count; ``--timer``),
* ``topk/m``     torch.topk's time over the method's (how many times faster than exact top-k),
* ``m/dot``      the method's time over one read pass ``torch.dot(x, x)`` (the floor for any
                 selector that has to look at every entry),
* ``capture``    the squared norm of what the method selected over that of the exact top-k,
* ``overlap``    the fraction of the exact top-k's indices that the method selected,
* ``count/k``    entries selected over k (1 for every method but "gaussk_paper").

Methods: "topk", "gaussk", "dgc", "randk" from ``lightning_gaussk.selection.selectors`` and, as a quality
reference, "gaussk_paper": the reference code's unrefined Gaussian-k (threshold
``mu + sigma * PPF(1 - rho/2)`` from the mean and std of the whole tensor, then at most 3 passes
that halve it when fewer than 2k/3 entries clear it or multiply it by 1.5 when more than 4k/3 do;
it keeps every ``|x| > t``, however many that is).

Inputs: normal, Laplace, Student-t(3), concatenated "layers" of scales 1e-3..1, and real
gradients: the vectors ``u = g + r`` that TopK-SGD with error feedback sparsifies, recorded while
training an MLP on scikit-learn's digits in this process (see ``real_gradients``).

Usage::

    python benchmarks/selection.py                       # full run, updates docs/benchmarks.md
    python benchmarks/selection.py --quick               # small d, few repeats (< 60 s)
    python benchmarks/selection.py --threads 2 --json out.json --markdown none
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, load_average, machine_description, write_doc_section  # noqa: E402
from lightning_gaussk.selection.selectors import select  # noqa: E402

METHODS = ("topk", "gaussk", "dgc", "randk", "gaussk_paper")
FAMILIES = ("normal", "laplace", "student_t3", "mixed_scales", "real_grad")


# ------------------------------------------------------------------------------ methods
def gaussk_paper(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's Gaussian-k, unrefined: a variable number of entries."""
    d = x.numel()
    mean, std = float(x.mean()), float(x.std())
    z = float(torch.special.ndtri(torch.tensor(1.0 - k / d / 2, dtype=torch.float64)))
    t = mean + std * z
    mag = x.abs()
    for _ in range(3):  # each pass selects, then adjusts t for the next pass if it is off
        idx = torch.nonzero(mag > t).squeeze(1)
        if idx.numel() < 2 * k / 3:
            t *= 0.5
        elif idx.numel() > 4 * k / 3:
            t *= 1.5
        else:
            break
    return x[idx], idx


def run_method(method: str, x: torch.Tensor, k: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "gaussk_paper":
        return gaussk_paper(x, k)
    return select(x, k, method, seed=0, step=step)


# ------------------------------------------------------------------------------ inputs
def synthetic(family: str, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "normal":
        return torch.randn(d, generator=g)
    if family == "laplace":  # inverse CDF, in float64 so that no u hits -0.5 exactly (an infinite entry)
        u = torch.rand(d, generator=g, dtype=torch.float64) - 0.5
        return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    if family == "student_t3":  # z / sqrt(chi2_3 / 3)
        z = torch.randn(d, generator=g)
        chi2 = torch.randn(d, generator=g).square_()
        chi2 += torch.randn(d, generator=g).square_()
        chi2 += torch.randn(d, generator=g).square_()
        return z / (chi2 / 3).sqrt_()
    if family == "mixed_scales":  # 6 concatenated "layers" of unequal sizes and scales 1e-3..1
        cuts = [0, d // 10, d // 4, d // 3, d // 2, (4 * d) // 5, d]
        scales = (1.0, 1e-3, 0.3, 1e-2, 0.1, 3e-3)
        return torch.cat([torch.randn(b - a, generator=g) * s for a, b, s in zip(cuts, cuts[1:], scales)])
    raise ValueError(family)


def real_gradients(d: int, density: float, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``u = g + r`` of TopK-SGD with error feedback, training an MLP on scikit-learn's digits.

    One process: every step takes the gradient ``g`` of all parameters (concatenated in
    ``model.parameters()`` order), forms ``u = g + r``, applies ``lr * topk(u)`` and keeps
    ``r = u - topk(u)``. After a warm-up, the ``u`` of consecutive steps are concatenated until
    there are ``d`` entries (each step gives one model's worth; no entry is duplicated).
    """
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    xs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    ys = torch.tensor(data.target)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    k = max(1, int(density * n))
    r = torch.zeros(n)
    warmup = 20
    need = math.ceil(d / n)
    pieces = []
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while len(pieces) < need:
        batch = torch.randint(0, len(ys), (128,), generator=gen)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
        u = torch.cat([p.grad.reshape(-1) for p in params]) + r
        idx = torch.topk(u.abs(), k, sorted=False).indices
        sent = torch.zeros_like(u)
        sent[idx] = u[idx]
        r = u - sent
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= 0.1 * sent[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        if step >= warmup:
            pieces.append(u)
        step += 1
    how = (
        "the vectors u = g + r that TopK-SGD with error feedback sparsifies (top-k at the benchmark's "
        "density; residual r = u - topk(u); SGD, lr 0.1, batch 128), recorded in this process while training a "
        f"64-1024-1024-256-10 ReLU MLP ({n:,} parameters) on scikit-learn's load_digits, after {warmup} warm-up "
        f"steps. The u of consecutive steps (one model's worth each: {need} steps for d = {d:,}) are concatenated "
        "and cut to d: no entry is duplicated, but beyond 1.4M entries the input is a stack of steps of one small "
        "model, not one large model"
    )
    return torch.cat(pieces)[:d].contiguous(), how


# ------------------------------------------------------------------------------ timing
def median_times(x: torch.Tensor, k: int, repeats: int, topk_repeats: int, clock) -> dict[str, float]:
    """Median time (``clock``) of each method and of ``torch.dot(x, x)``, methods interleaved.

    Every timed call is preceded by an untimed read of ``x``, so that each starts from the same
    cache state, as in the comm hook where ``u = g + r`` has just been written.
    """
    names = ("dot",) + METHODS
    for m in METHODS:  # warm-up: first-call allocations and lazy imports
        run_method(m, x, k, 0)
    times: dict[str, list[float]] = {m: [] for m in names}
    for rep in range(repeats):
        for m in names:
            if m == "topk" and rep >= topk_repeats:
                continue
            x.sum()
            t0 = clock()
            if m == "dot":
                torch.dot(x, x)
            else:
                run_method(m, x, k, rep)
            times[m].append(clock() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def quality(x: torch.Tensor, k: int, best_idx: torch.Tensor, best_sq: float, method: str) -> dict[str, float]:
    values, indices = run_method(method, x, k, 0)
    if not torch.equal(values, x[indices]):
        raise AssertionError(f"{method}: values != x[indices]")
    if method != "gaussk_paper" and (indices.numel() != k or indices.unique().numel() != k):
        raise AssertionError(f"{method}: not exactly k distinct indices")
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[best_idx] = True
    return {
        "capture": float(values.double().square().sum()) / best_sq if best_sq > 0 else 1.0,
        "overlap": float(mask[indices].sum()) / k,
        "count_over_k": indices.numel() / k,
    }


# ------------------------------------------------------------------------------ report
def fmt_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append(
            [
                f"{r['d'] / 1e6:g}M",
                f"{r['density']:g}",
                r["family"],
                r["method"],
                f"{r['ms']:.2f}",
                f"{r['topk_over_method']:.1f}",
                f"{r['method_over_dot']:.1f}",
                f"{r['capture']:.4f}",
                f"{r['overlap']:.4f}",
                f"{r['count_over_k']:.2f}",
            ]
        )
    return out


HEADER = ["d", "density", "input", "method", "ms", "topk/m", "m/dot", "capture", "overlap", "count/k"]


def text_table(rows: list[dict]) -> str:
    cells = [HEADER] + fmt_rows(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(HEADER))) for c in cells)


def md_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in fmt_rows(rows)]
    return "\n".join(lines)


def headline(rows: list[dict]) -> str:
    """gaussk at every (d, density, input): the figures the product's speed claims rest on."""
    lines = [
        "| d | density | input | gaussk ms | topk ms | dot ms | topk/gaussk | gaussk/dot | capture |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "gaussk":
            lines.append(
                f"| {r['d'] / 1e6:g}M | {r['density']:g} | {r['family']} | {r['ms']:.2f} | {r['topk_ms']:.1f} | "
                f"{r['dot_ms']:.2f} | {r['topk_over_method']:.1f} | {r['method_over_dot']:.1f} | {r['capture']:.4f} |"
            )
    return "\n".join(lines)


def machine_note(threads: int) -> str:
    return (
        machine_description(f"torch {torch.__version__}", f"torch.set_num_threads({threads})")
        + f"; 1-minute load average at start {load_average():.2f}"
    )


def summary(rows: list[dict]) -> list[str]:
    """One line per (d, density): the range over inputs of gaussk's ratios, and what the reference
    code's unrefined estimate selects."""
    lines = []
    for d, density in sorted({(r["d"], r["density"]) for r in rows}, key=lambda t: (t[0], -t[1])):
        g = [r for r in rows if r["d"] == d and r["density"] == density and r["method"] == "gaussk"]
        p = [r for r in rows if r["d"] == d and r["density"] == density and r["method"] == "gaussk_paper"]
        if not g:
            continue

        def span(rs: list[dict], key: str, f: str) -> str:
            lo, hi = f"{min(r[key] for r in rs):{f}}", f"{max(r[key] for r in rs):{f}}"
            return lo if lo == hi else f"{lo}-{hi}"

        line = (
            f"- d = {d / 1e6:g}M, density {density:g}: gaussk is {span(g, 'topk_over_method', '.1f')}x faster than "
            f"torch.topk and costs {span(g, 'method_over_dot', '.1f')} read passes, capture "
            f"{span(g, 'capture', '.4f')} (exact top-k)"
        )
        if p:
            line += (
                f"; the unrefined paper estimate selects {span(p, 'count_over_k', '.2f')} k entries "
                f"(overlap with the top-k {span(p, 'overlap', '.2f')})"
            )
        lines.append(line + ".")
    return lines


def write_markdown(path: str, result: dict) -> None:
    rows = result["rows"]
    body = "\n".join(
        [
            "## Selection",
            "",
            f"Command: `{result['command'].strip()}` (one run; all figures below come from it).",
            "",
            f"Machine: {result['machine']}; load average at the end {result['load_end']:.2f}.",
            "Times are medians over repeats with the methods interleaved. With one torch thread every",
            "op runs on the calling thread, so its CPU time is the selector's cost (equal to the wall time",
            "on an idle machine) and does not count time taken by other processes on this shared 2-core",
            "machine; memory-bandwidth and cache contention still add noise, so compare the ratios",
            "(`topk/m`, `m/dot`), which are taken within the same run, rather than absolute milliseconds.",
            "",
            "GPU figures are not measured here: no GPU is available on this machine. On accelerators",
            '"gaussk" runs the sync-free histogram refinement (`_histselect` / `kernels`), which this',
            "benchmark does not exercise.",
            "",
            "Columns: `topk/m` = torch.topk(|x|, k) time / method time; `m/dot` = method time / one",
            "read pass `torch.dot(x, x)`; `capture` = squared norm selected / that of the exact top-k;",
            "`overlap` = fraction of the exact top-k's indices selected; `count/k` = entries selected / k",
            '(only "gaussk_paper", the reference code\'s unrefined estimate, returns a variable count, so',
            "its capture can exceed 1: it sends more than k entries).",
            "",
            ("Real gradients (`real_grad`): " + result["real_grad"][-1] + ".") if result["real_grad"] else "",
            "",
            "### Summary",
            "",
            *summary(rows),
            "",
            "At d = 1M the input (4 MB) stays in cache, so a read pass is several times cheaper per entry",
            "than at 10M (40 MB, read from memory) and `m/dot` there mostly measures the selector's fixed",
            "per-call cost (a few dozen torch ops).",
            "",
            "### gaussk",
            "",
            headline(rows),
            "",
            "### Every method",
            "",
            md_table(rows),
        ]
    )
    write_doc_section(path, "selection", body)


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small d and few repeats (under a minute)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: one core per rank)")
    p.add_argument("--sizes", type=str, default=None, help="comma-separated d (default 1e6,1e7,2.5e7)")
    p.add_argument("--densities", type=str, default="0.01,0.001")
    p.add_argument("--families", type=str, default=",".join(FAMILIES))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 7, quick 3)")
    p.add_argument(
        "--timer",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="cpu: CPU time of this thread (with one torch thread all work runs on it; other processes "
        "on a shared machine then do not count); wall: wall clock. auto: cpu with --threads 1, else wall",
    )
    p.add_argument("--json", type=str, default=None, help="write the results as JSON here")
    p.add_argument("--render", type=str, default=None, help="measure nothing: write the markdown of a saved --json run")
    p.add_argument(
        "--markdown",
        type=str,
        default=None,
        help="markdown file whose Selection section is replaced (default docs/benchmarks.md for a full run, "
        "nothing for --quick; 'none' to skip)",
    )
    args = p.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        target = DOCS if args.markdown in (None, "none") else args.markdown
        write_markdown(target, saved)
        print(f"wrote the Selection section of {target} from {args.render}")
        return

    torch.set_num_threads(args.threads)
    timer = args.timer if args.timer != "auto" else ("cpu" if args.threads == 1 else "wall")
    clock = time.thread_time if timer == "cpu" else time.perf_counter
    sizes = [int(float(s)) for s in (args.sizes or ("2.5e5,1e6" if args.quick else "1e6,1e7,2.5e7")).split(",")]
    densities = [float(s) for s in args.densities.split(",")]
    families = args.families.split(",")
    repeats = args.repeats or (3 if args.quick else 7)
    markdown = args.markdown if args.markdown is not None else (None if args.quick else DOCS)
    if markdown == "none":
        markdown = None
    command = "python benchmarks/selection.py " + " ".join(sys.argv[1:])
    note = machine_note(args.threads) + f"; timer: {timer} ({'CPU time of the calling thread' if timer == 'cpu' else 'wall clock'})"
    print(f"# {command.strip()}\n# {note}", flush=True)

    rows: list[dict] = []
    real_how: list[str] = []
    real: dict[float, torch.Tensor] = {}  # per density: recorded once for the largest d, cut for smaller ones
    started = time.perf_counter()
    for d in sizes:
        for density in densities:
            k = max(1, int(d * density))
            for fi, family in enumerate(families):
                if family == "real_grad":
                    if density not in real:
                        real[density], how = real_gradients(max(sizes), density)
                        real_how.append(how)
                    x = real[density][:d]
                else:
                    x = synthetic(family, d, seed=1000 * fi + d % 997)
                best_idx = torch.topk(x.abs(), k, sorted=False).indices
                best_sq = float(x[best_idx].double().square().sum())
                # torch.topk is slow at large d: fewer timed calls (its spread is small anyway)
                times = median_times(x, k, repeats, topk_repeats=max(2, min(repeats, 3)), clock=clock)
                for m in METHODS:
                    q = quality(x, k, best_idx, best_sq, m)
                    rows.append(
                        {
                            "d": d,
                            "density": density,
                            "k": k,
                            "family": family,
                            "method": m,
                            "ms": times[m] * 1e3,
                            "topk_ms": times["topk"] * 1e3,
                            "dot_ms": times["dot"] * 1e3,
                            "topk_over_method": times["topk"] / times[m],
                            "method_over_dot": times[m] / times["dot"],
                            **q,
                        }
                    )
                g = rows[-4]  # gaussk
                print(
                    f"d={d:>9,} density={density:<6g} {family:<13s} gaussk {g['ms']:7.2f} ms  "
                    f"topk/gaussk {g['topk_over_method']:5.1f}  gaussk/dot {g['method_over_dot']:5.1f}  "
                    f"capture {g['capture']:.4f}   [{time.perf_counter() - started:5.0f} s]",
                    flush=True,
                )
                del x
    print()
    print(text_table(rows))
    result = {
        "command": command,
        "machine": note,
        "load_end": load_average(),
        "threads": args.threads,
        "real_grad": real_how,
        "rows": rows,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    if markdown:
        write_markdown(markdown, result)
        print(f"wrote the Selection section of {markdown}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
