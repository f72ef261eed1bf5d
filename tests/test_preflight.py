"""Pre-flight (``python -m lightning_gaussk.observe.preflight``) and ``link_gbit="measure"``: the JSON's
schema and the recommendation on gloo over loopback (ranks started with torchrun's variables),
the recommendation rule on given links, errors naming the argument, and a measured link that every
rank agrees on. The emulated-cluster check (shaped links, root only) is
``benchmarks/preflight_check.py``; one rate of it runs here when the machine allows."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from _dist import free_port, run_distributed
from lightning_gaussk import GaussKState
from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.costs.policy import pick_exchange
from lightning_gaussk.observe import preflight
from lightning_gaussk.config import GaussKConfig

ROOT = Path(__file__).resolve().parents[1]
TABLE_KEYS = {"mode", "exchange", "density", "ms", "vs_dense"}


def _launch(world: int, per_node: int, args: list[str], tmp_path: Path, timeout: float = 240.0) -> str:
    """Start ``world`` ranks of pre-flight as torchrun would (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE,
    GROUP_RANK, MASTER_*), on loopback; return rank 0's output."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    procs = []
    for r in range(world):
        env = dict(base, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % per_node), LOCAL_WORLD_SIZE=str(per_node),
                   GROUP_RANK=str(r // per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        log = open(tmp_path / f"rank{r}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "lightning_gaussk.observe.preflight", *args], env=env, cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))  # fmt: skip
    try:
        codes = [p.wait(timeout=timeout) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            log.close()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(world)]
    assert codes == [0] * world, "\n".join(logs)
    return logs[0]


def _check_report(report: dict, nodes: int, per_node: int) -> None:
    assert report["world_size"] == nodes * per_node and report["nodes"] == nodes and report["ranks_per_node"] == per_node
    assert isinstance(report["inter_node_gbit"], float) and report["inter_node_gbit"] > 0
    if per_node == 1:
        assert report["intra_node_gbit"] is None
    else:
        assert isinstance(report["intra_node_gbit"], float) and report["intra_node_gbit"] > 0
    rows = report["table"]
    assert rows and all(set(r) == TABLE_KEYS for r in rows)
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
        assert chosen["ms"] == min(r["ms"] for r in at)
    # the table is the cost model's, for the figures measured
    links = {k: None if v is None else costmodel.Link(v["alpha_s"], v["bandwidth_bytes_s"]) for k, v in report["links"].items()}
    again = preflight.predict_table(report["buckets"], nodes, per_node, links["intra"], links["inter"],
                                    costmodel.HostCosts(**report["host_costs"]))  # fmt: skip
    assert [(r["mode"], r["exchange"], r["density"]) for r in again] == [(r["mode"], r["exchange"], r["density"]) for r in rows]
    assert all(abs(a["ms"] - b["ms"]) <= 1e-3 * max(a["ms"], 1) for a, b in zip(again, rows))


def test_preflight_on_two_nodes_of_two_ranks_writes_the_json_and_prints_the_table(tmp_path):
    out = _launch(4, 2, ["--params", "3e6", "--json", str(tmp_path / "pf.json")], tmp_path)
    report = json.loads((tmp_path / "pf.json").read_text())
    _check_report(report, 2, 2)
    assert "Recommendation:" in out and "node" in out and "vs dense" in out
    assert report["buckets"] == [sum(g) for g in preflight.ddp_bucket_groups(preflight.params_numels(3_000_000))]


def test_preflight_with_one_rank_per_node_has_no_intra_node_figure(tmp_path):
    _launch(2, 1, ["--params", "3e6", "--bucket-cap-mb", "2", "--json", str(tmp_path / "pf.json")], tmp_path)
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
