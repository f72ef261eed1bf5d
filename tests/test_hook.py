"""gaussk_hook with raw torch DDP on 2 gloo processes: what is sent, what is kept, what arrives."""

import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from _invariants import assert_residual_is_u_minus_sent, decode_mean
from lightning_gaussk import GaussKState, gaussk_hook, register_selector


class Net(nn.Module):
    def __init__(self, unused: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Linear(12, 40)
        self.b = nn.Linear(40, 30)
        self.c = nn.Linear(30, 3)
        self.unused = nn.Linear(5, 5) if unused else None  # gets no gradient
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def batch(step: int, rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(100 * step + rank)).to(dtype)


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
def _dense_equivalence(rank: int, world: int) -> None:
    torch.manual_seed(0)
    base = Net()
    plain = DDP(copy.deepcopy(base))
    sparse = DDP(copy.deepcopy(base), bucket_cap_mb=0.002)  # several buckets, all through the sparse path
    sparse_state = GaussKState(density=1.0, dense_fallback="never").bind(sparse)
    sparse.register_comm_hook(sparse_state, gaussk_hook)
    auto = DDP(copy.deepcopy(base), bucket_cap_mb=0.002)  # k = d: dense_fallback="auto" allreduces
    auto_state = GaussKState(density=1.0).bind(auto)
    auto.register_comm_hook(auto_state, gaussk_hook)
    models = (plain, sparse, auto)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for step in range(6):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(batch(step, rank)).pow(2).mean().backward()
            opt.step()
    for p, q, r in zip(plain.parameters(), sparse.parameters(), auto.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)
    assert sparse_state.telemetry["dense_buckets"] == 0
    assert auto_state.telemetry["dense_buckets"] == auto_state.telemetry["hook_calls"] > 0
    assert all(int(r.count_nonzero()) == 0 for r in auto_state.residuals().values())  # all of u was sent


def test_density_one_matches_plain_ddp_allreduce_on_sparse_and_dense_paths():
    run_distributed(_dense_equivalence)


# --------------------------------------------------------------------------------------------
def _conservation_cases(rank: int, world: int, cases: list[tuple[dict, float, str, str]]) -> None:
    for case in cases:  # one process pair for several cases: spawning costs more than the checks
        _conservation(rank, world, *case)


def _conservation(rank: int, world: int, ddp_kwargs: dict, density: float, dtype_name: str, selector: str) -> None:
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = Net(unused=ddp_kwargs.get("find_unused_parameters", False), dtype=dtype)
    ddp = DDP(model, **ddp_kwargs)
    state = GaussKState(density=density, selector=selector).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    names = {p: n for n, p in model.named_parameters()}
    old = {n: torch.zeros(p.numel()) for n, p in model.named_parameters()}  # residuals before the step
    for step in range(5):
        ref = copy.deepcopy(model)  # same parameters, no DDP: its gradient is this rank's local gradient
        ref(batch(step, rank, dtype)).pow(2).mean().backward()
        local = {n: (p.grad.float().reshape(-1) if p.grad is not None else torch.zeros(p.numel())) for n, p in ref.named_parameters()}

        opt.zero_grad()
        state.capture_next_step()
        ddp(batch(step, rank, dtype)).pow(2).mean().backward()
        new = {n: r.clone() for n, r in state.residuals().items()}
        assert state.step == step + 1  # counted per synchronising backward, not per bucket

        all_caps = _gather({i: (c["u"], c["indices"], [names[p] for p in c["parameters"]]) for i, c in state.captured.items()})
        for index, cap in state.captured.items():
            u, idx, k = cap["u"], cap["indices"], cap["k"]
            params = [names[p] for p in cap["parameters"]]
            d = u.numel()
            assert k == math.ceil(density * d) and idx.numel() == k
            assert idx.unique().numel() == k and int(idx.min()) >= 0 and int(idx.max()) < d
            # u = gradient + old residual, bit for bit, parameter by parameter
            expect_u = torch.cat([local[n] + old[n] for n in params])
            assert torch.equal(u, expect_u)
            # new residual = u with the sent entries zeroed: sent + residual == u exactly
            assert_residual_is_u_minus_sent(u, idx, torch.cat([new[n] for n in params]))
            # what arrives: the mean over ranks of every rank's sent entries (duplicates add up)
            assert all(caps[index][2] == params for caps in all_caps)
            agg = decode_mean([caps[index][:2] for caps in all_caps], d, world)
            grad = torch.cat([p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()) for p in cap["parameters"]])
            assert torch.equal(grad, agg.to(dtype).float())
            assert int((grad != 0).sum()) <= world * k
        # every rank holds the same gradient
        grads = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
        for g in _gather(grads):
            assert torch.equal(g, grads)
        opt.step()
        old = new


DDP_MODES = [
    {},
    {"bucket_cap_mb": 0.002},  # many buckets, rebuilt after the first iteration
    {"static_graph": True, "bucket_cap_mb": 0.002},
    {"find_unused_parameters": True},  # a parameter without gradient
    {"gradient_as_bucket_view": True, "bucket_cap_mb": 0.002},
]


def test_sparse_sync_conserves_mass_and_agrees_across_ranks_in_every_ddp_mode():
    run_distributed(_conservation_cases, [(kw, 0.05, "float32", "gaussk") for kw in DDP_MODES])


def test_every_selector_conserves_mass():
    run_distributed(_conservation_cases, [({"bucket_cap_mb": 0.002}, 0.1, "float32", s) for s in ("topk", "dgc", "randk")])


def test_bf16_buckets_keep_fp32_residuals():
    run_distributed(_conservation_cases, [({}, 0.05, "bfloat16", "gaussk")])


# --------------------------------------------------------------------------------------------
def _nonfinite_cases(rank: int, world: int) -> None:
    _nonfinite(rank, world, 0.05)  # sparse path
    _nonfinite(rank, world, 1.0)  # dense_fallback path


def _nonfinite(rank: int, world: int, density: float, **options) -> None:
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    state = GaussKState(density=density, **options).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(6):
        before = {n: r.clone() for n, r in state.residuals().items()}
        opt.zero_grad()
        x = batch(step, rank)
        if step == 3 and rank == 1:
            x[0, 0] = float("nan")  # one rank, one step
        ddp(x).pow(2).mean().backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if step == 3:
            assert not finite  # every rank sees the bad step, as with plain DDP
            after = state.residuals()
            assert all(torch.equal(after[n], before[n]) for n in before)  # residuals untouched
            continue  # a GradScaler would skip this step
        assert finite
        assert all(bool(torch.isfinite(r).all()) for r in state.residuals().values())
        opt.step()
    assert state.telemetry["skipped_buckets"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nonfinite_gradient_on_one_rank_is_seen_everywhere_and_spares_residuals():
    run_distributed(_nonfinite_cases)


# --------------------------------------------------------------------------------------------
def _fused_vs_unfused(rank: int, world: int) -> None:
    import lightning_gaussk.selection.cpu as cpu
    import lightning_gaussk.selection.selectors as sel

    fused_scans = []
    scan = cpu._lane_absmax
    cpu._lane_absmax = lambda x, body, s, off, fuse=None: fused_scans.append(fuse is not None) or scan(x, body, s, off, fuse)
    register_selector("gaussk_unfused", sel.gaussk_selector)  # same selector, not fused with the add
    for density in (0.001, 0.01):  # 64- and 8-entry lanes
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(12, 600), nn.Tanh(), nn.Linear(600, 300), nn.Tanh(), nn.Linear(300, 3))
        models, states = [], []
        for selector in ("gaussk", "gaussk_unfused"):
            ddp = DDP(copy.deepcopy(base))
            states.append(GaussKState(density=density, selector=selector).bind(ddp))
            ddp.register_comm_hook(states[-1], gaussk_hook)
            models.append(ddp)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        fused_scans.clear()
        for step in range(5):
            x = batch(step, rank)
            if step == 2 and rank == 1:
                x[3, 4] = float("nan")  # a skipped step in the middle
            for m, opt in zip(models, opts):
                opt.zero_grad()
                m(x).pow(2).mean().backward()
                if step != 2:
                    opt.step()
        assert True in fused_scans and False in fused_scans  # both paths really ran
        for p, q in zip(*(m.parameters() for m in models)):
            assert torch.equal(p, q)
        ra, rb = (s.residuals() for s in states)
        assert all(torch.equal(ra[n], rb[n]) for n in ra)
        assert states[0].telemetry == {**states[1].telemetry, **{t: states[0].telemetry[t] for t in ("select_ns", "comm_ns", "hook_ns")}}
        assert states[0].telemetry["skipped_buckets"] > 0


def test_fused_accumulate_and_select_trains_bit_for_bit_like_add_then_select():
    run_distributed(_fused_vs_unfused)


# --------------------------------------------------------------------------------------------
def _grad_scaler_run(rank: int, scaled: bool, density: float) -> tuple[list[torch.Tensor], dict, list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 600), nn.Tanh(), nn.Linear(600, 300), nn.Tanh(), nn.Linear(300, 3))
    ddp = DDP(model, bucket_cap_mb=0.5)  # a large bucket (fused path) and a small one
    state = GaussKState(density=density).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    # grows the scale after every finite step, halves it after a non-finite one
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) if scaled else None
    scales = []
    for step in range(7):
        x = batch(step, rank)
        if step == 3 and rank == 1:
            x[0, 0] = float("nan")  # one rank, one step: every bucket skipped everywhere
        opt.zero_grad()
        loss = ddp(x).pow(2).mean()
        if scaler is None:
            loss.backward()
            if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
                opt.step()
        else:
            scales.append(scaler.get_scale())
            state.set_loss_scale(scales[-1])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if step == 3:
            assert state.telemetry["skipped_buckets"] == len(state.store)
    raw = {n: r.clone() for n, r in state.residuals().items()}  # in each bucket's loss scale
    saved = state.state_dict()
    state.load_state_dict(saved)  # unscaled on disk, back to each bucket's scale on load
    assert all(torch.equal(state.residuals()[n], raw[n]) for n in raw)
    return [p.detach().clone() for p in model.parameters()], saved["residuals"], scales


def _grad_scaler(rank: int, world: int) -> None:
    for density in (0.01, 0.3):  # the sparse path, and dense_fallback for the small bucket
        plain, plain_res, _ = _grad_scaler_run(rank, False, density)
        scaled, scaled_res, scales = _grad_scaler_run(rank, True, density)
        assert len(set(scales)) >= 4 and scales[4] == scales[3] / 2  # it grew, backed off, grew
        # powers of two scale exactly: a scaled run equals the unscaled one bit for bit
        for p, q in zip(plain, scaled):
            assert torch.equal(p, q)
        assert plain_res.keys() == scaled_res.keys()
        for n in plain_res:  # state_dict holds residuals unscaled
            assert torch.equal(plain_res[n], scaled_res[n])
        assert any(int(r.count_nonzero()) > 0 for r in scaled_res.values())


def test_grad_scaler_scale_changes_and_skipped_steps_leave_training_identical_to_unscaled():
    run_distributed(_grad_scaler)


# --------------------------------------------------------------------------------------------
def _state_roundtrip(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.002)
    state = GaussKState(density=0.05).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    for step in range(3):
        ddp(batch(step, rank)).pow(2).mean().backward()
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # tensors and plain values only
    assert sd["step"] == 3 and set(sd["residuals"]) == {n for n, _ in model.named_parameters()}
    # a fresh state on another layout (one bucket) gets the same residuals back, by name
    model2 = copy.deepcopy(model)
    ddp2 = DDP(model2)
    state2 = GaussKState(density=0.05).bind(ddp2)
    state2.load_state_dict(sd)
    ddp2.register_comm_hook(state2, gaussk_hook)
    state2.capture_next_step()
    ddp2(batch(9, rank)).pow(2).mean().backward()
    assert state2.step == 4
    cap = state2.captured[0]
    assert torch.equal(state2.state_dict()["residuals"]["a.weight"].numel() * torch.ones(1), torch.tensor([480.0]))
    # u = g + the residual loaded by name
    ref = copy.deepcopy(model)
    ref(batch(9, rank)).pow(2).mean().backward()
    names = {p: n for n, p in model2.named_parameters()}
    rp = dict(ref.named_parameters())
    expect = torch.cat([rp[names[p]].grad.reshape(-1) + sd["residuals"][names[p]] for p in cap["parameters"]])
    assert torch.equal(cap["u"], expect)


def test_state_dict_loads_weights_only_and_maps_residuals_by_name_across_layouts():
    run_distributed(_state_roundtrip)


def test_load_state_dict_rejects_foreign_dicts():
    state = GaussKState()
    with pytest.raises(ValueError, match="state_dict"):
        state.load_state_dict({"residuals": {}})


def test_dense_fallback_rule_is_a_pure_function_of_shapes_and_config():
    from lightning_gaussk.costs import model as costmodel

    from lightning_gaussk.costs.policy import dense_wins

    def dense(state, d, k, w):
        return state.exchange_for(d, k, w, "cpu", exchange="allgather").name == "dense"

    auto, never = GaussKState(density=0.01), GaussKState(density=0.01, dense_fallback="never")
    # all-gather of W (2k + 1) words vs ring allreduce of 2 d (W - 1) / W: sparse only if fewer bytes
    assert dense(auto, 100, 50, 2) and dense(auto, 100, 1, 128)
    assert not dense(auto, 100_000, 1000, 2)
    assert not dense(never, 100, 50, 2)
    linked = GaussKState(density=0.01, link_gbit=100.0)
    for d, k, w in [(10_000, 100, 2), (1_000_000, 1000, 8), (25_000_000, 25_000, 2)]:
        expect = dense_wins(d, k, w, costmodel.Link.from_gbit(100.0), costmodel.HostCosts.for_device("cpu"))
        assert dense(linked, d, k, w) == (expect or w * (2 * k + 1) >= 2 * d)
    with pytest.raises(ValueError, match="dense_fallback"):
        GaussKState(dense_fallback="sometimes")


# ============================================================================ configuration errors
# (kwargs, error type, fragments the message must contain: the argument, the value, what is allowed)
BAD_CONFIG = [
    ({"density": 0}, ValueError, ["`density`", "0", "(0, 1]"]),
    ({"density": -0.1}, ValueError, ["`density`", "-0.1", "(0, 1]"]),
    ({"density": 1.5}, ValueError, ["`density`", "1.5", "(0, 1]"]),
    ({"density": float("nan")}, ValueError, ["`density`", "nan", "(0, 1]"]),
    ({"density": float("inf")}, ValueError, ["`density`", "inf", "(0, 1]"]),
    ({"density": "0.01"}, TypeError, ["`density`", "'0.01'", "(0, 1]"]),
    ({"density": True}, TypeError, ["`density`", "True", "(0, 1]"]),
    ({"density": None}, TypeError, ["`density`", "None", "(0, 1]"]),
    ({"selector": "bogus"}, ValueError, ["'bogus'", "gaussk", "topk"]),
    ({"selector": None}, TypeError, ["`selector`", "None", "gaussk"]),
    ({"selector": 3}, TypeError, ["`selector`", "3", "gaussk"]),
    ({"error_feedback": 1}, TypeError, ["`error_feedback`", "1", "bool"]),
    ({"error_feedback": "yes"}, TypeError, ["`error_feedback`", "'yes'", "bool"]),
    ({"warmup_steps": -1}, ValueError, ["`warmup_steps`", "-1", ">= 0"]),
    ({"warmup_steps": 2.5}, ValueError, ["`warmup_steps`", "2.5", ">= 0"]),
    ({"warmup_steps": True}, ValueError, ["`warmup_steps`", "True", ">= 0"]),
    ({"warmup_steps": 10}, ValueError, ["`warmup_density`", "None", "`warmup_steps`"]),
    ({"warmup_steps": 10, "warmup_density": 0.0001}, ValueError, ["`warmup_density`", "0.0001", "[density, 1]"]),
    ({"warmup_steps": 10, "warmup_density": 1.5}, ValueError, ["`warmup_density`", "1.5", "[density, 1]"]),
    ({"warmup_steps": 10, "warmup_density": float("nan")}, ValueError, ["`warmup_density`", "nan", "[density, 1]"]),
    ({"warmup_steps": 10, "warmup_density": "0.5"}, TypeError, ["`warmup_density`", "'0.5'", "float"]),
    # a warm-up density without warm-up steps would be silently ignored: a schedule that makes no sense
    ({"warmup_density": 0.5}, ValueError, ["`warmup_density`", "0.5", "`warmup_steps`"]),
    ({"seed": 1.5}, TypeError, ["`seed`", "1.5", "int"]),
    ({"seed": True}, TypeError, ["`seed`", "True", "int"]),
]


def check_message(err: pytest.ExceptionInfo, fragments: list[str]) -> None:
    msg = str(err.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


@pytest.mark.parametrize(("kwargs", "error", "fragments"), BAD_CONFIG, ids=[repr(c[0]) for c in BAD_CONFIG])
def test_gaussk_state_rejects_bad_config_naming_argument_value_and_allowed_range(kwargs, error, fragments):
    with pytest.raises(error) as err:
        GaussKState(**kwargs)
    check_message(err, fragments)


# ============================================================================ DDP-mode matrix
class MatrixNet(nn.Module):
    """Three layers; optionally a branch used on some ranks and steps only, a layer never used,
    a frozen first layer, and a bf16 middle layer (DDP puts it in a bucket of its own)."""

    def __init__(self, unused: bool = False, frozen: bool = False, mixed: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(12, 40)
        self.b = nn.Linear(40, 30)
        self.c = nn.Linear(30, 3)
        self.branch = nn.Linear(40, 30) if unused else None
        self.never = nn.Linear(5, 5) if unused else None  # no gradient on any rank, ever
        if frozen:
            self.a.requires_grad_(False)
        if mixed:
            self.b.to(torch.bfloat16)

    def forward(self, x: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        z = self.b(h.to(self.b.weight.dtype)).float()
        if use_branch:
            z = z + self.branch(h)
        return self.c(torch.tanh(z))


def matrix_batch(step: int, micro: int, rank: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(10_007 * step + 101 * micro + rank))


def _matrix_loss(model: nn.Module, step: int, micro: int, rank: int, branchy: bool) -> torch.Tensor:
    return model(matrix_batch(step, micro, rank), use_branch=branchy and (step + micro + rank) % 2 == 0).pow(2).mean()


def _train_step(ddp: DDP, opt, step: int, rank: int, accumulate: int, branchy: bool) -> None:
    opt.zero_grad()
    for micro in range(accumulate):
        if micro < accumulate - 1:
            with ddp.no_sync():
                _matrix_loss(ddp, step, micro, rank, branchy).backward()
        else:
            _matrix_loss(ddp, step, micro, rank, branchy).backward()


def _matrix_case(rank: int, world: int, ddp_kwargs: dict, model_kwargs: dict, accumulate: int, steps: int = 4) -> None:
    branchy = model_kwargs.get("unused", False)
    torch.manual_seed(0)
    base = MatrixNet(**model_kwargs)
    names = {n for n, p in base.named_parameters() if p.requires_grad}
    models = {tag: copy.deepcopy(base) for tag in ("plain", "dense", "sparse")}
    ddps = {tag: DDP(m, **ddp_kwargs) for tag, m in models.items()}
    states = {tag: GaussKState(density=d, selector="topk").bind(ddps[tag]) for tag, d in (("dense", 1.0), ("sparse", 0.05))}
    for tag, state in states.items():
        ddps[tag].register_comm_hook(state, gaussk_hook)
    opts = {tag: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9) for tag, m in models.items()}

    sparse, state = models["sparse"], states["sparse"]
    pname = {p: n for n, p in sparse.named_parameters()}
    old = {n: torch.zeros(p.numel()) for n, p in sparse.named_parameters() if n in names}
    for step in range(steps):
        # this rank's own gradient of the sparse model (no DDP), micro-batches accumulated
        ref = copy.deepcopy(sparse)
        for micro in range(accumulate):
            _matrix_loss(ref, step, micro, rank, branchy).backward()
        local = {n: (p.grad.float().reshape(-1) if p.grad is not None else torch.zeros(p.numel())) for n, p in ref.named_parameters()}

        state.capture_next_step()
        for tag in ddps:
            _train_step(ddps[tag], opts[tag], step, rank, accumulate, branchy)
        new = {n: r.clone() for n, r in state.residuals().items()}
        assert set(new) == names  # frozen parameters have no residual, every trainable one has
        assert state.step == step + 1  # one compression per optimizer step, whatever the accumulation

        caps = {i: (c["u"], c["indices"], [pname[p] for p in c["parameters"]]) for i, c in state.captured.items()}
        all_caps = _gather(caps)
        seen = set()
        for index, (u, idx, params) in caps.items():
            seen.update(params)
            d, k = u.numel(), idx.numel()
            assert k == math.ceil(0.05 * d)
            torch.testing.assert_close(u, torch.cat([local[n] + old[n] for n in params]), rtol=1e-6, atol=1e-7)
            assert_residual_is_u_minus_sent(u, idx, torch.cat([new[n] for n in params]))  # nothing lost, nothing made up
            assert all(r_caps[index][2] == params for r_caps in all_caps)
            agg = decode_mean([r_caps[index][:2] for r_caps in all_caps], d, world)
            dtype = dict(sparse.named_parameters())[params[0]].dtype
            grad = torch.cat([p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()) for p in state.captured[index]["parameters"]])
            assert torch.equal(grad, agg.to(dtype).float())
        assert seen == names  # every trainable parameter went through the hook
        if model_kwargs.get("mixed"):  # the bf16 layer has a bucket of its own (decoded via fp32)
            dtypes = [{p.dtype for p in c["parameters"]} for c in state.captured.values()]
            assert {torch.bfloat16} in dtypes and {torch.float32} in dtypes, dtypes
        for n in ("never.weight", "never.bias"):
            if n in new:
                assert not new[n].any()
        for tag in ddps:
            opts[tag].step()
        old = new

    # density 1 is plain DDP, parameter for parameter
    for (n, p), q in zip(models["plain"].named_parameters(), models["dense"].parameters()):
        if p.dtype == torch.float32:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{ddp_kwargs} {model_kwargs} {n}: {m}")
        else:
            torch.testing.assert_close(q, p, msg=lambda m: f"{ddp_kwargs} {model_kwargs} {n}: {m}")
    # all ranks hold the same model
    flat = torch.cat([p.detach().float().reshape(-1) for m in models.values() for p in m.parameters()])
    for f in _gather(flat):
        assert torch.equal(f, flat)


MATRIX = [
    ({"find_unused_parameters": True}, {"unused": True}, 1),  # a branch on some ranks/steps, a layer never used
    ({"static_graph": True, "bucket_cap_mb": 0.001}, {}, 1),  # (no_sync under static_graph: DDP itself fails)
    ({"bucket_cap_mb": 0.001}, {}, 1),  # many buckets, rebuilt after the first step
    ({}, {}, 3),  # accumulation with no_sync
    ({"gradient_as_bucket_view": True, "bucket_cap_mb": 0.001}, {}, 2),
    ({}, {"frozen": True}, 1),
    ({}, {"mixed": True}, 1),  # a bf16 bucket next to fp32 ones
    ({"bucket_cap_mb": 0.001, "gradient_as_bucket_view": True}, {"mixed": True, "frozen": True}, 2),
]


def _matrix(rank: int, world: int) -> None:
    for case in MATRIX:
        _matrix_case(rank, world, *case)


def test_every_ddp_mode_equals_plain_ddp_at_density_one_and_conserves_mass_below_it():
    run_distributed(_matrix)


# ============================================================================ memory
def _state_bytes(state: GaussKState) -> tuple[int, int]:
    """(bytes of every tensor the state holds, the bound: per bucket 8 d + 4 (the loss scale)
    [+ 4 d for a non-fp32 bucket's decode buffer] + 4 (2k + 1)(1 + W))."""
    bound = 0
    world = dist.get_world_size()
    for slot in state.store.slots():
        d, msg = slot.size, slot.cache["msg"].numel()
        bound += 8 * d + 4 + (4 * d if "out" in slot.cache else 0) + 4 * msg * (1 + world)
    return state.store.nbytes(), bound


def _memory(rank: int, world: int) -> None:
    for ddp_kwargs, mixed in (({"bucket_cap_mb": 0.01}, False), ({"static_graph": True}, True)):
        torch.manual_seed(0)
        model = MatrixNet(mixed=mixed)
        ddp = DDP(model, **ddp_kwargs)
        state = GaussKState(density=0.05).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sizes = []
        for step in range(1000):
            opt.zero_grad()
            ddp(matrix_batch(step, 0, rank)).pow(2).mean().backward()
            opt.step()
            sizes.append(_state_bytes(state))
        numel = sum(p.numel() for p in model.parameters())
        total, bound = sizes[-1]
        # constant after the bucket rebuild (first steps), and within the bound
        assert all(s == sizes[3] for s in sizes[3:]), (ddp_kwargs, sizes[:6], sizes[-1])
        assert total <= bound, (total, bound)
        # the buckets held by the state cover every parameter exactly once: no stale buffers
        assert sum(slot.size for slot in state.store.slots()) == numel
        assert state.store.placed() == {n for n, _ in model.named_parameters()}
        assert not state.store.pending() and not state.captured


def test_hook_memory_is_bounded_and_constant_over_1000_steps():
    run_distributed(_memory)
