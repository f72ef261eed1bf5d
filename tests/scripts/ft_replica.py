"""One torchft replica group (one process) training SparseLocalSGD under a ``torchft.Manager``.

Run as a script (``python tests/scripts/ft_replica.py ARGS``), or as ``main(ARGS)`` in a process of
its own (the tests start it from a forkserver that has torch, torchft and the package imported
already, so that a restart takes milliseconds, not the imports' seconds).

Used by tests/test_torchft.py (3 replica groups, one killed hard mid-window and restarted) and by
benchmarks/ft_failures.py. The lighthouse runs in the parent; this process makes its own
``TCPStore`` and ``Manager(pg=ProcessGroupGloo, use_async_quorum=False)`` with short timeouts.

It trains until the manager's step reaches ``--end`` (or the number written to ``--end-file``
by the parent, read at every inner step), writing after every outer step a progress file (JSON:
the step, the participants of each quorum) that the parent watches, and at the end its records
(``torch.save``) to ``--out``: per outer step the state before the quorum, after it, at the vote
and after the step (theta, the error feedback, the model, what it sent).

``--pause-after N``: once N of its outer steps committed with at least
``--pause-participants`` groups, after one more optimizer step (mid-window) it writes
``"paused": true`` to its progress file and sleeps, for the parent to SIGKILL it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gaussk.local_sgd import SparseLocalSGD  # noqa: E402

MODELS = {"tiny": (8, 16, 1), "bench": (32, 256, 2)}  # (inputs, width, hidden layers)


def net(model: str, seed: int) -> nn.Module:
    d_in, width, depth = MODELS[model]
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))  # tiny: 161 parameters; bench: 74,753


def batch(model: str, i: int, who: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth regression target; batch ``i`` of replica ``who`` (its own data stream)."""
    d_in = MODELS[model][0]
    g = torch.Generator().manual_seed(7919 * i + 31 * who + 1)
    x = torch.randn(n, d_in, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.3 * torch.sin(3 * x[:, 2:3]) + 0.5 * x[:, 3:4] * x[:, 4:5]


def eval_loss(model_name: str, model: nn.Module) -> float:
    x, y = batch(model_name, 10_000, 99, n=1024)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--replica", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--who", type=int, default=0, help="the replica's data stream")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--progress", required=True)
    ap.add_argument("--end", type=int, default=None)
    ap.add_argument("--end-file", default=None)
    ap.add_argument("--pause-after", type=int, default=None, help="outer steps of --pause-participants, then pause")
    ap.add_argument("--pause-participants", type=int, default=1)
    ap.add_argument("--sync-every", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--quantize", default="default", help="'default' (the library's), 'none', 2 or 8")
    ap.add_argument("--outer-lr", type=float, default=0.8)
    ap.add_argument("--ef-decay", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--inner-sleep", type=float, default=0.0)
    ap.add_argument("--records", type=int, default=1, help="0: keep no per-step tensors (benchmarks)")
    ap.add_argument("--log", default=None, help="stdout and stderr to this file (a forked replica)")
    args = ap.parse_args(argv)
    if args.log:
        fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        _run(args)
        code = 0
    except BaseException:
        traceback.print_exc()
        _write_json(args.progress, {"error": traceback.format_exc()})
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no slow teardown of torchft's servers and threads


def _run(args: argparse.Namespace) -> None:
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    torch.set_num_threads(1)
    t_start = time.monotonic()
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=5)), load_state_dict=None, state_dict=None, min_replica_size=1,
        use_async_quorum=False, lighthouse_addr=args.lighthouse, store_addr="localhost", store_port=store.port, rank=0,
        world_size=1, replica_id=args.replica, timeout=timedelta(seconds=5), quorum_timeout=timedelta(seconds=30),
        connect_timeout=timedelta(seconds=10), heartbeat_interval=timedelta(milliseconds=100),
    )  # fmt: skip
    model = net(args.model, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    kw = {} if args.quantize == "default" else {"quantize": None if args.quantize == "none" else int(args.quantize)}
    local = SparseLocalSGD(
        model, opt, sync_every=args.sync_every, density=args.density, outer_lr=args.outer_lr, ef_decay=args.ef_decay,
        manager=manager, **kw,
    )  # fmt: skip
    keep = bool(args.records)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def snap() -> dict:
        if not keep:
            return {"step": manager.current_step()}
        return {"theta": local.global_params().clone(), "e": local.error_feedback(), "params": flat(),
                "step": manager.current_step(), "inner_step": local.inner_step}  # fmt: skip

    rec: list[dict] = []
    seen: list[list[int]] = []  # (step after the quorum, participants, committed) per outer step
    start_quorum, should_commit = manager.start_quorum, manager.should_commit

    def spy_start_quorum(*a, **k):
        before, heals = snap(), local.ft.heals
        start_quorum(*a, **k)
        rec.append({"before_quorum": before, "after_quorum": snap(), "healed": local.ft.heals > heals,
                    "participants": int(manager.num_participants()), "t": time.monotonic() - t_start})  # fmt: skip

    def spy_should_commit(*a, **k):
        cur = rec[-1]
        cur["at_vote"] = snap()
        cur["committed"] = bool(should_commit(*a, **k))
        return cur["committed"]

    manager.start_quorum, manager.should_commit = spy_start_quorum, spy_should_commit

    def end() -> int:
        if args.end_file and os.path.exists(args.end_file):
            return int(Path(args.end_file).read_text())
        return args.end if args.end is not None else 1 << 30

    progress = {"replica": args.replica, "pid": os.getpid(), "step": 0, "seen": seen, "paused": False}
    _write_json(args.progress, progress)
    loss0, i = eval_loss(args.model, model), 0
    while manager.current_step() < end():
        quorums = local.ft.quorums
        x, y = batch(args.model, i, args.who, n=args.batch)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        i += 1
        if local.ft.quorums != quorums:
            r = rec[-1]
            r["after"] = snap()
            if keep:
                r["sent"] = local.last_sent()
            seen.append([r["after_quorum"]["step"], r["participants"], int(r["committed"]), int(r["healed"])])
            progress.update(step=manager.current_step(), t=time.monotonic() - t_start)
            _write_json(args.progress, progress)
        full = sum(x[1] >= args.pause_participants and x[2] for x in seen)
        into = (local.inner_step - local.window_start) % args.sync_every  # optimizer steps into the window
        if args.pause_after is not None and full >= args.pause_after and into == 1:
            progress.update(paused=True, inner=i, window=into)
            _write_json(args.progress, progress)
            time.sleep(3600)  # killed here by the parent, mid-window
        if args.inner_sleep:
            time.sleep(args.inner_sleep)
    out = {
        "rec": rec, "seen": seen, "k": local.k, "d": local.d, "telemetry": dict(local.telemetry),
        "ft": {key: getattr(local.ft, key) for key in ("quorums", "heals", "uncommitted", "participants")},
        "loss": (loss0, eval_loss(args.model, model)), "theta": local.global_params().clone(), "params": flat(),
        "step": manager.current_step(), "wall_s": time.monotonic() - t_start, "outer_bytes": local.outer_bytes,
        "quantize": local.config.quantize,
    }  # fmt: skip
    torch.save(out, args.out)
    progress.update(done=True, step=manager.current_step())
    _write_json(args.progress, progress)
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
