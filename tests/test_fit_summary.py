"""The end-of-fit summary and local SGD's logged figures (issue 26, items 5 and 8).

- every engine logs, on rank 0 only, one line at the end of a fit: the fit's optimizer steps, the
  bytes rank 0 sent against what dense data parallelism would have sent (how many times fewer)
  and the time in communication where measured; a resumed fit sums up its own steps only; a fit
  that fails, and a validation, log none; Accelerate logs it at ``end_training()``;
- local SGD's telemetry has ``bytes_dense`` and ``compression``; ``gaussk/outer_ms`` (and the
  DDP hook's ``gaussk/residual_ratio``) reach a ``CSVLogger`` only on the steps that measured it
  (Lightning's ``self.log`` re-sends a key's last value on every later step of the epoch).

One 2-node launch on loopback (tests/scripts/summary_fit.py: two processes, one device each)
runs every Lightning engine's fits once (module fixture ``fits``); the rest is in this process.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_gaussk  # noqa: F401 (registers the strategies)
from _dist import free_port
from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.engine.describe import fit_summary_line, format_bytes, local_fit_summary_line
from lightning_gaussk.observe.telemetry import local_sgd_figures

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "scripts" / "summary_fit.py"
sys.path.insert(0, str(HERE / "scripts"))
from _launched import groups_at_exit  # noqa: E402

SUMMARY = "fit summary, rank 0's own counters (not summed over ranks;"
NAMES = ("ddp", "resumed", "node", "fsdp", "local", "diloco")


# ------------------------------------------------------------------------------- the text
def test_format_bytes_uses_decimal_units():
    assert [format_bytes(n) for n in (0, 999, 1000, 12_345, 999_999, 1_200_000, 3e9, 5e15)] == [
        "0 B", "999 B", "1.00 kB", "12.35 kB", "1.00 MB", "1.20 MB", "3.00 GB", "5,000.00 TB",
    ]  # fmt: skip


def test_per_step_line_states_steps_bytes_against_dense_factor_and_comm_time_only_when_measured():
    diff = {"hook_calls": 12, "bytes_sent": 2_000, "bytes_dense": 100_000, "hook_ns": 9_000_000, "comm_ns": 4_000_000,
            "select_ns": 2_000_000}  # fmt: skip
    line = fit_summary_line(diff, steps=6, layout=Layout(4, 0))
    assert line.startswith("GaussK " + SUMMARY + " flat, 4 ranks): 6 optimizer steps, 12 buckets compressed;")
    assert "sent 2.00 kB against 100.00 kB for dense DDP's all-reduce of the same buckets (50.0x fewer)" in line
    assert "communication 4.0 ms" in line and "hook 9.0 ms, selection 2.0 ms" in line
    untimed = fit_summary_line({**diff, "hook_ns": 0}, steps=6, layout=Layout(4, 0))  # GPU buckets not yet folded
    assert "communication" not in untimed and "hook " not in untimed and "(50.0x fewer)" in untimed
    more = fit_summary_line({**diff, "bytes_sent": 300_000, "dense_buckets": 2, "skipped_buckets": 1}, steps=6, layout=Layout(4, 0))
    assert "(3.00x more)" in more and "2 buckets sent dense (dense_fallback), 1 buckets skipped (non-finite)" in more


def test_per_step_line_in_node_mode_and_fsdp2_names_the_reference_and_the_traffic_inside_the_node():
    diff = {"hook_calls": 4, "bytes_sent": 1_000, "bytes_dense": 8_000, "bytes_intra": 6_000, "hook_ns": 5, "intra_ns": 2_000_000,
            "inter_ns": 3_000_000}  # fmt: skip
    node = fit_summary_line(diff, steps=4, layout=Layout(4, 0, 2))
    assert "node mode, 2 nodes x 2 ranks): 4 optimizer steps" in node and "(8.0x fewer)" in node
    assert "inside the node 6.00 kB (reduce-scatter and all-gather)" in node
    assert "communication 5.0 ms (inside the node 2.0 ms, between nodes 3.0 ms)" in node
    fsdp = fit_summary_line(diff, steps=4, layout=Layout(4, 0, 2), fsdp=True)
    assert "FSDP2 across nodes, 2 nodes x 2 ranks): 4 optimizer steps, 4 shards compressed" in fsdp
    assert "for native HSDP's all-reduce of the same shards between the replicas (8.0x fewer)" in fsdp
    assert "inside the node 6.00 kB (FSDP's reduce-scatter)" in fsdp
    one_node = fit_summary_line(diff, steps=4, layout=Layout(2, 0, 2), fsdp=True)
    assert "one node: nothing was exchanged between nodes" in one_node and "fewer" not in one_node
    assert "one rank: nothing was exchanged" in fit_summary_line(diff, steps=4, layout=Layout(1, 0))
    assert "the hook did not run" in fit_summary_line({}, steps=0, layout=Layout(2, 0))


def test_local_line_compares_with_dense_ddp_over_the_same_optimizer_steps():
    diff = {"inner_steps": 12, "outer_steps": 4, "skipped_outer_steps": 1, "dense_outer_steps": 2, "bytes_sent": 1_200,
            "outer_ns": 8_000_000}  # fmt: skip
    line = local_fit_summary_line(diff, dense_bytes_per_step=1_000, sync_every=3, layout=Layout(2, 0))
    assert line.startswith("GaussK local SGD " + SUMMARY + " flat, 2 ranks): 12 optimizer steps, 4 outer steps ")
    assert "(H = sync_every = 3; 1 skipped (non-finite); 2 sent dense)" in line
    assert "sent 1.20 kB in the outer steps against 12.00 kB for dense DDP's all-reduce over the same 12 optimizer steps (10.0x fewer)" in line
    assert "outer steps 8.0 ms of host wall time (2.00 ms each" in line
    alone = local_fit_summary_line(diff, dense_bytes_per_step=1_000, sync_every=3, layout=Layout(1, 0))
    assert "one rank: nothing was exchanged" in alone and "fewer" not in alone


def test_local_sgd_figures_give_bytes_dense_over_the_optimizer_steps_and_the_compression_so_far():
    before = {"inner_steps": 2, "outer_steps": 0, "bytes_sent": 0}
    after = {"inner_steps": 3, "outer_steps": 1, "bytes_sent": 150, "outer_ns": 2_000_000}
    got = local_sgd_figures(before, after, 0, dense_bytes_per_step=1_000)
    assert got["bytes_dense"] == 3_000.0 and got["compression"] == 20.0 and got["outer_ms"] == 2.0
    early = local_sgd_figures({"inner_steps": 0}, {"inner_steps": 1}, 1, dense_bytes_per_step=1_000)
    assert early["bytes_dense"] == 1_000.0 and "compression" not in early  # nothing sent yet
    assert "bytes_dense" not in local_sgd_figures(before, after, 0)  # the size not given


# ------------------------------------------------------------------------------- Lightning, one device, in this process
class _Tiny(L.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 1)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("boom")
        return self.net(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _summaries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lightning_gaussk" and "fit summary" in r.getMessage()]


def test_one_device_fit_logs_one_summary_a_validation_none_and_a_failed_fit_none(caplog):
    saved = dict(os.environ)
    data = torch.utils.data.DataLoader(torch.randn(32, 8), batch_size=4)
    try:
        with caplog.at_level(logging.INFO, logger="lightning_gaussk"):
            kw = {"accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False, "enable_checkpointing": False,
                  "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
            trainer = L.Trainer(strategy="gaussk_ddp", **kw)
            trainer.fit(_Tiny(), data, data)
            (line,) = _summaries(caplog)
            assert "flat, 1 ranks): 3 optimizer steps" in line and "one rank: nothing was exchanged" in line
            trainer.validate(trainer.lightning_module, data)
            assert len(_summaries(caplog)) == 1  # a validation is not a fit
            caplog.clear()
            with pytest.raises(RuntimeError, match="boom"):
                L.Trainer(strategy="gaussk_ddp", **kw).fit(_Tiny(fail_at=1), data, data)
            assert _summaries(caplog) == []  # interrupted by an error: no summary
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------------------- Accelerate, in this process
def test_accelerate_end_training_logs_each_registered_states_summary_once(caplog):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    from lightning_gaussk.frontends.wiring import summary_at_end_training
    from lightning_gaussk.local_sgd import SparseLocalSGD

    try:
        accelerator = accelerate.Accelerator(cpu=True)
        model = nn.Linear(8, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with caplog.at_level(logging.INFO, logger="lightning_gaussk"), pytest.warns(UserWarning, match="nothing is exchanged"):
            local = SparseLocalSGD(model, opt, sync_every=2, density=0.5, chunk=None, quantize=None)
        for _ in range(2):  # before registration: not this summary's steps
            opt.step()
        summary = summary_at_end_training(accelerator, local)
        other = summary_at_end_training(accelerator, local)
        for _ in range(5):
            opt.step()
        with caplog.at_level(logging.INFO, logger="lightning_gaussk"):
            caplog.clear()
            accelerator.end_training()
            lines = _summaries(caplog)
            assert len(lines) == 2 and lines[0] == lines[1] == summary.line() == other.line()
            assert "flat, 1 ranks): 5 optimizer steps, 2 outer steps (H = sync_every = 2" in lines[0]
            caplog.clear()
            accelerator.end_training()
            assert _summaries(caplog) == []  # logged once
        summary.restart()
        assert "0 optimizer steps, 0 outer steps" in summary.line()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# ------------------------------------------------------------------------------- two nodes, every engine
def _run_nodes(out: Path, timeout: float = 400) -> list[str]:
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    base["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), base.get("PYTHONPATH", "")])
    procs, logs = [], []
    for n in range(2):
        env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(n), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        log = open(out / f"node{n}.log", "wb")
        logs.append(log)
        cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=out, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2.0)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for log in logs:
            log.close()
    texts = [(out / f"node{n}.log").read_text(errors="replace") for n in range(2)]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(f"--- node {n} (exit {c})\n{t[-3000:]}" for n, (c, t) in enumerate(zip(codes, texts)))
    return texts


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary_fit")
    _run_nodes(out)
    recs = {n: [torch.load(out / n / f"rank{r}.pt", weights_only=False) for r in range(2)] for n in NAMES}
    return {"out": out, **recs}


def _summary(recs: list[dict]) -> str:
    """Rank 0's one summary line; rank 1 logs none."""
    (line,) = [x for x in recs[0]["lines"] if "fit summary" in x]
    assert not [x for x in recs[1]["lines"] if "fit summary" in x]
    return line


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _diff(after: dict, before: dict | None = None) -> dict:
    return {k: v - (before or {}).get(k, 0) for k, v in after.items()}


def _check_bytes(line: str, sent: int, dense: int) -> None:
    assert 0 < sent < dense
    assert f"sent {format_bytes(sent)} " in line and f"against {format_bytes(dense)} for" in line
    assert f"({dense / sent:.1f}x fewer)" in line


def test_every_fit_ends_cleanly_and_destroys_its_group(fits):
    assert groups_at_exit(str(fits["out"])) == ["False", "False"]


def test_gaussk_ddp_summary_gives_its_steps_bytes_against_dense_ddp_and_the_comm_time(fits):
    recs = fits["ddp"]
    line = _summary(recs)
    assert line.startswith("GaussK " + SUMMARY + " flat, 2 ranks): 6 optimizer steps, ")
    tel = recs[0]["telemetry"]
    assert tel["bytes_dense"] == 6 * 4 * recs[0]["numel"]  # every fp32 gradient, every step
    _check_bytes(line, tel["bytes_sent"], tel["bytes_dense"])
    assert "communication " in line and "waiting for the slowest rank included" in line  # CPU buckets are timed


def test_a_resumed_gaussk_ddp_fit_sums_up_its_own_steps_not_the_saved_ones(fits):
    line = _summary(fits["resumed"])
    assert "flat, 2 ranks): 3 optimizer steps, " in line  # steps 6 to 9
    d = _diff(fits["resumed"][0]["telemetry"], fits["ddp"][0]["telemetry"])  # the counters continue across the resume
    assert d["bytes_dense"] == 3 * 4 * fits["ddp"][0]["numel"]
    _check_bytes(line, d["bytes_sent"], d["bytes_dense"])


def test_gaussk_ddp_node_mode_summary_says_node_mode_and_the_time_between_nodes(fits):
    line = _summary(fits["node"])
    assert "node mode, 2 nodes x 1 ranks): 4 optimizer steps, " in line
    tel = fits["node"][0]["telemetry"]
    _check_bytes(line, tel["bytes_sent"], tel["bytes_dense"])
    assert "between nodes" in line


def test_gaussk_fsdp_summary_compares_with_native_hsdp_between_the_replicas(fits):
    line = _summary(fits["fsdp"])
    assert "FSDP2 across nodes, 2 nodes x 1 ranks): 4 optimizer steps, " in line and "shards compressed" in line
    tel = fits["fsdp"][0]["telemetry"]
    assert tel["bytes_dense"] == 4 * 4 * fits["fsdp"][0]["numel"]  # one rank per node: its shard is the whole model
    _check_bytes(line, tel["bytes_sent"], tel["bytes_dense"])
    assert "native HSDP" in line and "between nodes" in line


def test_local_sgd_summary_compares_the_outer_steps_with_dense_ddp_over_the_same_optimizer_steps(fits):
    recs = fits["local"]
    line = _summary(recs)
    assert line.startswith("GaussK local SGD " + SUMMARY + " flat, 2 ranks): 9 optimizer steps, 3 outer steps (H = sync_every = 3)")
    tel, dense_step = recs[0]["telemetry"], recs[0]["dense_bytes_per_step"]
    assert dense_step == 4 * recs[0]["numel"] and tel["bytes_sent"] == 3 * recs[0]["outer_bytes"]
    _check_bytes(line, tel["bytes_sent"], 9 * dense_step)
    assert "outer steps " in line and "ms each" in line


def test_diloco_summary_counts_its_dense_outer_steps(fits):
    recs = fits["diloco"]
    line = _summary(recs)
    assert "flat, 2 ranks): 6 optimizer steps, 2 outer steps (H = sync_every = 3; 2 sent dense)" in line
    _check_bytes(line, recs[0]["telemetry"]["bytes_sent"], 6 * recs[0]["dense_bytes_per_step"])


def test_csv_logger_gets_outer_ms_only_on_the_steps_that_ran_an_outer_step(fits):
    rows = _csv(fits["out"] / "local" / "csv" / "version_0" / "metrics.csv")
    with_outer = [int(r["step"]) for r in rows if r["gaussk/outer_ms"]]
    assert with_outer == [2, 5, 8]  # after optimizer steps 3, 6 and 9 (Lightning's rows count from 0)
    assert all(float(r["gaussk/outer_ms"]) > 0 for r in rows if r["gaussk/outer_ms"])
    regular = [r for r in rows if r["gaussk/window_position"]]  # the rows of self.log, one per optimizer step
    assert [int(r["step"]) for r in regular] == list(range(9))
    assert not [r for r in regular if r["gaussk/outer_ms"]]  # never repeated on the steps in between
    rec = fits["local"][0]
    for r in regular:
        step = int(r["step"]) + 1
        assert float(r["gaussk/bytes_dense"]) == step * rec["dense_bytes_per_step"]
        sent = (step // 3) * rec["outer_bytes"]
        assert (r["gaussk/compression"] == "") == (sent == 0)
        if sent:
            assert float(r["gaussk/compression"]) == pytest.approx(step * rec["dense_bytes_per_step"] / sent, rel=1e-6)


def test_csv_logger_gets_residual_ratio_only_on_the_steps_that_measured_it(fits):
    rows = _csv(fits["out"] / "ddp" / "csv" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["gaussk/residual_ratio"]] == [1, 3, 5]  # every 2 optimizer steps
    regular = [r for r in rows if r["gaussk/bytes_sent"]]
    assert [int(r["step"]) for r in regular] == list(range(6)) and not [r for r in regular if r["gaussk/residual_ratio"]]
