"""The profile model trained in one process and in two (``persona train --nproc 2``: PyTorch DDP over gloo).

    cd benchmarks && ../.venv/bin/python bench_ddp.py

A generated shop (``BENCH_DDP_USERS`` users, default 3,000; 500 items; 30 days) goes into a local
workspace (event log, Feast features, materialised); its training examples get their point-in-time
features through Feast once. Then the default profile model (all-MiniLM-L6-v2, the default
ModelConfig) trains for ``BENCH_DDP_EPOCHS`` epochs (default 3) with no time budget and no early
stopping, with ``nproc`` 1 and 2 on the same seed and data: wall time to the first epoch's end and in
all, training rows per second, and each epoch's loss. Writes benchmarks/ddp_results.json.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_common import load_log, write_results

from feature_repo.pipeline import materialize, registry
from feature_repo.pipeline.build import build
from persona import sample_data
from training import dataset
from training.model import ModelConfig, ProfileModel
from training.train import TrainConfig, seed_everything, train
from training.workflow import feature_spec

POSITIVES = {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0, "review": 3.0}


def prepare(root: Path):
    shop = sample_data.generate(int(os.environ.get("BENCH_DDP_USERS", 3_000)), 500, 30, seed=0)
    log = load_log(root, shop)
    store, _ = registry.apply(root, "local")
    build(log, "local", root)
    materialize.materialize(root)
    events, items = log.read_table("events"), log.read_table("items")
    log.dispose()
    frame = dataset.fetch_features(store, dataset.build_examples(events, items, POSITIVES, seed=0))
    catalogue = dataset.ItemCatalogue(store, items["item_id"].tolist(), frame["event_timestamp"])
    return frame, feature_spec(store, frame), catalogue


def timed(frame, spec, catalogue, nproc: int, epochs: int) -> dict:
    seed_everything(0)
    model = ProfileModel.build(ModelConfig(), spec)
    cfg = TrainConfig(epochs=epochs, max_seconds=None, patience=epochs + 1, device="cpu", nproc=nproc)
    started = time.perf_counter()
    history = train(model, frame, catalogue, cfg, None, progress=False)
    seconds = time.perf_counter() - started
    rows = sum(sum(h["rows_per_process"]) for h in history)
    return {"nproc": nproc, "seconds": round(seconds, 1), "rows": rows,
            "rows_per_second": round(rows / seconds, 1), "losses": [round(h["loss"], 4) for h in history]}


def main() -> None:
    epochs = int(os.environ.get("BENCH_DDP_EPOCHS", 3))
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "epochs": epochs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        frame, spec, catalogue = prepare(Path(tmp))
        results["positives"] = int((frame["label"] == 1).sum())
        for nproc in (1, 2):
            results["runs"].append(timed(frame, spec, catalogue, nproc, epochs))
            print(results["runs"][-1], flush=True)
    one, two = results["runs"]
    results["two_against_one"] = {"seconds": round(two["seconds"] / one["seconds"], 2),
                                  "rows_per_second": round(two["rows_per_second"] / one["rows_per_second"], 2)}
    write_results("ddp", results)


if __name__ == "__main__":
    main()
