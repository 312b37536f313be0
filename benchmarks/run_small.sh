#!/usr/bin/env bash
# `make bench` at a smaller size (about an hour on 2 vCPUs instead of several), for a before/after
# comparison of one change: bash benchmarks/run_small.sh TREE OUT runs TREE's benchmarks (a checkout
# of any commit, e.g. a `git worktree`) with this venv and writes their logs and *_results.json to OUT.
# Compare two such runs with benchmarks/compare_runs.py.
set -uo pipefail
TREE=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd)
VENV=$(cd "$(dirname "$0")/.." && pwd)/.venv
export PYTHONPATH=$TREE PATH=$VENV/bin:$PATH BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 SPARK_LOCAL_IP=127.0.0.1
export BENCH_USERS=${BENCH_USERS:-5800} BENCH_HIST_ROWS=${BENCH_HIST_ROWS:-200000} BENCH_TRAIN_USERS=${BENCH_TRAIN_USERS:-2720}
export BENCH_SPARK_ROWS=${BENCH_SPARK_ROWS:-50000} BENCH_REQUESTS=${BENCH_REQUESTS:-300} BENCH_HISTORY=${BENCH_HISTORY:-10,100,1000}
cd "$TREE"
for b in bench_ingest bench_features bench_training; do
  /usr/bin/time -v "$VENV/bin/python" "benchmarks/$b.py" > "$OUT/$b.log" 2>&1 || echo "$b failed (see $OUT/$b.log)"
done
cd benchmarks
for b in bench_serving bench_user_tower bench_online; do
  /usr/bin/time -v "$VENV/bin/python" "$b.py" > "$OUT/$b.log" 2>&1 || echo "$b failed (see $OUT/$b.log)"
done
cp ./*results.json "$OUT/" 2>/dev/null
echo "results in $OUT"
