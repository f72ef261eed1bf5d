"""The pre-flight's rules on given links, without launching it (``test_preflight.py`` runs it):

- the engine's log lines are held back while pre-flight builds its parts (``engine_quiet``);
- the text: one node has no inter-node figure, and every speedup is written once (the reason
  quotes the table's figure, against the faster dense row, named in words);
- the verdict holds at the pessimistic end of the measured spread, or it is "stay dense" quoting it;
- local SGD: the outer exchange priced as the engine sends it (checked against ``SparseLocalSGD``
  on 2 gloo ranks), the ``overlap_steps`` rule, and a recommendation that passes straight into
  ``GaussKLocalSGDStrategy`` (the per-step one into ``GaussKDDPStrategy``).
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from _dist import run_distributed
from torch import nn

from lightning_gaussk.comm.quant import message_bytes as quant_message_bytes
from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.costs import planning
from lightning_gaussk.observe import preflight
from lightning_gaussk.utils.log import rank_zero_info

HOST = costmodel.HostCosts.for_device("cpu")
BUCKETS_25M = [sum(g) for g in preflight.ddp_bucket_groups(preflight.params_numels(25_000_000))]


# ------------------------------------------------------------------------------- finding 1: stray lines
def test_engine_quiet_holds_back_the_engine_log_and_restores_it():
    log = logging.getLogger("lightning_gaussk")
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    catch, level = Catch(), log.level
    log.addHandler(catch)
    log.setLevel(logging.INFO)
    try:
        with preflight.engine_quiet():
            rank_zero_info("GaussK: flat, 2 ranks (a startup line)")
        assert seen == []
        assert catch in log.handlers  # restored
        rank_zero_info("after")
        assert seen == ["after"]
    finally:
        log.removeHandler(catch)
        log.setLevel(level)


# ------------------------------------------------------------------------------- finding 2: figures that agree
def _report(nodes: int, per_node: int, intra: list, inter: list, **kw) -> dict:
    numels = preflight.params_numels(25_000_000)
    return preflight.assemble(numels=numels, buckets=BUCKETS_25M, bucket_cap_mb=25.0, nodes=nodes, ranks_per_node=per_node,
                              mode="node" if nodes > 1 and per_node > 1 else "flat", backend="gloo", device="cpu",
                              intra=intra, inter=inter, host=HOST, **kw)  # fmt: skip


def test_one_node_prints_no_inter_node_figure_and_one_rank_per_node_no_intra_node_one():
    text = preflight.render(_report(1, 2, [costmodel.Link(2e-4, 1e9)], [None]))
    assert "  inter-node: none (one node)" in text.splitlines()
    assert "None" not in text and "n/a" not in text and "1 nodes" not in text
    text = preflight.render(_report(2, 1, [None], [costmodel.Link(2e-4, 1e9)]))
    assert "  intra-node: none (one rank per node)" in text.splitlines() and "None" not in text


def test_the_reason_quotes_the_table_figure_against_the_faster_dense_row():
    # 2 nodes x 2 on a slow inter-node link: node mode's hierarchical dense beats DDP's flat all-reduce,
    # so the verdict compares with it; the table's "vs dense" is that same comparison
    slow, fast = costmodel.Link.from_gbit(0.1), costmodel.Link(5e-6, 100e9)
    report = _report(2, 2, [fast], [slow])
    table = report["table"]
    dense = {r["mode"]: r["ms"] for r in table if r["density"] is None}
    assert dense["node"] < dense["dense"]  # the premise
    rec, why = report["recommended"], report["reason"]
    row = next(r for r in table if (r["mode"], r["exchange"], r["density"]) == (rec["hierarchy"], rec["exchange"], rec["density"]))
    assert row["vs_dense"] == round(dense["node"] / (row["ms"]), 2) or abs(row["vs_dense"] - dense["node"] / row["ms"]) < 0.006
    x = re.findall(r"\d+\.\d\dx", why)[0]
    line = next(ln for ln in preflight.format_table(table).splitlines()
                if ln.startswith(f"{row['mode']:<6} {row['exchange']:<10} {row['density']:>8g} "))  # fmt: skip
    assert x == preflight.fmt_x(row["vs_dense"]) and x in line.split()
    assert "dense dense" not in why and "node mode's hierarchical dense all-reduce" in why
    assert f"{row['ms']:.2f} ms/step" in why and f"{dense['node']:.2f} ms/step" in why
    assert next(r for r in table if r["mode"] == "node" and r["density"] is None)["vs_dense"] == 1.0


# ------------------------------------------------------------------------------- finding 3: the spread
def test_sparse_only_when_it_pays_at_the_pessimistic_end_of_the_spread():
    """Three measurements of one link, as on a busy host: at the median link sparse pays, at the
    fastest fit it does not; the verdict is "stay dense", quoting the spread."""
    fits = [costmodel.Link(1.4e-4, 2.5e9), costmodel.Link(5e-4, 0.85e9), costmodel.Link(2e-3, 0.5e9)]  # 20, 6.8, 4 Gbit/s
    pairs = [(f, None) for f in fits]
    table = preflight.predict_spread(BUCKETS_25M, 1, 2, pairs, HOST)
    median = preflight.median_link(fits)
    assert median == costmodel.Link(5e-4, 0.85e9)
    best = max((r for r in table if r["density"] is not None), key=lambda r: r["vs_dense"])
    assert best["vs_dense"] >= preflight.MARGIN > best["vs_dense_min"]  # the premise: pays at the median only
    # one measurement (today's rule) would have said sparse
    alone, _ = preflight.recommend(preflight.predict_table(BUCKETS_25M, 1, 2, median, None, HOST), median)
    assert alone is not None
    rec, why = preflight.recommend(table, median, link_repeats=fits)
    assert rec is None and why.startswith("stay dense")
    assert preflight.fmt_range(best["vs_dense_min"], best["vs_dense_max"]) in why and "pessimistic" in why
    assert "fitted latency 140.0-2000.0 us" in why and "over 3 link measurements" in why
    # the same spread with a margin it clears everywhere: sparse, the spread quoted
    rec, why = preflight.recommend(table, median, margin=min(r["vs_dense_min"] for r in table if r["density"]) / 2, link_repeats=fits)
    assert rec is not None and "over 3 link measurements" in why


def test_the_table_spread_covers_every_measurement():
    fits = [costmodel.Link(1e-4, 2e9), costmodel.Link(3e-4, 0.5e9), costmodel.Link(2e-4, 1e9)]
    table = preflight.predict_spread(BUCKETS_25M, 1, 2, [(f, None) for f in fits], HOST)
    each = [preflight.predict_table(BUCKETS_25M, 1, 2, f, None, HOST) for f in fits]
    for i, row in enumerate(table):
        xs = [t[i]["vs_dense"] for t in each]
        assert row["vs_dense_min"] == min(xs + [row["vs_dense"]]) and row["vs_dense_max"] == max(xs + [row["vs_dense"]])
    assert preflight.predict_table(BUCKETS_25M, 1, 2, fits[2], None, HOST)[1]["ms"] == table[1]["ms"]  # the median link's


# ------------------------------------------------------------------------------- finding 4: local SGD
NUMELS = [5000, 300, 70_000, 1]


CASES = [(2, 0.02), (8, 0.02), (None, 0.05)]  # (quantize, density)


def _engine_worker(rank: int, world: int, numels: list[int]) -> None:
    from lightning_gaussk.local_sgd import SparseLocalSGD

    link = costmodel.Link(3e-4, 1.2e8)
    for quantize, density in CASES:
        model = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in numels])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        local = SparseLocalSGD(model, opt, sync_every=16, density=density, quantize=quantize, hierarchy="flat")
        cost = planning.local_outer_cost(numels, density, quantize, world, link)
        assert cost.message_bytes == local.outer_bytes, (quantize, cost, local.outer_bytes)
        assert cost.k == local.k, (quantize, cost, local.k)
        predicted = local.predicted_outer_time(link)
        assert math.isclose(cost.background_s, predicted, rel_tol=1e-12), (quantize, cost, predicted)
        assert cost.blocking_s == 0.0
        local.remove()
    if world == 4:  # node mode, 2 nodes of 2: each rank's shard, the link shared by the node's 2 ranks
        model = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in numels])
        local = SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), hierarchy="node", ranks_per_node=2)
        cost = planning.local_outer_cost(numels, 0.02, 2, 2, link, gpus_per_node=2, intra=link)
        assert (cost.message_bytes, cost.k) == (local.outer_bytes, local.k), (cost, local.outer_bytes, local.k)
        predicted = local.predicted_outer_time(link)
        assert math.isclose(cost.background_s, predicted, rel_tol=1e-12), (cost, predicted)
        local.remove()


@pytest.mark.parametrize("world", [2, 4])
def test_the_outer_exchange_is_priced_as_the_engine_sends_it(world):
    """``local_outer_cost`` against ``SparseLocalSGD`` on 2 and 4 gloo ranks: the same message
    bytes, ``k`` and ``predicted_outer_time``, for 2-bit, 8-bit and fp32 values (flat), and in
    node mode (2 x 2: the link shared by the node's ranks)."""
    run_distributed(_engine_worker, NUMELS, world=world)


def test_outer_cost_formulas_flat_and_node():
    link, intra = costmodel.Link(1e-4, 1e8), costmodel.Link(1e-5, 1e10)
    d = sum(NUMELS)
    # flat, 2-bit: n chunks of 4096, kc = ceil(0.02 * 4096) = 82 per chunk
    n = math.ceil(d / 4096)
    cost = planning.local_outer_cost(NUMELS, 0.02, 2, 4, link)
    assert (cost.k, cost.m, cost.exchange) == (n * 82, n * 4096, "quant_allgather")
    assert cost.message_bytes == quant_message_bytes(n, 82, 2)
    assert math.isclose(cost.background_s, 3 * link.alpha + 3 * cost.message_bytes * link.beta)
    # node mode, 2 nodes of 4: each rank's shard of every parameter, the NIC shared by 4, intra stages blocking
    s = sum(math.ceil(x / 4) for x in NUMELS)
    node = planning.local_outer_cost(NUMELS, 0.02, 2, 2, link, gpus_per_node=4, intra=intra)
    n = math.ceil(s / 4096)
    assert node.message_bytes == quant_message_bytes(n, 82, 2) and node.peers == 2
    assert math.isclose(node.background_s, link.alpha + node.message_bytes * 4 * link.beta)
    assert math.isclose(node.blocking_s, 2 * 3 * intra.alpha + 3 * 4 * (2 * s + 1) * intra.beta)
    with pytest.raises(ValueError, match="intra"):
        planning.local_outer_cost(NUMELS, 0.02, 2, 2, link, gpus_per_node=4)


def test_overlap_steps_hide_the_exchange_at_the_pessimistic_link():
    numels = [2**20] * 25
    fits = [costmodel.Link(1e-4, 1e9), costmodel.Link(2e-4, 0.25e9)]
    t = [planning.local_outer_cost(numels, 0.02, 2, 8, f).background_s for f in fits]
    slow = max(t)
    # a long step: H = 16 (the first rung), overlap_steps = ceil(T / t) at the slower fit
    choice, plans = planning.plan_local_sgd(numels, 8, fits, slow / 2.5)
    assert choice is plans[0] and (choice.sync_every, choice.density, choice.quantize) == (16, 0.02, 2)
    assert choice.overlap_steps == 3 and choice.hidden and choice.exposed_s == 0.0
    assert choice.background_s == (min(t), sum(t) / 2, max(t))
    assert choice.kwargs() == {"sync_every": 16, "density": 0.02, "quantize": 2, "overlap_steps": 3}
    assert choice.bytes_per_inner_step == choice.message_bytes / 16 and choice.dense_bytes_per_step == 4 * sum(numels)
    # a step 20x shorter than the exchange: 16 steps cannot hide it, 32 can
    choice, _ = planning.plan_local_sgd(numels, 8, fits, slow / 20)
    assert (choice.sync_every, choice.overlap_steps, choice.hidden) == (32, 20, True)
    # 40x shorter: nothing hides it; the least exposure, overlap_steps = H - 1
    step = slow / 40
    choice, plans = planning.plan_local_sgd(numels, 8, fits, step)
    assert not any(p.hidden for p in plans)
    assert (choice.sync_every, choice.overlap_steps) == (32, 31)
    assert math.isclose(choice.exposed_s, slow - 31 * step)
    # no step time: priced, nothing chosen
    choice, plans = planning.plan_local_sgd(numels, 8, fits, None)
    assert choice is None and plans[0].overlap_steps is None and plans[0].kwargs() == {"sync_every": 16, "density": 0.02, "quantize": 2}
    # node mode: the blocking intra-node stages are exposed on top
    intra = costmodel.Link(1e-5, 5e9)
    choice, _ = planning.plan_local_sgd(numels, 2, fits, slow, gpus_per_node=4, intras=[intra, intra])
    assert choice.hidden and choice.exposed_s == choice.blocking_s > 0
    with pytest.raises(ValueError, match="step_s"):
        planning.plan_local_sgd(numels, 8, fits, 0.0)


def _advice(nodes: int, per_node: int, step_ms: float | None, inter: costmodel.Link, intra: costmodel.Link | None = None) -> dict:
    return preflight.local_sgd_advice(preflight.params_numels(25_000_000), nodes, per_node,
                                      "node" if nodes > 1 and per_node > 1 else "flat", [(intra, inter)], step_ms)  # fmt: skip


def test_local_recommendation_passes_into_gaussk_local_and_the_per_step_one_into_gaussk_ddp():
    from lightning_gaussk import GaussKDDPStrategy, GaussKLocalSGDStrategy

    advice = _advice(4, 8, 300.0, costmodel.Link.from_gbit(1.0), costmodel.Link(5e-6, 100e9))
    rec = advice["recommended"]
    assert set(rec) == {"sync_every", "density", "quantize", "overlap_steps", "hierarchy"}
    assert {c["hierarchy"] for c in advice["candidates"]} == {"node", "flat"}
    assert f"overlap_steps={rec['overlap_steps']}" in advice["reason"] and "bytes per inner step against DDP's" in advice["reason"]
    strategy = GaussKDDPStrategy(**preflight.recommend(
        preflight.predict_table(BUCKETS_25M, 4, 8, costmodel.Link(5e-6, 100e9), costmodel.Link.from_gbit(1.0), HOST),
        costmodel.Link.from_gbit(1.0))[0])  # fmt: skip
    assert strategy.gaussk_config.density in preflight.DENSITIES
    local = GaussKLocalSGDStrategy(**rec)
    assert {k: getattr(local.local_config, k) for k in rec} == rec


def test_local_advice_without_a_step_time_says_what_it_needs():
    advice = _advice(2, 1, None, costmodel.Link.from_gbit(1.0))
    assert advice["recommended"] is None and advice["reason"].startswith("needs --step-ms")
    assert [c["sync_every"] for c in advice["candidates"]] == [16, 32] and all(c["overlap_steps"] is None for c in advice["candidates"])
    one = preflight.local_sgd_advice([10], 1, 1, "flat", [(None, None)], 50.0)
    assert one["recommended"] is None and one["candidates"] == [] and "nothing to exchange" in one["reason"]
