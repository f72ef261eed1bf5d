"""The emulated-cluster harness without root: command construction, argument checks, cleanup
bookkeeping (a recording runner stands in for ``ip``/``tc``), signals, docs sections, and the
benchmark drivers' calibration and summaries on synthetic figures. Seconds; no torch needed.

The real thing (namespaces, tc, gloo across them) runs in ``benchmarks/run_all.sh`` as root.
"""

import json
import math
import os
import signal
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCH)
import cluster  # noqa: E402
import costmodel_report  # noqa: E402
import throughput  # noqa: E402
import time_to_accuracy  # noqa: E402

cm = cluster.load_costmodel()
plan = cluster.load_costmodel("planning")


class Recorder:
    """Stands in for ``subprocess.run``: records commands; raises on the ``fail_at``-th one."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.cmds: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, cmd):
        self.cmds.append(list(cmd))
        if self.fail_at is not None and len(self.cmds) == self.fail_at:
            raise cluster.ClusterError(f"simulated failure of {' '.join(cmd)}")


def spec(world=2, **kw):
    return cluster.ClusterSpec(world=world, link=cluster.LinkSpec(**kw), run_id="4242-beef")


# ------------------------------------------------------------------------------------- arguments
def test_parse_rate():
    assert cluster.parse_rate("1gbit") == 10**9
    assert cluster.parse_rate("10GBIT") == 10**10
    assert cluster.parse_rate("100mbit") == 10**8
    assert cluster.parse_rate("2.5gbit") == 2_500_000_000
    for bad in ("1gb", "fast", "", "0gbit", "1000gbit", "-1gbit"):
        with pytest.raises(ValueError):
            cluster.parse_rate(bad)
    with pytest.raises(TypeError):
        cluster.parse_rate(10**9)


def test_link_and_cluster_spec_validation():
    with pytest.raises(ValueError, match="delay_ms"):
        cluster.LinkSpec("1gbit", delay_ms=-1)
    with pytest.raises(TypeError, match="delay_ms"):
        cluster.LinkSpec("1gbit", delay_ms="1")
    assert cluster.LinkSpec("1gbit").burst_bytes == 256 * 1024
    assert cluster.LinkSpec("10gbit").burst_bytes == 10**10 // 8 // 500
    for bad in (1, 0, cluster.MAX_WORLD + 1):
        with pytest.raises(ValueError, match="world"):
            cluster.ClusterSpec(world=bad)
    with pytest.raises(TypeError):
        cluster.ClusterSpec(world=True)
    with pytest.raises(ValueError, match="run_id"):
        cluster.ClusterSpec(world=2, run_id="x; rm -rf /")
    with pytest.raises(ValueError, match="rank"):
        spec(2).ns(2)


def test_names_are_unique_short_and_private():
    a, b = cluster.ClusterSpec(world=cluster.MAX_WORLD), cluster.ClusterSpec(world=cluster.MAX_WORLD)
    assert a.run_id != b.run_id and a.run_id.startswith(f"{os.getpid()}-")
    assert not set(a.namespaces()) & set(b.namespaces())
    names = [a.ifname(r) for r in range(a.world)] + [a.port_ifname(r) for r in range(a.world)] + [a.bridge]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 15 for n in names), "Linux interface names have at most 15 characters"
    addrs = [a.address(r) for r in range(a.world)]
    assert len(set(addrs)) == a.world and all(x.startswith("10.77.0.") for x in addrs)
    assert a.master_addr == "10.77.0.1"
    assert spec(2).switch_ns is None and spec(3).switch_ns.endswith("-sw")


# ------------------------------------------------------------------------------------- commands
def _shaped(cmds):
    return [c for c in cmds if "tbf" in c]


def test_two_hosts_one_veth_pair_shaped_both_ways():
    s = spec(2, rate="1gbit")
    cmds = cluster.setup_commands(s)
    assert cmds[:2] == [["ip", "netns", "add", s.ns(0)], ["ip", "netns", "add", s.ns(1)]]
    links = [c for c in cmds if c[:3] == ["ip", "link", "add"]]
    assert links == [["ip", "link", "add", s.ifname(0), "netns", s.ns(0), "type", "veth", "peer", "name", s.ifname(1), "netns", s.ns(1)]]
    assert not any("bridge" in c for c in cmds)
    tbf = _shaped(cmds)
    assert len(tbf) == 2 and {c[3] for c in tbf} == {s.ns(0), s.ns(1)}
    assert all(c[c.index("rate") + 1] == "1gbit" for c in tbf)
    assert ["ip", "-n", s.ns(1), "addr", "add", "10.77.0.2/24", "dev", s.ifname(1)] in cmds


def test_more_hosts_get_a_bridge_in_its_own_namespace():
    s = spec(4, rate="10gbit")
    cmds = cluster.setup_commands(s)
    assert ["ip", "-n", s.switch_ns, "link", "add", s.bridge, "type", "bridge"] in cmds
    for r in range(4):
        assert ["ip", "-n", s.switch_ns, "link", "set", s.port_ifname(r), "master", s.bridge] in cmds
    tbf = _shaped(cmds)
    assert len(tbf) == 8, "each host port shaped in both directions"
    assert sum(c[3] == s.switch_ns for c in tbf) == 4


def test_nothing_is_created_in_the_root_namespace():
    for world in (2, 5):
        for c in cluster.setup_commands(spec(world, delay_ms=0.5)):
            if c[:3] == ["ip", "netns", "add"]:
                continue
            inside = ("-n" in c) or c[:3] == ["ip", "netns", "exec"]
            veth_in_ns = c[:3] == ["ip", "link", "add"] and c.count("netns") == 2
            assert inside or veth_in_ns, c


def test_delay_uses_netem_with_tbf_below_it():
    s = spec(2, delay_ms=2.0)
    cmds = cluster.qdisc_commands(s.ns(0), s.ifname(0), s.link)
    assert "netem" in cmds[0] and "2.0ms" in cmds[0] and cmds[0][cmds[0].index("handle") + 1] == "1:"
    assert "tbf" in cmds[1] and cmds[1][cmds[1].index("parent") + 1] == "1:"
    assert len(cluster.qdisc_commands(s.ns(0), s.ifname(0), cluster.LinkSpec())) == 1


def test_rank_command_and_environment():
    s = spec(3)
    cmd = cluster.rank_command(s, 2, ["bench.py", "--x", "1"], python="/venv/python")
    assert cmd == ["ip", "netns", "exec", s.ns(2), "/venv/python", "bench.py", "--x", "1"]
    env = cluster.rank_env(s, 2, {"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "3"
    assert env["MASTER_ADDR"] == s.address(0) and env["MASTER_PORT"] == str(cluster.MASTER_PORT)
    assert env["GLOO_SOCKET_IFNAME"] == s.ifname(2) == env["GK_IFNAME"]
    assert env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match="argv"):
        cluster.rank_command(s, 0, [])


def test_teardown_deletes_hosts_then_switch():
    s = spec(3)
    assert cluster.teardown_commands(s.namespaces()) == [["ip", "netns", "del", n] for n in reversed(s.namespaces())]


# ------------------------------------------------------------------------------------- bookkeeping
def test_setup_and_teardown_with_a_recorder():
    rec = Recorder()
    s = spec(4)
    with cluster.EmulatedCluster(s, runner=rec, log_dir="/nonexistent") as c:
        assert c.created == s.namespaces()
        n_setup = len(rec.cmds)
    assert rec.cmds[:n_setup] == cluster.setup_commands(s)
    assert rec.cmds[n_setup:] == cluster.teardown_commands(s.namespaces())
    assert c.created == [] and c.torn_down


@pytest.mark.parametrize("fail_at", [1, 2, 4, 9])
def test_failed_setup_deletes_exactly_what_was_created(fail_at):
    rec = Recorder(fail_at=fail_at)
    s = spec(3)
    with pytest.raises(cluster.ClusterError, match="simulated"):
        with cluster.EmulatedCluster(s, runner=rec, log_dir="/nonexistent"):
            pytest.fail("body must not run")
    created = [c[3] for c in rec.cmds[: fail_at - 1] if c[:3] == ["ip", "netns", "add"]]
    assert rec.cmds[fail_at:] == cluster.teardown_commands(created)


def test_failure_in_the_body_still_tears_down_and_propagates():
    rec = Recorder()
    s = spec(2)
    with pytest.raises(RuntimeError, match="boom"):
        with cluster.EmulatedCluster(s, runner=rec, log_dir="/nonexistent"):
            raise RuntimeError("boom")
    assert rec.cmds[-2:] == cluster.teardown_commands(s.namespaces())


def test_sigterm_becomes_an_exception_and_handlers_are_restored():
    rec = Recorder()
    s = spec(2)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cluster.ClusterInterrupted, match="SIGTERM"):
        with cluster.EmulatedCluster(s, runner=rec, log_dir="/nonexistent"):
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("the signal must interrupt the body")
    assert rec.cmds[-2:] == cluster.teardown_commands(s.namespaces())
    assert signal.getsignal(signal.SIGTERM) is before


def test_teardown_keeps_going_when_one_delete_fails():
    s = spec(3)
    rec = Recorder()
    c = cluster.EmulatedCluster(s, runner=rec, log_dir="/nonexistent")
    c.setup()
    rec.fail_at = len(rec.cmds) + 1  # the first delete fails
    left = c.teardown()
    assert left == [s.namespaces()[-1]]
    assert [x[3] for x in rec.cmds[-4:]] == list(reversed(s.namespaces()))


def test_stale_namespaces_are_those_of_dead_runs():
    names = ["gkb-100-ab-h0", "gkb-100-ab-sw", "gkb-200-cd-h1", "other-ns", "gkb-x-h0"]
    assert cluster.stale_namespaces(names, alive=lambda pid: pid == 200) == ["gkb-100-ab-h0", "gkb-100-ab-sw"]


# ------------------------------------------------------------------------------------- privileges
def test_without_root_it_says_so_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in cluster.missing_privileges()
    with pytest.raises(SystemExit) as e:
        cluster.main(["--world", "2", "--", "script.py"])
    assert e.value.code == 2
    assert "need root" in capsys.readouterr().err
    for mod in (throughput, time_to_accuracy):
        out = tmp_path / mod.__name__ / "x.json"
        monkeypatch.setattr(sys, "argv", [mod.__file__, "--markdown", "none", "--json", str(out)])
        with pytest.raises(SystemExit) as e:
            mod.main()
        assert e.value.code == 2
        assert not out.parent.exists(), "nothing is written before the root check"


def test_dry_run_needs_no_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cluster.main(["--world", "3", "--rate", "10gbit", "--dry-run", "--", "bench.py", "--flag"]) == 0
    out = capsys.readouterr().out
    assert "type bridge" in out and "tbf rate 10gbit" in out and "bench.py --flag" in out
    assert out.count("ip netns del") == 4


# ------------------------------------------------------------------------------------- docs sections
def test_replace_section_inserts_in_order_and_keeps_selection():
    doc = "# Benchmarks\n\n<!-- selection:begin -->\nSEL\n<!-- selection:end -->\n\ntrailer\n"
    doc = cluster.replace_section(doc, "costmodel", "C1")
    doc = cluster.replace_section(doc, "throughput", "T1")
    doc = cluster.replace_section(doc, "time_to_accuracy", "A1")
    order = [doc.index(x) for x in ("SEL", "T1", "A1", "C1")]
    assert order == sorted(order)
    doc2 = cluster.replace_section(doc, "throughput", "T2")
    assert "T1" not in doc2 and "T2" in doc2 and "SEL" in doc2 and "trailer" in doc2
    assert cluster.replace_section(doc2, "throughput", "T2") == doc2
    with pytest.raises(ValueError):
        cluster.replace_section(doc, "selection", "x")


# ------------------------------------------------------------------------------------- drivers
def test_parse_setting_and_default_methods():
    assert throughput.parse_setting("mlp25m:2:1gbit") == ("mlp25m", 2, "1gbit", throughput.BATCH["mlp25m"])
    assert throughput.parse_setting("cnn:4:10gbit:64") == ("cnn", 4, "10gbit", 64)
    for bad in ("mlp25m:2", "resnet:2:1gbit", "mlp25m:2:fast"):
        with pytest.raises(ValueError):
            throughput.parse_setting(bad)
    assert set(throughput.default_methods("mlp25m", 2, "1gbit")) == set(throughput.ALL_METHODS)
    assert "topk@0.01" not in throughput.default_methods("mlp25m", 4, "1gbit")


def synthetic_result(world=2):
    """A throughput run's JSON as the workers write it, generated from known model parameters."""
    link = cm.Link(alpha=200e-6, bandwidth=118e6)
    host = cm.HostCosts(pass_s=0.8e-9, hook_passes=7.0, select_passes=3.0, select_per_k_s=0.3e-6, scatter_s=5e-9, call_s=0.2e-3)
    buckets = [4_297_828, 16_781_312, 4_198_400]
    numel = sum(buckets)
    samples = []
    for n in (4 << 10, 256 << 10, 4 << 20, 16 << 20):
        samples.append({"kind": "allreduce", "world": world, "nbytes": n, "seconds": cm.allreduce_time(n, world, link)})
    for n in (4 << 10, 64 << 10, 1 << 20):
        samples.append({"kind": "allgather", "world": world, "nbytes": n, "seconds": cm.allgather_time(n, world, link)})
    sel, rest = [], []
    for d in (16_781_312, 2_097_664):
        for rho in (0.001, 0.01):
            k = math.ceil(rho * d)
            sel.append({"method": "gaussk", "d": d, "k": k, "seconds": host.pass_s * d * host.select_passes + host.select_per_k_s * k})
            rest.append({"d": d, "k": k, "world": world,
                         "seconds": host.call_s + host.pass_s * d * host.hook_passes + host.scatter_s * world * k})  # fmt: skip
    work = plan.Workload(compute_s=0.25, buckets=tuple(buckets))
    methods = {}
    for m in ("ddp", "powersgd", "gaussk@0.001"):
        if m == "ddp":
            t = plan.step_time(work, "dense", world, link, host)
        elif m == "powersgd":
            t = 0.4
        else:
            t = plan.step_time(work, "sparse", world, link, host, density=0.001)
        methods[m] = {"times": [t, t * 1.01, t * 0.99], "tx": [1.0], "rx": [1.0],
                      "telemetry": [{"select_ns": 5e7, "hook_ns": 9e7}] if "@" in m else [],
                      "buckets": [numel] if m == "powersgd" else buckets}  # fmt: skip
    return {"model": "mlp25m", "world": world, "rate": "1gbit", "batch": 32, "setting": f"mlp25m:{world}:1gbit",
            "numel": numel, "powersgd_elements": 87540, "powersgd_uncompressed": 9316, "compute_concurrent_s": 0.25,
            "compute_alone_s": 0.2, "link_samples": samples, "host": {"pass_s": host.pass_s, "select": sel, "hook_rest": rest},
            "methods": methods, "wall_s": 1.0, "load": [1.0, 1.0], "netcheck": {"gbit_in": 0.95, "gbit_out": 0.95, "rtt_ms": 0.3}}, link, host  # fmt: skip


def test_calibration_recovers_the_synthetic_link_and_host():
    res, link, host = synthetic_result()
    fit_link, hosts = throughput.calibrated(res)
    assert fit_link.bandwidth == pytest.approx(link.bandwidth, rel=1e-6)
    assert fit_link.alpha == pytest.approx(link.alpha, rel=1e-6)
    g = hosts["gaussk"]
    for name in ("select_passes", "select_per_k_s", "hook_passes", "call_s"):
        assert getattr(g, name) == pytest.approx(getattr(host, name), rel=1e-6), name


def test_model_check_and_summaries_on_synthetic_runs():
    res, _, _ = synthetic_result()
    checks = {r["method"]: r for r in throughput.model_check(res)}
    assert set(checks) == {"ddp", "gaussk@0.001"}  # PowerSGD is not modelled
    assert all(abs(r["err"]) < 1e-6 for r in checks.values()), checks
    rows = {r["method"]: r for r in throughput.summarize(res)}
    ddp, g = rows["ddp"], rows["gaussk@0.001"]
    assert ddp["vs_ddp"] == pytest.approx(1.0)
    assert g["vs_ddp"] == pytest.approx(ddp["step_s"] / g["step_s"])
    assert g["eff"] == pytest.approx(0.25 / g["step_s"])
    assert ddp["model_bytes"] == pytest.approx(cm.wire_bytes("dense", res["numel"], 2))
    assert g["model_bytes"] == sum(cm.wire_bytes("sparse", d, 2, k=math.ceil(0.001 * d)) for d in res["methods"]["ddp"]["buckets"])
    assert rows["powersgd"]["model_bytes"] == pytest.approx(4 * 87540)
    res4, _, _ = synthetic_result(world=4)
    text = throughput.markdown_throughput([res, res4], {"command": "x", "machine": "m", "load_start": "1", "load_end": "1"})
    assert text.count("| gaussk@0.001 |") == 2 and "4 hosts" in text
    assert "| gaussk@0.001 >= PowerSGD steps/s |" in throughput.targets([res, res4])
    cmd = costmodel_report.markdown_costmodel([res, res4], None)
    assert "dense_wins" in cmd and "| mlp25m:4:1gbit | ddp |" in cmd


def test_time_to_accuracy_table_on_a_synthetic_run():
    def curve(final):
        return [{"step": s, "seconds": s * 0.1, "acc": min(final, 0.5 + s / 100), "loss": 1.0} for s in (0, 10, 40, 60)]

    runs = [{"method": m, "curve": curve(a), "steps": 60, "train_s": 6.0, "rank_spread": 0.0, "numel": 1000, "steps_per_epoch": 3,
             "bytes_sent_per_step": 10.0, "bytes_dense_per_step": 4000.0}
            for m, a in (("ddp", 0.98), ("gaussk@0.01", 0.975), ("topk@0.01", 0.95), ("randk@0.01", 0.5))]  # fmt: skip
    data = {"world": 2, "rate": "1gbit", "runs": runs,
            "config": {"epochs": 20, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1, "warmup_density": 0.1, "eval_every": 10}}  # fmt: skip
    text = time_to_accuracy.markdown(data, {"command": "x", "machine": "m", "load_start": "1", "load_end": "1"}, [])
    assert "Within 1 percentage point of plain DDP's final accuracy: gaussk@0.01; not within: topk@0.01." in text
    assert time_to_accuracy.time_to(runs[0]["curve"], 0.95, "step") == 60
    assert time_to_accuracy.time_to(runs[3]["curve"], 0.95, "step") is None
    json.dumps(data)  # the driver's JSON round-trips


def test_bounded_exchange_section_covers_the_grid():
    """2-512 nodes x 8 GPUs, 10/25/100 Gbit/s, three densities, three contenders (issue 18)."""
    md = costmodel_report.markdown_exchange()
    assert md.startswith("## Bounded exchange (model)")
    for rho in costmodel_report.EXCHANGE_DENSITIES:
        assert f"Density {rho}:" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and " x 8 |" in ln]
    assert len(rows) == 9 * len(costmodel_report.EXCHANGE_DENSITIES)
    assert all(ln.count("/") == 3 * 2 for ln in rows)  # dense / node+allgather / node+allreduce, three rates
    assert "| 2 x 8 |" in md and "| 512 x 8 |" in md and "25 Gbit/s: dense / node+allgather / node+allreduce" in md


def test_one_contender_format_and_its_legacy_names():
    import contenders

    c = contenders.parse("gaussk@0.01/node")
    assert (c.hook, c.selector, c.density, c.mode) == ("gaussk", "gaussk", 0.01, "node")
    assert contenders.parse("node@0.001").canonical == "gaussk@0.001/node"  # scaleout's first JSON
    assert contenders.parse("flat@0.01").mode == "flat" and contenders.parse("topk@0.01").mode is None
    assert contenders.parse("dense").hook == contenders.parse("ddp").hook == "ddp"
    assert contenders.options(contenders.parse("randk@0.5/allreduce"), seed=3) == {
        "density": 0.5, "selector": "randk", "exchange": "allreduce", "seed": 3}
    for bad in ("gaussk", "gaussk@x", "gaussk@0", "@0.1"):
        with pytest.raises(ValueError):
            contenders.parse(bad)
    with pytest.raises(ValueError, match="unknown tag"):
        contenders.options(contenders.parse("gaussk@0.01/bogus"))


def test_ddp_bucket_groups_are_torchs_assignment():
    import _common

    groups = _common.ddp_bucket_groups([10, 20, 300_000, 5])
    assert sorted(n for g in groups for n in g) == [5, 10, 20, 300_000]
    assert throughput.bucket_entries.__doc__ and len(groups) >= 1
