"""Pre-flight on an emulated cluster: does it measure the link it runs on, and is its advice right?

Two hosts (network namespaces, :mod:`cluster`) of 2 ranks each, their link shaped with ``tc`` at
each ``--rates`` (default 100 Mbit/s and 1 Gbit/s); ``python -m lightning_gaussk.observe.preflight`` runs
under torchrun's variables on the 4 ranks (gloo over the veth between hosts, loopback inside one).
For each rate it checks (issue 19, "Done when"):

- the inter-node figure is within ``--tolerance`` (25%) of the shaped rate;
- on the slowest rate the recommendation is sparse;
- on every rate the recommendation is what the cost model gives for the figures pre-flight
  measured (:func:`lightning_gaussk.observe.preflight.predict_spread` and ``recommend`` recomputed
  here from the JSON's link measurements and host costs: the same table, and at the recommended
  density no paying row faster than the recommended one).

Writes ``benchmarks/out/preflight_check.json`` (``--out``); exits 1 when a check fails, 2 without
root. Namespaces are always deleted (:class:`cluster.EmulatedCluster`).

    python benchmarks/preflight_check.py                       # 100mbit and 1gbit, --params 25e6
    python benchmarks/preflight_check.py --rates 1gbit --params 1e6
"""

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import cluster  # noqa: E402


def run_rate(rate: str, params: str, timeout: float, step_ms: float | None = None) -> dict[str, Any]:
    """Pre-flight's JSON on 2 hosts x 2 ranks at ``rate``, with the wall time of the run
    (``step_ms``: passed as ``--step-ms``, for the local SGD advice)."""
    spec = cluster.ClusterSpec(world=2, link=cluster.LinkSpec(rate=rate), ranks_per_host=2)
    with cluster.EmulatedCluster(spec) as c:
        assert c.log_dir is not None
        path = os.path.join(c.log_dir, "preflight.json")
        t0 = time.perf_counter()
        extra = [] if step_ms is None else ["--step-ms", str(step_ms)]
        c.run(["-m", "lightning_gaussk.observe.preflight", "--params", params, "--json", path, *extra], timeout=timeout)
        wall = time.perf_counter() - t0
        with open(path) as f:
            report = json.load(f)
        with open(os.path.join(c.log_dir, "rank0.log")) as f:
            printed = f.read()
    report["wall_s"] = round(wall, 1)
    report["printed"] = printed
    return report


def check(rate: str, report: dict[str, Any], tolerance: float, slowest: bool) -> list[str]:
    """What is wrong with ``report`` (empty: nothing)."""
    from lightning_gaussk.costs import model as costmodel
    from lightning_gaussk.observe import preflight

    bad = []
    shaped = cluster.parse_rate(rate) / 1e9
    got = report["inter_node_gbit"]
    if got is None or abs(got / shaped - 1) > tolerance:
        bad.append(f"{rate}: inter-node {got} Gbit/s is not within {tolerance:.0%} of the shaped {shaped:g} Gbit/s")
    if report["intra_node_gbit"] is None:
        bad.append(f"{rate}: no intra-node figure with 2 ranks per host")
    if slowest and report["verdict"] != "sparse":
        bad.append(f"{rate}: the slow link's recommendation is {report['verdict']}, not sparse ({report['reason']})")

    def link(fit: Any) -> Any:
        return None if fit is None else costmodel.Link(alpha=fit["alpha_s"], bandwidth=fit["bandwidth_bytes_s"])

    host = costmodel.HostCosts(**report["host_costs"])
    reps = report["link_repeats"]
    pairs = [(link(a), link(b)) for a, b in zip(reps["intra"], reps["inter"])]
    table = preflight.predict_spread(report["buckets"], report["nodes"], report["ranks_per_node"], pairs, host)
    inter = [b for _, b in pairs if b is not None]
    rec, _ = preflight.recommend(table, link(report["links"]["inter"]), report["margin"], inter)
    ms = {(r["mode"], r["exchange"], r["density"]): r["ms"] for r in table}
    for r in report["table"]:  # rounding of the JSON's figures: a relative 1e-3
        key = (r["mode"], r["exchange"], r["density"])
        if abs(ms[key] - r["ms"]) > 1e-3 * max(ms[key], 1.0):
            bad.append(f"{rate}: table row {key}: {r['ms']} ms in the report, {ms[key]:.4f} ms from the cost model")
    want, got_rec = (rec or {}), (report["recommended"] or {})
    if {k: v for k, v in want.items() if k != "link_gbit"} != {k: v for k, v in got_rec.items() if k != "link_gbit"}:
        bad.append(f"{rate}: recommended {got_rec} but the cost model gives {want}")
    if got_rec:
        rows = [r for r in report["table"] if r["density"] == got_rec["density"] and r["vs_dense_min"] >= report["margin"]]
        best = min(r["ms"] for r in rows)
        chosen = next(r["ms"] for r in rows if (r["mode"], r["exchange"]) == (got_rec["hierarchy"], got_rec["exchange"]))
        if chosen > best:
            bad.append(f"{rate}: the recommended row ({chosen} ms) is not the fastest at its density ({best} ms)")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="100mbit,1gbit", help="tc rates, comma-separated, slowest first (default 100mbit,1gbit)")
    p.add_argument("--params", default="25e6", help="the model pre-flight prices (default 25e6 parameters)")
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed relative error of the inter-node figure")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per pre-flight run")
    p.add_argument("--step-ms", type=float, default=None, help="passed to pre-flight as --step-ms (local SGD advice)")
    p.add_argument("--out", default=os.path.join(_common.OUT, "preflight_check.json"))
    args = p.parse_args(argv)
    cluster.require_root()
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    rates.sort(key=cluster.parse_rate)
    results, problems = [], []
    for i, rate in enumerate(rates):
        report = run_rate(rate, args.params, args.timeout, args.step_ms)
        bad = check(rate, report, args.tolerance, slowest=i == 0)
        problems += bad
        shaped = cluster.parse_rate(rate) / 1e9
        rec = report["recommended"]
        print(f"--- {rate}: inter-node {report['inter_node_gbit']} Gbit/s (shaped {shaped:g}, "
              f"{report['inter_node_gbit'] / shaped:.2f}x), intra-node {report['intra_node_gbit']} Gbit/s; "
              f"recommended {rec if rec else 'stay dense'}; pre-flight {report['elapsed_s']} s "
              f"({report['wall_s']} s with start-up)")  # fmt: skip
        print(report.pop("printed"))
        results.append({"rate": rate, "shaped_gbit": shaped, "ratio": round(report["inter_node_gbit"] / shaped, 3),
                        "problems": bad, "report": report})  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": _common.machine_description(), "params": args.params, "runs": results}, f, indent=1)
    print(f"wrote {args.out}")
    print("| shaped | inter-node measured | ratio | intra-node (loopback) | recommended | pre-flight time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rep, rec = r["report"], r["report"]["recommended"]
        kw = ", ".join(f"{k}={v!r}" for k, v in rec.items()) if rec else "stay dense"
        print(f"| {r['rate']} | {rep['inter_node_gbit']:.3g} Gbit/s | {r['ratio']:.2f} | {rep['intra_node_gbit']:.3g} Gbit/s "
              f"| `{kw}` | {rep['elapsed_s']:.1f} s |")  # fmt: skip
    for b in problems:
        print(f"FAIL {b}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
