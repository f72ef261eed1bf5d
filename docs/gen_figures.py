"""Regenerate every generated block of figures in the docs (and the measured figures the package
quotes) from benchmarks/out/*.json or the cost model, with the benchmark scripts' own renderers.

    python docs/gen_figures.py           # rewrite every block whose inputs are here
    python docs/gen_figures.py --check   # exit 1 and name the blocks that differ (tests/test_docs.py)

A block lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in Markdown (``# gen:NAME:begin``
and ``# gen:NAME:end`` in Python); the text between is the renderer's output and nothing else.
Blocks whose JSON is not in benchmarks/out/ (the emulated-cluster runs that need root:
selection, throughput, time_to_accuracy, costmodel) are listed by :func:`missing` and left as
their script last wrote them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OUT = BENCH / "out"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

# the convergence runs did not record their machine; this is the one they ran on
CONVERGENCE_MACHINE = "AMD EPYC, 2 logical CPUs, 2 gloo ranks, 1 thread each, Python 3.11.7"


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    name: str
    render: Callable[[], str]
    inputs: tuple[str, ...] = ()  # files under benchmarks/out/ it needs (none: the cost model)


def _json(name: str) -> object:
    with open(OUT / name) as f:
        return json.load(f)


def _convergence(name: str) -> str:
    import convergence

    return convergence.render(_json(name), machine=CONVERGENCE_MACHINE)


def headline_gaps() -> dict[tuple[str, float, int], tuple[float, int]]:
    """(family, density, steps) -> (% above dense, number of seeds) of the LM rows without a remedy."""
    import convergence

    out = {}
    for name in ("convergence.json", "convergence-long.json"):
        rows = convergence.summarise(_json(name))
        for (family, method), r in rows.items():
            if family.startswith("lm-") and method.endswith("/off"):
                rho = float(method.split("@")[1].split("/")[0])
                steps = max(x["steps"] for x in _json(name) if x["family"] == family)
                out[(family, rho, steps)] = (r["gap_pct"], len(r["seeds"]))
    return out


def _convergence_summary() -> str:
    """The headline of docs/convergence.md (quoted by faq.md and configuration.md by link)."""
    gaps = headline_gaps()
    lines = ["| optimizer (char-LSTM LM) | density | 400 steps | 1600 steps |", "|---|---|---|---|"]
    for family, label in (("lm-adamw", "AdamW"), ("lm-sgd", "SGD, momentum 0.9")):
        for rho in (0.01, 0.001):
            cells = []
            for steps in (400, 1600):
                g = gaps.get((family, rho, steps))
                cells.append("" if g is None else f"+{g[0]:.1f}% ({g[1]} seed{'s' if g[1] > 1 else ''})")
            lines.append(f"| {label} | {rho} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _adaptive_measured() -> str:
    gaps = {rho: g for (family, rho, steps), (g, _) in headline_gaps().items() if family == "lm-adamw" and steps == 1600}
    items = ", ".join(f"{rho}: {gaps[rho]:.1f}" for rho in sorted(gaps, reverse=True))
    return f"ADAPTIVE_MEASURED: dict[float, float] = {{{items}}}\nADAPTIVE_MEASURED_STEPS = 1600"


def _scaleout() -> str:
    import scaleout

    return scaleout.markdown(*scaleout.load_results())


def _scaleout_seeds() -> str:
    import scaleout

    return scaleout.markdown_seeds(*scaleout.load_seeds())


def _exchange() -> str:
    import costmodel_report

    return costmodel_report.markdown_exchange()


def _break_even() -> str:
    import costmodel_report

    return costmodel_report.markdown_break_even()


BLOCKS = (
    Block("docs/convergence.md", "convergence", lambda: _convergence("convergence.json"), ("convergence.json",)),
    Block("docs/convergence.md", "convergence_long", lambda: _convergence("convergence-long.json"), ("convergence-long.json",)),
    Block("docs/convergence.md", "convergence_summary", _convergence_summary, ("convergence.json", "convergence-long.json")),
    Block("lightning_gaussk/frontends/remedies.py", "adaptive_measured", _adaptive_measured, ("convergence-long.json",)),
    Block("docs/benchmarks.md", "break_even", _break_even),
    Block("docs/benchmarks.md", "scaleout", _scaleout, ("scaleout-1gbit-0.001.json", "scaleout-20mbit-0.01.json", "scaleout-digits.json")),
    Block("docs/benchmarks.md", "exchange", _exchange),
    Block("docs/benchmarks.md", "scaleout_seeds", _scaleout_seeds, ("scaleout-digits.json", "scaleout-digits-seed1.json", "scaleout-digits-seed2.json")),
)  # fmt: skip

# sections a benchmark script writes from JSON that is not kept in benchmarks/out/ (runs need root)
NOT_KEPT = {
    "docs/benchmarks.md selection": "selection.py --json",
    "docs/benchmarks.md throughput": "throughput.json",
    "docs/benchmarks.md time_to_accuracy": "time_to_accuracy.json",
    "docs/benchmarks.md costmodel": "throughput.json (except its break_even block)",
}


def markers(path: str, name: str) -> tuple[str, str]:
    if path.endswith(".py"):
        return f"# gen:{name}:begin", f"# gen:{name}:end"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace(text: str, path: str, name: str, body: str) -> str:
    """``text`` with block ``name`` holding ``body``; ``KeyError`` if its markers are missing."""
    begin, end = markers(path, name)
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise KeyError(f"{path}: no block {begin} ... {end}")
    return text[: text.index(begin) + len(begin)] + "\n" + body.strip("\n") + "\n" + text[text.index(end) :]


def available(block: Block) -> bool:
    return all((OUT / f).exists() for f in block.inputs)


def missing() -> list[str]:
    """Blocks that cannot be regenerated here, with why."""
    out = [f"{b.path} {b.name}: needs {', '.join(f for f in b.inputs if not (OUT / f).exists())}" for b in BLOCKS if not available(b)]
    return out + [f"{k}: needs {v}" for k, v in NOT_KEPT.items()]


def render_all(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """path -> (text now under ``root``, text regenerated)."""
    files: dict[str, tuple[str, str]] = {}
    for b in BLOCKS:
        if not available(b):
            continue
        old, new = files.get(b.path, ((root / b.path).read_text(),) * 2)
        files[b.path] = (old, replace(new, b.path, b.name, b.render()))
    return files


def stale(root: Path = ROOT) -> list[str]:
    """``path name`` of every block under ``root`` that differs from its regeneration."""
    out = []
    for b in BLOCKS:
        if not available(b):
            continue
        text = (root / b.path).read_text()
        if replace(text, b.path, b.name, b.render()) != text:
            out.append(f"{b.path} {b.name}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        bad = stale()
        for s in bad:
            print(f"stale: {s} (regenerate with: python docs/gen_figures.py)")
        return 1 if bad else 0
    for path, (old, new) in render_all().items():
        if new != old:
            (ROOT / path).write_text(new)
            print(f"updated {path}")
    for m in missing():
        print(f"not regenerated: {m}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
