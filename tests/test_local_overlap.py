"""The overlapped and streaming outer step of sparse local SGD (``overlap_steps``, ``fragments``).

One spawned 4-process gloo run (module fixture ``runs``) feeds every test: per case, a reference
run of 15 AdamW steps watched after each inner step and after each outer-step hook, a run saved
while an exchange is in flight and resumed in fresh objects, and (one case) a non-finite
pseudo-gradient on rank 1. The splitting of a model into fragments and the option checks run in
one process.
"""

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from _dist import run_distributed
from lightning_gaussk.config import LocalSGDConfig
from lightning_gaussk.engine.local.fragment import split_fragments
from lightning_gaussk.engine.local.schedule import SyncSchedule
from lightning_gaussk.local_sgd import SparseLocalSGD

STEPS = 15
CASES = {
    "overlap": dict(sync_every=4, overlap_steps=2, density=0.1, chunk=64, ef_decay=0.9, hierarchy="flat"),
    "stream": dict(sync_every=6, fragments=3, density=0.1, chunk=64, ef_decay=0.9, hierarchy="flat"),
    "stream+overlap/2bit": dict(sync_every=4, fragments=2, overlap_steps=1, density=0.1, chunk=64, quantize=2, ef_decay=0.9, hierarchy="flat"),
    "node/stream+overlap": dict(sync_every=4, fragments=2, overlap_steps=2, density=0.1, chunk=64, hierarchy="node", ranks_per_node=2),
    "diloco/overlap": dict(sync_every=4, overlap_steps=2, outer="dense", outer_lr=0.7, hierarchy="flat"),
}  # fmt: skip
FLAT_SPARSE = ("overlap", "stream", "stream+overlap/2bit")


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 1))  # 3 modules


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int, rank: int) -> None:
    g = torch.Generator().manual_seed(7919 * i + 31 * rank + 1)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.3 * torch.sin(3 * x[:, 2:3])
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t.contiguous())
    return got


def _reference(rank: int, name: str, cfg: dict, poison_at: int | None = None) -> dict:
    """15 steps watched: after each inner step (``pre``) and after the outer-step hook (``post``)."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    log: list[dict] = []
    cur: dict = {}

    def pre(optimizer, args, kwargs):  # registered first: runs before the outer-step hook
        if poison_at is not None and local.inner_step + 1 == poison_at and rank == 1:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        cur.update(p_pre=flat(model), theta_pre=local.global_params(), e_pre=local.error_feedback())

    opt.register_step_post_hook(pre)
    local = SparseLocalSGD(model, opt, **cfg)

    def post(optimizer, args, kwargs):
        cur.update(p_post=flat(model), theta_post=local.global_params(), e_post=local.error_feedback(),
                   sent=local.last_sent(), in_flight=local.in_flight, position=local.window_position,
                   state=len(opt.state))  # fmt: skip
        log.append(dict(cur))

    opt.register_step_post_hook(post)
    identical = []
    for i in range(STEPS):
        train_step(model, opt, i, rank)
        identical.append(all(torch.equal(t, gathered(local.global_params())[0]) for t in gathered(local.global_params())))
    bounds = [0]
    for f in local.fragments:
        bounds.append(bounds[-1] + f.d)
    return {
        "log": log, "theta_identical": identical, "bounds": bounds, "params": flat(model),
        "theta": local.global_params(), "e": local.error_feedback(), "telemetry": dict(local.telemetry),
        "finite": bool(torch.isfinite(flat(model)).all()),
    }  # fmt: skip


def _resumed(rank: int, cfg: dict, save_at: int) -> dict:
    """``save_at`` steps, ``state_dict()`` with an exchange in flight, fresh objects, load, go on."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    first = SparseLocalSGD(model, opt, **cfg)
    for i in range(save_at):
        train_step(model, opt, i, rank)
    in_flight = first.in_flight
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    first.remove()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = net(seed=5)  # another start: everything must come from the checkpoint
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.02)
    local = SparseLocalSGD(model2, opt2, **cfg)
    local.load_state_dict(saved)
    for i in range(save_at, STEPS):
        train_step(model2, opt2, i, rank)
    return {"in_flight_at_save": in_flight, "saved_landings": len(saved["in_flight"]), "params": flat(model2),
            "theta": local.global_params(), "e": local.error_feedback()}  # fmt: skip


def _worker(rank: int, world: int, out: dict) -> None:
    mine: dict = {}
    for name, cfg in CASES.items():
        ref = _reference(rank, name, cfg)
        save_at = next(i + 1 for i, rec in enumerate(ref["log"]) if i + 1 >= 9 and (rec["in_flight"] or "overlap" not in name))
        mine[name] = {"ref": ref, "resumed": _resumed(rank, cfg, save_at), "save_at": save_at}
    mine["nonfinite"] = _reference(rank, "overlap", CASES["overlap"], poison_at=8)
    out[rank] = mine


@pytest.fixture(scope="module")
def runs():
    out = torch.multiprocessing.Manager().dict()
    run_distributed(_worker, out, world=4)
    return dict(out)


def _schedule(cfg: dict) -> tuple[SyncSchedule, int]:
    return SyncSchedule(cfg["sync_every"], cfg.get("fragments", 1)), cfg.get("overlap_steps", 0)


def _launches(cfg: dict) -> dict[int, int]:
    """fragment -> its launch steps' landings: {landing step: (fragment, launch step)}."""
    schedule, tau = _schedule(cfg)
    out = {}
    for t in range(1, STEPS + 1):
        for f in schedule.due(t):
            out.setdefault(t + tau, []).append((f, t))
    return out


# ------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rank_holds_the_same_theta_at_every_step(runs, name):
    for rank in range(4):
        assert all(runs[rank][name]["ref"]["theta_identical"]), (rank, runs[rank][name]["ref"]["theta_identical"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_update_lands_tau_steps_after_its_launch_as_theta_plus_the_ranks_own_progress(runs, name):
    cfg = CASES[name]
    landings = _launches(cfg)
    tau = cfg.get("overlap_steps", 0)
    for rank in range(4):
        ref = runs[rank][name]["ref"]
        log, b = ref["log"], ref["bounds"]
        landed = 0
        for t in range(1, STEPS + 1):
            rec = log[t - 1]
            landing = {f: launch for f, launch in landings.get(t, [])}
            for f in range(len(b) - 1):
                sl = slice(b[f], b[f + 1])
                if f in landing:
                    snap = log[landing[f] - 1]["p_pre"][sl]
                    expect = (rec["p_pre"][sl] - snap) + rec["theta_post"][sl] if tau else rec["theta_post"][sl]
                    assert torch.equal(rec["p_post"][sl], expect), (rank, t, f)
                    assert not torch.equal(rec["theta_post"][sl], rec["theta_pre"][sl]), (rank, t, f)  # theta moved
                    landed += 1
                else:  # nothing lands: the inner step's parameters and theta stay as they are
                    assert torch.equal(rec["p_post"][sl], rec["p_pre"][sl]), (rank, t, f)
                    assert torch.equal(rec["theta_post"][sl], rec["theta_pre"][sl]), (rank, t, f)
        assert landed >= 3, landed
        if tau:  # between launch and landing every rank trains on its own: the models differ from theta
            assert any(rec["in_flight"] for rec in log)


@pytest.mark.parametrize("name", FLAT_SPARSE)
def test_error_feedback_is_u_minus_what_was_sent_per_fragment(runs, name):
    cfg = CASES[name]
    beta = cfg["ef_decay"]
    for rank in range(4):
        log, b = runs[rank][name]["ref"]["log"], runs[rank][name]["ref"]["bounds"]
        checked = 0
        for t, pairs in _launches(cfg).items():
            if t > STEPS:
                continue
            for f, launch in pairs:
                sl = slice(b[f], b[f + 1])
                at = log[launch - 1]
                u = at["e_pre"][sl] * beta + (at["theta_pre"][sl] - at["p_pre"][sl])  # u = beta e + Delta, at the launch
                sent, e = log[t - 1]["sent"][sl], log[t - 1]["e_post"][sl]
                mask = sent != 0
                assert mask.any() and not mask.all()
                assert torch.equal(e[mask], u[mask] - sent[mask]), (rank, t, f)
                assert torch.equal(e[~mask], u[~mask]), (rank, t, f)
                checked += 1
        assert checked >= 3


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_resume_with_an_exchange_in_flight_ends_like_the_uninterrupted_run(runs, name):
    overlapped = "overlap" in name
    for rank in range(4):
        ref, res = runs[rank][name]["ref"], runs[rank][name]["resumed"]
        if overlapped:
            assert res["in_flight_at_save"] >= 1 and res["saved_landings"] == res["in_flight_at_save"]
        for part in ("params", "theta", "e"):
            assert torch.equal(ref[part], res[part]), (rank, part)


def test_a_non_finite_pseudo_gradient_still_skips_the_overlapped_step_everywhere(runs):
    # rank 1's parameters go NaN at the launch of step 8; the update lands (is skipped) at step 10
    for rank in range(4):
        r = runs[rank]["nonfinite"]
        log = r["log"]
        launch, land = log[7], log[9]
        assert r["telemetry"]["skipped_outer_steps"] == 1, rank
        assert torch.equal(land["theta_post"], land["theta_pre"]), rank  # theta kept
        assert torch.equal(land["e_post"], launch["e_pre"]), rank  # error feedback kept
        if rank == 1:  # its own Delta was non-finite: back on theta, its inner optimizer afresh
            assert torch.equal(land["p_post"], land["theta_post"]) and land["state"] == 0
        else:  # the others keep their progress since the launch, on the unchanged theta
            assert torch.equal(land["p_post"], (land["p_pre"] - launch["p_pre"]) + land["theta_post"])
            assert land["state"] > 0
        assert r["finite"] and all(r["theta_identical"]), rank  # training goes on, the same theta everywhere
        assert r["telemetry"]["outer_steps"] == 3


def test_overlap_hides_exchange_time_and_the_blocking_step_exposes_it(runs):
    overlapped, streaming = runs[0]["overlap"]["ref"]["telemetry"], runs[0]["stream"]["ref"]["telemetry"]
    assert overlapped["outer_hidden_ns"] > 0 and overlapped["outer_exposed_ns"] > 0
    assert streaming["outer_hidden_ns"] == 0 and streaming["outer_exposed_ns"] > 0


# ------------------------------------------------------------------------------ one process
def test_fragments_split_at_module_boundaries_balanced_by_size():
    m = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 100), nn.Linear(100, 3), nn.LayerNorm(3))
    named = list(m.named_parameters())
    sizes = lambda parts: [sum(p.numel() for _, p in g) for g in parts]  # noqa: E731
    assert [[n for n, _ in g] for g in split_fragments(named, 1)] == [[n for n, _ in named]]
    two = split_fragments(named, 2)
    assert sizes(two) == [1210, 309]  # the best cut at a module boundary: max 1210 (the 1100 module can't split)
    four = split_fragments(named, 4)
    assert [[n.split(".")[0] for n, _ in g] for g in four] == [["0", "0"], ["1", "1"], ["2", "2"], ["3", "3"]]
    for parts in (two, split_fragments(named, 3), four):  # contiguous, in model order, everything once
        assert [n for g in parts for n, _ in g] == [n for n, _ in named]
    with pytest.raises(ValueError, match="`fragments` must be an int in \\[1, 4\\]"):
        split_fragments(named, 5)


def test_a_fragment_syncs_at_its_offset_and_moves_about_a_fraction_of_the_model():
    model = net()
    local = SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=6, fragments=3)
    assert [f.index for f in local.fragments] == [0, 1, 2] and sum(f.d for f in local.fragments) == local.d
    assert [local.schedule.offset(f) for f in range(3)] == [0, 2, 4]
    assert max(f.d for f in local.fragments) < local.d  # each sync moves a part


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sync_every=4, overlap_steps=4), "`overlap_steps` must be < sync_every=4"),
        (dict(sync_every=4, fragments=5), "`fragments` must be <= sync_every=4"),
        (dict(overlap_steps=-1), "`overlap_steps` must be an int >= 0"),
        (dict(end_on_theta=1), "`end_on_theta` must be a bool"),
    ],
)
def test_overlap_and_fragment_options_are_checked_naming_them(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        LocalSGDConfig(**kwargs)
    model = net()
    with pytest.raises((TypeError, ValueError), match=match):
        SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_a_manual_outer_step_and_finish_end_on_theta_and_restart_the_window():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    local = SparseLocalSGD(model, opt, sync_every=4, overlap_steps=2, fragments=2)
    for i in range(5):
        train_step(model, opt, i, 0)
    assert local.window_position == 1 and not local.on_theta and local.in_flight == 1  # fragment 0 launched at 4
    local.outer_step()
    assert local.window_position == 0 and local.on_theta and local.in_flight == 0
    assert torch.equal(flat(model), local.global_params())
    for i in range(5, 7):
        train_step(model, opt, i, 0)
    assert local.window_position == 2 and not local.on_theta
    assert local.finish() and local.on_theta and torch.equal(flat(model), local.global_params())
    assert not local.finish()  # already on theta: nothing to do


def test_the_startup_line_says_how_the_outer_steps_stream_and_overlap(caplog):
    import logging

    model = net()
    with caplog.at_level(logging.INFO):
        SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=6, fragments=3, overlap_steps=2)
    line = next(r.getMessage() for r in caplog.records if "GaussK local SGD" in r.getMessage())
    assert "streaming: 3 fragments" in line and "runs behind 2 inner steps" in line, line
    model = net()
    with caplog.at_level(logging.INFO):
        caplog.clear()
        SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=6)
    line = next(r.getMessage() for r in caplog.records if "GaussK local SGD" in r.getMessage())
    assert "streaming" not in line and "overlapped" not in line
