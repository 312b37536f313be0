"""Training benchmarks (model v2), with the real all-MiniLM-L6-v2 on whatever device is present.

- the default ``persona train`` (leave-one-out split, every baseline, the refit) end to end on
  ``../shared/data/amazon-office`` and on a generated log: wall time (target <= 10 minutes on the
  2-core CPU) and peak memory;
- batch recommend for 10k users x 10k items (target <= 60 s).

``BENCH_TRAIN_USERS`` sizes the generated log (default 13,600 users, 2,000 items, 30 days: about
468k events, 102k of them positive). ``python bench_training.py amazon`` runs the amazon-office train
only (its NDCG@10 table is the "no loss on English" check) and writes
benchmarks/training_amazon_results.json; with no argument every part runs and writes
benchmarks/training_results.json.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from bench_common import load_log, write_results

from feature_repo.pipeline import registry
from feature_repo.pipeline.build import build
from persona import sample_data
from training.model_store import load_from_bentoml
from training.train import pick_device
from training.workflow import recommend

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-office"
BIN = Path(sys.executable).parent


def persona(*args: str, env: dict) -> float:
    """Run a `persona` command; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([str(BIN / "persona"), *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed_train(source: Path, ws: Path) -> dict:
    env = {**os.environ, "BENTOML_HOME": str(ws / "bentoml"), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    persona("ingest", "-w", str(ws), "--source", str(source), env=env)
    persona("features", "apply", "-w", str(ws), env=env)
    persona("features", "build", "-w", str(ws), env=env)
    seconds = persona("train", "-w", str(ws), env=env)  # every default: what a data scientist runs
    metrics = sorted((ws / "reports" / "training").glob("*/metrics.csv"))[-1]
    table = pd.read_csv(metrics)
    table = table[table["segment"] == "all"].set_index("model")["NDCG@10"].round(4).to_dict()
    return {"train_seconds": round(seconds, 1), "ndcg10": table,
            "peak_rss_mb_of_any_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "device": str(pick_device())}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (AMAZON / "events.csv").exists():
            results["amazon_office"] = timed_train(AMAZON, tmp / "amazon")
            print("amazon-office:", results["amazon_office"], flush=True)
        if sys.argv[1:] == ["amazon"]:
            write_results("training_amazon", results)
            return
        users = int(os.environ.get("BENCH_TRAIN_USERS", 13_600))
        shop = sample_data.generate(users, 2000, 30, seed=0)
        sample_data.write(shop, tmp / "generated")
        results["generated"] = {"events": len(shop["events"]), **timed_train(tmp / "generated", tmp / "gen")}
        print("generated:", results["generated"], flush=True)

        os.environ["BENTOML_HOME"] = str(tmp / "gen" / "bentoml")
        model, _, _ = load_from_bentoml("latest")
        log = load_log(tmp / "rec", sample_data.generate(10_000, 10_000, 7, seed=0))
        registry.apply(tmp / "rec", "local")
        build(log, "local", tmp / "rec")
        store = registry.feature_store(tmp / "rec")
        events, items = log.read_table("events"), log.read_table("items")
        start = time.perf_counter()
        all_users = sorted(log.read_table("users")["user_id"])  # every user, cold ones included
        recs = recommend(model, store, events, items, {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0,
                                                       "review": 3.0}, 10, all_users, events["event_timestamp"].max())
        results["recommend_10k_x_10k"] = {"users": int(recs["user_id"].nunique()), "items": len(items),
                                          "seconds": round(time.perf_counter() - start, 1)}
        print("recommend:", results["recommend_10k_x_10k"], flush=True)
        log.dispose()
    write_results("training", results)


if __name__ == "__main__":
    main()
