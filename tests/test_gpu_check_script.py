"""scripts/gpu_check.sh fails at once, naming what is missing, on a machine without a CUDA GPU,
and benchmarks/gpu_selection.py runs end to end (on CPU, kernels interpreted) and refuses
``--device cuda`` without CUDA."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BENCH = ROOT / "benchmarks" / "gpu_selection.py"


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv-gpu"
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
        env={**os.environ, "GPU_CHECK_VENV": str(venv), **env},
    )
    assert not venv.exists(), "the script created its venv before finding a GPU"
    return proc


def assert_refused(proc: subprocess.CompletedProcess, *names: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "FAILED" in proc.stderr and "GPU" in proc.stderr and "Nothing was installed" in proc.stderr
    for name in names:
        assert name in proc.stderr, out
    assert "pip" not in out and "installing" not in out  # it stopped before installing anything


def test_without_nvidia_smi_the_script_fails_naming_the_missing_gpu_and_installs_nothing(tmp_path):
    if shutil.which("nvidia-smi") is None:  # this machine: the real no-GPU path, as it is
        proc = run_script(tmp_path)
    else:  # a GPU machine: the same branch, with the driver's tool made absent
        proc = run_script(tmp_path, GPU_CHECK_NVIDIA_SMI=str(tmp_path / "no-such-nvidia-smi"))
    assert_refused(proc, "nvidia-smi", "CUDA")


@pytest.mark.parametrize(
    "body", ['echo "No devices were found"; exit 6', 'echo "No devices were found"'], ids=["fails", "lists_none"]
)
def test_an_nvidia_smi_that_lists_no_gpu_is_refused_too(tmp_path, body):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = run_script(tmp_path, GPU_CHECK_NVIDIA_SMI=str(fake))
    assert_refused(proc, "lists no GPU", "No devices were found")


def test_gpu_benchmark_refuses_cuda_without_cuda_and_helps():
    import torch

    help_ = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--device" in help_.stdout
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark's no-CUDA refusal cannot happen here")
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs CUDA" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr


def test_gpu_benchmark_smoke_run_on_cpu_writes_json_and_markdown(tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--sizes", "20000", "--densities", "0.01", "--repeats", "1",
         "--json", str(out_json), "--markdown", str(out_md), "--junit", str(junit)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["tests"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1,
                               "failed_tests": ["tests.test_cuda::test_b"]}
    methods = {row["method"] for row in result["selection"]}
    assert {"topk", "gaussk", "gaussk_torch", "accum_unfused"} <= methods
    for row in result["selection"]:
        assert row["ms"] > 0 and row["two_reads_ms"] > 0 and row["d"] == 20_000 and row["k"] == 200
        assert 0.99 <= row["capture"] <= 1.0 + 1e-9  # every method keeps the top-k's energy up to a bin
    assert [row["call"] for row in result["profile"]] == [
        "select gaussk", "accumulate_select (fused on CUDA)", "gaussk_hook, one bucket"]
    md = out_md.read_text()
    assert "| 20000 | 0.01 | topk |" in md and "FAILED `tests.test_cuda::test_b`" in md
