#!/usr/bin/env bash
# Create .venv and install lightning_gaussk with everything its examples and tests use.
# TORCH_SPEC picks the torch to install first (default: the CPU build these machines carry,
# torch==2.13.0; on a CUDA machine use e.g. TORCH_SPEC="torch>=2.4" or your own build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
