"""A new exchange is one class and one registration, and every engine uses it: the DDP hook, the
FSDP2 hook and local SGD by name, the cost model by name, ``dense_fallback="auto"`` and
``exchange="auto"`` through its own byte and time model.

The test-only exchange delivers the first half of each selection, in two collectives (the values
with the flag, then the int32 indices); the undelivered half stays in the residual. It moves about
half the all-gather's bytes in twice its hops, so the cost model prefers it where bandwidth counts
and the all-gather where latency does. It is registered for ``exchange="auto"`` only while this
module runs (so other tests' automatic choices stay the built-in ones); the spawned ranks register
it themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from lightning_gaussk import GaussKState, gaussk_hook
from lightning_gaussk.comm.exchange import Delivery, Exchange, Launched, Route, Selection, all_gather, buffer
from lightning_gaussk.comm.registry import auto_exchanges, available_exchanges, get_exchange, register_exchange, unregister_exchange
from lightning_gaussk.costs import model as cm
from lightning_gaussk.costs import policy

NAME = "test-half-split"


class HalfSplitAllGather(Exchange):
    """All-gathers the first ``h = ceil(k / 2)`` selected entries of every rank as two collectives:
    ``[values h | flag]`` (fp32), then the indices (int32). ``out = (1 / D) sum_r scatter(idx_r,
    val_r)``; the other ``k - h`` entries are reported undelivered. Volume ``P (4 (h + 1) + 4 h)``
    bytes, ``2 (P - 1)`` hops."""

    name = NAME

    def launch(self, u: torch.Tensor, sel: Selection | None, out: torch.Tensor, route: Route, cache: dict) -> Launched:
        assert sel is not None
        h, P, dev = (sel.k + 1) // 2, route.peers, out.device
        head = buffer(cache, "hs_head", h + 1, dev)
        head[:h].copy_(sel.values[:h])
        head[h].copy_(sel.flag)
        idx = buffer(cache, "hs_idx", h, dev, torch.int32)
        idx.copy_(sel.indices[:h])
        heads = buffer(cache, "hs_heads", P * (h + 1), dev)
        idxs = buffer(cache, "hs_idxs", P * h, dev, torch.int32)
        all_gather(heads, head, group=route.group, async_op=True).wait()  # stage 1 complete before stage 2
        work = all_gather(idxs, idx, group=route.group, async_op=True)

        def finish() -> Delivery:
            rows = heads.view(P, h + 1)
            out.index_add_(0, idxs.long(), rows[:, :h].reshape(-1), alpha=1.0 / route.divisor)
            return Delivery(rows[:, h].sum(), torch.arange(sel.k, device=dev) < h)

        return Launched(work, finish)

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        h = (k + 1) // 2
        return 4 * (h + 1) + 4 * h

    def volume_bytes(self, k: int, d: int, peers: int) -> int:
        return peers * self.message_bytes(k, d, peers)

    def hops(self, peers: int) -> int:
        return 2 * (peers - 1)


def _register() -> None:
    register_exchange(NAME, HalfSplitAllGather, auto=True)  # the one registration


@pytest.fixture(scope="module", autouse=True)
def registered():
    _register()
    yield
    unregister_exchange(NAME)


# ------------------------------------------------------------------------------ spawned engines
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(100 * step + rank))


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _half_exact(state: GaussKState, key: int, cap: dict) -> bool:
    """The residual is u with exactly the delivered first half of the selection zeroed."""
    u, idx = cap["u"], cap["indices"].long()
    expect = u.clone()
    expect[idx[: (cap["k"] + 1) // 2]] = 0.0
    return torch.equal(state.store.slot(key).residual, expect)


def _ddp(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    ddp = DDP(Net())
    state = GaussKState(density=0.2, selector="topk", exchange=NAME).bind(ddp)  # dense_fallback="auto": priced by the policy
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    exact, mean_ok = True, True
    for step in range(3):
        state.capture_next_step()
        opt.zero_grad()
        ddp(_batch(step, rank)).pow(2).mean().backward()
        for key, cap in state.captured.items():
            exact &= _half_exact(state, key, cap)
            h = (cap["k"] + 1) // 2
            idx = cap["indices"].long()[:h]
            every = _gather((idx, cap["u"][idx]))
            want = torch.zeros_like(cap["u"])
            for i, v in every:
                want.index_add_(0, i, v / world)
            got = torch.cat([p.grad.reshape(-1) for p in cap["parameters"]])
            mean_ok &= torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        opt.step()
    state.wait_idle()
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    return {"params": flat, "exact": exact, "mean": mean_ok, "tel": dict(state.telemetry)}


def _local(rank: int, world: int) -> dict:
    from lightning_gaussk.local_sgd import SparseLocalSGD

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    try:
        local = SparseLocalSGD(net, opt, sync_every=2, density=0.2, chunk=None, quantize=None, selector="topk", exchange=NAME)
    except ValueError as err:
        return {"refused": str(err)}
    for step in range(4):
        opt.zero_grad()
        net(_batch(step, rank)).pow(2).mean().backward()
        opt.step()  # steps 2 and 4 run the outer step
    sent, e = local.last_sent(), local.error_feedback()
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return {"theta": local.global_params(), "params": flat, "sparse": local.sparse, "k": local.k,
            "sent": int((sent != 0).sum()), "overlap": int(((sent != 0) & (e != 0)).sum()), "kept": int((e != 0).sum())}  # fmt: skip


def _fsdp(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_gaussk.fsdp import register_gaussk_fsdp

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    net = Net()
    for unit in (net.a, net.b, net):
        fully_shard(unit, mesh=mesh["shard"])
    state = register_gaussk_fsdp(net, mesh, density=0.2, selector="topk", exchange=NAME)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    exact = True
    for step in range(3):
        state.capture_next_step()
        opt.zero_grad()
        net(_batch(step, rank)).pow(2).mean().backward()
        exact &= all(_half_exact(state, key, cap) for key, cap in state.captured.items())
        opt.step()
    full = torch.cat([p.full_tensor().detach().reshape(-1) for p in net.parameters()])
    return {"full": full, "exact": exact, "tel": dict(state.telemetry)}


def _worker(rank: int, world: int, out: str) -> None:
    _register()  # spawned ranks import this module afresh: they register it themselves
    every = _gather({"ddp": _ddp(rank, world), "local": _local(rank, world), "fsdp": _fsdp(rank)})
    if rank == 0:
        torch.save(every, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawned run of 4 gloo ranks for every engine: raw DDP and local SGD over the 4 ranks,
    FSDP2 on a 2 x 2 mesh."""
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path_factory.mktemp("registry") / "runs.pt")
    run_distributed(_worker, out, world=4)
    return torch.load(out, weights_only=False)


def test_one_registration_makes_it_a_valid_exchange_everywhere():
    assert NAME in available_exchanges() and NAME in auto_exchanges()
    assert isinstance(get_exchange(NAME), HalfSplitAllGather)
    from lightning_gaussk.config import GaussKConfig

    assert GaussKConfig(exchange=NAME).exchange == NAME
    with pytest.raises(ValueError, match="`exchange` must be one of"):
        get_exchange("no-such-exchange")
    with pytest.raises(ValueError, match="`name`"):
        register_exchange("auto", HalfSplitAllGather)


def test_the_ddp_hook_sends_through_it_with_exact_error_feedback_and_the_mean_update(runs):
    ddp = [r["ddp"] for r in runs]
    assert all(torch.equal(r["params"], ddp[0]["params"]) for r in ddp)  # every rank the same parameters
    assert all(r["exact"] and r["mean"] for r in ddp)
    tel = ddp[0]["tel"]
    assert tel["hook_calls"] > 0 and tel["dense_buckets"] == 0 and tel["bytes_wire"] > 0


def test_the_fsdp2_hook_sends_through_it_on_a_2x2_mesh(runs):
    fsdp = [r["fsdp"] for r in runs]
    assert all(torch.equal(r["full"], fsdp[0]["full"]) for r in fsdp)
    assert all(r["exact"] for r in fsdp)
    assert fsdp[0]["tel"]["dense_buckets"] == 0 and fsdp[0]["tel"]["bytes_wire"] > 0


def test_local_sgd_sends_its_outer_step_through_it(runs):
    local = [r["local"] for r in runs]
    assert "refused" not in local[0], local[0]
    assert all(torch.equal(r["theta"], local[0]["theta"]) for r in local)  # one global model
    assert all(torch.equal(r["params"], r["theta"]) for r in local)  # step 4 synced: every rank on theta
    for r in local:
        assert r["sparse"] and r["sent"] <= (r["k"] + 1) // 2  # the delivered half at most
        assert r["overlap"] == 0 and r["kept"] > 0  # what was sent left the error feedback, the rest stayed


def test_the_cost_model_prices_it_by_name_through_its_own_model():
    d, k, P = 1_000_000, 10_001, 8
    h = (k + 1) // 2
    link, host = cm.Link.from_gbit(10.0), cm.HostCosts.for_device("cpu")
    assert cm.exchange_bytes(NAME, d, k, P) == (P - 1) * (4 * (h + 1) + 4 * h)
    t = cm.sparse_host_time(d, k, P, host) + 2 * (P - 1) * link.alpha + cm.exchange_bytes(NAME, d, k, P) * link.beta
    assert cm.exchange_time(NAME, d, k, P, link, host) == t
    for d, k, P in ((100, 50, 2), (100, 30, 2), (1000, 10, 64), (1000, 10, 1), (10, 10, 1)):  # its byte rule: P (2h+1) >= 2d
        h = (k + 1) // 2
        assert policy.dense_wins(d, k, P, exchange=NAME) == (P * (2 * h + 1) >= 2 * d), (d, k, P)
    dec = policy.pick_exchange(100, 100, 2, exchange=NAME)  # 2 (2 * 50 + 1) >= 200
    assert dec.dense and dec.reason == "no fewer bytes than dense"


def test_auto_chooses_it_where_it_is_cheapest_and_not_elsewhere():
    by_bytes = GaussKState(density=0.01, exchange="auto")  # no link: the fewest bytes
    assert by_bytes.exchange_for(1_000_000, 10_000, 2, "cpu").name == NAME  # half the all-gather's bytes
    assert by_bytes.exchange_for(1_000_000, 10_000, 8, "cpu").name == "allreduce"  # many peers: bounded
    assert by_bytes.exchange_for(100, 50, 8, "cpu").name == "dense"
    slow = GaussKState(density=0.01, exchange="auto", link_gbit=1.0)  # bandwidth-bound: fewer bytes win
    assert slow.exchange_for(25_000_000, 250_000, 2, "cuda").name == NAME
    fast = GaussKState(density=0.01, exchange="auto", link_gbit=100.0)  # latency-bound: one hop fewer wins
    assert fast.exchange_for(25_000_000, 2_500, 2, "cuda").name == "allgather"
    link, gpu = cm.Link.from_gbit(100.0), cm.HostCosts.for_device("cuda")
    times = {e: cm.exchange_time(e, 25_000_000, 2_500, 2, link, gpu) for e in ("allgather", NAME)}
    assert times["allgather"] < times[NAME] and math.isfinite(times[NAME])
