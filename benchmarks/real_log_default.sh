#!/usr/bin/env bash
# The default path on a real contract folder, as a new user runs it: ingest, features, the default
# `persona train` (evaluation, baselines, refit) and `persona recommend`, in a fresh workspace, with the
# wall time and peak memory of the training. The report is WS/reports/training/*/report.md.
#     bash benchmarks/real_log_default.sh ../shared/data/tmall-2014 /tmp/tmall_ws
set -euo pipefail
SRC=$1; WS=$2
VENV=$(cd "$(dirname "$0")/.." && pwd)/.venv
export BENTOML_HOME=${BENTOML_HOME:-$WS/bentoml} BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
rm -rf "$WS"
started=$(date +%s)
"$VENV/bin/persona" ingest --source "$SRC" -w "$WS"
for step in apply build materialize; do "$VENV/bin/persona" features "$step" -w "$WS"; done
echo "ingest and features: $(( $(date +%s) - started )) s"
/usr/bin/time -v "$VENV/bin/persona" train -w "$WS" 2> >(grep -E "Elapsed|Maximum resident" >&2)
"$VENV/bin/persona" recommend -w "$WS" --output "$WS/recommendations.csv" --k 10
echo "report: $(ls -t "$WS"/reports/training/*/report.md | head -1)"
