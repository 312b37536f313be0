"""`persona train --training-set DIR` on the spark profile, at two log sizes, in one process and in two (DDP).

    cd benchmarks && ../.venv/bin/python bench_shard_training.py                 # 200k and 1M events
    cd benchmarks && ../.venv/bin/python bench_shard_training.py 1000000 10000000

For each size the shop of ``bench_spark_build.py`` (its generator, its SQLite log, its build on
``local[2]``), its training set written by `persona training-set` (Spark's tasks), then `persona train
--training-set` with ``--nproc`` 1 and 2, ``BENCH_SHARD_EPOCHS`` epochs (default 1), the default model
(packaged MiniLM, frozen on the CPU). Each command is its own process with its tree sampled every 0.2 s.
Per run: the command's wall time (to the end of its last epoch, with the survey of the shards, the
catalogue's features, and the save), the epoch's time and training rows per second (from the run's
history), the peak memory of rank 0 (``python_driver``) and of the other ranks (``python_workers``).
Writes benchmarks/shard_training_results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from bench_common import load_log, write_results
from bench_spark_build import EVENTS_PER_USER, over_sizes, timed, timed_build

from persona import sample_data

BIN = Path(sys.executable).parent
EPOCHS = int(os.environ.get("BENCH_SHARD_EPOCHS", 1))


def trained(ws: Path, shards: Path, nproc: int, env: dict) -> dict:
    """One `persona train --training-set` run: its time, memory, and its history's figures."""
    before = set((ws / "reports" / "training").glob("*")) if (ws / "reports" / "training").exists() else set()
    result, _ = timed(["train", "-w", str(ws), "--profile", "spark", "--training-set", str(shards), "--nproc",
                       str(nproc), "--epochs", str(EPOCHS)], env)
    report = next(iter(set((ws / "reports" / "training").glob("*")) - before))
    history = pd.read_csv(report / "history.csv")
    rows = int(history["rows_per_process"].map(lambda v: sum(int(x) for x in v.strip("[]").split(","))).iloc[0])
    first = float(history["seconds"].iloc[0])
    stages = json.loads((report / "stages.json").read_text())
    return {"nproc": nproc, **result, "first_epoch_seconds": round(first, 1), "rows_first_epoch": rows,
            "rows_per_second": round(rows / first, 1), "losses": [round(v, 4) for v in history["loss"]],
            "held_out_losses": [round(v, 4) for v in history["held_out_loss"]], "stages_seconds": stages}


def run(n_events: int, root: Path) -> dict:
    users = max(100, round(n_events / EVENTS_PER_USER))
    shop = sample_data.generate(users, 10_000, 30, seed=0)
    ws = root / f"ws_{n_events}"
    load_log(ws, shop).dispose()
    events = len(shop["events"])
    del shop
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(root / f"bentoml_{n_events}")}
    subprocess.run([str(BIN / "persona"), "features", "apply", "-w", str(ws), "--profile", "spark"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    build = timed_build(ws, env)
    shards = ws / "training_set"
    written, _ = timed(["training-set", "-w", str(ws), "--profile", "spark", "--output", str(shards)], env)
    runs = [trained(ws, shards, nproc, env) for nproc in (1, 2)]
    one, two = runs
    result = {"events": events, "users": users, "build_seconds": build["seconds"],
              "training_set_seconds": written["seconds"], "shards": len(list(shards.glob("part-*.parquet"))),
              "runs": runs, "two_against_one": {
                  "seconds": round(two["seconds"] / one["seconds"], 2),
                  "first_epoch_seconds": round(two["first_epoch_seconds"] / one["first_epoch_seconds"], 2),
                  "rows_per_second": round(two["rows_per_second"] / one["rows_per_second"], 2)}}
    print(f"{events:,} events:", result, flush=True)
    return result


def main() -> None:
    results = over_sizes(run, [int(a) for a in sys.argv[1:]] or [200_000, 1_000_000])
    results["epochs"] = EPOCHS
    if len(results["runs"]) > 1:
        small, large = results["runs"][0], results["runs"][-1]
        results["ratios_largest_to_smallest"] = {"events": round(large["events"] / small["events"], 2)} | {
            f"nproc {r}: {what}": round(large["runs"][r - 1][what] / max(small["runs"][r - 1][what], 1e-9), 2)
            for r in (1, 2) for what in ("first_epoch_seconds", "rows_per_second")} | {
            f"nproc {r}: peak rank 0 RSS": round(large["runs"][r - 1]["peak_rss_mb"]["python_driver"]
                                                 / small["runs"][r - 1]["peak_rss_mb"]["python_driver"], 2)
            for r in (1, 2)}
    write_results("shard_training", results)


if __name__ == "__main__":
    main()
