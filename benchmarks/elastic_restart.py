"""Elastic restart with torchrun: kill one host in the middle of a Lightning fit, measure what it costs.

Two emulated hosts (network namespaces joined by a shaped veth pair, benchmarks/cluster.py), one
``torchrun`` agent per host, both with::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
    torchrun --nnodes=1:2 --nproc-per-node=L --max-restarts=3 --rdzv-backend=c10d \\
        --rdzv-endpoint=10.77.0.1:29400 --rdzv-id=elastic --monitor-interval=0.1 \\
        --rdzv-conf=join_timeout=30,last_call_timeout=2,close_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3,is_host=<1 on host 0, else 0> \\
        --local-addr=<this host's address> tests/scripts/elastic_fit.py --strategy S ...

The c10d rendezvous store lives in host 0's agent (``is_host=1``), so host 1 is the one killed:
when host 1's workers have finished step ``--kill-at``, every process of host 1 (agent and
workers) gets SIGKILL. Host 0's worker fails in its next collective (the kernel resets the dead
peer's connections: "Connection reset by peer"), its agent restarts the worker group, the dead
host is dropped from the rendezvous once its heartbeats are ``keep_alive_interval *
keep_alive_max_attempt`` old, the one-node round closes ``last_call_timeout`` after host 0 joins,
and the new workers resume from the shared ``last.ckpt`` (``trainer.fit(..., ckpt_path="last")``)
at world size ``L``.

Reported per strategy (from the workers' event files, tests/scripts/elastic_fit.py, and the
agent's log with ``LOGLEVEL=INFO``):

- steps lost: steps finished before the kill minus the step of the checkpoint resumed (with
  gaussk_local host 0 also runs the inner steps up to its next outer step after the kill; they
  are lost too and reported as ``steps_after_kill``);
- seconds to resume: from the kill to the end of the first step of the new attempt, split into
  detection (kill -> host 0's worker raises), worker exit (-> its agent sees the failure: the
  worker's teardown), rendezvous (-> the one-node round is complete), start (-> the new worker's
  process group is up: interpreter, imports, Trainer), restore (-> checkpoint loaded,
  ``on_train_start``) and first step.

Usage (root; writes benchmarks/out/elastic_restart.json and prints a markdown table of the
medians; exit status 1 if a run did not finish, its folder is kept)::

    python benchmarks/elastic_restart.py [--strategies gaussk_ddp gaussk_local] [--ranks-per-host 1 2] [--repeats 3]

tests/test_elastic.py runs the same scenario (:func:`run_scenario`) and checks it.
"""

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import cluster
from _common import OUT, ROOT, machine_description

SCRIPT = Path(ROOT) / "tests" / "scripts" / "elastic_fit.py"
RDZV_PORT = 29400
STRATEGIES = ("gaussk_ddp", "gaussk_local")


#: ``--rdzv-conf`` of the recipe (seconds, integers). ``keep_alive_interval * keep_alive_max_attempt``
#: is how long the dead host stays a participant of the closed round (the defaults, 5 x 3 = 15 s,
#: are most of the wait); ``last_call_timeout`` how long a round with fewer than ``max_nodes``
#: waits for late nodes; ``join_timeout`` how long an agent waits for ``min_nodes``.
RDZV_CONF = {"join_timeout": 30, "last_call_timeout": 2, "close_timeout": 5, "keep_alive_interval": 1, "keep_alive_max_attempt": 3}


#: Environment of both agents. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the default (the
#: agents' store shared with the workers), torch 2.13 keeps one worker store across restarts with
#: no per-attempt prefix, so the restarted workers can read the dead attempt's gloo addresses and fail
#: ("Gloo connectFullMesh failed ... Connection refused") or hang when a host has two or more
#: ranks (3 of 4 runs at 2 ranks per host); with it, each round gets a store of its own.
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_command(spec: cluster.ClusterSpec, host: int, script_argv: list[str], python: str = sys.executable,
                     max_restarts: int = 3, **rdzv_conf: int) -> list[str]:  # fmt: skip
    """``ip netns exec <host> python -m torch.distributed.run ...`` (the recipe) for ``host``;
    ``rdzv_conf`` overrides :data:`RDZV_CONF`."""
    conf = ",".join(f"{k}={v}" for k, v in {**RDZV_CONF, **rdzv_conf}.items()) + f",is_host={int(host == 0)}"
    return ["ip", "netns", "exec", spec.ns(host), python, "-m", "torch.distributed.run",
            f"--nnodes=1:{spec.world}", f"--nproc-per-node={spec.ranks_per_host}", f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={spec.master_addr}:{RDZV_PORT}", "--rdzv-id=elastic",
            f"--rdzv-conf={conf}", f"--local-addr={spec.address(host)}", "--monitor-interval=0.1",
            *script_argv]  # fmt: skip


def read_events(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("attempt*.rank*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by SIGKILL
                    pass
    return sorted(out, key=lambda e: e["t"])


def _host1_step(folder: Path, spec: cluster.ClusterSpec) -> int:
    """The last step finished by a rank of host 1 in the first attempt (-1 before any)."""
    best = -1
    for r in range(spec.ranks_per_host, 2 * spec.ranks_per_host):
        f = folder / f"attempt0.rank{r}.jsonl"
        if f.exists():
            for line in f.read_text().splitlines():
                if '"step"' in line and line.startswith('{"event": "step"'):
                    try:
                        best = max(best, json.loads(line)["step"])
                    except json.JSONDecodeError:
                        pass
    return best


AGENT_READY = "elastic_restart: agent imported, waiting for the rendezvous store"


def agent_after(endpoint: str, torchrun_args: list[str], timeout: float = 120.0) -> None:
    """``torchrun torchrun_args...`` (torch.distributed.run's ``main``), entered once ``endpoint``
    (``host:port``, the c10d rendezvous store) accepts TCP connections."""
    import socket

    from torch.distributed import run

    host, port = endpoint.rsplit(":", 1)
    print(AGENT_READY, flush=True)
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            break
        except OSError:
            if time.monotonic() > end:
                raise SystemExit(f"elastic_restart: no rendezvous store at {endpoint} after {timeout:.0f} s") from None
            time.sleep(0.02)
    run.main(torchrun_args)


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise cluster.ClusterError(f"{path}: no {text!r} after {timeout:.0f} s (exit {proc.poll()})")


def run_scenario(strategy: str, workdir: str | Path, ranks_per_host: int = 1, max_steps: int = 30, ckpt_every: int = 10,
                 kill_at: int = 15, step_sleep: float = 0.05, timeout: float = 240.0, pg_timeout_s: float = 60.0,
                 agent_env: dict[str, str] | None = None, **rdzv_conf: int) -> dict[str, Any]:  # fmt: skip
    """Run the scenario once for ``strategy``; return the facts and figures (see the module doc).
    ``agent_env``: more environment variables of both agents (and so of their workers). Raises
    ``cluster.ClusterError`` (with the agents' logs) when the survivor's agent does not exit in
    ``timeout`` seconds."""
    workdir = Path(workdir)
    events, ckpt, logs = workdir / "events", workdir / "ckpt", workdir / "logs"
    for d in (events, ckpt, logs):
        d.mkdir(parents=True, exist_ok=True)
    argv = [str(SCRIPT), "--strategy", strategy, "--ckpt-dir", str(ckpt), "--events", str(events), "--max-steps", str(max_steps),
            "--ckpt-every", str(ckpt_every), "--step-sleep", str(step_sleep), "--timeout-s", str(pg_timeout_s)]  # fmt: skip
    spec = cluster.ClusterSpec(world=2, link=cluster.LinkSpec("1gbit"), ranks_per_host=ranks_per_host)
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH", "")]))}
    t_kill = None
    with cluster.EmulatedCluster(spec, log_dir=str(logs)) as c:
        procs = []
        # Both hosts must join the first round within last_call_timeout of each other (a late host
        # joins as a waiting node and makes host 0 restart its workers; in torch 2.13 that restart
        # was seen once to hang 60 s in the agents' rank assignment). torchrun's client connects to a
        # store that is not up yet with a growing back-off (seconds), and an agent takes seconds
        # to import torch on a loaded machine: so host 1's agent is torchrun's own main() entered
        # from a wrapper (:func:`agent_after`) that imports it first and polls host 0's store port
        # every 20 ms; host 0's agent is started once that wrapper is ready.
        for host in (1, 0):
            env = cluster.node_env(spec, host, {**base, **AGENT_ENV, **(agent_env or {})})
            for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):  # torchrun sets the workers' own
                env.pop(k, None)
            env["LOGLEVEL"] = "INFO"  # the agents' timeline (rendezvous rounds, restarts) in logs/host{h}.log
            cmd = torchrun_command(spec, host, argv, **rdzv_conf)
            if host == 1:  # the same torchrun, entered once host 0's store accepts connections
                i = cmd.index("torch.distributed.run")  # cmd[i - 1] is "-m"
                cmd[i - 1 : i + 1] = [os.path.abspath(__file__), "--_agent-after", f"{spec.master_addr}:{RDZV_PORT}", "--"]
            rp = cluster.RankProcess(host, cmd, str(logs / f"host{host}.log"))
            with open(rp.log, "wb") as log:
                rp.proc = subprocess.Popen(rp.cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(rp)
            c.procs.append(rp)
            if host == 1:  # host 0 (the store) only once host 1's agent has imported torch and polls for it
                _wait_for_text(Path(rp.log), AGENT_READY, rp.proc, 120.0)
        agent1, agent0 = procs
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and agent0.proc.poll() is None:
            if t_kill is None:
                if agent1.proc.poll() is not None:
                    raise cluster.ClusterError(f"host 1's agent exited ({agent1.proc.returncode}) before the kill\n" + c.tails(procs))
                if _host1_step(events, spec) >= kill_at:
                    t_kill = time.time()
                    c._kill_in_namespace(spec.ns(1))  # SIGKILL every process of host 1: agent and workers
            time.sleep(0.02)
        if agent0.proc.poll() is None:
            raise cluster.ClusterError(f"host 0's agent still running after {timeout:.0f} s\n" + c.tails(procs))
        rc, tails = agent0.proc.returncode, c.tails(procs, n=4000)
    res = {"run_id": spec.run_id} | summarize(strategy, read_events(events), t_kill, rc, ranks_per_host, max_steps, ckpt_every, kill_at)
    agent = agent_timeline((logs / "host0.log").read_text(errors="replace"))
    if res.get("split") and len(agent["failed"]) >= 1 and len(agent["rendezvous_complete"]) >= 2:
        t_detect, t_failed, t_rdzv = res["t_detect"], agent["failed"][0], agent["rendezvous_complete"][1]
        res["split"].update(worker_exit=None if t_detect is None else t_failed - t_detect, rendezvous=t_rdzv - t_failed,
                            start=None if res["t_setup_next"] is None else res["t_setup_next"] - t_rdzv)  # fmt: skip
    return res | {"log_tails": tails}


_AGENT_LINE = re.compile(r"^I(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*?\] (.*)$")


def agent_timeline(log: str) -> dict[str, list[float]]:
    """Times (epoch seconds) of the agent's "Worker group FAILED" and "Rendezvous complete" lines
    (torchrun with ``LOGLEVEL=INFO``; its timestamps are local time without a year)."""
    out: dict[str, list[float]] = {"failed": [], "rendezvous_complete": []}
    year = time.localtime().tm_year
    for line in log.splitlines():
        m = _AGENT_LINE.match(line)
        if not m:
            continue
        key = "failed" if "Worker group FAILED" in m.group(3) else "rendezvous_complete" if "Rendezvous complete" in m.group(3) else None
        if key:
            out[key].append(datetime.strptime(f"{year}{m.group(1)} {m.group(2)}", "%Y%m%d %H:%M:%S.%f").timestamp())
    return out


def summarize(strategy: str, ev: list[dict], t_kill: float | None, rc: int, ranks_per_host: int, max_steps: int,
              ckpt_every: int, kill_at: int) -> dict[str, Any]:  # fmt: skip
    attempts: dict[int, dict[str, Any]] = {}
    for e in ev:
        a = attempts.setdefault(e["attempt"], {"ranks": set(), "steps": [], "saves": [], "exceptions": []})
        a["ranks"].add(e["rank"])
        if e["event"] == "proc":
            a.setdefault("t_proc", e["t_proc"])
            a["t_proc"] = min(a["t_proc"], e["t_proc"])
            a["world_env"] = e["world"]
        elif e["event"] == "setup" and e["rank"] == 0:
            a["t_setup"] = e["t"]
        elif e["event"] == "train_start":
            if e["rank"] == 0:
                a.update(t_train_start=e["t"], start_step=e["step"], world=e["world"], num_nodes=e["num_nodes"], devices=e["devices"],
                         layout=e.get("layout"), carried=e.get("carried"))  # fmt: skip
        elif e["event"] == "step":
            a["steps"].append((e["t"], e["rank"], e["step"]))
        elif e["event"] == "save" and e["rank"] == 0:
            a["saves"].append(e["step"])
        elif e["event"] == "exception":
            a["exceptions"].append((e["t"], e["rank"], e["error"]))
        elif e["event"] == "end" and e["rank"] == 0:
            a["end_step"] = e["step"]
    order = sorted(attempts)
    res: dict[str, Any] = {"strategy": strategy, "exit_code": rc, "ranks_per_host": ranks_per_host, "max_steps": max_steps,
                           "ckpt_every": ckpt_every, "kill_at": kill_at, "killed": t_kill is not None, "attempts": []}  # fmt: skip
    for n in order:
        a = attempts[n]
        res["attempts"].append({
            "attempt": n, "ranks": sorted(a["ranks"]), "world": a.get("world"), "num_nodes": a.get("num_nodes"),
            "start_step": a.get("start_step"), "layout": a.get("layout"), "carried": a.get("carried"), "last_step": max((s for _, _, s in a["steps"]), default=None),
            "end_step": a.get("end_step"), "saves": a["saves"], "exceptions": [x[2] for x in a["exceptions"]][:4],
        })  # fmt: skip
    if t_kill is None or len(order) < 2:
        return res
    first, nxt = attempts[order[0]], attempts[order[1]]
    done = max((s for t, _, s in first["steps"] if t <= t_kill), default=0)
    after = max((s for t, _, s in first["steps"] if t > t_kill), default=done)
    survivors = [x for x in first["exceptions"] if x[0] > t_kill and x[1] < ranks_per_host]
    t_detect = min((x[0] for x in survivors), default=None)
    first_step = min((t for t, r, _ in nxt["steps"] if r == 0), default=None)
    ckpt_step = nxt.get("start_step")
    res.update(
        steps_done_at_kill=done, steps_after_kill=after - done, checkpoint_step=ckpt_step,
        last_save_before_kill=max((s for s in first["saves"] if s <= done), default=0),
        steps_lost=None if ckpt_step is None else done - ckpt_step,
        final_step=attempts[order[-1]].get("end_step"), restarts=len(order) - 1,
        world_before=first.get("world"), world_after=nxt.get("world"),
        seconds_to_resume=None if first_step is None else first_step - t_kill,
        t_detect=t_detect, t_setup_next=nxt.get("t_setup"),
        split={  # refined by run_scenario with the agent's log: worker_exit, rendezvous, start
            "detection": None if t_detect is None else t_detect - t_kill,
            "worker_exit": None,
            "rendezvous": None if t_detect is None else nxt["t_proc"] - t_detect,
            "start": nxt["t_setup"] - nxt["t_proc"] if "t_setup" in nxt else None,
            "restore": nxt["t_train_start"] - nxt["t_setup"] if "t_train_start" in nxt and "t_setup" in nxt else None,
            "first_step": None if first_step is None or "t_train_start" not in nxt else first_step - nxt["t_train_start"],
        },
    )  # fmt: skip
    return res


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if abs(x) < 1 else f"{x:.1f}"


def _n(x: float | None) -> str:
    """A step count (a median of counts may be a half)."""
    return "-" if x is None else str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def table(results: list[dict]) -> str:
    rows = ["| strategy | ranks: before -> after | killed after step | resumed at step | steps lost (+ run after the kill) | "
            "seconds to resume | detection | worker exit | rendezvous | start | restore | first step | final step, exit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        s = r.get("split", {})
        rows.append(
            f"| {r['strategy']} | {r.get('world_before')} -> {r.get('world_after')} | {_n(r.get('steps_done_at_kill'))} | "
            f"{_n(r.get('checkpoint_step'))} | {_n(r.get('steps_lost'))} (+{_n(r.get('steps_after_kill'))}) | {_f(r.get('seconds_to_resume'))} | {_f(s.get('detection'))} | "
            f"{_f(s.get('worker_exit'))} | {_f(s.get('rendezvous'))} | {_f(s.get('start'))} | {_f(s.get('restore'))} | {_f(s.get('first_step'))} | "
            f"{_n(r.get('final_step'))}, {r['exit_code']} |"
        )  # fmt: skip
    return "\n".join(rows)


def medians(results: list[dict]) -> list[dict]:
    """Per (strategy, ranks per host): the median of every figure over the repeats."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["strategy"], r["ranks_per_host"]), []).append(r)
    out = []
    for (strategy, per_host), rs in groups.items():
        def med(get):
            vals = [v for v in (get(r) for r in rs) if v is not None]
            return statistics.median(vals) if vals else None

        out.append({"strategy": strategy, "ranks_per_host": per_host, "runs": len(rs),
                    "world_before": rs[0].get("world_before"), "world_after": rs[0].get("world_after"),
                    "steps_done_at_kill": med(lambda r: r.get("steps_done_at_kill")), "checkpoint_step": med(lambda r: r.get("checkpoint_step")),
                    "steps_lost": med(lambda r: r.get("steps_lost")), "steps_after_kill": med(lambda r: r.get("steps_after_kill")),
                    "seconds_to_resume": med(lambda r: r.get("seconds_to_resume")),
                    "split": {k: med(lambda r, k=k: r["split"].get(k)) for k in rs[0].get("split", {})},
                    "final_step": med(lambda r: r.get("final_step")), "exit_code": max(r["exit_code"] for r in rs)})  # fmt: skip
    return out


def recipe(host: int = 0, script: str = "train.py") -> str:
    """The torchrun command line of host ``host`` (without ``ip netns exec``), as the docs quote it."""
    cmd = torchrun_command(cluster.ClusterSpec(world=2, run_id="1-0"), host, [script])
    env = [f"{k}={v}" for k, v in AGENT_ENV.items()]
    return " ".join([*env, "torchrun", *cmd[cmd.index("torch.distributed.run") + 1 :]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_agent-after"]:  # see run_scenario: host 1's agent
        agent_after(argv[1], argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--ranks-per-host", type=int, nargs="+", default=[1], help="one or more: ranks (torchrun workers) per host")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--kill-at", type=int, default=15)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=os.path.join(OUT, "elastic_restart.json"))
    a = p.parse_args(argv)
    cluster.require_root()
    cluster.cleanup_stale()
    results: list[dict] = []
    failed: list[dict] = []  # runs that did not finish (kept in the JSON; the exit status is then 1)
    for per_host, _, s in itertools.product(a.ranks_per_host, range(a.repeats), a.strategies):
        work = tempfile.mkdtemp(prefix=f"elastic-{s}-")
        try:
            r = run_scenario(s, work, per_host, a.max_steps, a.ckpt_every, a.kill_at, a.step_sleep)
        except cluster.ClusterError as e:
            print(f"{s}: {e}\n(kept {work})", file=sys.stderr)
            failed.append({"strategy": s, "ranks_per_host": per_host, "error": str(e)[:300]})
            continue
        tails = r.pop("log_tails")
        if r["exit_code"] != 0 or r.get("final_step") != a.max_steps:
            print(f"{tails}\n{json.dumps(r, indent=1)}\n(kept {work})", file=sys.stderr)
            failed.append(r)
            continue
        shutil.rmtree(work, ignore_errors=True)
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("strategy", "ranks_per_host", "steps_lost", "seconds_to_resume", "split")}), flush=True)
    summary = medians(results)
    doc = {"machine": machine_description("2 emulated hosts (network namespaces), 1 Gbit/s"),
           "recipe": recipe(),
           "settings": {"max_steps": a.max_steps, "ckpt_every": a.ckpt_every, "kill_at": a.kill_at, "step_sleep": a.step_sleep},
           "agent_env": AGENT_ENV, "medians": summary, "results": results, "failed": failed}  # fmt: skip
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"medians of {a.repeats} run(s) each:")
    print(table(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
