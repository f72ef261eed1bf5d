"""Sparse local SGD (lightning_gaussk.engine.local, the "gaussk_local" strategy, register_gaussk's
local path) on gloo.

One spawned 4-process run (module fixture ``raw``) feeds the raw-torch tests: DDP equivalence
on 2 ranks (a subgroup) and on 4, the invariants of H > 1 (identical models, sent + buffer ==
u bit for bit, conservation of the pseudo-gradients), exact resume mid-window and across an outer
step (sparse, 2-bit, DiLoCo, node mode) and the telemetry. The Lightning fit and the Accelerate
run are subprocesses (tests/scripts/local_fit.py, tests/scripts/local_accelerate.py).
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from _dist import run_distributed
from lightning_gaussk.costs.model import Link
from lightning_gaussk.comm.quant import dequantize, message_bytes, pack_codes, quantize, unpack_codes
from lightning_gaussk.config import LocalSGDConfig
from lightning_gaussk.engine.commit import commit
from lightning_gaussk.engine.local.outer import OuterNesterov, OuterOptimizer, OuterSGD
from lightning_gaussk.engine.local.schedule import SyncSchedule
from lightning_gaussk.local_sgd import SparseLocalSGD
from lightning_gaussk.selection.chunkwise import ChunkwiseTopK

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "scripts"))
from _launched import groups_at_exit  # noqa: E402

D_IN = 8


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 24), nn.Tanh(), nn.Linear(24, 1))  # 241 parameters


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + 31 * rank + 1)
    x = torch.randn(16, D_IN, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.3 * torch.sin(3 * x[:, 2:3])


def step(model: nn.Module, opt: torch.optim.Optimizer, i: int, rank: int) -> None:
    x, y = batch(i, rank)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_everywhere(t: torch.Tensor, group=None) -> bool:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, t.contiguous(), group=group)
    return all(torch.equal(got[0], g) for g in got)


# ------------------------------------------------------------------------------ the 4-rank run
def _ddp_equivalence(rank: int, world: int, out: dict) -> None:
    """sync_every=1, density=1, outer_lr=1, ef_decay=0, fp32 values (quantize=None), SGD inside == DDP SGD, on 2
    and 4 ranks."""
    pair = dist.new_group([0, 1])
    for name, group, members in (("2", pair, 2), ("4", None, 4)):
        for variant, extra in (("byte rule", {}), ("sparse k=d", {"dense_fallback": "never", "chunk": None})):
            if rank >= members:
                continue
            ref = net()
            ddp = nn.parallel.DistributedDataParallel(ref, process_group=group)
            ref_opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            model = net()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            local = SparseLocalSGD(model, opt, sync_every=1, density=1.0, outer_lr=1.0, ef_decay=0.0, quantize=None,
                                   hierarchy="flat", process_group=group, **extra)  # fmt: skip
            for i in range(5):
                step(ddp, ref_opt, i, rank)
                step(model, opt, i, rank)
            out[f"ddp{name}/{variant}"] = (float((flat(ref) - flat(model)).abs().max()), float(flat(ref).abs().max()),
                                           local.sparse, same_everywhere(flat(model), group))  # fmt: skip


def _invariants(rank: int, world: int, out: dict) -> None:
    """H = 3 with AdamW: after each outer step identical models; sent + e == u bit for bit; the
    beta-decayed sum of the pseudo-gradients == the decayed sum of what was sent + e_T."""
    configs = {
        "chunk/allgather/beta1": dict(density=0.1, chunk=64, ef_decay=1.0, quantize=None),
        "chunk/2bit/beta0.9": dict(density=0.1, chunk=64, ef_decay=0.9, quantize=2),
        "whole/allreduce/beta0.9": dict(density=0.05, chunk=None, ef_decay=0.9, exchange="allreduce", selector="topk", quantize=None),
    }
    for name, cfg in configs.items():
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        seen: dict = {}

        def capture(optimizer, args, kwargs, seen=seen):  # registered first: runs before the outer step
            seen["delta"] = local.global_params() - flat(model)
            seen["e"] = local.error_feedback()

        opt.register_step_post_hook(capture)
        local = SparseLocalSGD(model, opt, sync_every=3, outer_lr=0.8, hierarchy="flat", **cfg)
        beta = cfg["ef_decay"]
        sum_delta = torch.zeros(local.d, dtype=torch.float64)
        sum_sent = torch.zeros(local.d, dtype=torch.float64)
        exact, identical, outer = True, True, 0
        for i in range(10):
            step(model, opt, i, rank)
            if local.window_position == 0:  # an outer step just ran
                outer += 1
                u = seen["e"].mul(beta).add(seen["delta"])
                sent = local.last_sent()
                exact &= torch.equal(u - sent, local.error_feedback())  # e = u - sent, bit for bit
                sum_delta = sum_delta.mul(beta).add(seen["delta"].double())
                sum_sent = sum_sent.mul(beta).add(sent.double())
                identical &= same_everywhere(flat(model)) and torch.equal(flat(model), local.global_params())
        cons = float((sum_sent + local.error_feedback().double() - sum_delta).abs().max())
        out[f"inv/{name}"] = {
            "outer": outer, "exact": exact, "identical": identical, "conservation": cons,
            "scale": float(sum_delta.abs().max()), "telemetry": dict(local.telemetry), "outer_bytes": local.outer_bytes,
            "k": local.k, "per_inner": local.bytes_per_inner_step, "sparse": local.sparse,
            "predicted_1g": local.predicted_outer_time(Link(alpha=1e-4, bandwidth=1.25e8)),
        }  # fmt: skip


def _resume(rank: int, world: int, out: dict) -> None:
    """A run of 10 steps equals one saved after ``stop`` steps (mid-window or right after an
    outer step) and resumed into a fresh model, optimizer and outer loop."""
    cases = {
        "sparse2bit/mid-window": (dict(density=0.1, chunk=64, quantize=2, ef_decay=0.95, hierarchy="flat"), 4),
        "diloco/after-outer": (dict(outer="dense", outer_lr=0.7, hierarchy="flat"), 6),
        "node/mid-window": (dict(density=0.1, chunk=32, quantize=None, ef_decay=0.95, hierarchy="node", ranks_per_node=2), 5),
    }
    for name, (cfg, stop) in cases.items():
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        local = SparseLocalSGD(model, opt, sync_every=3, **cfg)
        saved = None
        for i in range(10):
            step(model, opt, i, rank)
            if i + 1 == stop:
                buf = io.BytesIO()
                torch.save(local.state_dict(), buf)
                saved = buf.getvalue()
        straight = flat(model)
        local.remove()
        model2 = net(seed=123)  # other weights: all must come from the state dict
        opt2 = torch.optim.AdamW(model2.parameters(), lr=0.02)
        local2 = SparseLocalSGD(model2, opt2, sync_every=3, **cfg)
        local2.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
        position = local2.window_position
        for i in range(stop, 10):
            step(model2, opt2, i, rank)
        out[f"resume/{name}"] = {
            "equal": torch.equal(straight, flat(model2)), "position": position, "mode": local2.layout.mode,
            "identical_at_end": same_everywhere(flat(model2)),
        }


def _nonfinite(rank: int, world: int, out: dict) -> None:
    """H = 2; rank 1's model goes NaN in the second window. Its outer step is skipped on every
    rank (theta, e and the outer momentum as before), every rank restarts from theta, rank 1's
    inner optimizer starts afresh, and the third window trains on normally."""
    import warnings

    cases = {
        "flat/sparse": dict(density=0.1, chunk=64, quantize=None, hierarchy="flat"),
        "node/sparse2bit": dict(density=0.1, chunk=32, quantize=2, hierarchy="node", ranks_per_node=2),
        "flat/diloco": dict(outer="dense", hierarchy="flat"),
    }
    for name, cfg in cases.items():
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        local = SparseLocalSGD(model, opt, sync_every=2, **cfg)
        for i in range(2):
            step(model, opt, i, rank)
        before = local.state_dict(local=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(2, 4):
                if i == 2 and rank == 1:
                    with torch.no_grad():
                        next(model.parameters())[0, 0] = float("nan")
                step(model, opt, i, rank)
        after = local.state_dict(local=False)
        same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)  # noqa: E731
        rec = {
            "skipped": local.telemetry["skipped_outer_steps"], "outer": local.telemetry["outer_steps"],
            "theta_kept": same(before["global"], after["global"]), "e_kept": same(before["residuals"], after["residuals"]),
            "momentum_kept": same(before.get("momentum", {}), after.get("momentum", {})),
            "model_is_theta": torch.equal(flat(model), local.global_params()), "finite": bool(flat(model).isfinite().all()),
            "optimizer_state": len(opt.state), "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        }  # fmt: skip
        theta = local.global_params()
        for i in range(4, 6):
            step(model, opt, i, rank)
        rec.update(moved=not torch.equal(theta, local.global_params()), finite_after=bool(local.global_params().isfinite().all()),
                   skipped_after=local.telemetry["skipped_outer_steps"], identical=same_everywhere(flat(model)))  # fmt: skip
        out[f"nonfinite/{name}"] = rec
        local.remove()


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    out: dict = {}
    _ddp_equivalence(rank, world, out)
    _invariants(rank, world, out)
    _resume(rank, world, out)
    _nonfinite(rank, world, out)
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local_sgd")
    run_distributed(_worker, str(folder), world=4)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.mark.parametrize("ranks", ["2", "4"])
@pytest.mark.parametrize("variant", ["byte rule", "sparse k=d"])
def test_sync_every_1_density_1_matches_ddp_sgd(raw, ranks, variant):
    for rank in range(int(ranks)):
        diff, scale, sparse, same = raw[rank][f"ddp{ranks}/{variant}"]
        assert diff <= 1e-6 * max(1.0, scale), (rank, diff)  # fp32 rounding only
        assert same
        assert sparse == (variant == "sparse k=d")  # the byte rule sends density 1 dense


@pytest.mark.parametrize("name", ["chunk/allgather/beta1", "chunk/2bit/beta0.9", "whole/allreduce/beta0.9"])
def test_outer_steps_leave_identical_models_and_account_for_every_pseudo_gradient(raw, name):
    for rank in range(4):
        r = raw[rank][f"inv/{name}"]
        assert r["outer"] == 3 and r["sparse"]
        assert r["identical"], "ranks differ after an outer step"
        assert r["exact"], "sent + error feedback != beta e + delta"
        assert r["conservation"] <= 1e-5 * max(1.0, r["scale"]), r


def test_telemetry_counts_bytes_per_outer_and_inner_step(raw):
    plain, q2 = raw[0]["inv/chunk/allgather/beta1"], raw[0]["inv/chunk/2bit/beta0.9"]
    for r in (plain, q2):
        tel = r["telemetry"]
        assert tel["inner_steps"] == 10 and tel["outer_steps"] == 3
        assert tel["bytes_sent"] == 3 * r["outer_bytes"]
        assert r["per_inner"] == pytest.approx(r["outer_bytes"] / 3)
        assert tel["bytes_wire"] == 3 * 3 * r["outer_bytes"]  # ring all-gather: P - 1 messages
    assert plain["outer_bytes"] == 4 * (2 * plain["k"] + 1)  # the all-gather's codec: value + index + flag
    assert q2["outer_bytes"] < plain["outer_bytes"] / 2  # 2-bit values, int16 offsets, a scale per chunk
    # communication only, by the exchange's own model: a ring all-gather of 4 messages, 3 hops
    assert plain["predicted_1g"] == pytest.approx(3 * (1e-4 + plain["outer_bytes"] / 1.25e8), rel=1e-12)
    assert q2["predicted_1g"] == pytest.approx(3 * (1e-4 + q2["outer_bytes"] / 1.25e8), rel=1e-12)


@pytest.mark.parametrize("name", ["sparse2bit/mid-window", "diloco/after-outer", "node/mid-window"])
def test_resume_is_exact(raw, name):
    for rank in range(4):
        r = raw[rank][f"resume/{name}"]
        assert r["equal"], (rank, r)
        assert not r["identical_at_end"]  # 10 % 3 == 1: the window is open, each rank's own model was restored
    assert raw[0]["resume/node/mid-window"]["mode"] == "node"
    assert raw[0]["resume/sparse2bit/mid-window"]["position"] == 1
    assert raw[0]["resume/diloco/after-outer"]["position"] == 0


@pytest.mark.parametrize("name", ["flat/sparse", "node/sparse2bit", "flat/diloco"])
def test_a_non_finite_pseudo_gradient_skips_the_outer_step_everywhere_and_training_goes_on(raw, name):
    for rank in range(4):
        r = raw[rank][f"nonfinite/{name}"]
        assert r["outer"] == 2 and r["skipped"] == 1, (rank, r)
        assert r["theta_kept"] and r["e_kept"] and r["momentum_kept"], (rank, r)  # nothing of the step kept
        assert r["model_is_theta"] and r["finite"], (rank, r)  # every rank restarts from theta
        # the rank that went non-finite starts its inner optimizer afresh; the others keep theirs
        assert (r["optimizer_state"] == 0) == (rank == 1), (rank, r["optimizer_state"])
        if rank == 1:
            assert any("rank 1's pseudo-gradient is non-finite at outer step 2" in w for w in r["warnings"]), r["warnings"]
        elif rank == 0:
            assert any("outer step 2 skipped on every rank" in w for w in r["warnings"]), r["warnings"]
        assert r["moved"] and r["finite_after"] and r["skipped_after"] == 1 and r["identical"], (rank, r)


# ------------------------------------------------------------------------------ one process
def test_single_process_runs_without_a_process_group():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    local = SparseLocalSGD(model, opt, sync_every=2, density=0.1)
    before = flat(model)
    for i in range(4):
        step(model, opt, i, 0)
    assert local.telemetry["outer_steps"] == 2 and not torch.equal(before, flat(model))
    assert torch.equal(flat(model), local.global_params())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sync_every": 0}, "sync_every"),
        ({"density": 0.0}, "density"),
        ({"outer_lr": -1.0}, "outer_lr"),
        ({"ef_decay": 1.5}, "ef_decay"),
        ({"outer": "avg"}, "outer"),
        ({"quantize": 4}, "quantize"),
        ({"quantize": 2, "chunk": None}, "chunk"),
        ({"quantize": 2, "exchange": "allreduce"}, "exchange"),
        ({"exchange": "ring"}, "exchange"),
        ({"selector": "nope"}, "selector"),
        ({"outer_momentum": 1.0}, "outer_momentum"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, match):
    model = net()
    with pytest.raises(ValueError, match=match):
        SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_options_are_one_declaration_keywords_env_and_checks():
    """LocalSGDConfig: today's defaults; keywords > GAUSSK_* variables > defaults; a bad value is
    refused naming its argument (and its variable when it came from the environment)."""
    cfg = LocalSGDConfig()
    assert (cfg.sync_every, cfg.density, cfg.outer_lr, cfg.ef_decay, cfg.outer, cfg.chunk) == (16, 0.02, 1.5, 0.95, "sparse", 4096)
    assert (cfg.quantize, cfg.selector, cfg.exchange, cfg.dense_fallback, cfg.outer_momentum) == (2, "gaussk", "allgather", "auto", 0.9)
    assert isinstance(LocalSGDConfig(density=1).density, float)
    env = {"GAUSSK_SYNC_EVERY": "4", "GAUSSK_CHUNK": "none", "GAUSSK_OUTER": "dense", "GAUSSK_OUTER_LR": "0.5"}
    got = LocalSGDConfig.from_env(env, outer_lr=0.7)
    assert (got.sync_every, got.chunk, got.outer, got.outer_lr) == (4, None, "dense", 0.7)
    assert LocalSGDConfig.env_vars()["sync_every"] == "GAUSSK_SYNC_EVERY"
    assert LocalSGDConfig.from_dict(got.to_dict()) == got and got.changed() == {"sync_every": 4, "outer": "dense", "outer_lr": 0.7, "chunk": None}
    with pytest.raises(ValueError, match="sync_every.*GAUSSK_SYNC_EVERY='0'"):
        LocalSGDConfig.from_env({"GAUSSK_SYNC_EVERY": "0"})
    with pytest.raises(ValueError, match="GAUSSK_DENSITY"):
        LocalSGDConfig.from_env({"GAUSSK_DENSITY": "lots"})
    with pytest.raises(TypeError, match="chunk"):
        LocalSGDConfig(chunk=True)
    with pytest.raises(ValueError, match="exchange.*'allgather'"):
        LocalSGDConfig(exchange="dense")  # the byte rule's choice, not an option
    with pytest.raises(ValueError, match="unknown option"):
        LocalSGDConfig.from_dict({"sync": 3})


def test_the_driver_takes_a_config_and_keywords_over_it():
    model = net()
    local = SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), config=LocalSGDConfig(sync_every=5, chunk=None, quantize=None), density=0.5)
    assert (local.config.sync_every, local.config.chunk, local.config.density) == (5, None, 0.5)
    with pytest.raises(TypeError, match="config"):
        SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), config={"sync_every": 5})  # type: ignore[arg-type]


def test_schedule_syncs_every_h_steps_and_spreads_fragments():
    one = SyncSchedule(every=4)
    assert [t for t in range(1, 13) if one.due(t)] == [4, 8, 12] and one.due(8) == (0,)
    assert [one.position(t) for t in (4, 5, 7, 8)] == [0, 1, 3, 0]
    two = SyncSchedule(every=4, fragments=2)  # fragment 1 at offset 2
    assert [(t, two.due(t)) for t in range(1, 9) if two.due(t)] == [(2, (1,)), (4, (0,)), (6, (1,)), (8, (0,))]
    for bad in ({"every": 0}, {"every": 2, "fragments": 3}):
        with pytest.raises(ValueError, match=next(iter(bad)) if "fragments" not in bad else "fragments"):
            SyncSchedule(**bad)


@pytest.mark.parametrize("n, C, kc", [(3, 16, 4), (1, 7, 7), (5, 32, 1)])
def test_chunkwise_selection_is_the_exact_top_k_of_every_chunk(n, C, kc):
    top = ChunkwiseTopK(n, C, kc)
    for seed in (0, 1):  # the buffers are reused: a second call is as exact as the first
        u = torch.randn(n * C, generator=torch.Generator().manual_seed(seed))
        values, indices = top(u)
        assert values.numel() == indices.numel() == top.k == n * kc
        assert torch.equal(values, u[indices])
        chunks = indices.view(n, kc)
        assert torch.equal(chunks // C, torch.arange(n).unsqueeze(1).expand(n, kc))  # kc per chunk, in chunk order
        want = torch.topk(u.view(n, C).abs(), kc, dim=1).values
        assert torch.equal(u[chunks].abs().sort(dim=1, descending=True).values, want)
    with pytest.raises(ValueError, match="per_chunk"):
        ChunkwiseTopK(2, 4, 5)


def test_outer_optimizers_follow_their_formulas():
    theta, g = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 0.5, -1.0])
    sgd = OuterSGD(0.5)
    t = theta.clone()
    sgd.step(t, g.clone())
    assert torch.equal(t, theta - 0.5 * g) and sgd.state_dict() == {}
    nesterov = OuterNesterov(lr=0.5, momentum=0.75, numel=3)
    assert isinstance(nesterov, OuterOptimizer) and isinstance(sgd, OuterOptimizer)
    t, m = theta.clone(), torch.zeros(3)
    for _ in range(3):  # by hand: m <- mu m + g; theta <- theta - alpha (g + mu m)
        m = 0.75 * m + g
        want = t - 0.5 * (g + 0.75 * m)
        nesterov.step(t, g.clone())
        assert torch.allclose(t, want) and torch.allclose(nesterov.state_dict()["momentum"], m)
    fresh = OuterNesterov(lr=0.5, momentum=0.75, numel=3)
    fresh.load_state_dict({"momentum": m})
    assert torch.equal(fresh.momentum, nesterov.momentum)
    with pytest.raises(ValueError, match="momentum"):
        OuterNesterov(lr=1.0, momentum=1.0, numel=3)


def test_commit_keeps_what_was_not_sent_and_nothing_on_a_skip():
    """One rule for every engine: sent + kept == u; exact entries zeroed, lossy values subtracted,
    undelivered entries kept; a non-finite agreement keeps the old buffer (host or device choice)."""
    u = torch.tensor([1.0, -2.0, 3.0, 4.0])
    idx, delivered = torch.tensor([1, 3]), torch.tensor([True, False])
    kept, _ = commit(torch.zeros(4), u.clone(), idx, delivered, True)
    assert torch.equal(kept, torch.tensor([1.0, 0.0, 3.0, 4.0]))
    sent = torch.tensor([-1.5, 4.0])  # a dequantised value: the rounding error stays
    kept, _ = commit(torch.zeros(4), u.clone(), idx, None, True, sent=sent)
    assert torch.equal(kept + torch.zeros(4).index_add_(0, idx, sent), u)
    old = torch.full((4,), 7.0)
    assert torch.equal(commit(old.clone(), u.clone(), idx, None, False)[0], old)
    assert torch.equal(commit(old.clone(), u.clone(), idx, None, torch.tensor(False))[0], old)
    assert torch.equal(commit(old.clone(), u.clone(), None, None, torch.tensor(True), everything=True)[0], torch.zeros(4))


def test_wrapped_model_and_wrong_types_are_refused():
    model = net()
    with pytest.raises(TypeError, match="optimizer"):
        SparseLocalSGD(model, "sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        SparseLocalSGD("net", torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]


def test_two_bit_levels_and_scale_per_chunk():
    values = torch.tensor([[3.0, -1.0, 0.9, -3.0], [0.0, 0.0, 0.0, 0.0]])
    codes = torch.empty(2, 4, dtype=torch.uint8)
    scales, deq = torch.empty(2), torch.empty(2, 4)
    quantize(values, 2, codes, scales, deq)
    assert scales.tolist() == [3.0, 0.0]
    assert deq[0].tolist() == [3.0, -1.0, 1.0, -3.0]  # levels {-m, -m/3, m/3, m}
    assert deq[1].tolist() == [0.0] * 4
    assert torch.equal(dequantize(codes, scales, 2), deq)
    assert message_bytes(10, 82, 2) < 10 * 82 * 3  # under 3 bytes per entry at 2 bits (vs 8 unquantised)


@pytest.mark.parametrize("bits, k", [(2, 7), (2, 8), (8, 5)])
def test_codes_pack_and_unpack_to_the_same_codes(bits, k):
    codes = torch.randint(0, 1 << bits, (k,), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = torch.zeros(2, 8, dtype=torch.uint8)
    pack_codes(codes, bits, packed[1])
    assert torch.equal(unpack_codes(packed, k, bits)[1], codes)
    assert packed[1, -(-k * bits // 8) :].eq(0).all()  # nothing written past the codes


def test_state_dict_of_another_layout_is_refused():
    model = net()
    local = SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    sd = local.state_dict()
    sd["layout"] = {"world_size": 4, "rank": 0, "ranks_per_node": None}
    with pytest.raises(ValueError, match="same layout"):
        local.load_state_dict(sd)


# ------------------------------------------------------------------------------ integrations
def _run(cmd: list[str], cwd: Path, env_extra: dict | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), **(env_extra or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_lightning_fit_trains_counts_optimizer_steps_and_resumes_mid_window(tmp_path):
    output = _run([sys.executable, str(HERE / "scripts" / "local_fit.py"), "--out", str(tmp_path)], tmp_path)
    # the fits end at optimizer step 8, 2 steps into a window of 3: a last outer step, and rank 0 says so
    assert "the fit ended 2 optimizer steps into a window of sync_every=3; a last outer step ran" in output, output[-3000:]
    assert groups_at_exit(str(tmp_path)) == ["False", "False"]  # gloo group destroyed at exit while Python ran
    ref = [torch.load(tmp_path / "ref" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    res = [torch.load(tmp_path / "resumed" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in range(2):
        assert ref[r]["inner_steps"] == 8 and ref[r]["outer_steps"] == 2  # 16 micro-batches, 8 optimizer steps, H = 3
        assert ref[r]["loss_last"] < ref[r]["loss_first"]  # it trains
        assert ref[r]["synced_equal"]  # identical models after the outer step at optimizer step 6
        # GaussKTelemetry logs the outer loop after each optimizer step: the last one is step 8
        last = ref[r]["telemetry_last"]
        dense = 8 * 4 * (16 * 64 + 64 + 64 + 1)  # what DDP would have all-reduced in 8 optimizer steps
        assert last == {"outer_steps": 2.0, "skipped_outer_steps": 0.0, "window_position": 2.0,
                        "bytes_per_inner_step": pytest.approx(2 * ref[r]["outer_bytes"] / 8), "bytes_dense": dense,
                        "compression": pytest.approx(dense / (2 * ref[r]["outer_bytes"]))}  # fmt: skip
        assert ref[r]["metrics"]["gaussk/outer_ms"] > 0  # logged at the outer step of optimizer step 6
        assert torch.equal(ref[r]["params"], res[r]["params"]), "resume from optimizer step 4 (mid-window) differs"
        assert res[r]["resumed_position"] == 1
    assert not torch.equal(ref[0]["params"], ref[1]["params"])  # step 8 is mid-window: local models differ
    # end_on_theta: after fit every rank holds theta (the same model), the resumed run's too, bit for bit
    final = {name: [torch.load(tmp_path / name / f"final_rank{r}.pt", weights_only=False) for r in range(2)] for name in ("ref", "resumed")}
    for name, (f0, f1) in final.items():
        assert torch.equal(f0["params"], f1["params"]), name
        assert f0["on_theta"] and f0["position"] == 0 and f0["outer_steps"] == 3, f0
    assert torch.equal(final["ref"][0]["params"], final["resumed"][0]["params"])
    assert not torch.equal(final["ref"][0]["params"], ref[0]["params"])  # the last outer step moved the model
    # overlap_steps=1, fragments=2 through Lightning: saved at step 4 with fragment 1's exchange in
    # flight, the resume ends bit for bit like the uninterrupted fit, and every rank ends on theta
    ref_o = [torch.load(tmp_path / "ref-overlap" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    res_o = [torch.load(tmp_path / "resumed-overlap" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    fin_o = {name: [torch.load(tmp_path / name / f"final_rank{r}.pt", weights_only=False) for r in range(2)]
             for name in ("ref-overlap", "resumed-overlap")}  # fmt: skip
    for r in range(2):
        assert ref_o[r]["in_flight_at_save"][0] == 1, ref_o[r]["in_flight_at_save"]
        assert torch.equal(ref_o[r]["params"], res_o[r]["params"])
        assert torch.equal(fin_o["ref-overlap"][r]["params"], fin_o["resumed-overlap"][r]["params"])
        assert fin_o["ref-overlap"][r]["on_theta"]
    assert torch.equal(fin_o["ref-overlap"][0]["params"], fin_o["ref-overlap"][1]["params"])
    assert not torch.equal(fin_o["ref-overlap"][0]["params"], final["ref"][0]["params"])  # the options took effect


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap+fragments"])
def test_accelerate_register_gaussk_local_path_trains_and_restores(tmp_path, overlap):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "scripts" / "local_accelerate.py"), "--out", str(tmp_path)] + ["--overlap"] * overlap  # fmt: skip
    _run(cmd, tmp_path, {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert groups_at_exit(str(tmp_path)) == ["False", "False"]  # destroyed at exit without end_training()
    for r in range(2):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        # gradient accumulation 2: optimizer steps; fragments 0 / 1 sync after steps 3, 6 / 1, 4, 7
        assert rec["inner_steps"] == 8 and rec["outer_steps"] == (5 if overlap else 2)
        assert rec["in_flight_at_save"] == (1 if overlap else 0)
        assert rec["grads_local"]  # the comm hook left each rank's own gradient
        assert rec["synced_equal"]
        assert rec["loss_last"] < rec["loss_first"]
        assert rec["restored_equal"], "load_state mid-window did not reproduce the run"
