"""`make bench`: generation throughput and the validation gate's share of ingestion time.

Targets (issues 2 and 3): 1M events generated in <= 60 s; validating 1M events adds <= 25% to the
time ingestion takes without the gate. Results print as a table and go to benchmarks/ingest_results.json;
copy them into BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench_common import timed, write_results

from eventlog.sources import load_batch
from eventlog.store import EventLog, new_batch_id
from ingestion.ingest import ingest
from persona import sample_data
from validation.gate import Gate, GateSettings

N_USERS, N_ITEMS, DAYS = int(os.environ.get("BENCH_USERS", 29_000)), 10_000, 30


def main() -> None:
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
                     "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tables, gen_s = timed(lambda: sample_data.generate(N_USERS, N_ITEMS, DAYS, seed=0))
        n = len(tables["events"])
        _, write_s = timed(lambda: sample_data.write(tables, tmp / "shop", "parquet"))
        results["generate"] = {"events": n, "seconds": round(gen_s, 2), "write_parquet_seconds": round(write_s, 2),
                               "events_per_second": round(n / (gen_s + write_s))}
        print(f"generate: {n:,} events in {gen_s:.1f} s (+{write_s:.1f} s parquet)", flush=True)

        batch, load_s = timed(lambda: load_batch(tmp / "shop"))
        print(f"load + normalise: {load_s:.1f} s", flush=True)

        # Without the gate: the same rows written straight to a fresh event log.
        log = EventLog(f"sqlite:///{tmp / 'plain.db'}")

        def plain():
            bid = new_batch_id()
            with log.engine.begin() as conn:
                for name, tb in batch.tables.items():
                    log.write(conn, name, tb.frame, tb.present, bid)

        _, plain_s = timed(plain)
        log.dispose()
        print(f"ingest without gate: {plain_s:.1f} s", flush=True)

        gate = Gate(GateSettings())
        checked, gate_s = timed(lambda: gate.check(batch))
        assert checked.rejected == 0
        print(f"gate alone: {gate_s:.1f} s", flush=True)

        log = EventLog(f"sqlite:///{tmp / 'gated.db'}")
        _, gated_s = timed(lambda: ingest(batch, log, gate))
        print(f"ingest with gate: {gated_s:.1f} s", flush=True)
        again, again_s = timed(lambda: ingest(batch, log, gate))
        assert again[0].tables["events"].written == 0
        log.dispose()
        print(f"re-ingest of the same batch (idempotent, all rows compared): {again_s:.1f} s", flush=True)
        results["ingest"] = {"events": n, "load_seconds": round(load_s, 2), "without_gate_seconds": round(plain_s, 2),
                             "with_gate_seconds": round(gated_s, 2), "gate_only_seconds": round(gate_s, 2),
                             # Ingestion = read + normalise + write; the gate adds (gated - plain).
                             "gate_overhead": round((gated_s - plain_s) / (load_s + plain_s), 3),
                             "reingest_seconds": round(again_s, 2),
                             "events_per_second_with_gate": round(n / (load_s + gated_s))}
    write_results("ingest", results)
    print("target: gate_overhead <= 0.25", file=sys.stderr)


if __name__ == "__main__":
    main()
