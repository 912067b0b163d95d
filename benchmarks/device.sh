#!/usr/bin/env bash
# Issue #14's per-node measurements in one command on the lent 16-core machine (../shared/device/README.md).
# Here, once: bash ../shared/device/make_site.sh   (writes .device/site.tar.xz, ~30 MB)
# Then run, carrying .device:   bash benchmarks/device.sh   (about 6 minutes on 16 cores, at most 9; results in $OUT)
# rates.py: limit, this job and the Ray Data recipe back to back on 2,400 → 9,600 JPEGs (the set);
# ceiling.py: 16 plain Detector processes, then the job; scaling.py: 2 → 16 workers of one interpreter
# thread, then the default sizing;
# startup.py: the 120-image job without Ray, with Ray, and a finished re-run.
# `bash benchmarks/device.sh placement` (~4 minutes): decode_placement.py, scaling.py with decode on the
# interpreter's thread, startup.py once.
# `bash benchmarks/device.sh prepare` (a second call, ~1 minute): prepare_cost.py, the per-image CPU outside
# the interpreter on that CPU.
set -euo pipefail
mkdir -p /tmp/site && tar -xJf .device/site.tar.xz -C /tmp/site
# make_site.sh unpacks wheels with zipfile, which drops the executable bit of Ray's servers (gcs_server:
# "Permission denied" when Ray starts)
find /tmp/site/ray/core -type f -exec chmod +x {} +
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
nproc; python3 -c "import ray, ai_edge_litert; print('ray', ray.__version__)"
if [ "${1:-}" = prepare ]; then
  timeout 300 python3 benchmarks/prepare_cost.py --repeat 5 --out "$OUT" 2>&1 | tail -12
  exit 0
fi
if [ "${1:-}" = placement ]; then  # where a full node decodes, then scaling with decode on the interpreter's thread
  timeout 200 python3 benchmarks/decode_placement.py --images 9600 --rounds 2 --out "$OUT" 2>&1 | tail -8 \
    || echo "decode_placement.py did not finish"
  timeout 80 python3 benchmarks/scaling.py --images 2400 --counts 2,4,8 --flags "--decode-threads 0" --out "$OUT" \
    2>&1 | tail -8 || echo "scaling.py did not finish"
  timeout 50 python3 benchmarks/startup.py --repeat 1 --out "$OUT" 2>&1 | tail -6 || echo "startup.py did not finish"
  exit 0
fi
# Each step bounded on its own, so one that overruns still leaves the others' results.
timeout 300 python3 benchmarks/rates.py --repeat 1 --scale 4 --out "$OUT" 2>&1 | grep -v "^progress" | tail -40 \
  || echo "rates.py did not finish"
timeout 90 python3 benchmarks/ceiling.py --images 4800 --out "$OUT" 2>&1 | tail -6 || echo "ceiling.py did not finish"
timeout 110 python3 benchmarks/scaling.py --images 2400 --out "$OUT" 2>&1 | tail -12 || echo "scaling.py did not finish"
timeout 50 python3 benchmarks/startup.py --repeat 1 --out "$OUT" 2>&1 | tail -8 || echo "startup.py did not finish"
