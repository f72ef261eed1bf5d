"""The bounded sparse all-reduce exchange (``exchange="allreduce"``) on its own, against its public
behaviour: identical updates on every rank, the delivery invariant
``out = (1/D) sum_r u_r[sel_r] * delivered_r`` (exact error feedback), density 1 = the mean,
non-finite flags everywhere, buffer reuse, and bytes bounded whatever P. One spawn per world size
(2 and 4 gloo processes), many cases each."""

import math

import torch
import torch.distributed as dist

from _dist import run_distributed
from lightning_gaussk.comm.exchange import AllGather, Route, Selection
from lightning_gaussk.comm.registry import available_exchanges, get_exchange
from lightning_gaussk.comm.sparse_allreduce import SparseAllReduce, bounded_chunks


# ------------------------------------------------------------------------------ helpers (per rank)
def _make_u(kind: str, d: int, rank: int, world: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    u = torch.randn(d, generator=gen)
    if kind == "overlap":  # every rank's top-k nearly the same entries
        base = torch.randn(d, generator=torch.Generator().manual_seed(seed))
        u = 10 * base + 2 * u  # shared top entries, a few of each rank's own
    elif kind == "layer":  # one contiguous "layer" dominates the bucket
        u[: max(1, d // 10)] *= 100
    elif kind == "strided":  # the large entries all fall in one region: stage 1 must drop some
        u[::world] *= 100
    elif kind == "shuffled":  # the same large entries (all in region 0) on every rank, ranked differently
        big = torch.arange(0, d, world)[: d // (10 * world) + 1]
        u[big] = 100 + torch.randperm(big.numel(), generator=gen).float()
    return u


def _exchange(u: torch.Tensor, k: int, world: int, cache: dict, index_dtype=torch.int64):
    idx = torch.topk(u.abs(), k).indices.to(index_dtype)
    flag = (u.sum() * 0.0).to(torch.float32)  # 0, or NaN when u is non-finite
    sel = Selection(u[idx.long()].clone(), idx, flag, u.numel())
    out = torch.zeros(u.numel())
    launched = SparseAllReduce().launch(u, sel, out, Route(None, world, world), cache)
    launched.work.wait()
    delivery = launched.finish()
    return out, idx.long(), delivery


def _gather(obj, world):
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def _check_case(rank: int, world: int, kind: str, d: int, k: int, seed: int, index_dtype=torch.int64) -> dict:
    """Run one exchange and assert the invariants; returns facts about the case for the caller."""
    u = _make_u(kind, d, rank, world, seed)
    out, idx, delivery = _exchange(u, k, world, {}, index_dtype)
    dlv = delivery.delivered
    assert dlv is not None and dlv.dtype == torch.bool and dlv.shape == (k,)
    assert not delivery.everything
    assert float(delivery.flag) == 0.0

    everyone = _gather((out, u, idx, dlv), world)
    for other_out, *_ in everyone:
        assert torch.equal(other_out, out), (kind, d, k, "ranks disagree on the update")
    expected = torch.zeros(d, dtype=torch.float64)
    for _, u_r, idx_r, dlv_r in everyone:
        expected.index_add_(0, idx_r[dlv_r], u_r[idx_r[dlv_r]].double())
    expected /= world
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6), (kind, d, k, (out.double() - expected).abs().max())

    _, c2 = bounded_chunks(d, k, world)
    assert int((out != 0).sum()) <= world * c2  # the global update holds about k entries, not P k
    # selected entries that were not delivered although their index is in the update (another rank's
    # value got there, this rank's was dropped in stage 1): the subtle half of the delivery rule
    dropped_but_in_update = sum(int((out[i_r][~d_r] != 0).sum()) for _, _, i_r, d_r in everyone)
    return {
        "delivered": int(dlv.sum()),
        "out": out,
        "u": u,
        "all_delivered": [int(x[3].sum()) for x in everyone],
        "dropped_but_in_update": dropped_but_in_update,
    }


def _worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    # (kind, d, k): d not divisible by P, d < P, d = 1, heavy overlap, one dominant layer, strided
    cases = [
        ("random", 1, 1),
        ("random", 3, 1),
        ("random", 3, 2),
        ("random", 5, 3),
        ("random", 37, 5),
        ("random", 1001, 10),
        ("random", 4099, 41),
        ("overlap", 1000, 10),
        ("layer", 2000, 20),
        ("strided", 1000, 50),
    ]
    for seed, (kind, d, k) in enumerate(cases):
        _check_case(rank, world, kind, d, k, seed)
    # int32 indices (some selectors return them) work the same
    _check_case(rank, world, "random", 1001, 10, 3, index_dtype=torch.int32)

    # density 1: nothing dropped, out is the mean of u (also d < P and d not divisible by P)
    for seed, d in enumerate((1, 3, 37, 1000)):
        facts = _check_case(rank, world, "random", d, d, 100 + seed)
        assert facts["delivered"] == d
        mean = torch.stack(_gather(facts["u"], world)).mean(0)
        assert torch.allclose(facts["out"], mean, rtol=1e-5, atol=1e-6)

    # not vacuous: independent selections with small k leave entries undelivered (the update holds
    # ~1.5 k entries, not the union of P k), and so does a region over stage 1's capacity
    facts = _check_case(rank, world, "random", 1000, 4, 7)
    assert sum(facts["all_delivered"]) < world * 4 and sum(facts["all_delivered"]) > 0
    facts = _check_case(rank, world, "strided", 1000, 40, 8)
    assert sum(facts["all_delivered"]) < world * 40
    if world > 2:
        facts = _check_case(rank, world, "shuffled", 1000, 25, 10)
        assert facts["dropped_but_in_update"] > 0
    # ... while random selections on a large bucket deliver most of what they send
    facts = _check_case(rank, world, "random", 4099, 41, 9)
    assert facts["delivered"] > 0

    if world == 4:  # node mode's inter-node stage: 2 peers in a subgroup, the mean over all 4 ranks
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        peers = [[0, 2], [1, 3]][rank % 2]
        u = _make_u("layer", 501, rank, world, 14)
        idx = torch.topk(u.abs(), 20).indices
        out = torch.zeros(501)
        route = Route(groups[rank % 2], 2, 4)
        launched = SparseAllReduce().launch(u, Selection(u[idx], idx, torch.tensor(0.0), 501), out, route, {})
        launched.work.wait()
        dlv = launched.finish().delivered
        everyone = _gather((out, u, idx, dlv), world)
        expected = torch.zeros(501, dtype=torch.float64)
        for r in peers:
            _, u_r, idx_r, dlv_r = everyone[r]
            assert torch.equal(everyone[r][0], out)
            expected.index_add_(0, idx_r[dlv_r], u_r[idx_r[dlv_r]].double())
        assert torch.allclose(out.double(), expected / 4, rtol=1e-6, atol=1e-6)

    # a non-finite u on one rank gives a NaN flag on every rank
    u = _make_u("random", 100, rank, world, 11)
    if rank == world - 1:
        u[3] = float("nan")
    _, _, delivery = _exchange(u, 10, world, {})
    assert math.isnan(float(delivery.flag))

    # a reused cache allocates nothing new and gives the same result
    u = _make_u("layer", 777, rank, world, 12)
    cache: dict = {}
    out1, _, d1 = _exchange(u, 13, world, cache)
    ptrs = {name: t.data_ptr() for name, t in cache.items()}
    out2, _, d2 = _exchange(u, 13, world, cache)
    assert {name: t.data_ptr() for name, t in cache.items()} == ptrs
    assert torch.equal(out1, out2) and torch.equal(d1.delivered, d2.delivered)
    assert float(d2.flag) == 0.0
    # ... and a different selection through the same cache is still right (the marks were reset)
    facts_u = _make_u("random", 777, rank, world, 13)
    out3, idx3, d3 = _exchange(facts_u, 13, world, cache)
    fresh_out, _, fresh = _exchange(facts_u, 13, world, {})
    assert torch.equal(out3, fresh_out) and torch.equal(d3.delivered, fresh.delivered)


def test_sparse_allreduce_on_2_and_4_ranks():
    run_distributed(_worker, world=2)
    run_distributed(_worker, world=4)


# ------------------------------------------------------------------------- single process, no wire
def test_one_peer_delivers_everything_without_collectives():
    ex = get_exchange("allreduce")
    assert isinstance(ex, SparseAllReduce) and "allreduce" in available_exchanges()
    for d, k in ((1, 1), (10, 3), (257, 50), (64, 64)):
        u = torch.randn(d)
        u[0] = 0.0  # a selected exact zero is still delivered
        idx = torch.topk(u.abs(), k).indices
        idx[-1] = 0
        idx = idx.unique()
        k = idx.numel()
        out = torch.zeros(d)
        launched = ex.launch(u, Selection(u[idx], idx, torch.tensor(0.0), d), out, Route(None, 1, 2), {})
        launched.work.wait()
        delivery = launched.work.get_future().then(lambda _: launched.finish()).wait()  # as a DDP hook does
        assert bool(delivery.delivered.all()) and float(delivery.flag) == 0.0
        expected = torch.zeros(d)
        expected[idx] = u[idx] / 2
        assert torch.equal(out, expected)
        assert ex.wire_bytes(k, d, 1) == 0


def test_bytes_stay_bounded_as_peers_grow_while_allgather_grows():
    ar, ag = SparseAllReduce(), AllGather()
    for d, k in ((10**6, 10**4), (10**5, 10**3), (4099, 41)):
        c1_2, c2_2 = bounded_chunks(d, k, 2)
        assert ar.wire_bytes(k, d, 2) == 4 * (2 * c1_2 + 1) + 4 * (2 * c2_2 + 1)  # the cost model's formula
        # from 2 to 4 peers: at most the (P-1)/P factor (1.5x), up to the ceilings of c1 and c2 (at most
        # 4 words per peer); the all-gather's triple
        assert ar.wire_bytes(k, d, 4) <= 1.5 * ar.wire_bytes(k, d, 2) + 4 * 4 * 3
        assert ag.wire_bytes(k, d, 4) / ag.wire_bytes(k, d, 2) >= 2.99
        for peers in (2, 4, 8, 16, 64, 512):
            words = ar.wire_bytes(k, d, peers) / 4
            assert words <= 6 * k * (peers - 1) / peers + 6 * (peers - 1)  # Ok-Topk's 6 words per entry
            c1, c2 = bounded_chunks(d, k, peers)
            assert ar.message_bytes(k, d, peers) == 4 * ((2 * c1 + 1) * peers + 2 * c2 + 1)
        assert ar.wire_bytes(k, d, 8) <= 0.45 * ag.wire_bytes(k, d, 8)
    # tiny buckets: never more capacity than a region holds, and still at least one entry
    assert bounded_chunks(1, 1, 4) == (1, 1)
    assert bounded_chunks(3, 3, 4) == (1, 1)
    assert bounded_chunks(37, 37, 4) == (10, 10)
