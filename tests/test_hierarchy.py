"""Node mode of the hook (``hierarchy="node"``) on 4 gloo processes as 2 nodes x 2 ranks:
dense inside a node, sparse between nodes; the same invariants as flat mode, per shard."""

import copy
import random
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from _invariants import assert_residual_is_u_minus_sent, decode_mean
from lightning_gaussk import GaussKState, gaussk_hook, register_selector
from lightning_gaussk.config import bucket_k
from lightning_gaussk.selection.selectors import topk_selector
from lightning_gaussk.comm.layout import Layout, chunk_bounds, resolve_layout
from test_hook import DDP_MODES, MATRIX, MatrixNet, Net, _gather, _matrix_loss, _train_step, batch

NODE = {"hierarchy": "node", "ranks_per_node": 2}


# -------------------------------------------------------------------------------- layout rules
def test_chunks_cover_every_parameter_once_in_order():
    for numel in (1, 2, 3, 7, 64, 1001):
        for parts in (1, 2, 3, 8):
            bounds = [chunk_bounds(numel, parts, i) for i in range(parts)]
            assert bounds[0][0] == 0 and bounds[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap


def test_auto_picks_node_mode_only_for_several_nodes_of_several_ranks():
    assert resolve_layout("auto", None, 8, 5, launcher_rpn=4) == Layout(8, 5, 4)
    assert resolve_layout("auto", None, 4, 1, launcher_rpn=4).mode == "flat"  # one node
    assert resolve_layout("auto", None, 4, 1, launcher_rpn=1).mode == "flat"  # one rank per node
    assert resolve_layout("auto", None, 4, 1, launcher_rpn=None).mode == "flat"  # the launcher says nothing
    assert resolve_layout("flat", 2, 4, 1).mode == "flat"
    assert resolve_layout("auto", 2, 4, 3) == Layout(4, 3, 2)  # explicit ranks_per_node overrides the launcher
    assert resolve_layout("node", None, 4, 3, launcher_rpn=2) == Layout(4, 3, 2)
    lay = Layout(8, 5, 4)
    assert (lay.nodes, lay.node, lay.local_rank) == (2, 1, 1)
    with pytest.raises(ValueError, match="`ranks_per_node` = 3 must divide the world size 4"):
        resolve_layout("auto", 3, 4, 0)
    with pytest.raises(ValueError, match="'node' needs the number of ranks per node"):
        resolve_layout("node", None, 4, 0)


def test_node_mode_refuses_a_custom_process_group():
    with pytest.raises(ValueError, match="process_group"):
        GaussKState(hierarchy="node", process_group=object())  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- equivalence
def _density_one(rank: int, world: int) -> None:
    torch.manual_seed(0)
    base = Net()
    plain = DDP(copy.deepcopy(base))
    models, states = [plain], []
    for fallback in ("never", "auto"):  # sparse path with k = s, and the inter-node all-reduce
        ddp = DDP(copy.deepcopy(base), bucket_cap_mb=0.002)
        state = GaussKState(density=1.0, dense_fallback=fallback, **NODE).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
        models.append(ddp)
        states.append(state)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for step in range(5):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(batch(step, rank)).pow(2).mean().backward()
            opt.step()
    for p, q, r in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)
    sparse, dense = states
    assert sparse.layout == Layout(4, rank, 2) and sparse.telemetry["dense_buckets"] == 0
    assert dense.telemetry["dense_buckets"] == dense.telemetry["hook_calls"] > 0
    assert all(int(r.count_nonzero()) == 0 for r in dense.residuals().values())


def test_node_mode_at_density_one_equals_plain_ddp():
    run_distributed(_density_one, world=4)


# -------------------------------------------------------------------------------- conservation
def _check_node_sync(rank: int, world: int, state: GaussKState, model, local: dict, old: dict, new: dict, density: float) -> None:
    """u, the residual, what was sent and what arrived, per shard, against gathered local gradients."""
    rpn, lr = 2, rank % 2
    every_local = _gather(local)
    node_sum = {n: every_local[rank - lr][n] + every_local[rank - lr + 1][n] for n in local}  # the reduce-scatter
    pname = {p: n for n, p in model.named_parameters()}
    caps = {i: (c["u"], c["indices"], [pname[p] for p in c["parameters"]], c["places"]) for i, c in state.captured.items()}
    every = _gather(caps)
    total = 0
    for index, (u, idx, params, places) in caps.items():
        s = u.numel()
        total += s
        assert idx.numel() == bucket_k(density, s) and idx.unique().numel() == idx.numel()
        expect_u = torch.zeros(s)
        kept = torch.zeros(s)
        for n, (off, ln) in zip(params, places):
            a, b = chunk_bounds(node_sum[n].numel(), rpn, lr)
            assert ln == b - a
            expect_u[off : off + ln] = node_sum[n][a:b] + old[n]  # u = node-summed chunk + residual
            kept[off : off + ln] = new[n]
        assert torch.equal(u, expect_u)
        assert_residual_is_u_minus_sent(u, idx, kept)
        # arrives: the mean over all W ranks of what the N ranks with this local rank sent
        peers = [every[q][index] for q in range(world) if q % rpn == lr]
        assert all(p[2] == params and p[3] == places for p in peers)
        agg = decode_mean([(p[0], p[1]) for p in peers], s, world)
        grads = dict(model.named_parameters())
        for n, (off, ln) in zip(params, places):
            a, b = chunk_bounds(grads[n].numel(), rpn, lr)
            g = grads[n].grad
            got = g.reshape(-1)[a:b].float() if g is not None else torch.zeros(b - a)
            assert torch.equal(got, agg[off : off + ln].to(grads[n].dtype).float()), n
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(r.numel() for r in new.values()) <= d // rpn + len(new)  # ~ d / L residual entries per rank
    if caps:
        assert total <= d // rpn + sum(1 for _ in model.parameters())


def _node_matrix_case(rank: int, world: int, ddp_kwargs: dict, model_kwargs: dict, accumulate: int, steps: int = 3) -> None:
    branchy = model_kwargs.get("unused", False)
    torch.manual_seed(0)
    base = MatrixNet(**model_kwargs)
    names = {n for n, p in base.named_parameters() if p.requires_grad}
    models = {tag: copy.deepcopy(base) for tag in ("plain", "dense", "sparse")}
    ddps = {tag: DDP(m, **ddp_kwargs) for tag, m in models.items()}
    states = {tag: GaussKState(density=d, selector="topk", **NODE).bind(ddps[tag]) for tag, d in (("dense", 1.0), ("sparse", 0.05))}
    for tag, state in states.items():
        ddps[tag].register_comm_hook(state, gaussk_hook)
    opts = {tag: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9) for tag, m in models.items()}
    sparse, state = models["sparse"], states["sparse"]
    old = {n: torch.zeros(chunk_bounds(p.numel(), 2, rank % 2)[1] - chunk_bounds(p.numel(), 2, rank % 2)[0])
           for n, p in sparse.named_parameters() if n in names}  # fmt: skip
    for step in range(steps):
        ref = copy.deepcopy(sparse)
        for micro in range(accumulate):
            _matrix_loss(ref, step, micro, rank, branchy).backward()
        local = {n: (p.grad.float().reshape(-1) if p.grad is not None else torch.zeros(p.numel())) for n, p in ref.named_parameters() if n in names}
        state.capture_next_step()
        for tag in ddps:
            _train_step(ddps[tag], opts[tag], step, rank, accumulate, branchy)
        new = {n: r.clone() for n, r in state.residuals().items()}
        assert set(new) == names and state.step == step + 1
        _check_node_sync(rank, world, state, sparse, local, old, new, 0.05)
        for tag in ddps:
            opts[tag].step()
        old = new
    for (n, p), q in zip(models["plain"].named_parameters(), models["dense"].parameters()):
        tol = {"rtol": 1e-5, "atol": 1e-6} if p.dtype == torch.float32 else {}
        torch.testing.assert_close(q, p, **tol, msg=lambda m: f"{ddp_kwargs} {model_kwargs} {n}: {m}")
    flat = torch.cat([p.detach().float().reshape(-1) for m in models.values() for p in m.parameters()])
    for f in _gather(flat):
        assert torch.equal(f, flat)  # every rank holds the same model


def _node_matrix(rank: int, world: int) -> None:
    for case in MATRIX + [(kw, {}, 1) for kw in DDP_MODES]:
        _node_matrix_case(rank, world, *case)


def test_node_mode_conserves_mass_per_shard_and_equals_plain_ddp_at_density_one_in_every_ddp_mode():
    run_distributed(_node_matrix, world=4)


# -------------------------------------------------------------------------------- faults, scale
def _nonfinite_and_loss_scale(rank: int, world: int) -> None:
    for density in (0.05, 1.0):  # sparse path and dense fallback
        torch.manual_seed(0)
        model = Net()
        ddp = DDP(model)
        state = GaussKState(density=density, **NODE).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
        ref_model = copy.deepcopy(model)  # the same training without a loss scale
        ref_ddp = DDP(ref_model)
        ref = GaussKState(density=density, **NODE).bind(ref_ddp)
        ref_ddp.register_comm_hook(ref, gaussk_hook)
        opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(ref_model.parameters(), lr=0.05)
        for step in range(6):
            scale = 2.0 ** (4 + step)  # a GradScaler growing every step
            state.set_loss_scale(scale)
            before = {n: r.clone() for n, r in state.residuals().items()}
            opt.zero_grad()
            x = batch(step, rank)
            if step == 3 and rank == 2:
                x[0, 0] = float("nan")  # one rank of the second node, one step
            (ddp(x).pow(2).mean() * scale).backward()
            finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            if step == 3:
                assert not finite  # every rank of every node sees it
                assert all(torch.equal(state.residuals()[n], before[n]) for n in before)  # no rank commits
                continue
            assert finite
            for p in model.parameters():
                p.grad.div_(scale)
            opt.step()
            ref_opt.zero_grad()
            ref_ddp(batch(step, rank)).pow(2).mean().backward()
            ref_opt.step()
        assert state.telemetry["skipped_buckets"] == 1
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # the scale changed nothing but the skipped step's


def test_node_mode_propagates_a_nonfinite_gradient_everywhere_and_follows_the_loss_scale():
    run_distributed(_nonfinite_and_loss_scale, world=4)


# -------------------------------------------------------------------------------- collective order
def _uneven_delays(rank: int, world: int) -> None:
    rng = random.Random(1000 + rank)

    @register_selector("slow_topk", override=True)
    def slow_topk(x, k, *, seed, step):  # between the reduce-scatter and the inter-node all-gather
        time.sleep(rng.random() * 0.02)
        return topk_selector(x, k, seed=seed, step=step)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 30), *(m for _ in range(6) for m in (nn.Tanh(), nn.Linear(30, 30))), nn.Linear(30, 3))
    plain = DDP(copy.deepcopy(base))
    node = DDP(copy.deepcopy(base), bucket_cap_mb=0.001)  # many buckets
    state = GaussKState(density=1.0, selector="slow_topk", dense_fallback="never", **NODE).bind(node)
    node.register_comm_hook(state, gaussk_hook)
    for p in node.parameters():  # gradients become ready at different times on different ranks
        p.register_hook(lambda g: time.sleep(rng.random() * 0.01) or g)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, node)]
    for step in range(4):
        for m, opt in zip((plain, node), opts):
            opt.zero_grad()
            m(batch(step, rank)).pow(2).mean().backward()
            opt.step()
    assert len(state.store) >= 5  # several buckets, each with three collectives
    for p, q in zip(plain.parameters(), node.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_many_buckets_under_uneven_per_rank_delays_keep_the_collective_order():
    run_distributed(_uneven_delays, world=4)


# -------------------------------------------------------------------------------- telemetry
def _telemetry(rank: int, world: int) -> None:
    torch.manual_seed(0)
    flat_model, node_model = Net(), Net()
    node_model.load_state_dict(flat_model.state_dict())
    stats = {}
    for tag, model, kw, density in (
        ("flat", flat_model, {"hierarchy": "flat"}, 0.05),
        ("node", node_model, NODE, 0.05),
        # the byte rule counts the N = 2 nodes, not the W = 4 ranks: at density 0.3 one bucket of
        # d = 1843 goes dense in flat mode (4 (2k + 1) >= 2d) but not in node mode (2 (2k_s + 1) < 2s)
        ("flat_dense", copy.deepcopy(flat_model), {"hierarchy": "flat"}, 0.3),
        ("node_sparse", copy.deepcopy(node_model), NODE, 0.3),
    ):
        ddp = DDP(model)
        state = GaussKState(density=density, **kw).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
        for step in range(3):
            ddp(batch(step, rank)).pow(2).mean().backward()
        stats[tag] = dict(state.telemetry)
    assert stats["flat_dense"]["dense_buckets"] == stats["flat_dense"]["hook_calls"] > 0
    assert stats["node_sparse"]["dense_buckets"] == 0 < stats["node_sparse"]["hook_calls"]
    d = sum(p.numel() for p in flat_model.parameters())
    flat, node = stats["flat"], stats["node"]
    assert flat["bytes_intra"] == flat["bytes_inter"] == 0
    assert node["bytes_inter"] == node["bytes_sent"] > 0
    assert node["bytes_intra"] > 0
    # each rank selects from half the bucket: its message is about half of flat's
    assert node["bytes_inter"] <= 0.55 * flat["bytes_sent"], (node["bytes_inter"], flat["bytes_sent"])
    assert node["entries_total"] == 3 * sum(-(-p.numel() // 2) for p in node_model.parameters())  # s = sum_p ceil(n_p / 2)
    assert flat["entries_total"] == 3 * d


def test_telemetry_counts_intra_and_inter_node_bytes_separately():
    run_distributed(_telemetry, world=4)


def test_the_startup_line_says_the_mode_why_the_exchange_and_what_a_node_sends():
    from lightning_gaussk.config import GaussKConfig
    from lightning_gaussk.engine.describe import startup_line

    line = startup_line(GaussKConfig(density=0.01), Layout(8, 0, 4), 4)
    assert line.startswith("GaussK: node mode, 2 nodes x 4 ranks (hierarchy='auto'")
    assert "auto chose node mode" in line and "a node sends about density * d entries" in line
    assert "4x fewer" in line and "gaussk-preflight" in line and "exchange: all-gather" in line
    line = startup_line(GaussKConfig(density=0.01, exchange="allreduce"), Layout(4, 0), None)
    assert "auto stayed flat: the launcher gives no ranks per node" in line and "bounded sparse all-reduce" in line
