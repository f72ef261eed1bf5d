"""The raw-DDP and Accelerate examples, end to end on 2 CPU processes, with the exact commands of
docs/raw_ddp.md and docs/accelerate.md (scripts by absolute path, run in a temporary folder):
train and save, then resume from each rank's own saved state."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
NUMEL = 320 + 18496 + 131200 + 1290  # the examples' CNN: one DDP bucket
K = math.ceil(0.01 * NUMEL)
STEPS_PER_EPOCH = 24  # 1500 digits / 2 ranks / batch 32 (raw) or 16 x 2 micro-batches (accelerate)


def run(cmd: list[str], cwd: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GAUSSK_")}
    proc = subprocess.run(cmd, cwd=cwd, env={**environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


def test_raw_ddp_example_trains_sparse_and_resumes_each_ranks_state(tmp_path):
    script = str(ROOT / "examples" / "raw_ddp.py")
    # python examples/raw_ddp.py --world-size 2 --epochs 2 --save-dir ckpt
    out = run([sys.executable, script, "--world-size", "2", "--epochs", "2", "--save-dir", "ckpt"], tmp_path)
    assert "raw DDP + gaussk_hook on 2 x cpu (gloo), density 0.01" in out, out
    assert float(re.search(r"test accuracy (\d\.\d+)", out).group(1)) > 0.5
    nnz = int(re.search(r"optimizer: (\d+) of (\d+)", out).group(1))
    assert 0 < nnz <= 2 * K < NUMEL // 10
    assert re.findall(r"rank (\d): steps (\d+)", out) == [("0", str(2 * STEPS_PER_EPOCH)), ("1", str(2 * STEPS_PER_EPOCH))]
    saved = [torch.load(tmp_path / "ckpt" / f"rank{r}.pt", weights_only=True)["gaussk"] for r in range(2)]
    assert saved[0]["step"] == 2 * STEPS_PER_EPOCH
    assert any(not torch.equal(saved[0]["residuals"][n], saved[1]["residuals"][n]) for n in saved[0]["residuals"])

    # python examples/raw_ddp.py --world-size 2 --epochs 1 --resume-from ckpt
    out = run([sys.executable, script, "--world-size", "2", "--epochs", "1", "--resume-from", "ckpt"], tmp_path)
    assert "epochs 2..3 (resumed from ckpt)" in out, out
    assert float(re.search(r"test accuracy (\d\.\d+)", out).group(1)) > 0.7
    assert re.findall(r"rank (\d): steps (\d+)", out) == [("0", str(3 * STEPS_PER_EPOCH)), ("1", str(3 * STEPS_PER_EPOCH))]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_accelerate_example_with_torchrun_saves_and_resumes_per_rank_state(tmp_path):
    # ACCELERATE_USE_CPU=true GAUSSK_DENSITY=0.01 torchrun --standalone --nproc_per_node 2 \
    #     examples/accelerate_train.py --epochs 2 --save-dir acc_ckpt
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(ROOT / "examples" / "accelerate_train.py")]
    env = {"ACCELERATE_USE_CPU": "true", "GAUSSK_DENSITY": "0.01"}
    out = run([*cmd, "--epochs", "2", "--save-dir", "acc_ckpt"], tmp_path, **env)
    assert "Accelerate on 2 x cpu (DistributedType.MULTI_CPU): GaussK density 0.01, selector 'gaussk', 48 optimizer steps" in out, out
    assert re.findall(r"rank (\d): hook calls (\d+)", out) == [("0", "48"), ("1", "48")]  # once per optimizer step
    assert float(re.search(r"test accuracy (\d\.\d+)", out).group(1)) > 0.5
    assert {"gaussk_state_rank0.pt", "gaussk_state_rank1.pt"} <= set(os.listdir(tmp_path / "acc_ckpt"))

    # ... examples/accelerate_train.py --epochs 1 --resume-from acc_ckpt
    out = run([*cmd, "--epochs", "1", "--resume-from", "acc_ckpt"], tmp_path, **env)
    assert "72 optimizer steps (resumed from acc_ckpt)" in out, out
    assert float(re.search(r"test accuracy (\d\.\d+)", out).group(1)) > 0.7
