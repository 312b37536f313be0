"""The user tower for one request row, in process (issue 10's `/rank` budget): where its time goes.

A model of the default shape (dim 64, a 2-layer transformer over a 50-item sequence, the packaged
MiniLM for the recent-query text, 45 numeric and 8 categorical user features) over a 10,000-item
catalogue, one torch thread, as the service runs it. No store and no HTTP: `bench_online.py` times
those. Writes benchmarks/user_tower_results.json.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch
from bench_common import percentiles, write_results

from training.encoding import FeatureSpec
from training.model import Catalogue, ModelConfig, ProfileModel

N_ITEMS, N_NUMERIC, N_CATEGORICAL, REPEATS = 10_000, 45, 8, 300


def request_row(rng: np.random.Generator, items: list[str], numeric: list[str], categorical: list[str]):
    users = pd.DataFrame({**{c: rng.random(100) * 10 for c in numeric},
                          **{c: rng.choice(list("abcdef"), 100) for c in categorical}})
    row = users.iloc[:1].copy()
    row["sequence_items"] = json.dumps(list(rng.choice(items, 50)))
    row["sequence_types"] = json.dumps(["click"] * 50)
    row["sequence_times"] = json.dumps(list(range(1_700_000_000, 1_700_000_050)))
    row["request_timestamp"] = pd.Timestamp("2024-01-01", tz="UTC")
    row["query"], row["recent_queries"] = None, "red shoes | blue mug"
    return users, row


def timings(fn) -> dict:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    numeric = [f"n{i}" for i in range(N_NUMERIC)]
    categorical = [f"c{i}" for i in range(N_CATEGORICAL)]
    items = [f"i{k}" for k in range(N_ITEMS)]
    users, row = request_row(rng, items, numeric, categorical)
    spec = FeatureSpec.fit(users, pd.DataFrame({"x": [1.0]}), numeric, categorical, [], [], item_ids=items)
    model = ProfileModel.build(ModelConfig(), spec).eval()
    catalogue = Catalogue({i: k for k, i in enumerate(items)}, torch.randn(N_ITEMS, model.cfg.dim))
    with torch.inference_mode():
        inputs = model.user_inputs(row)
        results = {
            "input tensors from the frame": timings(lambda: model.user_inputs(row)),
            "tower forward": timings(lambda: model.user_tower(inputs, catalogue)),
            "of which the sequence transformer": timings(lambda: model.user_tower.sequence(inputs, catalogue)),
            "user vector, all of it": timings(lambda: model.user_vectors(row, catalogue=catalogue)),
        }
    write_results("user_tower", results)


if __name__ == "__main__":
    main()
