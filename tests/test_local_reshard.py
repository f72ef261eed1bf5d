"""Local SGD resumes on any layout: ``save_local_sgd`` / ``restore_local_sgd`` and the reshard policy.

One spawned 4-process gloo run: per case (sparse with an exchange in flight, DiLoCo) a flat
4-rank run saves in the middle of a window, then the save is restored on the same layout (it
must go on exactly like the run that saved), on 2 ranks (a subgroup) and on 2 nodes x 2 ranks;
and a 2-rank save (the subgroup) is restored on 4. Lightning: ``gaussk_local`` fits 2 -> 4 -> 2
processes (tests/scripts/local_relayout.py).
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from _dist import run_distributed
from lightning_gaussk.local_sgd import SparseLocalSGD, restore_local_sgd, save_local_sgd

HERE = Path(__file__).parent
STEPS, SAVE_AT = 15, 9
CASES = {
    "sparse/overlap+fragments": dict(sync_every=4, overlap_steps=2, fragments=2, density=0.1, chunk=64, ef_decay=0.9),
    "diloco": dict(sync_every=4, outer="dense", outer_lr=0.7),
}
TARGETS = {"same": dict(hierarchy="flat"), "2 ranks": dict(hierarchy="flat"), "2x2 nodes": dict(hierarchy="node", ranks_per_node=2)}


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 1))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int, rank: int) -> None:
    g = torch.Generator().manual_seed(7919 * i + 31 * rank + 1)
    x = torch.randn(16, 8, generator=g)
    nn.functional.mse_loss(model(x), x[:, :1] * 2 - x[:, 1:2]).backward()
    opt.step()
    opt.zero_grad()


def _gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, t.contiguous(), group=group)
    return got


def _worker(rank: int, world: int, folder: str, out: dict) -> None:
    pair = dist.new_group([0, 1])
    mine: dict = {}
    for name, cfg in CASES.items():
        path = f"{folder}/{name.replace('/', '_')}"
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        local = SparseLocalSGD(model, opt, hierarchy="flat", **cfg)
        for i in range(SAVE_AT):
            train_step(model, opt, i, rank)
        rec = {"in_flight": local.in_flight, "position": local.window_position}
        save_local_sgd(local, path)
        rec.update(theta=local.global_params(), e=torch.cat(_gather(local.error_feedback())),
                   momentum=local.state_dict(local=False).get("momentum"))  # fmt: skip
        for i in range(SAVE_AT, STEPS):
            train_step(model, opt, i, rank)
        rec["final"] = flat(model)
        local.remove()
        for target, extra in TARGETS.items():
            group = pair if target == "2 ranks" else None
            if group is not None and rank >= 2:
                continue
            model2 = net(seed=3)
            opt2 = torch.optim.AdamW(model2.parameters(), lr=0.02)
            fresh = SparseLocalSGD(model2, opt2, process_group=group, **{**cfg, **extra})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                found = restore_local_sgd(fresh, path)
            got = {
                "found": found, "warnings": [str(w.message) for w in caught], "theta": fresh.global_params(),
                "on_theta": torch.equal(flat(model2), fresh.global_params()), "position": fresh.window_position,
                "e_all": _gather(fresh.error_feedback(), group), "layout": fresh.layout.describe(),
                "momentum": fresh.state_dict(local=False).get("momentum"), "inner_step": fresh.inner_step,
            }  # fmt: skip
            for i in range(SAVE_AT, STEPS):
                train_step(model2, opt2, i, rank)
            got["final"] = flat(model2)
            got["theta_identical"] = all(torch.equal(t, fresh.global_params()) for t in _gather(fresh.global_params(), group))
            fresh.remove()
            rec[target] = got
        mine[name] = rec
    # 2 -> 4: the pair saves (flat, 2 ranks), the world of 4 restores
    path = f"{folder}/from2"
    cfg = CASES["sparse/overlap+fragments"]
    if rank < 2:
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        local = SparseLocalSGD(model, opt, hierarchy="flat", process_group=pair, **cfg)
        for i in range(SAVE_AT):
            train_step(model, opt, i, rank)
        save_local_sgd(local, path)
        mine["from2"] = {"e": torch.cat(_gather(local.error_feedback(), pair)), "theta": local.global_params()}
        local.remove()
    dist.barrier()
    model2 = net(seed=3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.02)
    fresh = SparseLocalSGD(model2, opt2, hierarchy="flat", **cfg)
    restore_local_sgd(fresh, path)
    mine["to4"] = {"e_all": _gather(fresh.error_feedback()), "theta": fresh.global_params(), "position": fresh.window_position}
    fresh.remove()
    out[rank] = mine


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = torch.multiprocessing.Manager().dict()
    run_distributed(_worker, str(tmp_path_factory.mktemp("local_reshard")), out, world=4)
    return dict(out)


def _owed(e_all: list[torch.Tensor], ranks_per_node: int | None, sizes: list[int]) -> torch.Tensor:
    """(1/W) sum_r e_r in model order, summed in rank order: flat buffers, or node mode's
    per-parameter chunks reassembled."""
    w = len(e_all)
    if ranks_per_node is None:
        total = e_all[0].clone()
        for e in e_all[1:]:
            total += e
        return total / w
    total = torch.zeros(sum(sizes))
    for node in range(w // ranks_per_node):
        offs, pos = [0] * ranks_per_node, 0
        for n in sizes:
            c = -(-n // ranks_per_node)
            for l in range(ranks_per_node):
                start, stop = min(l * c, n), min(l * c + c, n)
                total[pos + start : pos + stop] += e_all[node * ranks_per_node + l][offs[l] : offs[l] + stop - start]
                offs[l] += stop - start
            pos += n
    return total / w


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_layout_resumes_exactly_even_with_an_exchange_in_flight(runs, name):
    for rank in range(4):
        rec = runs[rank][name]
        got = rec["same"]
        assert got["found"] and torch.equal(got["final"], rec["final"]), rank
        assert not any("resuming a save" in w for w in got["warnings"])
    if name.startswith("sparse"):
        assert runs[0][name]["in_flight"] == 1


@pytest.mark.parametrize("target", ["2 ranks", "2x2 nodes"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_another_layout_keeps_theta_momentum_and_the_owed_update_and_restarts_from_theta(runs, name, target):
    sizes = [p.numel() for p in net().parameters()]
    saved = runs[0][name]
    e_saved = list(saved["e"].reshape(4, -1))
    ranks = range(2) if target == "2 ranks" else range(4)
    for rank in ranks:
        got = runs[rank][name][target]
        assert got["found"] and torch.equal(got["theta"], saved["theta"]), rank  # theta is global
        if saved["momentum"] is not None:  # DiLoCo's outer momentum is global too
            assert all(torch.equal(got["momentum"][k], saved["momentum"][k]) for k in saved["momentum"])
        assert got["on_theta"] and got["position"] == 0 and got["inner_step"] == SAVE_AT, rank  # a new window from theta
        assert got["theta_identical"] and torch.isfinite(got["final"]).all()  # and it trains on
    if name == "diloco":
        return
    # the error feedback still owes what the 4 saved ranks owed: (1/W') sum e' == (1/W) sum e
    owed = _owed(e_saved, None, sizes)
    got = runs[0][name][target]
    assert torch.equal(_owed(got["e_all"], 2 if target == "2x2 nodes" else None, sizes), owed)  # exactly
    assert owed.abs().sum() > 0
    warning = next(w for w in got["warnings"] if "resuming a save of flat, 4 ranks" in w)
    assert "partial window of 1 optimizer steps since the last outer step is lost" in warning, warning


def test_a_two_rank_save_resumes_on_four_with_the_owed_update_exactly(runs):
    sizes = [p.numel() for p in net().parameters()]
    saved = runs[0]["from2"]
    owed = _owed(list(saved["e"].reshape(2, -1)), None, sizes)
    for rank in range(4):
        got = runs[rank]["to4"]
        assert torch.equal(got["theta"], saved["theta"]) and got["position"] == 0
    assert torch.equal(_owed(runs[0]["to4"]["e_all"], None, sizes), owed) and owed.abs().sum() > 0


def _fit(out: Path, devices: int, max_steps: int, resume: Path | None = None) -> list[dict]:
    cmd = [sys.executable, str(HERE / "scripts" / "local_relayout.py"), "--out", str(out), "--devices", str(devices),
           "--max-steps", str(max_steps)] + (["--resume", str(resume)] if resume else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)], proc.stdout + proc.stderr


def test_lightning_gaussk_local_resumes_two_to_four_to_two_processes_keeping_the_owed_update(tmp_path):
    sizes = [p.numel() for p in torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).parameters()]
    # 2 processes, 4 steps (saved at step 4, one step into a window of 3)
    a, _ = _fit(tmp_path / "a", 2, 4)
    # 4 processes from it to step 8 (saved at step 8), then 2 again to step 12 (an outer step at 11)
    b, log_b = _fit(tmp_path / "b", 4, 8, tmp_path / "a" / "ckpt" / "step=4.ckpt")
    c, log_c = _fit(tmp_path / "c", 2, 12, tmp_path / "b" / "ckpt" / "step=8.ckpt")
    for before, after, log in ((a, b, log_b), (b, c, log_c)):
        owed = _owed([r["e_end"] for r in before], None, sizes)
        assert owed.abs().sum() > 0
        assert torch.equal(_owed([r["e_start"] for r in after], None, sizes), owed)  # the owed update, exactly
        for r in after:
            assert torch.equal(r["theta_start"], before[0]["theta_end"])  # theta as saved
            assert r["on_theta_start"] and r["position_start"] == 0 and r["start_step"] == before[0]["step_end"]
            assert r["agree_after_first_outer"]  # every rank holds the same model after the first outer step
        assert f"resuming a save of flat, {len(before)} ranks on flat, {len(after)} ranks" in log, log[-3000:]
