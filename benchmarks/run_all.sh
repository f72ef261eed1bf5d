#!/usr/bin/env bash
# Reproduce every table and plot of the emulated-network benchmarks in docs/benchmarks.md
# ("Throughput on an emulated network", "Time to accuracy", "Cost model") and docs/img/bench_*.png.
#
#   sudo bash benchmarks/run_all.sh            # needs root (network namespaces, tc)
#   PYTHON=/path/to/python bash benchmarks/run_all.sh
#
# About 10 minutes of wall-clock time on a 2-core machine (~12 CPU-minutes). The Selection section
# is separate: python benchmarks/selection.py. Cleanup of namespaces is done by each script
# (also on Ctrl-C); the last line checks that none of this harness's namespaces is left.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ "$(id -u)" != "0" ]; then
  echo "run_all.sh: the emulated cluster needs root (network namespaces and tc); run it with sudo." >&2
  exit 2
fi
"$PY" benchmarks/cluster.py --cleanup-stale
# throughput: every setting in one call (each setting = one run of the emulated cluster);
# writes the "Throughput" section, bench_throughput.png and benchmarks/out/throughput.json
"$PY" benchmarks/throughput.py "$@"
# cost model: calibrated from that JSON; writes the "Cost model" section and bench_costmodel.png
"$PY" benchmarks/costmodel_report.py
# time to accuracy on digits, 2 hosts at 1 Gbit/s; writes its section and bench_tta_*.png
"$PY" benchmarks/time_to_accuracy.py
left="$(ip netns list | grep -c '^gkb-' || true)"
if [ "$left" != "0" ]; then
  echo "run_all.sh: $left namespaces of this harness are left: ip netns list | grep ^gkb-" >&2
  exit 1
fi
echo "run_all.sh: done; see docs/benchmarks.md"
