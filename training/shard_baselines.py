"""Id baselines on a training set's shards, for the held-out ranking of ``persona train --training-set``.

ItemKNN and EASE are fitted on the sparse user x item matrix of the positives the model trained on (the
held-out share and erased users aside), read a shard at a time, four columns of it. Each held-out row is
scored from its own history: the engaged items in its sequence (the user's last events before the row),
the items the ranking leaves out. The bounds are the log's (``training/baselines.py``): past
``EASE_MAX_ITEMS`` items EASE models the items with the most users and every other item scores 0; past
``KNN_FULL_ITEMS`` ItemKNN keeps each item's ``KNN_NEIGHBOURS`` nearest. EASE's λ is the best of
``EASE_LAMBDAS`` on the held-out rows themselves: the baseline's best case, so the comparison favours it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import sparse

from training.baselines import (
    EASE_LAMBDAS,
    EASE_MAX_ITEMS,
    KNN_FULL_ITEMS,
    KNN_NEIGHBOURS,
    cosine_neighbours,
    ease_note,
    ease_weights,
    popular_columns,
)
from training.evaluate import ranking_metrics, summarise
from training.recall.cooccurrence import coded_pairs

Rows = Callable[[pd.DataFrame], np.ndarray]  # a shard's four columns -> the rows trained on
SCORE_CELLS = 20_000_000  # scores held at once


def trained_interactions(paths: Iterable, index: dict[str, int], trained: Rows) -> sparse.csr_matrix:
    """Binary user x item matrix of the trained-on positives, a shard at a time."""
    def shards() -> Iterator[pd.DataFrame]:
        for path in paths:
            frame = pq.read_table(path, columns=["user_id", "item_id", "label", "example_id"]).to_pandas()
            yield frame[trained(frame)]
    rows, cols = coded_pairs(shards(), index)
    x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                          shape=(int(rows.max()) + 1 if len(rows) else 0, len(index)))
    x.data[:] = 1.0  # binary: a user's repeats count once
    return x


def histories(excluded: list[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """The held-out rows' histories (their engaged items) as a binary rows x items matrix."""
    lengths = np.array([len(e) for e in excluded], dtype=np.int64)
    cols = np.concatenate(excluded) if len(excluded) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(excluded)), lengths)
    return sparse.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(excluded), n_items))


def _ranked(score: Callable[[sparse.csr_matrix], np.ndarray], history: sparse.csr_matrix, targets: np.ndarray,
            excluded: list[np.ndarray]) -> dict[str, float]:
    n_items = history.shape[1]
    chunk = max(1, SCORE_CELLS // max(1, n_items))
    ranks, tops = [], []
    for s in range(0, history.shape[0], chunk):
        got = ranking_metrics(score(history[s:s + chunk]), targets[s:s + chunk], excluded[s:s + chunk])
        ranks.append(got["rank"])
        tops.append(got["top10"])
    if not ranks:
        return {"requests": 0}
    return summarise(np.concatenate(ranks), np.concatenate(tops), n_items)


def baseline_rows(x: sparse.csr_matrix, targets: np.ndarray, excluded: list[np.ndarray]) -> list[dict]:
    """ItemKNN's and EASE's rows of the held-out ranking (``x``: the trained-on interactions)."""
    n_items = x.shape[1]
    history = histories(excluded, n_items)
    knn = cosine_neighbours(x, KNN_NEIGHBOURS if n_items > KNN_FULL_ITEMS else None)
    rows = [{"model": "ItemKNN (cosine over the trained positives)",
             **_ranked(lambda h: (h @ knn).toarray(), history, targets, excluded)}]
    cols = popular_columns(x, EASE_MAX_ITEMS)
    modelled = x if cols is None else x[:, cols]
    best: tuple[float, dict] | None = None
    for lam in EASE_LAMBDAS:
        weights = ease_weights(modelled, lam)

        def score(h: sparse.csr_matrix, weights=weights) -> np.ndarray:
            if cols is None:
                return np.asarray(h @ weights, dtype=np.float32)
            out = np.zeros((h.shape[0], n_items), dtype=np.float32)
            out[:, cols] = h[:, cols] @ weights
            return out
        got = _ranked(score, history, targets, excluded)
        if best is None or got.get("NDCG@10", 0.0) > best[1].get("NDCG@10", 0.0):
            best = (lam, got)
    if best is not None:
        rows.append({"model": f"EASE (λ={best[0]:g}, the best on these rows{ease_note(n_items)})", **best[1]})
    return rows
