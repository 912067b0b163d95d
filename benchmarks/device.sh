#!/usr/bin/env bash
# Issue #14's per-node measurements in one command on the lent 16-core machine (../shared/device/README.md).
# Here, once: bash ../shared/device/make_site.sh   (writes .device/site.tar.xz, ~30 MB)
# Then run, carrying .device:   bash benchmarks/device.sh   (about 6 minutes on 16 cores; results in $OUT)
# rates.py: limit, this job and the Ray Data recipe back to back on 2,400 → 9,600 JPEGs (the set);
# startup.py: the 120-image job without Ray, with Ray, and a finished re-run.
# `bash benchmarks/device.sh prepare` (a second call, ~1 minute): prepare_cost.py, the per-image CPU outside
# the interpreter on that CPU.
set -euo pipefail
mkdir -p /tmp/site && tar -xJf .device/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
nproc; python3 -c "import ray, ai_edge_litert; print('ray', ray.__version__)"
if [ "${1:-}" = prepare ]; then
  timeout 300 python3 benchmarks/prepare_cost.py --repeat 5 --out "$OUT" 2>&1 | tail -12
  exit 0
fi
timeout 420 python3 benchmarks/rates.py --repeat 1 --scale 4 --out "$OUT" 2>&1 | grep -v "^progress" | tail -40
timeout 150 python3 benchmarks/startup.py --repeat 3 --out "$OUT" 2>&1 | tail -8
