"""/rank's top k on a catalogue of a million items: the nearest-neighbour graph against the exact scan.

The top k is the step of /rank that grows with the catalogue (the user tower, the feature fetch and
the answer do not). In process, on clustered unit vectors of the towers' size (64), this times
``bentos.ranking.top_items`` per request (k = 10, 20 seen items left out) at 10,000 items (the
exact scan, as served there) and at 1,000,000 (the HNSW graph of ``bentos/nearest.py``; the exact
scan too, for reference), and measures the graph's recall@100 against the exact scan and its build.
Not measured here: /rank over HTTP at a million items (a Feast catalogue that size is not built).

``BENCH_ANN_ITEMS`` sizes the large catalogue (default 1,000,000). Writes benchmarks/ann_results.json.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from bench_common import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bentos import nearest, settings  # noqa: E402
from bentos.ranking import Ranker, nearest_items, top_items  # noqa: E402

DIM, K, SEEN, REQUESTS = 64, 10, 20, 500


def clustered(n: int, seed: int) -> torch.Tensor:
    """Vectors around n / 100 centres: trained item towers cluster by category and brand."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 100, 10), DIM)).astype(np.float32)
    out = centres[rng.integers(len(centres), size=n)]
    out += 0.4 * rng.normal(size=out.shape).astype(np.float32)
    return torch.from_numpy(out)


def ranker(vectors: torch.Tensor, nearest=None) -> Ranker:
    ids = [f"i{n}" for n in range(len(vectors))]
    model = SimpleNamespace(cfg=SimpleNamespace(temperature=0.05))
    return Ranker("bench", model, {}, "c", ids, dict(zip(ids, range(len(ids)), strict=True)), frozenset(),
                  [], vectors, nearest=nearest)


def latency(r: Ranker, users: torch.Tensor) -> dict:
    """ms per top_items call, p50 and p99, after a warm-up."""
    rng = np.random.default_rng(1)
    seen = [{f"i{n}" for n in rng.integers(len(r.item_ids), size=SEEN)} for _ in range(len(users))]
    top_items(r, users[:1], K, None, seen[0])
    times = []
    for user, left in zip(users, seen, strict=True):
        started = time.perf_counter()
        top_items(r, user[None, :], K, None, left)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def recall_at_100(exact: Ranker, approximate: Ranker, users: torch.Tensor) -> float:
    found = []
    for user in users:
        want, got = (set(top_items(r, user[None, :], 100, None, set()).indices) for r in (exact, approximate))
        found.append(len(want & got) / 100)
    return round(float(np.mean(found)), 4)


def main() -> None:
    torch.set_num_threads(1)  # as the service runs each request (PERSONA_TORCH_THREADS)
    n = int(os.environ.get("BENCH_ANN_ITEMS", 1_000_000))
    users = clustered(REQUESTS, seed=7)
    small = clustered(10_000, seed=3)
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(), "items": n,
                     "dim": DIM, "k": K, "requests": REQUESTS,
                     "exact_10k": latency(ranker(small), users)}
    large = clustered(n, seed=3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    settings.ANN_MIN_ITEMS = min(settings.ANN_MIN_ITEMS, n)
    graph = nearest_items(large)
    results["graph_build_seconds"] = round(time.perf_counter() - started, 1)
    results["graph_peak_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024)
    exact, approximate = ranker(large), ranker(large, graph)
    results[f"exact_{n // 1000}k"] = latency(exact, users[:100])
    default = nearest.SEARCH_DEPTH
    results["search_depth_default"] = default
    for depth in sorted({5, 10, 20, 40, default}):  # efSearch = depth x the neighbours asked for
        nearest.SEARCH_DEPTH = depth
        results[f"graph_{n // 1000}k_depth_{depth}"] = {**latency(approximate, users),
                                                        "recall_at_100": recall_at_100(exact, approximate, users[:200])}
    nearest.SEARCH_DEPTH = default
    write_results("ann", results)


if __name__ == "__main__":
    main()
