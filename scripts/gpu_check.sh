#!/usr/bin/env bash
# One command on a CUDA machine: does everything GPU-specific work, and how fast is it?
#
#   bash scripts/gpu_check.sh
#
# 1. checks for an NVIDIA GPU (nvidia-smi -L) and fails at once, naming what is missing and
#    installing nothing, where there is none;
# 2. makes .venv-gpu (reused when it already has a CUDA torch) with TORCH_SPEC (default
#    "torch>=2.4": PyPI's Linux wheels are CUDA builds, and bring triton) and ".[dev]";
# 3. runs the `cuda` tests (tests/test_cuda.py) with TRITON_INTERPRET=0, so the kernels compile;
# 4. runs benchmarks/gpu_selection.py: gaussk (Triton and torch paths) vs torch.topk and vs two
#    read passes at the measured copy bandwidth, launches and host syncs per bucket;
# 5. writes benchmarks/out/gpu_check.json and benchmarks/out/gpu_check.md.
# Exit status: 0 when every cuda test passed and the benchmark ran, non-zero otherwise.
# Environment: TORCH_SPEC, GPU_CHECK_VENV (default .venv-gpu), GPU_CHECK_REINSTALL=1 (fresh
# install), GPU_CHECK_NVIDIA_SMI (the nvidia-smi to ask; default: the one on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

# ---- 1. a GPU, before anything is installed
NVSMI="${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}"
if ! command -v "$NVSMI" >/dev/null 2>&1; then
    fail "no CUDA GPU: \`$NVSMI\` (the NVIDIA driver's tool) is not installed, so this machine has no usable NVIDIA GPU. \
Needed: an NVIDIA GPU with its driver, then this script installs a CUDA build of torch and triton. Nothing was installed."
fi
if ! gpus="$("$NVSMI" -L 2>&1)" || ! grep -q '^GPU ' <<<"$gpus"; then
    fail "no CUDA GPU: \`$NVSMI -L\` lists no GPU (it said: ${gpus:-nothing}). Nothing was installed."
fi
echo "gpu_check: found:"
echo "$gpus"

# ---- 2. the venv
VENV="${GPU_CHECK_VENV:-.venv-gpu}"
PY="$VENV/bin/python"
ready() {
    "$PY" -c "import torch, triton, pytest, lightning_gaussk; assert torch.cuda.is_available()" >/dev/null 2>&1
}
if [ "${GPU_CHECK_REINSTALL:-0}" = 1 ] || ! [ -x "$PY" ] || ! ready; then
    echo "gpu_check: installing ${TORCH_SPEC:-torch>=2.4} and .[dev] into $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "${TORCH_SPEC:-torch>=2.4}"
    "$PY" -m pip install -q -e ".[dev]"
fi
"$PY" - <<'EOF' || fail "the installed torch cannot use the GPU (see above); set TORCH_SPEC to a CUDA build of torch, e.g. TORCH_SPEC='torch>=2.4' (PyPI, Linux) or your own, and rerun with GPU_CHECK_REINSTALL=1"
import sys
import torch
if not torch.cuda.is_available():
    print(f"gpu_check: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device", file=sys.stderr)
    sys.exit(1)
try:
    import triton
except Exception as e:
    print(f"gpu_check: `import triton` failed ({e}): the kernels cannot compile", file=sys.stderr)
    sys.exit(1)
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
EOF

# ---- 3. the cuda tests, compiled kernels
OUT=benchmarks/out
mkdir -p "$OUT"
export TRITON_INTERPRET=0
start=$SECONDS
set +e
"$PY" -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_check_tests.xml"
tests_rc=$?
set -e
echo "gpu_check: cuda tests took $((SECONDS - start)) s (exit status $tests_rc)"

# ---- 4 and 5. the benchmark, one JSON and one markdown file
"$PY" benchmarks/gpu_selection.py --json "$OUT/gpu_check.json" --markdown "$OUT/gpu_check.md" \
    --junit "$OUT/gpu_check_tests.xml" || fail "benchmarks/gpu_selection.py failed"
echo "gpu_check: wrote $OUT/gpu_check.json and $OUT/gpu_check.md in $SECONDS s"
if [ "$tests_rc" != 0 ]; then
    fail "some cuda tests failed (pytest exit status $tests_rc; see above and $OUT/gpu_check.md)"
fi
echo "gpu_check: OK"
