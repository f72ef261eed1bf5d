"""The torchrun elastic recipe (docs/reliability.md, "Elastic restart with torchrun"), tested.

Two emulated hosts (network namespaces, benchmarks/cluster.py), one ``torchrun --nnodes=1:2
--max-restarts=3 --rdzv-backend=c10d`` agent per host, a Lightning fit with
``ckpt_path="last"`` (tests/scripts/elastic_fit.py). In the middle of the run every process of
host 1 (agent and worker) gets SIGKILL; host 0's agent restarts its worker, the rendezvous closes
with the one host left, and the fit finishes from ``last.ckpt`` at the world size of one host, for
``gaussk_ddp`` and ``gaussk_local`` (both resume on the other layout). One run per strategy,
shared by the assertions (benchmarks/elastic_restart.py's :func:`run_scenario`, which also reports
the figures). Needs root and ``ip netns``: skipped with the reason otherwise.
"""

import math
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
import cluster  # noqa: E402
import elastic_restart  # noqa: E402

STRATEGIES = ("gaussk_ddp", "gaussk_local")
MAX_STEPS, CKPT_EVERY, KILL_AT, PER_HOST = 30, 10, 15, 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    why = cluster.missing_privileges()
    if why:
        pytest.skip(f"needs network namespaces to emulate two hosts: {why}")
    cluster.cleanup_stale()
    out = {}
    for s in STRATEGIES:
        work = tmp_path_factory.mktemp(f"elastic_{s}")
        res = elastic_restart.run_scenario(s, work, ranks_per_host=PER_HOST, max_steps=MAX_STEPS, ckpt_every=CKPT_EVERY,
                                           kill_at=KILL_AT, step_sleep=0.05, timeout=240.0)  # fmt: skip
        res["host0_log"] = (work / "logs" / "host0.log").read_text(errors="replace")
        out[s] = res
    return out


def _explain(res: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in res.items() if k not in ("log_tails", "host0_log")) + "\n" + res["log_tails"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_job_survives_the_loss_of_a_host_and_finishes(runs, strategy):
    res = runs[strategy]
    assert res["killed"], _explain(res)
    assert res["exit_code"] == 0, _explain(res)
    assert res["final_step"] == MAX_STEPS, _explain(res)
    assert res["restarts"] == 1, _explain(res)  # one failure, one restart: the first round had both hosts
    first, second = res["attempts"]
    assert first["ranks"] == list(range(2 * PER_HOST)) and (first["world"], first["num_nodes"]) == (2 * PER_HOST, 2), first
    # the second attempt ran on the host that is left: one node, its own ranks only
    assert second["ranks"] == list(range(PER_HOST)) and (second["world"], second["num_nodes"]) == (PER_HOST, 1), second
    assert second["end_step"] == MAX_STEPS and "Connection reset by peer" in " ".join(first["exceptions"]), res
    assert not [ns for ns in cluster.list_namespaces() if ns.startswith(f"{cluster.PREFIX}-{res['run_id']}-")]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_restart_resumes_from_the_last_checkpoint_and_loses_less_than_an_interval(runs, strategy):
    res = runs[strategy]
    first, second = res["attempts"]
    assert res["steps_done_at_kill"] >= KILL_AT, _explain(res)
    # resumed from last.ckpt, the last save before the kill (not from scratch, not from an older one)
    assert second["start_step"] == res["checkpoint_step"] == res["last_save_before_kill"] == KILL_AT // CKPT_EVERY * CKPT_EVERY
    assert res["steps_lost"] == res["steps_done_at_kill"] - res["checkpoint_step"]
    assert 0 <= res["steps_lost"] < CKPT_EVERY, _explain(res)
    assert second["saves"] and min(second["saves"]) > res["checkpoint_step"]  # and checkpoints on after the restart


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_strategy_state_is_resumed_on_the_smaller_layout(runs, strategy):
    res = runs[strategy]
    first, second = res["attempts"]
    assert first["layout"]["world_size"] == 2 * PER_HOST and second["layout"]["world_size"] == PER_HOST, res["attempts"]
    assert second["carried"] > 0, "the residuals / error feedback of the saved ranks were restored, not reset"
    log = res["host0_log"]
    if strategy == "gaussk_local":
        assert f"resuming a save of flat, {2 * PER_HOST} ranks on flat, {PER_HOST} ranks" in log, log[-3000:]
    else:
        assert f"saved with world size {2 * PER_HOST} on world size {PER_HOST}" in log, log[-3000:]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seconds_to_resume_are_measured_and_add_up(runs, strategy):
    res = runs[strategy]
    total, split = res["seconds_to_resume"], res["split"]
    assert set(split) == {"detection", "worker_exit", "rendezvous", "start", "restore", "first_step"}, split
    assert all(v is not None and v >= 0 for v in split.values()), split
    assert math.isclose(sum(split.values()), total, abs_tol=0.05), (total, split)
    # a killed host's connections are reset by its kernel: the survivor fails at its next collective
    # (not after the process group timeout), and the dead host is dropped from the rendezvous after
    # keep_alive_interval * keep_alive_max_attempt = 3 s, not the default 15 s
    assert split["detection"] < 5.0 and split["rendezvous"] < 10.0, split
