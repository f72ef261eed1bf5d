"""Pre-flight (``python -m lightning_gaussk.observe.preflight``) and ``link_gbit="measure"``: the JSON's
schema and the recommendation on gloo over loopback (ranks started with torchrun's variables),
the recommendation rule on given links, errors naming the argument, and a measured link that every
rank agrees on. The emulated-cluster check (shaped links, root only) is
``benchmarks/preflight_check.py``; one rate of it runs here when the machine allows.

One 2-rank run on one node (module fixture ``one_node``: ``--params 3e6 --step-ms 50``, 3 link
measurements) is shared by the tests of what it prints and writes: the report alone on stdout
(no engine line), figures that agree, the spread, the local SGD section, and the documented keys.
The rules themselves, on given links, are in ``test_preflight_local.py``."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from _dist import free_port, run_distributed
from lightning_gaussk import GaussKState
from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.costs import planning
from lightning_gaussk.costs.policy import pick_exchange
from lightning_gaussk.observe import preflight
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig

ROOT = Path(__file__).resolve().parents[1]
TABLE_KEYS = {"mode", "exchange", "density", "ms", "vs_dense", "vs_dense_min", "vs_dense_max"}
ENGINE_LINE = "GaussK: flat"  # the start of the line GaussKState logs at setup_layout (engine/describe.py)


def _launch_split(world: int, per_node: int, args: list[str], tmp_path: Path, timeout: float = 240.0) -> tuple[str, str]:
    """Start ``world`` ranks of pre-flight as torchrun would (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE,
    GROUP_RANK, MASTER_*), on loopback; return rank 0's stdout and stderr."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    procs = []
    for r in range(world):
        env = dict(base, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % per_node), LOCAL_WORLD_SIZE=str(per_node),
                   GROUP_RANK=str(r // per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        out, err = open(tmp_path / f"rank{r}.out", "w"), open(tmp_path / f"rank{r}.err", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "lightning_gaussk.observe.preflight", *args], env=env, cwd=ROOT,
                                       stdout=out, stderr=err, start_new_session=True), out, err))  # fmt: skip
    try:
        codes = [p.wait(timeout=timeout) for p, _, _ in procs]
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            out.close()
            err.close()
    outs = [((tmp_path / f"rank{r}.out").read_text(), (tmp_path / f"rank{r}.err").read_text()) for r in range(world)]
    assert codes == [0] * world, "\n".join(o + e for o, e in outs)
    return outs[0]


def _launch(world: int, per_node: int, args: list[str], tmp_path: Path, timeout: float = 240.0) -> str:
    """:func:`_launch_split`, rank 0's stdout and stderr together."""
    out, err = _launch_split(world, per_node, args, tmp_path, timeout)
    return out + err


def _check_report(report: dict, nodes: int, per_node: int) -> None:
    assert report["world_size"] == nodes * per_node and report["nodes"] == nodes and report["ranks_per_node"] == per_node
    if nodes == 1:
        assert report["inter_node_gbit"] is None and report["links"]["inter"] is None
    else:
        assert isinstance(report["inter_node_gbit"], float) and report["inter_node_gbit"] > 0
    if per_node == 1:
        assert report["intra_node_gbit"] is None
    else:
        assert isinstance(report["intra_node_gbit"], float) and report["intra_node_gbit"] > 0
    rows = report["table"]
    assert rows and all(set(r) == TABLE_KEYS for r in rows)
    assert all(r["vs_dense_min"] <= r["vs_dense"] <= r["vs_dense_max"] for r in rows)
    modes = {(r["mode"], r["exchange"]) for r in rows}
    assert ("dense", "dense") in modes and {("flat", e) for e in ("allgather", "allreduce", "auto")} <= modes
    assert any(m == "node" for m, _ in modes) == (nodes > 1 and per_node > 1) == (("node", "dense") in modes)
    assert {r["density"] for r in rows if r["density"] is not None} == set(preflight.DENSITIES)
    rec = report["recommended"]
    assert report["verdict"] == ("sparse" if rec else "dense") and report["reason"]
    if rec:
        assert set(rec) == {"hierarchy", "exchange", "density", "link_gbit"}
        GaussKConfig(**rec)  # valid keyword arguments
        at = [r for r in rows if r["density"] == rec["density"]]
        chosen = next(r for r in at if (r["mode"], r["exchange"]) == (rec["hierarchy"], rec["exchange"]))
        paying = [r for r in at if r["vs_dense_min"] >= report["margin"]]
        assert chosen in paying and chosen["ms"] == min(r["ms"] for r in paying)  # it pays at the pessimistic end
    else:
        assert all(r["vs_dense_min"] < report["margin"] for r in rows if r["density"] is not None)
    # the table is the cost model's, for the figures measured: on the median links, with the repeats' spread
    links = {k: None if v is None else costmodel.Link(v["alpha_s"], v["bandwidth_bytes_s"]) for k, v in report["links"].items()}
    host = costmodel.HostCosts(**report["host_costs"])
    again = preflight.predict_table(report["buckets"], nodes, per_node, links["intra"], links["inter"], host)
    assert [(r["mode"], r["exchange"], r["density"]) for r in again] == [(r["mode"], r["exchange"], r["density"]) for r in rows]
    assert all(abs(a["ms"] - b["ms"]) <= 1e-3 * max(a["ms"], 1) for a, b in zip(again, rows))
    assert preflight.predict_spread(report["buckets"], nodes, per_node, _pairs(report), host) == rows


def _link(v: dict | None) -> costmodel.Link | None:
    return None if v is None else costmodel.Link(v["alpha_s"], v["bandwidth_bytes_s"])


def _pairs(report: dict) -> list:
    """The JSON's link measurements as ``(intra, inter)`` per repeat."""
    reps = report["link_repeats"]
    return [(_link(a), _link(b)) for a, b in zip(reps["intra"], reps["inter"])]


def test_preflight_on_two_nodes_of_two_ranks_writes_the_json_and_prints_the_table(tmp_path):
    out = _launch(4, 2, ["--params", "3e6", "--repeats", "2", "--json", str(tmp_path / "pf.json")], tmp_path)
    report = json.loads((tmp_path / "pf.json").read_text())
    _check_report(report, 2, 2)
    assert "Recommendation:" in out and "node" in out and "vs dense" in out
    assert report["repeats"] == 2 and all(len(v) == 2 for v in report["link_repeats"].values())
    # no --step-ms: the local SGD advice prices both layouts and says what it needs
    local = report["local_sgd"]
    assert local["recommended"] is None and "--step-ms" in local["reason"]
    assert {c["hierarchy"] for c in local["candidates"]} == {"node", "flat"}
    assert all(c["overlap_steps"] is None and c["outer_ms"]["max"] > 0 for c in local["candidates"])
    assert report["buckets"] == [sum(g) for g in preflight.ddp_bucket_groups(preflight.params_numels(3_000_000))]


def test_preflight_with_one_rank_per_node_has_no_intra_node_figure(tmp_path):
    _launch(2, 1, ["--params", "3e6", "--bucket-cap-mb", "2", "--repeats", "1", "--json", str(tmp_path / "pf.json")], tmp_path)
    report = json.loads((tmp_path / "pf.json").read_text())
    _check_report(report, 2, 1)
    assert report["bucket_cap_mb"] == 2.0 and len(report["buckets"]) > 1


def test_recommendation_follows_the_cost_model():
    buckets = [sum(g) for g in preflight.ddp_bucket_groups(preflight.params_numels(25_000_000))]
    host = costmodel.HostCosts.for_device("cpu")
    fast_intra = costmodel.Link(5e-6, 100e9)
    # a slow link: sparse, at the densest density that pays, the fastest row there
    slow = costmodel.Link.from_gbit(0.1)
    table = preflight.predict_table(buckets, 2, 2, fast_intra, slow, host)
    rec, why = preflight.recommend(table, slow)
    assert rec is not None and rec["density"] == max(preflight.DENSITIES) and not why.startswith("stay dense")
    at = [r for r in table if r["density"] == rec["density"]]
    assert min(at, key=lambda r: r["ms"])["ms"] == next(r["ms"] for r in at if (r["mode"], r["exchange"]) == (rec["hierarchy"], rec["exchange"]))
    assert rec["link_gbit"] == pytest.approx(0.1, rel=0.01)  # Link.from_gbit(link_gbit) gives the measured bandwidth back
    # a link so fast that the CPU's selection costs more than sending everything: stay dense
    fast = costmodel.Link(1e-6, 1e12)
    table = preflight.predict_table(buckets, 2, 2, fast_intra, fast, host)
    rec, why = preflight.recommend(table, fast)
    assert rec is None and why.startswith("stay dense")
    dense = min(r["ms"] for r in table if r["density"] is None)
    assert {(r["mode"], r["exchange"]) for r in table if r["density"] is None} == {("dense", "dense"), ("node", "dense")}
    assert all(r["ms"] * preflight.MARGIN > dense for r in table if r["density"] is not None)
    # one rank per node: no node rows; one rank: nothing
    assert {r["mode"] for r in preflight.predict_table(buckets, 4, 1, None, slow, host)} == {"dense", "flat"}
    assert preflight.predict_table(buckets, 1, 1, None, None, host) == []
    assert preflight.recommend([], None)[0] is None


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "--model"),  # one of --model / --params is required
        (["--params", "-3"], "--params"),
        (["--params", "many"], "--params"),
        (["--params", "10", "--model", "torch.nn:Linear"], "not allowed with"),
        (["--model", "no_such_module_xyz:build"], "--model"),
        (["--model", "torch.nn"], "--model"),
        (["--model", "torch.nn:NoSuchFactory"], "--model"),
        (["--model", "torch.nn:Linear"], "--model"),  # Linear() needs arguments
        (["--model", "os:getcwd"], "not a torch.nn.Module"),
        (["--params", "1e6", "--bucket-cap-mb", "0"], "--bucket-cap-mb"),
        (["--params", "1e6", "--json", "/no/such/dir/pf.json"], "--json"),
        (["--params", "1e6", "--ranks-per-node", "0"], "--ranks-per-node"),
        (["--params", "1e6", "--repeats", "0"], "--repeats"),
        (["--params", "1e6", "--repeats", "two"], "--repeats"),
        (["--params", "1e6", "--step-ms", "0"], "--step-ms"),
        (["--params", "1e6", "--step-ms", "fast"], "--step-ms"),
    ],
)
def test_bad_input_names_the_argument(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        preflight.main(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_model_factory_is_built_on_the_meta_device():
    with pytest.raises(ValueError, match="no trainable parameters"):
        preflight.model_numels("torch.nn:Identity")
    assert preflight.model_numels("test_preflight:_tiny_model") == [12, 4, 4, 1]


def _tiny_model():
    from torch import nn

    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    assert next(m.parameters()).device.type == "meta"
    return m


def test_link_gbit_measure_in_config_and_environment():
    assert GaussKConfig(link_gbit="measure").link_gbit == "measure"
    assert GaussKConfig.from_env({"GAUSSK_LINK_GBIT": "measure"}).link_gbit == "measure"
    assert GaussKConfig.from_env({"GAUSSK_LINK_GBIT": "2.5"}).link_gbit == 2.5
    assert GaussKConfig.from_env({"GAUSSK_LINK_GBIT": "none"}).link_gbit is None
    with pytest.raises(ValueError, match="GAUSSK_LINK_GBIT"):
        GaussKConfig.from_env({"GAUSSK_LINK_GBIT": "fast"})
    with pytest.raises(ValueError, match="`link_gbit`"):
        GaussKConfig(link_gbit="fast")
    with pytest.raises(ValueError, match="'never'"):
        GaussKConfig(link_gbit="measure", dense_fallback="never")
    state = GaussKState(link_gbit="measure")
    assert state.link is None  # measured at setup_layout, not before
    assert GaussKState(link_gbit=10.0).link == costmodel.Link.from_gbit(10.0)


def _measure_worker(rank: int, world: int) -> None:
    state = GaussKState(link_gbit="measure", density=0.01, exchange="auto")
    layout = state.setup_layout(launcher_ranks_per_node=2)
    assert layout.mode == "node" and layout.nodes == 2
    link = state.link
    assert link is not None and link.bandwidth > 0
    choices = [state.exchange_for(d, max(1, d // 100), layout.nodes, "cpu").name for d in (1000, 100_000, 4_000_000)]
    seen: list = [None] * world
    dist.all_gather_object(seen, (link.alpha, link.bandwidth, choices))
    assert all(s == seen[0] for s in seen), seen  # rank 0's figure on every rank, so the same choices
    # the choice is the cost model's with the measured link (share = ranks per node)
    for d, name in zip((1000, 100_000, 4_000_000), choices):
        assert name == pick_exchange(d, max(1, d // 100), 2, link, costmodel.HostCosts.for_device("cpu"), share=2).name


def test_link_gbit_measure_is_agreed_on_every_rank():
    run_distributed(_measure_worker, world=4)


# ------------------------------------------------------------------------------- one shared run, one node
@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """One pre-flight on 2 gloo ranks of one node (``--params 3e6 --step-ms 50``, 3 link
    measurements): rank 0's stdout, stderr and JSON, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("one_node")
    out, err = _launch_split(2, 2, ["--params", "3e6", "--step-ms", "50", "--repeats", "3", "--json", str(tmp / "pf.json")], tmp)
    return out, err, json.loads((tmp / "pf.json").read_text())


def test_the_report_is_the_only_output_and_the_engine_startup_line_is_held_back(one_node):
    out, err, report = one_node
    assert out == preflight.render(report) + "\n"  # stdout is exactly the report, nothing before or after it
    assert out.startswith("GaussK pre-flight: 2 ranks = 1 node x 2")
    assert ENGINE_LINE not in out and ENGINE_LINE not in err  # GaussKState's startup line, logged by the engine
    _check_report(report, 1, 2)


def test_one_node_figures_are_meaningful_and_the_reason_quotes_the_table(one_node):
    out, _, report = one_node
    assert "  inter-node: none (one node)" in out.splitlines()
    assert "None" not in out and "n/a" not in out and "dense dense" not in out  # the table's "dense  dense" is two columns
    intra = report["spread"]["intra"]
    assert f"latency {intra['latency_us']['min']:.1f}-{intra['latency_us']['max']:.1f} us" in out
    # the row the verdict is about: its speedup is written once, the same in the table, the reason and the JSON
    speed = report["spread"]["speedup"]
    row = next(r for r in report["table"] if {k: r[k] for k in ("mode", "exchange", "density")} == speed["row"])
    assert (speed["min"], speed["median"], speed["max"]) == (row["vs_dense_min"], row["vs_dense"], row["vs_dense_max"])
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{row['mode']:<6} {row['exchange']:<10} {row['density']:>8g} "))
    x, spread = preflight.fmt_x(row["vs_dense"]), preflight.fmt_range(row["vs_dense_min"], row["vs_dense_max"])
    assert x in line.split() and line.endswith(spread) and f"{row['ms']:.2f}" in line.split()
    reason = report["reason"]
    assert f"is predicted {row['ms']:.2f} ms/step" in reason and f": {x}" in reason and f"({spread} over 3 link" in reason
    # every speedup the reason quotes is the table's (the row's, its spread's ends) or the margin
    quoted = set(re.findall(r"\d+\.\d\dx", reason.replace(spread, "")))
    assert quoted <= {x, preflight.fmt_x(row["vs_dense_min"]), preflight.fmt_x(report["margin"])}, quoted
    assert reason in out


def test_the_link_is_measured_repeatedly_and_the_spread_reported(one_node):
    _, _, report = one_node
    assert report["repeats"] == 3 and report["link_repeats"]["inter"] == [None] * 3
    fits = [_link(v) for v in report["link_repeats"]["intra"]]
    assert len(fits) == 3 and all(f is not None for f in fits)
    lat = report["spread"]["intra"]["latency_us"]
    assert lat == {k: round(v, 1) for k, v in zip(("min", "median", "max"), planning.spread(f.alpha * 1e6 for f in fits))}
    assert report["intra_node_latency_us"] == lat["median"] and report["spread"]["inter"] is None
    assert {r["repeat"] for r in report["samples"]["intra"]} == {0, 1, 2}


def test_local_sgd_advice_passes_into_the_local_strategy(one_node):
    from lightning_gaussk import GaussKDDPStrategy, GaussKLocalSGDStrategy

    out, _, report = one_node
    local = report["local_sgd"]
    rec = local["recommended"]
    assert set(rec) == {"sync_every", "density", "quantize", "overlap_steps", "hierarchy"} and rec["hierarchy"] == "flat"
    assert rec["sync_every"] in (8, 16, 32) and rec["quantize"] in (None, 8, 2) and 0 <= rec["overlap_steps"] < rec["sync_every"]
    # the plan is the cost model's for the links measured (flat, one node: the intra-node link)
    fits = [_link(v) for v in report["link_repeats"]["intra"]]
    choice, _ = planning.plan_local_sgd(preflight.params_numels(3_000_000), 2, fits, 0.050)
    assert choice is not None and {**choice.kwargs(), "hierarchy": "flat"} == rec
    c = next(c for c in local["candidates"] if (c["hierarchy"], c["sync_every"]) == ("flat", rec["sync_every"]))
    assert c["hidden"] == (c["outer_ms"]["max"] <= rec["overlap_steps"] * 50.0)
    assert c["bytes_per_inner_step"] == round(c["outer_bytes"] / rec["sync_every"], 1)
    assert local["dense_bytes_per_step"] == 12_000_000 and f"Local SGD recommendation: sync_every={rec['sync_every']}" in out
    cfg = LocalSGDConfig(**rec)
    assert (cfg.sync_every, cfg.density, cfg.quantize, cfg.hierarchy) == (rec["sync_every"], rec["density"], rec["quantize"], "flat")
    if report["recommended"]:  # the per-step recommendation still passes into the strategy it names
        strategy = GaussKDDPStrategy(**report["recommended"])
        assert {k: getattr(strategy.gaussk_config, k) for k in report["recommended"]} == report["recommended"]
    local_strategy = GaussKLocalSGDStrategy(**rec)  # overlap_steps included: every key taken
    assert {k: getattr(local_strategy.local_config, k) for k in rec} == rec


def _documented(heading: str) -> set[str]:
    """The keys of the first table under ``heading`` in docs/preflight.md (each backticked name
    in a row's first cell)."""
    text = (ROOT / "docs" / "preflight.md").read_text()
    body = text.split(f"\n{heading}\n", 1)[1]
    keys: set[str] = set()
    started = False
    for line in body.splitlines():
        if line.startswith("|"):
            started = True
            cell = line.split("|")[1]
            keys |= set(re.findall(r"`([a-z_]+)`", cell))
        elif started:
            break
    return keys


def test_the_documented_json_keys_are_the_keys_the_json_has(one_node):
    _, _, report = one_node
    assert _documented("## The JSON") == set(report)
    assert _documented("### `local_sgd`") == set(report["local_sgd"])
    assert _documented("### A `local_sgd.candidates` entry") == set(report["local_sgd"]["candidates"][0])
    assert _documented("### A `table` row") == set(report["table"][0])
    assert _documented("### `spread`") == set(report["spread"])


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")),
    reason="needs root and iproute2 (network namespaces, tc)",
)
def test_preflight_across_two_shaped_namespaces(tmp_path):
    """One rate of benchmarks/preflight_check.py: 2 namespaces x 2 ranks at 100 Mbit/s; the
    inter-node figure within 25% of it, the recommendation sparse and the cost model's."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preflight_check.py"), "--rates", "100mbit",
                          "--params", "4e6", "--out", str(tmp_path / "check.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads((tmp_path / "check.json").read_text())["runs"][0]
    assert run["problems"] == [] and 0.75 <= run["ratio"] <= 1.25 and run["report"]["verdict"] == "sparse"
