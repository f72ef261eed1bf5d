"""``exchange="allreduce"`` through the DDP hook (the bounded sparse all-reduce in the pipeline):
density 1 equals plain DDP, and below it every rank holds the same gradient, error feedback is exact
per rank (what was selected but not delivered stays in the residual), a non-finite value on one
rank is skipped everywhere, resume is exact, and the wire bytes per rank do not grow with P beyond
(P - 1) / P. Flat mode on 4 ranks and node mode on 2 x 2, one spawned run each."""

import copy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from lightning_gaussk import GaussKState, gaussk_hook
from lightning_gaussk.comm.layout import chunk_bounds
from test_hook import Net, _gather, _nonfinite, batch

AR = {"exchange": "allreduce", "dense_fallback": "never"}
NODE = {"hierarchy": "node", "ranks_per_node": 2}


def _density_one(rank: int, mode: dict) -> None:
    torch.manual_seed(0)
    base = Net()
    plain, ddp = DDP(copy.deepcopy(base)), DDP(copy.deepcopy(base), bucket_cap_mb=0.002)
    state = GaussKState(density=1.0, **AR, **mode).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, ddp)]
    for step in range(5):
        for m, opt in zip((plain, ddp), opts):
            opt.zero_grad()
            m(batch(step, rank)).pow(2).mean().backward()
            opt.step()
    for p, q in zip(plain.parameters(), ddp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert state.telemetry["dense_buckets"] == 0 and state.telemetry["hook_calls"] > 0
    assert all(int(r.count_nonzero()) == 0 for r in state.residuals().values())  # all of u was delivered
    dense = GaussKState(density=1.0, exchange="allreduce", **mode)  # dense_fallback="auto": k = d goes dense
    assert dense.exchange_for(1000, 1000, 4 if mode.get("hierarchy") == "flat" else 2, "cpu").name == "dense"


def _conservation(rank: int, world: int, mode: dict) -> int:
    """Five steps at density 0.05; returns how many selected entries were not delivered."""
    rpn = mode.get("ranks_per_node", 1)
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.002)
    state = GaussKState(density=0.05, selector="topk", warmup_steps=2, warmup_density=0.3, **AR, **mode).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)  # a density warm-up: k (and the message sizes) change
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    pname = {p: n for n, p in model.named_parameters()}
    undelivered = 0
    for step in range(5):
        opt.zero_grad()
        state.capture_next_step()
        ddp(batch(step, rank)).pow(2).mean().backward()
        sent = {}
        for index, cap in state.captured.items():
            u, idx, residual = cap["u"], cap["indices"].long(), state.store.slot(index).residual
            outside = torch.ones_like(u, dtype=torch.bool).index_fill_(0, idx, False)
            assert torch.equal(residual[outside], u[outside])  # never selected: kept whole
            r_sel, u_sel = residual[idx], u[idx]
            delivered = (r_sel == 0) & (u_sel != 0)
            assert torch.equal(torch.where(delivered, u_sel, r_sel), u_sel)  # selected: either sent whole or kept whole
            undelivered += int((~delivered & (u_sel != 0)).sum())
            sent[index] = (u - residual, [pname[p] for p in cap["parameters"]], cap["places"])
        every = _gather(sent)
        grads = {n: p.grad.reshape(-1) for n, p in model.named_parameters()}
        lr = rank % rpn
        for index, (_, params, places) in sent.items():
            agg = sum(every[q][index][0].double() for q in range(world) if q % rpn == lr) / world  # the update: mean of what was delivered
            for n, (off, ln) in zip(params, places):
                a, b = chunk_bounds(grads[n].numel(), rpn, lr)
                torch.testing.assert_close(grads[n][a:b].double(), agg[off : off + ln], rtol=0, atol=1e-6)
        flat = torch.cat([g for g in grads.values()])
        assert all(torch.equal(g, flat) for g in _gather(flat))  # every rank holds the same gradient
        opt.step()
    return undelivered


def _resume(rank: int, mode: dict) -> None:
    """Six steps straight equal three, a state_dict round trip into fresh objects, and three more
    (the fresh DDP's first buckets hold the parameters in another order than the rebuilt ones: the
    exchange works in the canonical order, so the update is the same)."""

    def build():
        torch.manual_seed(0)
        ddp = DDP(Net())  # one bucket: a fresh DDP's first buckets differ from rebuilt ones
        state = GaussKState(density=0.05, momentum_correction=0.9, **AR, **mode).bind(ddp)
        state.setup_layout()  # before loading: node mode keeps a chunk of each parameter
        ddp.register_comm_hook(state, gaussk_hook)
        return ddp, state, torch.optim.SGD(ddp.parameters(), lr=0.05)

    def train(ddp, state, opt, steps):
        for step in steps:
            state.set_loss_scale(2.0 ** (10 - step % 3))  # a changing loss scale, unscaled before the step
            opt.zero_grad()
            (ddp(batch(step, rank)).pow(2).mean() * state.loss_scale).backward()
            for p in ddp.parameters():
                p.grad.div_(state.loss_scale)
            opt.step()

    straight = build()
    train(*straight, range(6))
    first = build()
    train(*first, range(3))
    saved = (copy.deepcopy(first[0].module.state_dict()), first[1].state_dict(), copy.deepcopy(first[2].state_dict()))
    second = build()
    second[0].module.load_state_dict(saved[0])
    second[1].load_state_dict(saved[1])
    second[2].load_state_dict(saved[2])
    train(*second, range(3, 6))
    for p, q in zip(straight[0].parameters(), second[0].parameters()):
        assert torch.equal(p, q)
    assert straight[1].velocities().keys() == second[1].velocities().keys() != set()


def _wire_bytes(rank: int, world: int) -> dict:
    """Bytes on the wire per hook call for each exchange among 4 ranks and among 2 (subgroups)."""
    pair, _ = dist.new_subgroups(2)
    out = {}
    for exchange in ("allgather", "allreduce"):
        for peers, group in ((4, None), (2, pair)):
            torch.manual_seed(0)
            ddp = DDP(Net(), process_group=group)
            state = GaussKState(density=0.05, exchange=exchange, dense_fallback="never", hierarchy="flat",
                                process_group=group).bind(ddp)  # fmt: skip
            ddp.register_comm_hook(state, gaussk_hook)
            ddp(batch(0, rank)).pow(2).mean().backward()
            tel = state.telemetry
            out[exchange, peers] = tel["bytes_wire"] / tel["hook_calls"]
    return out


def _flat(rank: int, world: int) -> None:
    _density_one(rank, {"hierarchy": "flat"})
    assert sum(_gather(_conservation(rank, world, {"hierarchy": "flat"}))) > 0  # the exchange did drop entries
    _nonfinite(rank, world, 0.05, **AR)
    _resume(rank, {"hierarchy": "flat"})
    wire = _wire_bytes(rank, world)
    assert wire["allreduce", 4] <= wire["allreduce", 2] * (3 / 4) / (1 / 2) * 1.05, wire  # bounded: only (P-1)/P
    assert wire["allgather", 4] >= wire["allgather", 2] * 2.9, wire  # the all-gather's grows with P - 1


def _node(rank: int, world: int) -> None:
    _density_one(rank, NODE)
    _conservation(rank, world, NODE)
    _nonfinite(rank, world, 0.05, **AR, **NODE)
    _resume(rank, NODE)


def test_allreduce_exchange_in_flat_mode_on_4_ranks():
    run_distributed(_flat, world=4)


def test_allreduce_exchange_as_node_modes_inter_node_stage_on_2x2():
    run_distributed(_node, world=4)


def test_auto_picks_per_bucket_from_the_cost_model_and_logs_each_choice_once(caplog):
    import logging

    state = GaussKState(density=0.01, exchange="auto")
    with caplog.at_level(logging.INFO, logger="lightning_gaussk"):
        assert state.exchange_for(1_000_000, 10_000, 2, "cpu").name == "allgather"  # 2 peers: fewer bytes
        assert state.exchange_for(1_000_000, 10_000, 8, "cpu").name == "allreduce"  # 8 peers: bounded
        assert state.exchange_for(100, 50, 8, "cpu").name == "dense"  # tiny bucket, high density
        for _ in range(3):
            state.exchange_for(1_000_000, 10_000, 8, "cpu")
    lines = [r.getMessage() for r in caplog.records if "exchange='auto'" in r.getMessage()]
    assert len(lines) == 3 and "by allreduce" in lines[1], lines  # once per bucket size and choice
    timed = GaussKState(density=0.01, exchange="auto", link_gbit=10.0)  # with a link: by predicted time
    assert timed.exchange_for(25_000_000, 250_000, 2, "cuda").name == "allgather"
    assert timed.exchange_for(25_000_000, 250_000, 64, "cuda").name == "allreduce"
    assert timed.exchange_for(25_000_000, 250_000, 2, "cpu").name == "dense"  # CPU selection costs more than the link saves
