"""SparseLocalSGD under a torchft Manager (``manager=``), on CPU with gloo (issue 28 point 3).

One run (module fixture ``runs``) of four replica groups, each one process forked from this one
with its own ``TCPStore`` and ``torchft.Manager(pg=torchft.ProcessGroupGloo(...),
use_async_quorum=False)``, around two in-process lighthouses:

- "sparse" (lighthouse ``min_replicas=1``): group A trains alone, group B (another init) joins
  late and heals from A; A's vote is then made to fail once (``manager.report_error`` before
  ``should_commit``), and A heals from B at the next quorum;
- "dense" (DiLoCo, ``min_replicas=2``): C and D start together from different inits (torchft's
  ``init_sync`` heals one of them at the first outer step); C's vote fails once.

Each group records, per outer step, its state before and after the quorum, at the vote and after
the step (``theta``, the error feedback, the outer momentum, the model, the steps); the tests
compare the records across groups.

A second run (module fixture ``killed``): three replica groups with the default options (2-bit
values), each a process running tests/scripts/ft_replica.py (forked from a forkserver that has
the imports done); one is SIGKILLed mid-window and a new process with its replica id started once
the survivors have gone on without it; the parent fixes the end step once it has rejoined.

The quantised exchange is also checked without processes, against QuantAllGather, on a fake
process group.
"""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import sys
import time
import traceback
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from _dist import free_port

pytest.importorskip("torchft")

from lightning_gaussk.comm import codec, quant  # noqa: E402
from lightning_gaussk.engine.local.ft import ManagerQuantAllGather  # noqa: E402
from lightning_gaussk.local_sgd import SparseLocalSGD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))  # ft_replica, one replica group of the kill test
D_IN = 8
H = 2  # sync_every
LR_OUT, EF, MU = 0.8, 0.9, 0.9
END = {"sparse": 9, "dense": 6}  # manager steps each run trains to


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, 1))  # 161 parameters


def batch(i: int, who: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * i + 31 * who + 1)
    x = torch.randn(32, D_IN, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.3 * torch.sin(3 * x[:, 2:3])


def eval_loss(model: nn.Module) -> float:
    x, y = batch(10_000, 99)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


# ------------------------------------------------------------------------------ one replica group
def _replica(conn, name: str, run: str, seed: int, events: dict) -> None:
    """One replica group (a forked process): trains under its own Manager, sends its records."""
    try:
        torch.set_num_threads(1)
        addr = conn.recv()  # the lighthouse, started after the fork
        buf = io.BytesIO()
        torch.save(_train(addr, name, run, seed, events), buf)  # bytes: no tensor shared through fds
        conn.send_bytes(buf.getvalue())
        conn.close()
        code = 0
    except BaseException:
        buf = io.BytesIO()
        torch.save({"error": f"{name}: {traceback.format_exc()}"}, buf)
        conn.send_bytes(buf.getvalue())
        code = 1
    os._exit(code)  # no slow interpreter teardown (torchft's servers and threads)


def _train(addr: str, name: str, run: str, seed: int, events: dict) -> dict:
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    if name == "B":  # joins late: no heartbeat before A has trained alone
        assert events["a_alone"].wait(60), "A never trained alone"
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=30)), load_state_dict=None, state_dict=None, min_replica_size=1,
        use_async_quorum=False, lighthouse_addr=addr, store_addr="localhost", store_port=store.port, rank=0,
        world_size=1, replica_id=f"{run}_{name}", timeout=timedelta(seconds=30), quorum_timeout=timedelta(seconds=60),
        connect_timeout=timedelta(seconds=30),
    )  # fmt: skip
    model = net(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if run == "sparse":
        local = SparseLocalSGD(model, opt, sync_every=H, density=0.05, outer_lr=LR_OUT, ef_decay=EF, manager=manager)
    else:
        local = SparseLocalSGD(model, opt, sync_every=H, outer="dense", outer_lr=LR_OUT, outer_momentum=MU, manager=manager)

    def snap() -> dict:
        f = local.fragments[0]
        return {
            "theta": local.global_params().clone(),
            "e": local.error_feedback(),
            "m": f.outer.state_dict()["momentum"].clone() if local.config.outer == "dense" else None,
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone(),
            "step": manager.current_step(),
            "inner_step": local.inner_step,
            "window_start": local.window_start,
        }

    rec: list[dict] = []
    messages: list[tuple[int, int]] = []  # (words of this group's message, rows gathered) per all-gather
    joint = [0]
    start_quorum, should_commit, allgather = manager.start_quorum, manager.should_commit, manager._pg.allgather

    def spy_start_quorum(*args, **kwargs):
        if name == "B" and not rec:
            events["b_asks"].set()  # B's first quorum request is on its way
        before = snap()
        heals = local.ft.heals
        start_quorum(*args, **kwargs)
        rec.append({"before_quorum": before, "after_quorum": snap(), "healed": local.ft.heals > heals,
                    "participants": manager.num_participants()})  # fmt: skip

    def spy_should_commit(*args, **kwargs):
        cur = rec[-1]
        cur["at_vote"] = snap()
        joint[0] += cur["participants"] == 2
        if name in ("A", "C") and joint[0] == 3 and not cur.get("injected") and not any(r.get("injected") for r in rec):
            manager.report_error(RuntimeError("injected failure"))  # this group's vote says no
            cur["injected"] = True
        cur["committed"] = should_commit(*args, **kwargs)
        return cur["committed"]

    def spy_allgather(outputs, inputs, opts):
        messages.append((inputs[0].numel(), len(outputs[0])))
        return allgather(outputs, inputs, opts)

    manager.start_quorum, manager.should_commit, manager._pg.allgather = spy_start_quorum, spy_should_commit, spy_allgather
    loss0, i, who = eval_loss(model), 0, ord(name)
    while manager.current_step() < END[run]:
        if name == "A" and manager.current_step() == 2 and not events["a_alone"].is_set():
            events["a_alone"].set()  # A has committed two outer steps alone: B may start
            assert events["b_asks"].wait(60), "B never asked for a quorum"
            time.sleep(1.0)  # B's request reaches the lighthouse first: A's next quorum takes B in
        quorums = local.ft.quorums
        x, y = batch(i, who)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        i += 1
        if local.ft.quorums != quorums:
            rec[-1]["after"] = snap()
            rec[-1]["sent"] = local.last_sent()
    out = {
        "rec": rec, "messages": messages, "k": local.k, "d": local.d, "telemetry": dict(local.telemetry),
        "ft": {key: getattr(local.ft, key) for key in ("quorums", "heals", "uncommitted", "participants")},
        "loss": (loss0, eval_loss(model)), "on_theta": bool(torch.equal(snap()["params"], local.global_params())),
    }  # fmt: skip
    manager.shutdown(wait=False)
    return out


def _group_rank(conn, name: str, rank: int, port: int, seed: int, events: dict) -> None:
    """Rank ``rank`` of a replica group of two ranks (a forked process): gloo inside the group, a
    torchft Manager per rank; sends its records."""
    try:
        torch.set_num_threads(1)
        addr = conn.recv()
        buf = io.BytesIO()
        torch.save(_train_ranks(addr, name, rank, port, seed), buf)
        conn.send_bytes(buf.getvalue())
        conn.close()
        code = 0
    except BaseException:
        buf = io.BytesIO()
        torch.save({"error": f"{name}{rank}: {traceback.format_exc()}"}, buf)
        conn.send_bytes(buf.getvalue())
        code = 1
    os._exit(code)


def _train_ranks(addr: str, name: str, rank: int, port: int, seed: int) -> dict:
    import torch.distributed as dist
    from torch.distributed import PrefixStore, TCPStore
    from torchft import Manager, ProcessGroupGloo

    store = TCPStore("localhost", port, world_size=2, is_master=rank == 0, wait_for_workers=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=PrefixStore("group", store), rank=rank, world_size=2)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=30)), load_state_dict=None, state_dict=None, min_replica_size=1,
        use_async_quorum=False, lighthouse_addr=addr, store_addr="localhost", store_port=port, rank=rank,
        world_size=2, replica_id=f"node_{name}", timeout=timedelta(seconds=30), quorum_timeout=timedelta(seconds=60),
        connect_timeout=timedelta(seconds=30),
    )  # fmt: skip
    model = net(seed + rank)  # the group starts from its rank 0's model (a broadcast inside the group)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # every entry of the shard sent, nothing kept: the update is exactly the mean over the 2 x 2 ranks
    local = SparseLocalSGD(model, opt, sync_every=H, density=1.0, outer_lr=1.0, ef_decay=0.0, quantize=None, manager=manager)
    rec, messages = [], []
    start_quorum, should_commit, allgather = manager.start_quorum, manager.should_commit, manager._pg.allgather
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def spy_start_quorum(*args, **kwargs):
        before = local.global_params()
        start_quorum(*args, **kwargs)
        rec.append({"participants": manager.num_participants(), "before": before})

    def spy_should_commit(*args, **kwargs):
        rec[-1].update(theta=local.global_params(), params=flat(), step=manager.current_step())
        rec[-1]["committed"] = should_commit(*args, **kwargs)
        return rec[-1]["committed"]

    def spy_allgather(outputs, inputs, opts):
        messages.append((inputs[0].numel(), len(outputs[0])))
        return allgather(outputs, inputs, opts)

    manager.start_quorum, manager.should_commit, manager._pg.allgather = spy_start_quorum, spy_should_commit, spy_allgather
    i = 0
    while manager.current_step() < 3:
        quorums, heals = local.ft.quorums, local.ft.heals
        x, y = batch(i, 100 + 10 * seed + rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        i += 1
        if local.ft.quorums != quorums:  # healed: this rank, or another rank of its group (the group heals as a whole)
            rec[-1].update(after=local.global_params(), healed=local.ft.heals > heals)
    out = {"rec": rec, "messages": messages, "shard": local.fragments[0].sizes.m, "d": local.d, "layout": local.layout.describe()}
    manager.shutdown(wait=False)
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def runs():
    from torchft.coordination import LighthouseServer

    ctx = mp.get_context("fork")  # no re-import of torch per group; forked before any torchft server exists
    events = {"a_alone": ctx.Event(), "b_asks": ctx.Event()}
    groups = {"A": ("sparse", 0), "B": ("sparse", 1), "C": ("dense", 2), "D": ("dense", 3)}
    procs, conns = {}, {}
    for name, (run, seed) in groups.items():
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=_replica, args=(child, name, run, seed, events), daemon=True)
        procs[name].start()
        conns[name] = parent
    ports = {"E": free_port(), "F": free_port()}
    for name, seed in (("E", 4), ("F", 6)):  # two replica groups of two ranks each
        for rank in (0, 1):
            parent, child = ctx.Pipe()
            key = f"{name}{rank}"
            groups[key] = ("node", seed)
            procs[key] = ctx.Process(target=_group_rank, args=(child, name, rank, ports[name], seed, events), daemon=True)
            procs[key].start()
            conns[key] = parent
    lighthouses = {
        "sparse": LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=100),
        "dense": LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=100),
        "node": LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=100),
    }
    out: dict[str, dict] = {}
    try:
        for name, (run, _) in groups.items():
            conns[name].send(lighthouses[run].address())
        deadline = time.monotonic() + 240
        for name in groups:
            if not conns[name].poll(max(1.0, deadline - time.monotonic())):
                raise AssertionError(f"replica group {name} did not finish in time")
            out[name] = torch.load(io.BytesIO(conns[name].recv_bytes()), weights_only=False)
            assert "error" not in out[name], out[name]["error"]
    finally:
        for p in procs.values():
            p.join(5)
            if p.is_alive():
                p.kill()  # only the processes this fixture started
        for lh in lighthouses.values():
            lh.shutdown()
    return out


def _by_step(rec: list[dict]) -> dict[int, dict]:
    """Records keyed by the manager step after the quorum (the same on every group of a quorum)."""
    return {r["after_quorum"]["step"]: r for r in rec}


def _joint(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """The outer steps both groups ran in one quorum of two."""
    ra, rb = _by_step(a["rec"]), _by_step(b["rec"])
    return [(ra[s], rb[s]) for s in sorted(set(ra) & set(rb)) if ra[s]["participants"] == 2 and rb[s]["participants"] == 2]


# ------------------------------------------------------------------------------ sparse (SparseLoCo)
def test_two_replica_groups_train_and_hold_the_same_theta_after_every_committed_step(runs):
    a, b = runs["A"], runs["B"]
    pairs = _joint(a, b)
    assert len(pairs) >= 4, [(r["after_quorum"]["step"], r["participants"]) for r in a["rec"]]
    both = [(x, y) for x, y in pairs if x["committed"] and y["committed"]]
    assert len(both) >= 3
    for x, y in both:
        assert torch.equal(x["after"]["theta"], y["after"]["theta"])  # bit for bit
        assert torch.equal(x["after"]["params"], x["after"]["theta"]) and torch.equal(y["after"]["params"], y["after"]["theta"])
    for g in (a, b):
        assert g["loss"][1] < g["loss"][0], g["loss"]  # they train
        assert g["on_theta"]
    # both end at the same step, on the same theta
    assert a["rec"][-1]["after"]["step"] == b["rec"][-1]["after"]["step"] == END["sparse"]
    assert torch.equal(a["rec"][-1]["after"]["theta"], b["rec"][-1]["after"]["theta"])


def test_the_update_is_the_mean_over_the_participants(runs):
    a, b = runs["A"], runs["B"]
    alone = [r for r in a["rec"] if r["participants"] == 1 and r["committed"]]
    assert len(alone) >= 2  # A's first outer steps, before B joined: P = 1
    for r in alone:
        want = r["after_quorum"]["theta"] - LR_OUT * r["sent"]
        torch.testing.assert_close(r["after"]["theta"], want, rtol=0, atol=1e-6)
    checked = 0
    for x, y in _joint(a, b):
        if x["committed"] and y["committed"]:
            assert torch.equal(x["after_quorum"]["theta"], y["after_quorum"]["theta"])
            want = x["after_quorum"]["theta"] - LR_OUT * (x["sent"] + y["sent"]) / 2  # P = 2
            torch.testing.assert_close(x["after"]["theta"], want, rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 3


def test_a_late_replica_group_heals_theta_and_the_step_and_starts_with_zero_error_feedback(runs):
    a, b = runs["A"], runs["B"]
    first = b["rec"][0]
    assert first["healed"] and first["participants"] == 2
    assert not torch.equal(first["before_quorum"]["theta"], first["after_quorum"]["theta"])  # another init
    peer = _by_step(a["rec"])[first["after_quorum"]["step"]]
    assert not peer["healed"] and peer["after_quorum"]["step"] >= 2  # A trained alone before
    assert torch.equal(first["after_quorum"]["theta"], peer["after_quorum"]["theta"])
    for key in ("step", "inner_step", "window_start"):
        assert first["after_quorum"][key] == peer["after_quorum"][key], key
    assert first["before_quorum"]["inner_step"] == H  # B's own window, discarded
    assert torch.equal(first["after_quorum"]["params"], first["after_quorum"]["theta"])  # it goes on from theta
    assert first["after_quorum"]["e"].count_nonzero() == 0  # its own error feedback starts at zero
    # the live group keeps its own error feedback through the join
    assert peer["before_quorum"]["e"].count_nonzero() > 0
    assert torch.equal(peer["before_quorum"]["e"], peer["after_quorum"]["e"])
    # the healed group sent nothing of its discarded window
    assert first["sent"].count_nonzero() == 0


def test_an_uncommitted_step_changes_nothing_and_the_failed_group_heals_from_the_peer(runs):
    a, b = runs["A"], runs["B"]
    failed = [r for r in a["rec"] if r.get("injected")]
    assert len(failed) == 1 and not failed[0]["committed"] and a["ft"]["uncommitted"] == 1
    r = failed[0]
    # theta and e exactly as before the step; the model back on theta
    assert torch.equal(r["after"]["theta"], r["after_quorum"]["theta"])
    assert torch.equal(r["after"]["e"], r["after_quorum"]["e"]) and r["after"]["e"].count_nonzero() > 0
    assert torch.equal(r["after"]["params"], r["after"]["theta"])
    assert r["after"]["step"] == r["after_quorum"]["step"]  # the step did not advance
    # the other group committed that step (torchft's vote is per replica group) ...
    other = _by_step(b["rec"])[r["after_quorum"]["step"]]
    assert other["committed"] and not torch.equal(other["after"]["theta"], other["after_quorum"]["theta"])
    # ... and A, one step behind, heals from B at the next quorum; B keeps its own error feedback
    nxt = a["rec"][a["rec"].index(r) + 1]
    assert nxt["healed"] and nxt["after_quorum"]["e"].count_nonzero() == 0
    peer = _by_step(b["rec"])[nxt["after_quorum"]["step"]]
    assert not peer["healed"]
    assert torch.equal(nxt["after_quorum"]["theta"], peer["after_quorum"]["theta"])
    assert torch.equal(nxt["after_quorum"]["theta"], other["after"]["theta"])  # B's theta after the step A missed
    assert nxt["after_quorum"]["step"] == peer["after_quorum"]["step"] == other["after"]["step"]
    assert peer["before_quorum"]["e"].count_nonzero() > 0
    assert torch.equal(peer["before_quorum"]["e"], peer["after_quorum"]["e"])
    assert a["ft"]["heals"] == 1 and b["ft"]["heals"] == 1


def test_the_sparse_exchange_sends_k_entries_at_2_bits_by_default(runs):
    for g in (runs["A"], runs["B"]):
        k, d = g["k"], g["d"]
        assert 0 < k < d // 10  # density 0.05 of 161 entries
        nbytes = quant.message_bytes(1, k, 2)  # one chunk (161 < chunk=4096) of k entries at 2 bits
        assert nbytes < 4 * codec.message_words(k) / 2  # against 2k + 1 fp32 words
        participants = [r["participants"] for r in g["rec"]]
        assert g["messages"] == [(nbytes, p) for p in participants]  # one all-gather of the uint8 message per outer step
        assert g["telemetry"]["bytes_sent"] == nbytes * len(g["rec"])
        assert g["telemetry"]["entries_sent"] == k * len(g["rec"])
        for r in g["rec"]:
            assert int(r["sent"].count_nonzero()) <= k


# ------------------------------------------------------------------------------ dense (DiLoCo)
def test_dense_groups_start_from_one_theta_and_share_theta_and_momentum(runs):
    c, d = runs["C"], runs["D"]
    first = [c["rec"][0], d["rec"][0]]
    assert sorted(r["healed"] for r in first) == [False, True]  # init_sync: one heals at step 0
    assert not torch.equal(first[0]["before_quorum"]["theta"], first[1]["before_quorum"]["theta"])
    assert torch.equal(first[0]["after_quorum"]["theta"], first[1]["after_quorum"]["theta"])
    both = [(x, y) for x, y in _joint(c, d) if x["committed"] and y["committed"]]
    assert len(both) >= 4
    for x, y in both:
        assert torch.equal(x["after"]["theta"], y["after"]["theta"]) and torch.equal(x["after"]["m"], y["after"]["m"])
        # DiLoCo over the participants: g = (1/2) sum_r Delta_r; m' = mu m + g; theta' = theta - alpha (g + mu m')
        theta, m = x["at_vote"]["theta"], x["at_vote"]["m"]
        g = ((theta - x["at_vote"]["params"]) + (theta - y["at_vote"]["params"])) / 2
        m_new = MU * m + g
        torch.testing.assert_close(x["after"]["m"], m_new, rtol=0, atol=1e-6)
        torch.testing.assert_close(x["after"]["theta"], theta - LR_OUT * (g + MU * m_new), rtol=0, atol=1e-6)
    for g in (c, d):
        assert g["loss"][1] < g["loss"][0], g["loss"]


def test_dense_uncommitted_step_keeps_theta_and_momentum_and_heals_them_from_the_peer(runs):
    c, d = runs["C"], runs["D"]
    failed = [r for r in c["rec"] if r.get("injected")]
    assert len(failed) == 1 and not failed[0]["committed"]
    r = failed[0]
    assert r["after_quorum"]["m"].count_nonzero() > 0
    assert torch.equal(r["after"]["theta"], r["after_quorum"]["theta"]) and torch.equal(r["after"]["m"], r["after_quorum"]["m"])
    assert torch.equal(r["after"]["params"], r["after"]["theta"])
    other = _by_step(d["rec"])[r["after_quorum"]["step"]]
    assert other["committed"]
    nxt = c["rec"][c["rec"].index(r) + 1]
    assert nxt["healed"]
    assert torch.equal(nxt["after_quorum"]["theta"], other["after"]["theta"])
    assert torch.equal(nxt["after_quorum"]["m"], other["after"]["m"])  # the outer momentum, from the peer
    assert nxt["after_quorum"]["step"] == other["after"]["step"]


# ------------------------------------------------------------------------------ replica groups of several ranks
def test_replica_groups_of_two_ranks_reduce_inside_and_average_over_every_rank(runs):
    ranks = [runs[k] for k in ("E0", "E1", "F0", "F1")]
    assert all(r["layout"] == "node mode, 1 nodes x 2 ranks" for r in ranks)
    steps = len(ranks[0]["rec"])
    assert steps >= 3 and all(len(r["rec"]) == steps for r in ranks)
    # init_sync: torchft heals rank l from rank l of a peer; a group with a healed rank heals as a whole
    healed = [r["rec"][0]["healed"] for r in ranks]
    assert healed[0] == healed[1] and healed[2] == healed[3] and any(healed), healed
    assert not torch.equal(ranks[0]["rec"][0]["before"], ranks[2]["rec"][0]["before"])  # two inits
    for t in range(steps):
        recs = [r["rec"][t] for r in ranks]
        assert all(x["committed"] and x["participants"] == 2 for x in recs)
        for x in recs[1:]:  # one theta on every rank of every group, before and after
            assert torch.equal(x["theta"], recs[0]["theta"]) and torch.equal(x["after"], recs[0]["after"])
        # density 1, ef_decay 0, outer_lr 1: theta' = theta - (1/(P L)) sum over the 4 ranks of (theta - x_r)
        theta = recs[0]["theta"]
        want = theta - sum(theta - x["params"] for x in recs) / 4
        torch.testing.assert_close(recs[0]["after"], want, rtol=0, atol=1e-6)
    for r in ranks:  # each rank sends its shard of the group's sum to its peer rank of the other group
        assert r["shard"] < r["d"]
        assert r["messages"] == [(codec.message_words(r["shard"]), 2)] * steps


# ------------------------------------------------------------------------------ refusals, no processes
def _fake_manager(**extra):
    calls = ("start_quorum", "should_commit", "num_participants", "is_participating", "register_state_dict_fn",
             "report_error", "errored", "allreduce", "current_step")  # fmt: skip
    fields = {**{c: (lambda *a, **k: None) for c in calls}, "_pg": object(), "_use_async_quorum": False, **extra}
    return types.SimpleNamespace(**fields)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"overlap_steps": 1}, ("overlap_steps", "manager")),
        ({"fragments": 2}, ("fragments", "manager")),
        ({"exchange": "allreduce", "quantize": None}, ("exchange", "manager")),
    ],
)
def test_options_a_manager_cannot_run_are_refused_naming_them(kwargs, names):
    model = net(0)
    with pytest.raises(ValueError) as err:
        SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4, manager=_fake_manager(), **kwargs)
    for n in names:
        assert f"`{n}`" in str(err.value) or n in str(err.value), (n, str(err.value))


@pytest.mark.parametrize("kwargs, bits", [({}, 2), ({"quantize": 8}, 8), ({"quantize": 2, "chunk": 64}, 2)])
def test_quantized_values_run_under_a_manager_with_the_default_options_included(kwargs, bits):
    model = net(0)
    local = SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), manager=_fake_manager(), **kwargs)
    way = local.exchanges[0]
    assert isinstance(way.exchange, ManagerQuantAllGather) and way.exchange.bits == bits
    sizes = way.sizes
    assert local.outer_bytes == quant.message_bytes(sizes.n_chunks, sizes.kc, bits)
    assert f"{bits}-bit" in local.ft.describe()
    other = net(0)
    dense = SparseLocalSGD(other, torch.optim.SGD(other.parameters(), lr=0.1), outer="dense", manager=_fake_manager())
    assert dense.config.quantize == 2 and not dense.exchanges[0].sparse  # ignored by DiLoCo's dense step


class _Work:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def wait(self, timeout=None) -> bool:
        if self.fail:
            raise RuntimeError("peer died")
        return True

    def is_completed(self) -> bool:
        return True


class _EchoGroup:
    """A process group of ``peers`` copies of this one: every row of the all-gather is this message."""

    def __init__(self, peers: int, fail: bool = False) -> None:
        self.peers, self.fail, self.sent = peers, fail, []

    def size(self) -> int:
        return self.peers

    def allgather(self, outputs, inputs, opts):
        self.sent.append(inputs[0].clone())
        for row in outputs[0]:
            row.copy_(inputs[0])
        return _Work(self.fail)


@pytest.mark.parametrize("bits", [2, 8])
def test_the_quantized_exchange_sends_quant_allgathers_message_and_keeps_the_rounding_in_e(bits, monkeypatch):
    """The message is byte for byte QuantAllGather's (the non-torchft path); sel.values becomes the
    dequantised values, so e = u - sent keeps the rounding error; the update is their mean."""
    from lightning_gaussk.comm.exchange import Route, Selection
    from lightning_gaussk.selection.chunkwise import ChunkwiseTopK

    n, C, kc = 3, 64, 5
    u = torch.randn(n * C, generator=torch.Generator().manual_seed(bits))
    topk = ChunkwiseTopK(n, C, kc, u.device)

    def selection() -> Selection:
        values, indices = topk(u)
        return Selection(values.clone(), indices.clone(), torch.zeros(()), n * C)

    # the non-torchft exchange, its collective replaced by the same echo
    plain_rows: list[torch.Tensor] = []

    def echo(gathered, msg, group=None, async_op=False):
        plain_rows.append(msg.clone())
        gathered.view(2, -1).copy_(msg.expand(2, -1))
        return _Work()

    monkeypatch.setattr(quant, "all_gather", echo)
    ref_sel, ref_out = selection(), torch.zeros(n * C)
    plain = quant.QuantAllGather(bits, C, kc).launch(u, ref_sel, ref_out, Route(None, 2, 2), {})
    plain.work.wait()
    plain.finish()

    group, reported = _EchoGroup(2), []
    manager = _fake_manager(_pg=group, is_participating=lambda: True, errored=lambda: None, report_error=reported.append)
    sel, out = selection(), torch.zeros(n * C)
    launched = ManagerQuantAllGather(manager, bits, C, kc).launch(u, sel, out, Route(group, 2, 2), {})
    assert launched.work.wait() and not reported
    delivery = launched.finish()
    assert group.sent[0].numel() == plain_rows[0].numel() == quant.message_bytes(n, kc, bits)
    cb, ob, _ = quant._sizes(n, kc, bits)
    used = torch.ones(plain_rows[0].numel(), dtype=torch.bool)
    used[cb + 2 * n * kc : cb + ob] = False  # the offsets' padding to 4 bytes is never read
    assert torch.equal(group.sent[0][used], plain_rows[0][used])  # codes, offsets, scales, flag: byte for byte
    assert torch.equal(out, ref_out) and torch.equal(sel.values, ref_sel.values)
    assert delivery.delivered is None and float(delivery.flag) == 0.0
    # sent = the dequantised values, within half a level of u; e = u - sent keeps the rounding
    original = u[sel.indices]
    scale = original.view(n, kc).abs().amax(1).repeat_interleave(kc)
    assert torch.all((original - sel.values).abs() <= scale / ((1 << bits) - 1) + 1e-6)
    assert (original - sel.values).count_nonzero() > 0
    want = torch.zeros(n * C).index_add_(0, sel.indices, sel.values)  # the mean of two identical messages
    torch.testing.assert_close(out, want, rtol=0, atol=0)

    # a group not participating: zero scales, nothing decoded from it, nothing of its selection delivered
    manager.is_participating = lambda: False
    sel, out = selection(), torch.zeros(n * C)
    launched = ManagerQuantAllGather(manager, bits, C, kc).launch(u, sel, out, Route(group, 2, 2), {})
    launched.work.wait()
    delivery = launched.finish()
    assert out.count_nonzero() == 0 and not delivery.delivered.any()

    # a failed collective: reported to the manager, nothing decoded, nothing delivered
    failing = _EchoGroup(2, fail=True)
    manager = _fake_manager(_pg=failing, is_participating=lambda: True, errored=lambda: None, report_error=reported.append)
    sel, out = selection(), torch.zeros(n * C)
    launched = ManagerQuantAllGather(manager, bits, C, kc).launch(u, sel, out, Route(failing, 2, 2), {})
    assert not launched.work.wait() and len(reported) == 1
    delivery = launched.finish()
    assert out.count_nonzero() == 0 and not delivery.delivered.any()


def test_an_async_quorum_or_a_non_manager_is_refused():
    model = net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="use_async_quorum=False"):
        SparseLocalSGD(model, opt, manager=_fake_manager(_use_async_quorum=True))
    with pytest.raises(TypeError, match="`manager` must be a torchft.Manager"):
        SparseLocalSGD(model, opt, manager=object())


def test_torchft_is_never_imported_by_the_package():
    """torchft is the optional extra ``ft``: the package talks to the user's Manager object only."""
    for path in (ROOT / "lightning_gaussk").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torchft" for n in names), path


# ------------------------------------------------------------------------------ 3 groups, one killed hard and restarted
FULL = 3  # the victim is killed after 3 outer steps with all three groups and one optimizer step: mid-window


class _Proc:
    """A replica's process (``multiprocessing.Process``) with ``Popen``'s ``poll``/``returncode``/``wait``."""

    def __init__(self, proc) -> None:
        self.proc = proc

    @property
    def returncode(self):
        return self.proc.exitcode

    def poll(self):
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> None:
        self.proc.join(timeout)

    def kill(self) -> None:
        self.proc.kill()


def _progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(what: str, cond, procs: dict, logs: dict, timeout: float = 90.0) -> None:
    """Poll ``cond()`` until true; a replica that exits with an error, or the deadline, fails the run."""
    deadline = time.monotonic() + timeout
    while not cond():
        for name, p in procs.items():
            if p.poll() not in (None, 0, -signal.SIGKILL):
                raise AssertionError(f"replica {name} failed (rc {p.returncode}):\n{logs[name].read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Three replica groups (one process each, tests/scripts/ft_replica.py, default options: 2-bit
    values) around an in-process lighthouse (min_replicas=2). R2 stops mid-window after 3 outer
    steps with all three and is SIGKILLed there; once both survivors have committed 2 outer steps without it, a new
    R2 process (another init) starts; once it has rejoined, the parent fixes the end step."""
    from torchft.coordination import LighthouseServer

    tmp = tmp_path_factory.mktemp("ft_kill")
    # each replica group is a new process forked from a server that imported torch, torchft and the
    # package once (a restart then takes milliseconds); SIGKILL ends it like any other process
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchft", "lightning_gaussk.local_sgd", "ft_replica"])
    from ft_replica import main as replica_main

    # join_timeout_ms: a group late to a quorum by up to 2 s (a loaded machine) is waited for, not left out;
    # a dead group stops heartbeating and is given up after heartbeat_timeout_ms
    lh = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=2000, heartbeat_timeout_ms=1000)
    end_file = tmp / "end"
    procs: dict[str, _Proc] = {}
    logs: dict[str, Path] = {}

    def start(name: str, replica: str, seed: int, *extra: str) -> None:
        logs[name] = tmp / f"{name}.log"
        argv = ["--lighthouse", lh.address(), "--replica", replica, "--seed", str(seed), "--who", str(seed),
                "--out", str(tmp / f"{name}.pt"), "--progress", str(tmp / f"{name}.json"), "--end-file", str(end_file),
                "--sync-every", str(H), "--outer-lr", str(LR_OUT), "--ef-decay", str(EF), "--inner-sleep", "0.02",
                "--log", str(logs[name]), *extra]  # fmt: skip
        proc = ctx.Process(target=replica_main, args=(argv,), daemon=True)
        proc.start()
        procs[name] = _Proc(proc)

    prog = lambda name: _progress(tmp / f"{name}.json")
    try:
        start("R0", "R0", 0)
        start("R1", "R1", 1)
        start("R2", "R2", 2, "--pause-after", str(FULL), "--pause-participants", "3")
        _wait("R2 to stop mid-window", lambda: prog("R2").get("paused"), procs, logs)
        victim = prog("R2")
        procs["R2"].send_signal(signal.SIGKILL)  # hard: no shutdown, no goodbye to the lighthouse
        procs["R2"].wait(10)
        gone = victim["seen"][-1][0]  # the survivors' steps after this one are without R2
        two = lambda name: sum(s[1] == 2 and s[0] > gone for s in prog(name).get("seen", []))
        _wait("two outer steps of the survivors without R2", lambda: min(two("R0"), two("R1")) >= 2, procs, logs)
        at_restart = {name: len(prog(name)["seen"]) for name in ("R0", "R1")}  # records before the restart
        start("R2b", "R2", 5)  # the same replica id, a new process, another init
        _wait("the restarted R2 to rejoin", lambda: len(prog("R2b").get("seen", [])) >= 2, procs, logs)
        end = max(prog(name)["step"] for name in ("R0", "R1", "R2b")) + 6
        (tmp / "end.tmp").write_text(str(end))
        os.replace(tmp / "end.tmp", end_file)  # atomic: a replica never reads half of it
        for name in ("R0", "R1", "R2b"):
            _wait(f"{name} to finish", lambda name=name: procs[name].poll() is not None, procs, logs, timeout=60)
            assert procs[name].returncode == 0, logs[name].read_text()[-4000:]
        out = {name: torch.load(tmp / f"{name}.pt", weights_only=False) for name in ("R0", "R1", "R2b")}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()  # only the processes this fixture started
                p.wait(10)
        lh.shutdown()
    return {"out": out, "end": end, "victim": victim, "at_restart": at_restart}


def _first_without_victim(killed: dict, g: dict) -> int:
    """The index in ``g``'s records of its first outer step after the victim's last committed one."""
    last = killed["victim"]["seen"][-1][0] + 1  # the step the victim's last outer step committed
    return [r["after_quorum"]["step"] for r in g["rec"]].index(last)


def _runs(xs: list[int]) -> list[int]:
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


def test_a_replica_group_is_killed_mid_window_and_the_survivors_go_on_with_two_participants(killed):
    victim = killed["victim"]
    assert victim["paused"] and victim["window"] == 1 < H  # killed inside a window: 1 of its H optimizer steps done
    assert [s[1] for s in victim["seen"][-FULL:]] == [3] * FULL
    for name in ("R0", "R1"):
        g = killed["out"][name]
        steps = [r["after_quorum"]["step"] for r in g["rec"]]
        # the survivors never stop: one outer step after another, each committed, none healed after the first
        assert all(r["committed"] for r in g["rec"]) and g["ft"]["uncommitted"] == 0
        assert steps == list(range(steps[0], steps[0] + len(steps))) and g["step"] == killed["end"]
        assert not any(r["healed"] for r in g["rec"][1:])
        parts = [r["participants"] for r in g["rec"]]
        k0, k1 = _first_without_victim(killed, g), killed["at_restart"][name]
        assert parts[k0 - 1] == 3  # before the kill: three
        assert parts[k0:k1].count(2) >= 2 and set(parts[k1:]) <= {2, 3}  # without R2: two
        assert _runs(parts[k0 - 1 :]) == [3, 2, 3] and parts[-1] == 3  # and three again after the rejoin
        assert g["loss"][1] < g["loss"][0], g["loss"]


def test_the_update_without_the_killed_group_is_the_mean_over_the_two_survivors(killed):
    r0, r1 = (_by_step(killed["out"][n]["rec"]) for n in ("R0", "R1"))
    pairs = [(r0[s], r1[s]) for s in sorted(set(r0) & set(r1)) if r0[s]["participants"] == 2]
    assert len(pairs) >= 2
    for x, y in pairs:
        assert torch.equal(x["at_vote"]["theta"], y["at_vote"]["theta"])
        want = x["at_vote"]["theta"] - LR_OUT * (x["sent"] + y["sent"]) / 2  # P = 2
        torch.testing.assert_close(x["after"]["theta"], want, rtol=0, atol=1e-6)
        assert torch.equal(x["after"]["theta"], y["after"]["theta"])


def test_the_restarted_group_heals_from_a_survivor_and_rejoins(killed):
    g, peers = killed["out"]["R2b"], [_by_step(killed["out"][n]["rec"]) for n in ("R0", "R1")]
    first = g["rec"][0]
    assert first["healed"] and first["participants"] == 3 and g["ft"]["heals"] == 1
    step = first["after_quorum"]["step"]
    assert step > killed["victim"]["seen"][-1][0] + 2  # the survivors went on without it
    assert not torch.equal(first["before_quorum"]["theta"], first["after_quorum"]["theta"])  # another init
    for p in peers:
        assert p[step]["participants"] == 3 and not p[step]["healed"]
        assert torch.equal(first["after_quorum"]["theta"], p[step]["after_quorum"]["theta"])
    assert first["after_quorum"]["e"].count_nonzero() == 0  # its own error feedback starts at zero
    assert first["sent"].count_nonzero() == 0  # its discarded window sent nothing
    assert all(r["committed"] and r["participants"] == 3 for r in g["rec"])


def test_all_three_groups_end_on_the_same_theta_and_agree_after_every_step(killed):
    out = killed["out"]
    for name in ("R0", "R1", "R2b"):
        assert out[name]["step"] == killed["end"] and out[name]["quantize"] == 2  # the default: 2-bit values
        assert torch.equal(out[name]["theta"], out["R0"]["theta"]) and torch.equal(out[name]["params"], out[name]["theta"])
    by = {n: _by_step(out[n]["rec"]) for n in out}
    joint = 0
    for s, r in by["R0"].items():
        for n in ("R1", "R2b"):
            if s in by[n]:
                assert torch.equal(r["after"]["theta"], by[n][s]["after"]["theta"]), (s, n)
                joint += 1
    assert joint >= len(by["R0"]) + 3


def test_the_survivors_error_feedback_is_conserved_through_the_failure_with_2bit_values(killed):
    for name in ("R0", "R1"):
        g = killed["out"][name]
        rec, k = g["rec"], g["k"]
        rounding = 0
        for t, r in enumerate(rec):
            v, sent = r["at_vote"], r["sent"]
            u = v["e"] * EF + (v["theta"] - v["params"])  # u = beta e + Delta, as the engine computes it
            torch.testing.assert_close(r["after"]["e"], u - sent, rtol=0, atol=1e-7)  # e = u - sent
            if r["healed"]:  # its first outer step, if init_sync healed it: its window discarded, nothing sent
                assert sent.count_nonzero() == 0 and v["e"].count_nonzero() == 0
                continue
            # what was sent: k entries at 2 bits over one scale per chunk (161 entries: one chunk): {+-m, +-m/3}
            mags = sent[sent != 0].abs()
            assert 0 < mags.numel() <= k
            torch.testing.assert_close(mags, torch.where(mags > mags.max() * 2 / 3, mags.max(), mags.max() / 3))
            idx = sent.nonzero().squeeze(1)
            rounding += int(r["after"]["e"][idx].count_nonzero() > 0)  # the rounding error stays in e
            if t:  # nothing of e is lost between outer steps, the kill and the rejoin included
                assert torch.equal(r["before_quorum"]["e"], rec[t - 1]["after"]["e"])
                assert torch.equal(r["at_vote"]["e"], rec[t - 1]["after"]["e"])
        assert rounding >= len(rec) // 2
        # the first outer step without R2: e carried over; had it been reset, e = u - sent would not hold
        r = rec[_first_without_victim(killed, g)]
        assert r["participants"] == 2 and r["at_vote"]["e"].count_nonzero() > 0
        v = r["at_vote"]
        assert not torch.allclose(r["after"]["e"], (v["theta"] - v["params"]) - r["sent"], rtol=0, atol=1e-4)
