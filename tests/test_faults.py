"""Faults and endings: a rank that dies or stalls mid-step, a rank SIGKILLed in a Lightning fit
and the resume from its last checkpoint, clean process exits, truncated checkpoint files.
See docs/reliability.md for what each test guarantees.

Raw-DDP cases spawn their own process pairs; the Lightning fits run tests/scripts/lightning_fit.py
from a plan (several fits per process pair, popen launcher). The long versions (50 fits per
launcher) are in benchmarks/soak.py."""

import json
import math
import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import free_port
from lightning_gaussk import GaussKDDPStrategy, GaussKState, gaussk_hook
from lightning_gaussk.checkpoint.files import make_manifest, read_shard, shard_dir, write_shard
from test_hook import MatrixNet, matrix_batch
from test_strategy import bound_strategy, good_state, records, run_plan


# ============================================================================ a rank that dies or stalls
def _fault_entry(rank: int, world: int, port: int, how: str, out: str, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    torch.manual_seed(0)
    model = MatrixNet()
    ddp = DDP(model)
    state = GaussKState(density=0.05).bind(ddp)
    state.fault = (how, 1, 3)  # (what, rank, step): read by _faulty_hook
    ddp.register_comm_hook(state, _faulty_hook)
    t0 = time.monotonic()
    try:
        for step in range(6):
            t0 = time.monotonic()
            ddp(matrix_batch(step, 0, rank)).pow(2).mean().backward()
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - what a user would see
        result = {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the peer is gone: skip the teardown of a broken process group


def _faulty_hook(state: GaussKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    how, rank, step = state.fault
    if dist.get_rank() == rank and state.step == step:  # mid-step: inside backward
        if how == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)  # "stall": alive but silent
    return gaussk_hook(state, bucket)


def test_a_rank_that_dies_or_stalls_mid_step_makes_the_other_fail_within_the_timeout(tmp_path):
    """Two process pairs at once: in one, rank 1 is SIGKILLed inside its hook at step 3; in the
    other it hangs there. Rank 0 must raise (peer gone / collective timed out), not train on."""
    timeout_s = 10
    ctx = mp.get_context("spawn")
    procs = {}
    for how in ("die", "stall"):
        (tmp_path / how).mkdir()
        port = free_port()
        procs[how] = [ctx.Process(target=_fault_entry, args=(r, 2, port, how, str(tmp_path / how), timeout_s)) for r in range(2)]
        for p in procs[how]:
            p.start()
    try:
        for how in procs:
            procs[how][0].join(240)  # a hang guard, not a timing assertion
            assert procs[how][0].exitcode is not None, f"{how}: rank 0 hung after its peer failed"
    finally:
        for p in procs["die"] + procs["stall"]:
            if p.is_alive():
                p.kill()
            p.join(30)
    for how in procs:
        result = json.loads((tmp_path / how / "rank0.json").read_text())
        assert result["error"], (how, result)  # before the fix: no error, stale gradients
        # gloo names the cause: the peer closed the connection, or the collective timed out
        assert re.search(r"closed|reset|timed out|timeout|peer", result["error"], re.I), (how, result)
    stall = json.loads((tmp_path / "stall" / "rank0.json").read_text())
    assert stall["seconds"] >= timeout_s * 0.9, stall  # it waited for the configured timeout, then failed
    assert procs["die"][1].exitcode == -signal.SIGKILL


# ============================================================================ clean exits (raw DDP)
def _short_run(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = MatrixNet()
    ddp = DDP(model, bucket_cap_mb=0.001)
    state = GaussKState(density=0.05).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(10):
        opt.zero_grad()
        ddp(matrix_batch(step, 0, rank)).pow(2).mean().backward()
        opt.step()
    if rank == 1:
        # torch's communication thread releases the last callback just after backward returns;
        # wait_idle waits for that (the atexit handler does the same for rank 0 below)
        assert state.wait_idle(timeout=30) and state._inflight == 0
    # then just return: no barrier, no destroy_process_group; the interpreter tears down with the
    # group alive (what the Lightning launchers do on CPU), the riskiest ordinary ending


def test_five_consecutive_spawned_runs_with_the_hook_exit_with_status_zero():
    for _ in range(5):
        # raises if any process exits with a non-zero status or a signal (SIGABRT at teardown)
        mp.start_processes(_short_run, args=(2, free_port()), nprocs=2, join=True, start_method="spawn")


def _drop_then_destroy(rank: int, world: int, folder: str) -> None:
    """20 times: a DDP over a subgroup with the hook, one backward, the model dropped and the
    group destroyed at once (no wait_idle): the subgroup's own communication thread may then hold
    the callback's last references to the group."""
    torch.set_num_threads(1)
    for i in range(20):
        dist.init_process_group("gloo", init_method=f"file://{folder}/store{i}", rank=rank, world_size=world)
        group = dist.new_group([0, 1])
        ddp = DDP(MatrixNet(), process_group=group, bucket_cap_mb=0.001)
        state = GaussKState(density=0.05, dense_fallback="never", hierarchy="flat", process_group=group).bind(ddp)
        ddp.register_comm_hook(state, gaussk_hook)
        ddp(matrix_batch(i, 0, rank)).pow(2).mean().backward()
        del ddp, state, group
        dist.destroy_process_group()


def test_destroying_the_group_right_after_backward_never_lets_a_communication_thread_join_itself(tmp_path):
    """Without the hand-over of released callbacks' owners (core.inflight), a run like this aborts
    with "Resource deadlock avoided" (the group destroyed on its own thread; seen in CI)."""
    mp.start_processes(_drop_then_destroy, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")


# ============================================================================ a rank SIGKILLed in a Lightning fit, then resume
@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A fit whose rank 1 SIGKILLs itself at step 10 (checkpoints every 4 steps), then one
    process pair (popen launcher, several fits): resume from the last checkpoint, the uninterrupted reference, a resume
    from a one-process checkpoint and a resume from a checkpoint without hook state."""
    cwd = tmp_path_factory.mktemp("kill")
    ckpts = cwd / "ckpts"
    t0 = time.monotonic()
    rc, killed_log = run_plan(
        cwd,
        [{"name": "killed", "density": 0.05, "max_steps": 14, "ckpt_every": 4, "ckpt_dir": str(ckpts)}],
        env={"FIT_KILL_STEP": "10", "FIT_KILL_RANK": "1"},
        expect_ok=False,
    )
    killed_s = time.monotonic() - t0
    found = {int(re.search(r"step=(\d+)", p.name).group(1)): p for p in ckpts.glob("*.ckpt")}
    last = found[max(found)]
    # the same run saved on one process (the policy's input), and without any hook state
    ckpt = torch.load(last, weights_only=True)
    rank0 = read_shard(shard_dir(last) / "rank0.pt", ckpt["gaussk"]["files"][0])["state"]
    rank0 = {k: v for k, v in rank0.items() if k != "layout"}  # as one flat process saved it
    entry = write_shard(rank0, shard_dir(cwd / "one_process.ckpt") / "rank0.pt", rank=0, world_size=1)
    one = dict(ckpt, gaussk=make_manifest([entry], world_size=1, dir_name="one_process.ckpt.gaussk"))
    torch.save(one, cwd / "one_process.ckpt")
    bare = {k: v for k, v in ckpt.items() if k != "gaussk"}
    torch.save(bare, cwd / "no_state.ckpt")
    _, log = run_plan(
        cwd,
        [
            {"name": "resumed", "density": 0.05, "max_steps": 14, "resume": str(last)},
            {"name": "straight", "density": 0.05, "max_steps": 14},
            {"name": "one_to_two", "density": 0.05, "max_steps": 12, "resume": str(cwd / "one_process.ckpt")},
            {"name": "no_state", "density": 0.05, "max_steps": 12, "resume": str(cwd / "no_state.ckpt")},
        ],
    )
    return {"rc": rc, "killed_log": killed_log, "killed_s": killed_s, "ckpts": found, "last": last, "cwd": cwd, "log": log}


def test_sigkilled_rank_then_resume_from_last_checkpoint_reproduces_the_uninterrupted_run(killed_and_resumed):
    k = killed_and_resumed
    assert k["rc"] != 0, k["killed_log"][-3000:]  # rank 0 failed too (peer gone), it did not hang
    assert not (k["cwd"] / "out" / "killed").exists()  # neither rank finished
    assert sorted(k["ckpts"]) == [4, 8]  # the kill at step 10 came after the step-8 checkpoint
    resumed, straight = records(k["cwd"], "resumed"), records(k["cwd"], "straight")
    assert len(resumed) == len(straight) == 2
    for a, b in zip(resumed, straight):
        assert a["global_step"] == b["global_step"] == 14
        for n in a["params"]:
            torch.testing.assert_close(a["params"][n], b["params"][n], rtol=1e-6, atol=1e-7)
        for n in b["state"]["residuals"]:
            torch.testing.assert_close(a["state"]["residuals"][n], b["state"]["residuals"][n], rtol=1e-6, atol=1e-7)
        assert a["state"]["step"] == b["state"]["step"] == 13
    # each rank got its own residuals back (they differ per rank)
    r0, r1 = (r["start_state"]["residuals"]["net.0.weight"] for r in resumed)
    assert not torch.equal(r0, r1)


def test_resume_from_one_process_to_two_warns_and_continues(killed_and_resumed):
    k = killed_and_resumed
    assert "world size 1 on world size 2" in k["log"]
    recs = records(k["cwd"], "one_to_two")
    saved = read_shard(shard_dir(k["cwd"] / "one_process.ckpt") / "rank0.pt")["state"]["residuals"]
    for rec in recs:
        assert rec["global_step"] == 12 and all(math.isfinite(v) for v in rec["losses"])
        # policy: every rank starts from the mean of the saved residuals (here: the only one)
        for n, r in saved.items():
            assert torch.equal(rec["start_state"]["residuals"][n], r)


def test_resume_without_hook_state_warns_and_starts_from_zero_residuals(killed_and_resumed):
    k = killed_and_resumed
    assert "has no `gaussk` hook state" in k["log"]
    for rec in records(k["cwd"], "no_state"):
        assert rec["global_step"] == 12
        assert not rec["start_state"]["residuals"]  # documented fallback: nothing restored, zeros
        assert rec["start_state"]["step"] == 0


def _plain_values_only(obj, path="ckpt"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), path
            _plain_values_only(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _plain_values_only(v, f"{path}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool)), f"{path}: {type(obj)}"


def test_model_checkpoints_load_with_weights_only_and_hold_every_ranks_fp32_residuals(killed_and_resumed):
    for path in killed_and_resumed["ckpts"].values():
        ckpt = torch.load(path, weights_only=True)
        _plain_values_only(ckpt["gaussk"])
        saved = ckpt["gaussk"]  # the manifest: no tensors; every rank's residuals are in its own shard
        assert saved["world_size"] == 2 and len(saved["files"]) == 2
        assert not any(isinstance(v, torch.Tensor) for v in saved.values())
        for entry in saved["files"]:
            shard = torch.load(shard_dir(path) / entry["name"], weights_only=True)  # loads with weights_only too
            _plain_values_only(shard)
            sd = read_shard(shard_dir(path) / entry["name"], entry)["state"]  # size and sha256 as in the manifest
            assert sd["residuals"] and all(r.dtype == torch.float32 and r.device.type == "cpu" for r in sd["residuals"].values())


# ============================================================================ truncated files
def test_truncated_checkpoint_file_fails_loudly(tmp_path):
    strategy, model = bound_strategy()
    torch.save({"state_dict": {}, "gaussk": {"world_size": 1, "per_rank": [good_state(model)]}}, tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - torch's own error; the point is that it is not silent
        GaussKDDPStrategy().load_checkpoint(tmp_path / "cut.ckpt")


_EXIT_SCRIPT = r"""
import atexit, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from lightning_gaussk import GaussKState, gaussk_hook
from lightning_gaussk.comm import inflight

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
atexit.register(lambda: print("initialized at the end:", dist.is_initialized(), flush=True))  # runs after ours (LIFO)
ddp = DDP(torch.nn.Linear(8, 4))
state = GaussKState(density=0.25, dense_fallback="never").bind(ddp)
ddp.register_comm_hook(state, gaussk_hook)
ddp(torch.randn(3, 8)).sum().backward()  # a callback of the hook in flight at exit, possibly
inflight.destroy_group_at_exit()
inflight.destroy_group_at_exit()  # once per process, however many integrations
print("exiting", flush=True)
"""


def test_the_process_group_is_destroyed_at_exit_after_the_hooks_callbacks_are_released():
    """The strategy's exit teardown runs while Python still runs: callbacks drained, then the gloo
    group destroyed in order (not left to finalization, where it can abort the process)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["exiting", "initialized at the end: False"], proc.stdout
