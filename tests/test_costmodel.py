"""The alpha-beta cost model (costs.model), the one exchange policy (costs.policy) and planning
(costs.planning): formulas, the per-bucket decision, fits on synthetic figures."""

import math

import pytest

from lightning_gaussk.comm.sparse_allreduce import bounded_chunks
from lightning_gaussk.comm.registry import auto_exchanges
from lightning_gaussk.costs import model as cm
from lightning_gaussk.costs import planning as plan
from lightning_gaussk.costs import policy as pol

CPU = cm.HostCosts.for_device("cpu")
GPU = cm.HostCosts.for_device("cuda")


# ------------------------------------------------------------------------------------- links
def test_link_validation_and_units():
    with pytest.raises(ValueError, match="alpha"):
        cm.Link(alpha=-1.0, bandwidth=1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        cm.Link(alpha=0.0, bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        cm.Link(alpha=0.0, bandwidth=float("nan"))
    with pytest.raises(ValueError):
        cm.Link.from_gbit(0.0)
    link = cm.Link.from_gbit(10.0, latency_us=20.0, efficiency=1.0)
    assert link.bandwidth == pytest.approx(1.25e9)
    assert link.alpha == pytest.approx(20e-6)
    assert link.gbit == pytest.approx(10.0)
    assert link.beta == pytest.approx(1 / 1.25e9)


def test_collective_formulas():
    link = cm.Link(alpha=1e-4, bandwidth=1e8)
    assert cm.allreduce_time(1e6, 1, link) == 0.0
    assert cm.allgather_time(1e6, 1, link) == 0.0
    # W = 2: ring all-reduce = 2 alpha + nbytes * beta
    assert cm.allreduce_time(1e6, 2, link) == pytest.approx(2e-4 + 1e-2)
    # W = 4: 6 alpha + 1.5 nbytes beta
    assert cm.allreduce_time(1e6, 4, link) == pytest.approx(6e-4 + 1.5e-2)
    assert cm.allgather_time(1e3, 4, link) == pytest.approx(3 * (1e-4 + 1e-5))
    assert cm.sparse_message_bytes(10) == 84
    with pytest.raises(ValueError, match="world"):
        cm.allreduce_time(1.0, 0, link)


def test_wire_bytes_match_the_issue_formulas():
    d, k = 25_000_000, 25_000
    assert cm.wire_bytes("dense", d, 2) == pytest.approx(2 * 1 / 2 * 4 * d)
    assert cm.wire_bytes("fp16", d, 4) == pytest.approx(cm.wire_bytes("dense", d, 4) / 2)
    assert cm.wire_bytes("sparse", d, 4, k=k) == 3 * 4 * (2 * k + 1)
    assert cm.wire_bytes("allreduce", d, 2, elements=1000) == pytest.approx(4000)
    with pytest.raises(ValueError, match="elements"):
        cm.wire_bytes("allreduce", d, 2)
    with pytest.raises(ValueError, match="method"):
        cm.wire_bytes("bogus", d, 2)


@pytest.mark.parametrize("density", [0.1, 0.01, 0.001])
def test_byte_break_even_near_one_over_density(density):
    """Sparse sends more bytes than dense exactly when W (2k+1) > 2d, i.e. W > ~1/density
    (peers-and-pitfalls point 5: break-even near W = 1 + 1/density)."""
    d = 1_000_000
    k = math.ceil(density * d)
    for w in range(2, int(3 / density)):
        more = cm.wire_bytes("sparse", d, w, k=k) > cm.wire_bytes("dense", d, w)
        assert more == (w * (2 * k + 1) > 2 * d), w


# ------------------------------------------------------------------------------------- decision
def test_dense_wins_when_gathered_messages_outgrow_the_bucket():
    slow = cm.Link(alpha=0.0, bandwidth=1e3)  # a link so slow that bytes are all that matters
    free = cm.HostCosts(pass_s=0, hook_passes=0, select_passes=0, select_per_k_s=0, scatter_s=0, call_s=0, dense_passes=0)
    d, k = 10_000, 100
    # the one byte rule (policy.byte_rule, also the hook's): W (2k+1) >= 2d
    assert pol.dense_wins(d, k, 99, slow, free) is False  # 99 * 201 = 19899 < 2d: sparse moves fewer bytes
    assert pol.dense_wins(d, k, 100, slow, free) is True  # 100 * 201 = 20100 >= 2d: always dense
    dec = pol.judge("allgather", d, k, 100, slow, free)
    assert dec.dense and dec.reason == "no fewer bytes than dense"
    assert pol.byte_rule("allgather", d, k, 100) and not pol.byte_rule("allgather", d, k, 99)
    single = pol.judge("allgather", d, k, 1, slow, free)
    assert single.dense and single.reason == "single rank" and single.t_dense == 0.0


def test_dense_wins_depends_on_link_and_host():
    d, k = 16_000_000, 16_000
    one_gbit = cm.Link.from_gbit(1.0)
    assert pol.dense_wins(d, k, 2, one_gbit, CPU) is False  # 64 MB over 1 Gbit/s: sparse wins
    assert pol.judge("allgather", d, k, 2, one_gbit, CPU).reason == "sparse faster"
    very_fast = cm.Link(alpha=1e-6, bandwidth=1e13)
    dec = pol.judge("allgather", d, k, 2, very_fast, CPU)  # the CPU's selection now costs more than the link
    assert dec.dense and dec.reason == "sparse slower" and dec.t_sparse > dec.t_dense
    assert pol.dense_wins(d, k, 2, cm.Link.from_gbit(100.0), GPU) is False  # cheap GPU selection


def test_decision_flips_once_as_the_world_grows():
    d, k = 4_000_000, 4_000
    link = cm.Link.from_gbit(1.0)
    host = cm.HostCosts(pass_s=0.5e-9, hook_passes=7.0, select_passes=3.0, select_per_k_s=0.3e-6, scatter_s=5e-9, call_s=0.3e-3)
    flags = [pol.dense_wins(d, k, w, link, host) for w in range(2, 2000)]
    assert not flags[0] and flags[-1]
    first = flags.index(True)
    assert all(flags[first:]), "once dense, dense for every larger world"


def test_bucket_argument_checks():
    link = cm.Link.from_gbit(1.0)
    for d, k in ((0, 1), (10, 0), (10, 11), (10.0, 1), (True, 1)):
        with pytest.raises(ValueError):
            pol.dense_wins(d, k, 2, link, CPU)
    with pytest.raises(ValueError, match="world"):
        pol.dense_wins(10, 1, 0, link, CPU)
    with pytest.raises(ValueError, match="HostCosts"):
        cm.HostCosts(pass_s=-1.0)
    with pytest.raises(ValueError, match="device_type"):
        cm.HostCosts.for_device("tpu")


def test_default_host_is_the_cpu_fit():
    link = cm.Link.from_gbit(1.0)
    assert pol.judge("allgather", 1000, 10, 2, link) == pol.judge("allgather", 1000, 10, 2, link, CPU)


# ------------------------------------------------------------------------------------- steps
def test_step_time_composition_and_auto():
    work = plan.Workload(compute_s=0.3, buckets=(4_000_000, 16_000_000, 4_000_000))
    link = cm.Link.from_gbit(1.0)
    dense = plan.step_time(work, "dense", 2, link, CPU)
    sparse = plan.step_time(work, "sparse", 2, link, CPU, density=0.001)
    manual = 0.3 + sum(cm.dense_bucket_time(d, 2, link, CPU) for d in work.buckets)
    assert dense == pytest.approx(manual)
    assert sparse < dense
    for w in (2, 16, 256, 1024):
        for g in (1, 10, 100):
            ln = cm.Link.from_gbit(g)
            d_ = plan.step_time(work, "dense", w, ln, CPU)
            s_ = plan.step_time(work, "sparse", w, ln, CPU, density=0.001)
            a_ = plan.step_time(work, "sparse", w, ln, CPU, density=0.001, auto=True)
            assert 0.3 < a_ <= min(d_, s_) + 1e-12 and math.isfinite(a_)
    fp16 = plan.step_time(work, "fp16", 2, link, CPU)
    assert 0.3 < fp16 < dense
    assert plan.step_time(work, "allreduce", 2, link, elements=1000) == pytest.approx(0.3 + cm.allreduce_time(4000, 2, link))
    overlapped = plan.Workload(compute_s=0.3, buckets=work.buckets, overlap_s=0.2)
    assert plan.step_time(overlapped, "dense", 2, link, CPU) == pytest.approx(dense - 0.2)
    with pytest.raises(ValueError):
        plan.step_time(work, "bogus", 2, link)
    with pytest.raises(ValueError):
        plan.Workload(compute_s=0.1, buckets=())


def test_hierarchical_reduces_to_its_parts():
    d, rho = 8_000_000, 0.001
    intra = cm.Link(alpha=5e-6, bandwidth=150e9)
    inter = cm.Link.from_gbit(25.0)
    # one GPU per node: exactly the flat sparse all-gather across the nodes
    flat = cm.sparse_bucket_time(d, math.ceil(rho * d), 16, inter, GPU)
    assert plan.hierarchical_bucket_time(d, rho, 16, 1, intra, inter, GPU) == pytest.approx(flat)
    # one node: reduce-scatter + all-gather inside the node = one ring all-reduce on the intra link
    assert plan.hierarchical_bucket_time(d, rho, 1, 8, intra, inter, GPU) == pytest.approx(cm.allreduce_time(4 * d, 8, intra))
    # many nodes: far less than a flat dense all-reduce through the NICs
    assert plan.hierarchical_bucket_time(d, rho, 64, 8, intra, inter, GPU) < cm.dense_bucket_time(d, 512, inter, GPU)


# ------------------------------------------------------------------------------------- the one rule
def _legacy_rule(d, k, n, link, host):
    """The hook's rule before the policy priced exchanges through themselves, written out: the
    integer byte rule ``n (2k + 1) >= 2d``, then with a link dense for one peer or when the
    all-gather's formula time exceeds the dense all-reduce's."""
    if n * (2 * k + 1) >= 2 * d or (link is not None and n == 1):
        return True
    if link is None:
        return False
    t_sparse = cm.sparse_host_time(d, k, n, host) + (n - 1) * link.alpha + (n - 1) * 4 * (2 * k + 1) * link.beta
    t_dense = cm.dense_host_time(d, host) + 2 * (n - 1) * link.alpha + 2 * (n - 1) / n * (4 * d) * link.beta
    return t_sparse > t_dense


@pytest.mark.parametrize("link", [None, cm.Link.from_gbit(1.0), cm.Link.from_gbit(100.0)])
def test_dense_wins_is_the_hooks_rule(link):
    """dense_wins reproduces the hook's rule in every cell, one peer included; judge carries the
    same decision."""
    for d in (10, 1_000, 100_000, 4_000_000):
        for rho in (0.001, 0.01, 0.05, 0.5, 1.0):
            k = cm.bucket_k(rho, d)
            for peers in (1, 2, 3, 8, 64, 512):
                want = _legacy_rule(d, k, peers, link, CPU)
                assert pol.dense_wins(d, k, peers, link, CPU) == want, (d, k, peers)
                assert pol.judge("allgather", d, k, peers, link, CPU).dense == want


def test_byte_rule_by_volumes_equals_the_integer_forms_including_one_peer():
    """V_sparse >= V_dense = 8d is P (2k + 1) >= 2d for the all-gather and P (c1 + c2 + 1) >= d for
    the bounded all-reduce, for every P (P = 1 included, where no byte crosses the wire); for
    P > 1 it is the comparison of wire bytes."""
    for d in (1, 2, 3, 10, 50, 999, 100_000):
        for k in sorted({1, min(2, d), max(1, d // 3), max(1, d // 2), d}):
            for P in (1, 2, 3, 4, 7, 8, 64, 513):
                c1, c2 = bounded_chunks(d, k, P)
                assert pol.byte_rule("allgather", d, k, P) == (P * (2 * k + 1) >= 2 * d), (d, k, P)
                assert pol.byte_rule("allreduce", d, k, P) == (P * (c1 + c2 + 1) >= d), (d, k, P)
                if P > 1:
                    for e in ("allgather", "allreduce"):
                        assert pol.byte_rule(e, d, k, P) == (cm.exchange_bytes(e, d, k, P) >= cm.exchange_bytes("dense", d, k, P))


def test_exchange_times_are_the_formulas_bit_for_bit():
    """Priced through the exchange objects, the three built-in exchanges give exactly the closed
    forms (floating-point operations in the same order), shared links included."""
    for link in (cm.Link.from_gbit(1.0), cm.Link(alpha=3e-6, bandwidth=7e10)):
        for host in (CPU, GPU):
            for d, k, P, share in ((1_000, 10, 1, 1), (1_000_000, 10_000, 8, 4), (16_781_312, 16_782, 3, 1), (777, 77, 64, 8)):
                w = cm.Link(link.alpha, link.bandwidth / share)
                c1, c2 = bounded_chunks(d, k, P)
                ag = cm.sparse_host_time(d, k, P, host) + (P - 1) * w.alpha + (P - 1) * (2 * k + 1) * 4 * w.beta
                ar = cm.sparse_host_time(d, k, P, host) + 2 * (P - 1) * w.alpha + ((P - 1) * (2 * c1 + 1) + (P - 1) * (2 * c2 + 1)) * 4 * w.beta
                if P > 1:
                    ar += host.scatter_s * P * (c1 + c2 - k) + host.pass_s * d / P * (1 + host.select_passes) + host.select_per_k_s * c2
                dn = cm.dense_host_time(d, host) + cm.allreduce_time(4 * d, P, w)
                assert cm.exchange_time("allgather", d, k, P, link, host, share) == ag
                assert cm.exchange_time("allreduce", d, k, P, link, host, share) == ar
                assert cm.exchange_time("dense", d, k, P, link, host, share) == dn


def test_dense_wins_byte_rule_comes_first_and_share_only_moves_the_time_model():
    d, k = 10_000, 100
    fast = cm.Link(alpha=0.0, bandwidth=1e15)  # time says dense (the host work of sparse dominates)
    assert pol.dense_wins(d, k, 100) and not pol.dense_wins(d, k, 99)  # 100 * 201 >= 2d: bytes alone
    assert not pol.dense_wins(d, k, 99, None, CPU, share=8)  # without a link, share changes nothing
    assert pol.dense_wins(d, k, 2, fast, CPU)
    # a slow shared NIC: sparse wins by time at share=8 where it loses at share=1
    d, k = 1_000_000, 1_000
    link = cm.Link(alpha=0.0, bandwidth=4e9)
    host = cm.HostCosts(pass_s=1e-9, hook_passes=1.0, select_passes=1.0, select_per_k_s=0.0, scatter_s=0.0, call_s=0.0, dense_passes=0.0)
    assert pol.dense_wins(d, k, 2, link, host, share=1) and not pol.dense_wins(d, k, 2, link, host, share=8)


def test_hierarchical_model_and_scaleout_table_take_the_inter_stage_from_dense_wins():
    intra = cm.Link(alpha=5e-6, bandwidth=150e9)
    inter = cm.Link.from_gbit(10.0, latency_us=10.0)
    d, rho, g = 16_781_312, 0.01, 8
    s = math.ceil(d / g)
    k = cm.bucket_k(rho, s)
    half = cm.allgather_time(4 * d / g, g, intra)  # half a ring all-reduce: (G-1)(alpha + 4d/G beta)
    for nodes in (2, 16, 128, 512):
        dense = pol.dense_wins(s, k, nodes, inter, GPU, share=g)
        stage = "dense" if dense else "allgather"
        want = 2 * half + cm.exchange_time(stage, s, k, nodes, inter, GPU, share=g)
        assert plan.hierarchical_bucket_time(d, rho, nodes, g, intra, inter, GPU) == pytest.approx(want)
    assert pol.dense_wins(s, k, 512, inter, GPU, share=g)  # 512 nodes at 0.01: the byte rule (512 * 2k > 2s)


# ------------------------------------------------------------------------------------- exchanges
def test_exchange_bytes_formulas():
    d, k, P = 1_000_000, 10_000, 8
    c1, c2 = bounded_chunks(d, k, P)
    assert (c1, c2) == (1875, 1875)  # ceil(3k / 2P) both
    assert cm.exchange_bytes("dense", d, k, P) == pytest.approx(2 * 7 / 8 * 4 * d)
    assert cm.exchange_bytes("allgather", d, k, P) == 7 * 4 * (2 * k + 1) == cm.wire_bytes("sparse", d, P, k=k)
    assert cm.exchange_bytes("allreduce", d, k, P) == 7 * 4 * (2 * c1 + 1) + 7 * 4 * (2 * c2 + 1)
    assert bounded_chunks(100, 90, 8) == (13, 13)  # both capped at ceil(d/P)
    assert bounded_chunks(10, 3, 4) == (2, 2)
    with pytest.raises(ValueError, match="exchange"):
        cm.exchange_bytes("ring", d, k, P)


def test_allreduce_bytes_are_bounded_in_peers_and_allgathers_grow():
    d, k = 10_000_000, 10_080  # 3k / 2P whole for every P below: the ceilings are exact
    for P in (2, 3, 4, 6, 8, 12, 16, 24, 48):
        ar = cm.exchange_bytes("allreduce", d, k, P)
        assert ar == 4 * (P - 1) / P * 6 * k + 8 * (P - 1)  # 6 words per entry, (P-1)/P of them, + 2 flags per peer
    for k in (1, 7, 1000, 12_345):
        for P in range(2, 200):
            assert cm.exchange_bytes("allreduce", d, k, P) <= 4 * ((P - 1) / P * 6 * k + 6 * (P - 1))
    k = 10_000
    ar = {P: cm.exchange_bytes("allreduce", d, k, P) for P in (2, 4, 8)}
    ag = {P: cm.exchange_bytes("allgather", d, k, P) for P in (2, 4, 8)}
    assert ar[4] / ar[2] <= (3 / 4) / (1 / 2) * 1.001 and ar[8] / ar[4] <= (7 / 8) / (3 / 4) * 1.001
    assert ag[4] / ag[2] == pytest.approx(3.0) and ag[8] / ag[4] == pytest.approx(7 / 3)
    assert ar[8] <= 0.45 * ag[8]  # issue 18's target at 8 hosts, by the formulas


def test_allreduce_byte_rule_is_its_bytes_against_dense():
    for d in (50, 1_000, 100_000):
        for rho in (0.001, 0.01, 0.1, 0.3, 1.0):
            k = cm.bucket_k(rho, d)
            for P in (2, 3, 8, 64, 512):
                more = cm.exchange_bytes("allreduce", d, k, P) >= cm.exchange_bytes("dense", d, k, P) * (1 - 1e-12)
                assert pol.dense_wins(d, k, P, exchange="allreduce") == more, (d, k, P)


def test_pick_exchange_allgather_for_few_peers_allreduce_for_many():
    d, k = 2_000_000, 20_000  # a 16.8M bucket's shard on 8 GPUs, density 0.01
    link = cm.Link.from_gbit(25.0, latency_us=10.0)
    for ln in (None, link):
        assert pol.pick_exchange(d, k, 2, ln, GPU, share=8).name == "allgather"
        assert pol.pick_exchange(d, k, 128, ln, GPU, share=8).name == "allreduce"
    assert pol.pick_exchange(d, d, 4, link, GPU).name == "dense"  # density 1: both byte rules say dense
    assert pol.pick_exchange(d, k, 128, link, GPU, exchange="allgather").name == "dense"  # 128 (2k+1) >= 2d
    for P in (2, 8, 128, 1024):  # one exchange: exactly dense_wins
        for e in auto_exchanges():
            assert pol.pick_exchange(d, k, P, link, GPU, 8, exchange=e).dense == pol.dense_wins(d, k, P, link, GPU, e, 8)


def test_exchange_time_and_the_node_stage():
    link = cm.Link(alpha=1e-5, bandwidth=1e9)
    free = cm.HostCosts(pass_s=0, hook_passes=0, select_passes=0, select_per_k_s=0, scatter_s=0, call_s=0, dense_passes=0)
    d, k, P = 1_000_000, 10_000, 8
    for e in ("dense", *auto_exchanges()):  # without host costs: alpha hops + bytes / (bandwidth / share)
        hops = {"dense": 2 * (P - 1), "allgather": P - 1, "allreduce": 2 * (P - 1)}[e]
        want = hops * 1e-5 + cm.exchange_bytes(e, d, k, P) * 4 / 1e9
        assert cm.exchange_time(e, d, k, P, link, free, share=4) == pytest.approx(want)
    assert cm.exchange_time("allgather", d, k, P, link, CPU) == cm.sparse_bucket_time(d, k, P, link, CPU)
    assert cm.exchange_time("dense", d, k, P, link, CPU) == pytest.approx(cm.dense_bucket_time(d, P, link, CPU))
    # node mode: half rings inside + the inter-node stage as the hook decides it
    intra, inter = cm.Link(alpha=5e-6, bandwidth=150e9), cm.Link.from_gbit(25.0, latency_us=10.0)
    d, rho, g, n = 16_781_312, 0.01, 8, 128
    s = math.ceil(d / g)
    half = cm.allgather_time(4 * d / g, g, intra)
    for e in ("allgather", "allreduce", "dense", "auto"):
        want = 2 * half + plan.bucket_time(s, cm.bucket_k(rho, s), n, inter, GPU, e, share=g)
        assert plan.hierarchical_bucket_time(d, rho, n, g, intra, inter, GPU, exchange=e) == pytest.approx(want)
    t = {e: plan.hierarchical_bucket_time(d, rho, n, g, intra, inter, GPU, exchange=e) for e in ("allgather", "allreduce", "auto")}
    assert t["auto"] == min(t.values()) == t["allreduce"]


def test_decision_names_what_is_sent():
    link = cm.Link.from_gbit(1.0)
    assert pol.judge("allgather", 16_000_000, 16_000, 2, link, CPU).name == "allgather"
    assert pol.judge("allgather", 10_000, 100, 100, link, CPU).name == "dense"


# ------------------------------------------------------------------------------------- fits
def test_least_squares_exact_and_nonnegative():
    rows = [[1.0, x] for x in range(8)]
    a, b = plan.least_squares(rows, [2.0 + 3.0 * x for x in range(8)])
    assert a == pytest.approx(2.0) and b == pytest.approx(3.0)
    a, b = plan.least_squares(rows, [-5.0 + 3.0 * x for x in range(8)])  # intercept would be < 0
    assert a == 0.0 and b > 0
    with pytest.raises(ValueError):
        plan.least_squares([], [])


def _samples(link, worlds=(2, 4)):
    out = []
    for w in worlds:
        for n in (4096, 262144, 4 << 20, 16 << 20):
            out.append(plan.Sample("allreduce", w, n, cm.allreduce_time(n, w, link)))
        for n in (4096, 65536, 1 << 20):
            out.append(plan.Sample("allgather", w, n, cm.allgather_time(n, w, link)))
    return out


def test_fit_link_recovers_a_link_from_exact_figures():
    true = cm.Link(alpha=150e-6, bandwidth=118e6)
    fit = plan.fit_link(_samples(true))
    assert fit.alpha == pytest.approx(true.alpha, rel=1e-6)
    assert fit.bandwidth == pytest.approx(true.bandwidth, rel=1e-6)


def test_fit_link_tolerates_noise():
    true = cm.Link(alpha=300e-6, bandwidth=950e6)
    noisy = [plan.Sample(s.kind, s.world, s.nbytes, s.seconds * (1 + 0.08 * math.sin(7 * i))) for i, s in enumerate(_samples(true))]
    fit = plan.fit_link(noisy)
    assert fit.bandwidth == pytest.approx(true.bandwidth, rel=0.1)
    assert fit.alpha == pytest.approx(true.alpha, rel=0.3)
    with pytest.raises(ValueError):
        plan.fit_link(noisy[:1])
    with pytest.raises(ValueError, match="kind"):
        plan.Sample("broadcast", 2, 1, 1.0).features()


def test_fit_host_costs_recovers_synthetic_costs():
    true = cm.HostCosts(pass_s=0.8e-9, hook_passes=7.0, select_passes=3.5, select_per_k_s=0.4e-6, scatter_s=5e-9, call_s=0.2e-3)
    sel, rest = [], []
    for d in (6_000_000, 750_000):
        for rho in (0.01, 0.001):
            k = math.ceil(rho * d)
            sel.append(plan.HostSample(d, k, 2, true.pass_s * d * true.select_passes + true.select_per_k_s * k))
            rest.append(plan.HostSample(d, k, 2, true.call_s + true.pass_s * d * true.hook_passes + true.scatter_s * 2 * k))
    fit = plan.fit_host_costs(true.pass_s, sel, rest, base=true)
    for name in ("select_passes", "select_per_k_s", "hook_passes", "call_s"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6), name
    d, k = 16_000_000, 16_000
    assert cm.sparse_host_time(d, k, 4, fit) == pytest.approx(cm.sparse_host_time(d, k, 4, true), rel=1e-6)
    with pytest.raises(ValueError):
        plan.fit_host_costs(true.pass_s, [])
