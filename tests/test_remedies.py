"""The optimizer remedies, mechanics on small tensors: momentum correction in the hook equals a
hand-written DGC reference (flat and node mode, 2 gloo ranks), conservation, skipped non-finite
steps, bit-exact resume of the velocity; Adam's frozen second moment stays frozen and resumes
exactly; the optimizer adaptations and their refusals; the Lightning strategy's adaptation."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from _invariants import assert_residual_is_u_minus_sent
from lightning_gaussk import GaussKState, gaussk_hook
from lightning_gaussk.frontends.remedies import describe, frozen_adam_step, wrap_optimizer

M = 0.9
D_IN, D_OUT = 6, 5  # one weight of 30 entries: one bucket, one parameter
K = 4  # density 4/30


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(3, D_IN, generator=torch.Generator().manual_seed(100 * step + rank))


def _local_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    clone = copy.deepcopy(model)
    clone(x).pow(2).sum().backward()
    return clone.weight.grad.reshape(-1).clone()


def _topk(u: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(u.abs(), k, sorted=False).indices


def _mc_vs_reference(rank: int, world: int, hierarchy: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(D_IN, D_OUT, bias=False)
    ddp = DDP(model)
    opts = {"ranks_per_node": 2} if hierarchy == "node" else {}
    state = GaussKState(density=K / 30 if hierarchy == "flat" else K / 15, selector="topk", dense_fallback="never",
                        momentum_correction=M, hierarchy=hierarchy, **opts).bind(ddp)  # fmt: skip
    ddp.register_comm_hook(state, gaussk_hook)
    d = 30
    chunk = slice(rank * 15, rank * 15 + 15) if hierarchy == "node" else slice(0, d)
    n = chunk.stop - chunk.start
    v = torch.zeros(n)
    r = torch.zeros(n)
    for step in range(6):
        x = _batch(rank, step)
        g_local = _local_grad(model, x)
        grads = [torch.empty(d) for _ in range(world)]
        dist.all_gather(grads, g_local)
        # the reference (DGC): per entry u = m u + g; v += u; send top-k of v; zero v and u where sent
        g = grads[rank] if hierarchy == "flat" else sum(grads)[chunk]  # node mode: the node-summed shard
        vel = M * v + g
        u = vel + r
        idx = _topk(u, K)
        us = [torch.empty(n) for _ in range(world)]
        dist.all_gather(us, u)
        ids = [torch.empty(K, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(ids, idx)
        expected = torch.zeros(d)
        for q in range(world):
            seg = slice(q * 15, q * 15 + 15) if hierarchy == "node" else slice(0, d)
            expected[seg].index_add_(0, ids[q], us[q][ids[q]], alpha=1.0 / world)
        r = u.clone().index_fill_(0, idx, 0.0)
        v = vel.clone().index_fill_(0, idx, 0.0)

        model.zero_grad()
        ddp(x).pow(2).sum().backward()
        torch.testing.assert_close(model.weight.grad.reshape(-1), expected, rtol=1e-6, atol=1e-7)
        (res,) = state.residuals().values()
        (velocity,) = state.velocities().values()
        torch.testing.assert_close(res, r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(velocity, v, rtol=1e-6, atol=1e-7)
        assert_residual_is_u_minus_sent(u, idx, r)  # conservation: sent + kept == u
        assert int(velocity[idx].count_nonzero()) == 0  # factor masking


@pytest.mark.parametrize("hierarchy", ["flat", "node"])
def test_momentum_correction_equals_a_hand_written_dgc_reference(hierarchy):
    run_distributed(_mc_vs_reference, hierarchy)


def _skip_and_resume(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Linear(D_IN, D_OUT, bias=False)
    start = copy.deepcopy(model.state_dict())
    ddp = DDP(model)
    state = GaussKState(density=0.2, selector="topk", dense_fallback="never", momentum_correction=M).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)

    def step(ddp: DDP, x: torch.Tensor) -> torch.Tensor:
        ddp.module.zero_grad()
        ddp(x).pow(2).sum().backward()
        return ddp.module.weight.grad.clone()

    for s in range(3):
        step(ddp, _batch(rank, s))
    before = {k: t.clone() for k, t in state.residuals().items()}, {k: t.clone() for k, t in state.velocities().items()}
    bad = _batch(rank, 3)
    if rank == 1:
        bad[0, 0] = float("nan")
    out = step(ddp, bad)
    assert not torch.isfinite(out).all()  # every rank sees the bad step
    for saved, now in zip(before, (state.residuals(), state.velocities())):
        for name in saved:
            assert torch.equal(saved[name], now[name])  # skipped: velocity and residual untouched
    assert state.telemetry["skipped_buckets"] == 1

    sd = state.state_dict()
    assert set(sd["velocity"]) == set(sd["residuals"]) == {"weight"}
    later = [step(ddp, _batch(rank, s)) for s in (4, 5, 6)]

    model2 = nn.Linear(D_IN, D_OUT, bias=False)
    model2.load_state_dict(start)
    ddp2 = DDP(model2)
    state2 = GaussKState(density=0.2, selector="topk", dense_fallback="never", momentum_correction=M).bind(ddp2)
    state2.load_state_dict(sd)  # before the first step: placed when the bucket first runs
    ddp2.register_comm_hook(state2, gaussk_hook)
    again = [step(ddp2, _batch(rank, s)) for s in (4, 5, 6)]
    for a, b in zip(later, again):
        assert torch.equal(a, b)  # resume is bit-exact
    assert torch.equal(state.velocities()["weight"], state2.velocities()["weight"])


def test_skipped_nonfinite_step_keeps_velocity_and_resume_is_bit_exact():
    run_distributed(_skip_and_resume)


def _scaled_velocity(rank: int, world: int) -> None:
    """A loss scale S: velocity is kept in S units and saved unscaled; u follows the new scale."""
    torch.manual_seed(0)
    model = nn.Linear(D_IN, D_OUT, bias=False)
    ref = copy.deepcopy(model)
    ddp, ddp_ref = DDP(model), DDP(ref)
    kw = {"density": 0.2, "selector": "topk", "dense_fallback": "never", "momentum_correction": M}
    state, state_ref = GaussKState(**kw).bind(ddp), GaussKState(**kw).bind(ddp_ref)
    ddp.register_comm_hook(state, gaussk_hook)
    ddp_ref.register_comm_hook(state_ref, gaussk_hook)
    for s, scale in enumerate([8.0, 8.0, 2.0, 32.0]):
        x = _batch(rank, s)
        state.set_loss_scale(scale)
        model.zero_grad()
        (ddp(x).pow(2).sum() * scale).backward()
        ref.zero_grad()
        ddp_ref(x).pow(2).sum().backward()
        torch.testing.assert_close(model.weight.grad / scale, ref.weight.grad)  # powers of two: exact up to rounding
    torch.testing.assert_close(state.state_dict()["velocity"]["weight"], state_ref.state_dict()["velocity"]["weight"])


def test_velocity_follows_the_loss_scale():
    run_distributed(_scaled_velocity)


# ------------------------------------------------------------------------------------ Adam
def _adam(cls: type, freeze: int, **kw: object) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = cls(model.parameters(), lr=0.01, weight_decay=0.1, **kw)
    wrap_optimizer(opt, GaussKState(density=0.01, adam_remedy="freeze", variance_freeze_steps=freeze), log=False)
    return model, opt


def _adam_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    opt.zero_grad()
    model(torch.randn(5, 4, generator=torch.Generator().manual_seed(i))).pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_frozen_variance_stays_frozen_and_the_update_is_adams_with_it(cls):
    model, opt = _adam(cls, freeze=3)
    assert "frozen from step 3" in describe(opt)
    torch.manual_seed(0)
    plain_model = nn.Linear(4, 3)
    plain = cls(plain_model.parameters(), lr=0.01, weight_decay=0.1)
    for i in range(3):  # before the freeze: torch's own Adam, bit for bit
        _adam_step(model, opt, i)
        _adam_step(plain_model, plain, i)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))
    frozen = {p: opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()}
    for i in range(3, 7):
        params = [p.detach().clone() for p in model.parameters()]
        exp_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
        _adam_step(model, opt, i)
        for p, p0, m0 in zip(model.parameters(), params, exp_avg):
            st = opt.state[p]
            assert torch.equal(st["exp_avg_sq"], frozen[p])  # frozen
            t = int(st["step"])
            assert t == i + 1
            g = p.grad if cls is torch.optim.AdamW else p.grad + 0.1 * p0
            base = p0 * (1 - 0.01 * 0.1) if cls is torch.optim.AdamW else p0
            m = m0.lerp(g, 0.1)
            expected = base - 0.01 / (1 - 0.9**t) * m / (frozen[p].sqrt() / (1 - 0.999**3) ** 0.5 + 1e-8)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8)


def test_frozen_adam_resumes_bit_exactly_from_its_state_dict():
    model, opt = _adam(torch.optim.AdamW, freeze=2)
    for i in range(4):
        _adam_step(model, opt, i)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for i in range(4, 7):
        _adam_step(model, opt, i)
    model2, opt2 = _adam(torch.optim.AdamW, freeze=2)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for i in range(4, 7):
        _adam_step(model2, opt2, i)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"]) for p, q in zip(model.parameters(), model2.parameters()))


def test_frozen_step_of_a_parameter_that_started_late_still_learns_its_variance():
    model, opt = _adam(torch.optim.Adam, freeze=1)
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = None
    opt.step()
    opt.step()  # weight frozen from here; bias never had a gradient
    model.bias.grad = torch.ones_like(model.bias)
    frozen_adam_step(opt, 1)
    assert opt.state[model.bias]["exp_avg_sq"].abs().sum() > 0 and int(opt.state[model.bias]["step"]) == 1


def test_amsgrad_remedy_sets_amsgrad_and_survives_a_state_dict_load():
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    _adam_step(model, opt, 0)
    sd = copy.deepcopy(opt.state_dict())
    wrap_optimizer(opt, GaussKState(density=0.01, adam_remedy="amsgrad"), log=False)
    assert all(g["amsgrad"] for g in opt.param_groups) and "AMSGrad" in describe(opt)
    opt.load_state_dict(sd)  # saved without amsgrad
    assert all(g["amsgrad"] for g in opt.param_groups)
    _adam_step(model, opt, 1)
    assert all("max_exp_avg_sq" in opt.state[p] for p in model.parameters())


# ------------------------------------------------------------------------------------ SGD and the rest
def test_sgd_momentum_moves_into_the_hook_once_and_stays_out_of_the_optimizer():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _adam_step(model, opt, 0)  # a momentum buffer exists
    sd = copy.deepcopy(opt.state_dict())
    state = GaussKState(density=0.01, remedies="all")
    assert wrap_optimizer(opt, state, log=False) is opt
    assert state.config.momentum_correction == 0.9
    assert all(g["momentum"] == 0.0 for g in opt.param_groups)
    assert all("momentum_buffer" not in s for s in opt.state.values())
    wrap_optimizer(opt, state, log=False)  # idempotent
    assert state.config.momentum_correction == 0.9
    opt.load_state_dict(sd)  # a state dict saved before the adaptation brings momentum 0.9 back: kept at 0
    assert all(g["momentum"] == 0.0 for g in opt.param_groups)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: torch.optim.SGD([{"params": ps[:1], "momentum": 0.9}, {"params": ps[1:], "momentum": 0.5}], lr=0.1), "different momenta"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
    ],
)
def test_sgd_adaptations_that_cannot_apply_are_refused_clearly(make, match):
    opt = make(list(nn.Linear(4, 3).parameters()))
    with pytest.raises(ValueError, match=match):
        wrap_optimizer(opt, GaussKState(density=0.01, remedies="all"), log=False)


def test_momentum_in_the_hook_and_in_the_optimizer_is_refused():
    opt = torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="applied twice"):
        wrap_optimizer(opt, GaussKState(density=0.01, momentum_correction=0.9), log=False)


def test_remedies_none_changes_nothing_and_unknown_adaptive_optimizers_are_warned_about():
    opt = torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9)
    state = GaussKState(density=0.001, remedies="none")
    wrap_optimizer(opt, state, log=False)
    assert opt.param_groups[0]["momentum"] == 0.9 and state.config.momentum_correction is None
    opt = torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9)
    state = GaussKState(density=0.001)  # "auto": SGD stays as it is (measured mixed)
    wrap_optimizer(opt, state, log=False)
    assert opt.param_groups[0]["momentum"] == 0.9 and state.config.momentum_correction is None
    with pytest.warns(UserWarning, match="adaptive optimizer"):
        wrap_optimizer(torch.optim.RMSprop(nn.Linear(4, 3).parameters()), GaussKState(density=0.001), log=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap_optimizer(torch.optim.RMSprop(nn.Linear(4, 3).parameters()), GaussKState(density=0.05), log=False)


def test_lightning_strategy_adapts_sgd_momentum_and_logs_it(caplog):
    import os

    import lightning as L

    from lightning_gaussk import GaussKDDPStrategy

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    strategy = GaussKDDPStrategy(density=0.5, remedies="all", process_group_backend="gloo")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    environ = dict(os.environ)
    try:
        with caplog.at_level("INFO"):
            trainer.fit(Module(), data)
    finally:
        # an in-process DDP fit leaves a process group and MASTER_ADDR/PORT, NODE_RANK, LOCAL_RANK and
        # OMP_NUM_THREADS in this process: the launchers of later tests would inherit them (a taken
        # port; LOCAL_RANK makes Lightning's popen launcher believe it is a child and wait forever)
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert strategy.gaussk_state.config.momentum_correction == 0.9
    assert strategy.gaussk_config.momentum_correction == 0.9
    assert trainer.optimizers[0].param_groups[0]["momentum"] == 0.0
    assert "momentum correction in the hook (m=0.9)" in describe(trainer.optimizers[0])


def test_adam_runs_unchanged_by_default():
    # measured (docs/convergence.md, 1600 steps): plain error feedback beats the frozen second moment
    state = GaussKState(density=0.01)
    opt = torch.optim.AdamW(nn.Linear(4, 3).parameters())
    wrap_optimizer(opt, state, log=False)
    assert state.config == GaussKState(density=0.01).config  # no warm-up added, nothing moved
    assert "none" in describe(opt) and not any(g.get("amsgrad") for g in opt.param_groups)


def test_adam_freeze_without_settings_adds_a_dense_warm_up_and_explicit_settings_are_kept():
    state = GaussKState(density=0.01, adam_remedy="freeze")
    opt = torch.optim.AdamW(nn.Linear(4, 3).parameters())
    wrap_optimizer(opt, state, log=False)
    assert (state.config.warmup_steps, state.config.warmup_density) == (100, 1.0)
    assert "warm-up from 1.0 over 100 steps" in describe(opt)
    state = GaussKState(density=0.01, adam_remedy="freeze", variance_freeze_steps=50)
    wrap_optimizer(torch.optim.Adam(nn.Linear(4, 3).parameters()), state, log=False)
    assert state.config.warmup_steps == 0
    state = GaussKState(density=0.01, adam_remedy="freeze", warmup_steps=30, warmup_density=0.5)
    opt = wrap_optimizer(torch.optim.Adam(nn.Linear(4, 3).parameters()), state, log=False)
    assert (state.config.warmup_steps, state.config.warmup_density) == (30, 0.5) and "from step 30" in describe(opt)
