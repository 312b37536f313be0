"""The spark profile's jobs past the build, at two log sizes: `persona training-set` and `persona recommend`.

    cd benchmarks && ../.venv/bin/python bench_spark_jobs.py                 # 200k and 1M events
    cd benchmarks && ../.venv/bin/python bench_spark_jobs.py 1000000 10000000

For each size the shop of ``bench_spark_build.py`` (its generator, its SQLite log, its build on
``local[2]``), then, each as its own process with its tree sampled every 0.2 s (the Python driver, the
JVM, the Python workers):
- ``persona training-set``: the labelled rows built by Spark's tasks from the log's ranges, Feast's
  Spark point-in-time join, Parquet shards written by the tasks;
- ``persona recommend --k 10``: every user with an event scored in Spark's tasks. The model is the
  default architecture (packaged MiniLM) with its feature statistics fitted on the first shard and
  its weights untrained: this times the scoring path, not a model's quality.
Writes benchmarks/spark_jobs_results.json; the ratios compare the largest size with the smallest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from bench_common import load_log, write_results
from bench_spark_build import EVENTS_PER_USER, over_sizes, timed, timed_build

from persona import sample_data

BIN = Path(sys.executable).parent


def timed_command(args: list[str], env: dict) -> dict:
    """``timed`` with the command's last words (what it wrote, and where)."""
    result, output = timed(args, env)
    return {**result, "said": " ".join(output.split()[-16:])}


def save_untrained_model(ws: Path, shards: Path, window: pd.DataFrame) -> None:
    """The default model over this workspace's features, its statistics from the first shard;
    ``window``: the log's first and last event times (the saved model's data window)."""
    from feature_repo.pipeline.registry import feature_store
    from training.model import ModelConfig, ProfileModel
    from training.model_store import bentoml_home, save_to_bentoml
    from training.spark_training_set import TrainingShards
    from training.workflow import RunConfig, feature_spec

    bentoml_home(ws)
    store = feature_store(ws)
    reader = TrainingShards(shards)
    first = reader.read(reader.paths[0])
    model = ProfileModel.build(ModelConfig(), feature_spec(store, first)).eval()
    save_to_bentoml(model, store, None, window, RunConfig(model=model.cfg))


def run(n_events: int, root: Path) -> dict:
    """One size; every size saves into one model store (``root/bentoml``): BentoML fixes its store per
    process, at import, so this process could not switch to a second one."""
    users = max(100, round(n_events / EVENTS_PER_USER))
    shop = sample_data.generate(users, 10_000, 30, seed=0)
    ws = root / f"ws_{n_events}"
    load_log(ws, shop).dispose()
    events = len(shop["events"])
    times = pd.to_datetime(shop["events"]["event_timestamp"], utc=True)
    window = pd.DataFrame({"event_timestamp": [times.min(), times.max()]})  # what the saved model records
    del shop, times
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(root / "bentoml")}
    subprocess.run([str(BIN / "persona"), "features", "apply", "-w", str(ws), "--profile", "spark"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    build = timed_build(ws, env)
    shards = ws / "training_set"
    training_set = timed_command(["training-set", "-w", str(ws), "--profile", "spark", "--output", str(shards)], env)
    training_set["shards"] = len(list(shards.glob("part-*.parquet")))
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    save_untrained_model(ws, shards, window)
    recommend = timed_command(["recommend", "-w", str(ws), "--profile", "spark", "--k", "10",
                       "--output", str(ws / "recs.parquet")], env)
    result = {"events": events, "users": users, "build_seconds": build["seconds"],
              "training_set": training_set, "recommend": recommend}
    print(f"{events:,} events:", result, flush=True)
    return result


def main() -> None:
    results = over_sizes(run, [int(a) for a in sys.argv[1:]] or [200_000, 1_000_000])
    if len(results["runs"]) > 1:
        small, large = results["runs"][0], results["runs"][-1]
        results["ratios_largest_to_smallest"] = {"events": round(large["events"] / small["events"], 2)} | {
            f"{job}: {what}": round(value(large[job]) / max(value(small[job]), 1e-9), 2)
            for job in ("training_set", "recommend")
            for what, value in (("seconds", lambda r: r["seconds"]),
                                *((f"peak_rss_{k}", lambda r, k=k: r["peak_rss_mb"][k])
                                  for k in ("python_driver", "jvm", "python_workers")))}
    write_results("spark_jobs", results)


if __name__ == "__main__":
    main()
