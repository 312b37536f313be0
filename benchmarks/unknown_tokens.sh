#!/usr/bin/env bash
# The feature checks' unknown-token shares (issue 25) on the English and the Chinese sample shop, with the
# default encoder: generate, ingest, build; prints each text column's row of reports/features/summary.md.
#   bash benchmarks/unknown_tokens.sh [OUT_DIR]
set -euo pipefail
P="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/persona"
OUT="${1:-$(mktemp -d)}"
for loc in en zh; do
  rm -rf "$OUT/$loc"
  "$P" generate --locale "$loc" --out "$OUT/$loc/data" > /dev/null
  "$P" ingest -w "$OUT/$loc/ws" --source "$OUT/$loc/data" > /dev/null
  "$P" features apply -w "$OUT/$loc/ws" > /dev/null 2>&1
  "$P" features build -w "$OUT/$loc/ws" > /dev/null 2>&1 || true
  echo "== --locale $loc"
  grep unknown_tokens "$OUT/$loc/ws/reports/features/summary.md"
done
