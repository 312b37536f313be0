"""Candidate source: items that go with the user's recent items (item-to-item co-occurrence).

Cosine over the binary user x item matrix of every behaviour (sparse, so any catalogue fits), each
item keeping its ``NEIGHBOURS`` most similar items; a user's score is the sum of the similarities to
their recent items, newer items counting more.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import sparse

from training.recall.history import Recent
from training.recall.scores import SparseScores

NEIGHBOURS = 200


def item_similarity(events: pd.DataFrame, index: dict[str, int], types: list[str],
                    neighbours: int = NEIGHBOURS) -> sparse.csr_matrix:
    """Sparse item x item cosine, the top ``neighbours`` of each row, zero diagonal."""
    ev = events[events["event_type"].isin(types) & events["item_id"].isin(index)]
    users = pd.factorize(ev["user_id"])[0]
    return similarity_from_pairs(users, ev["item_id"].map(index).to_numpy(), len(index), neighbours)


def coded_pairs(chunks: Iterable[pd.DataFrame], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(user code, catalogue position) of every row of ``chunks`` (``user_id``, ``item_id``) whose item
    is in ``index``, users coded in order of first sight across the chunks: a log or a training set read
    a piece at a time, for ``similarity_from_pairs`` or a user x item matrix."""
    codes: dict[str, int] = {}
    users, items = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for chunk in chunks:
        item = chunk["item_id"].astype(str)
        known = item.isin(index).to_numpy()
        chunk, item = chunk[known], item[known]
        user = chunk["user_id"].astype(str)
        new = pd.unique(user[user.map(codes).isna()])
        codes.update(zip(new, range(len(codes), len(codes) + len(new)), strict=True))
        users.append(user.map(codes).to_numpy(np.int64))
        items.append(item.map(index).to_numpy(np.int64))
    return np.concatenate(users), np.concatenate(items)


BLOCK_ENTRIES = 4_000_000  # item x item products computed at once (rows x catalogue): bounds the memory


def similarity_from_pairs(users: np.ndarray, items: np.ndarray, n_items: int,
                          neighbours: int = NEIGHBOURS) -> sparse.csr_matrix:
    """``item_similarity`` from (user code, catalogue position) pairs, repeats allowed: what a reader of
    the log in chunks hands over (``training/recall/shop.py``). The item x item product is taken a block
    of rows at a time, each row cut to its ``neighbours`` best before the next block: the memory is the
    pairs' and one block's, not the full product's, which grows towards items squared with the log."""
    x = sparse.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                          shape=(users.max() + 1 if len(users) else 0, n_items))
    x.data[:] = 1.0  # binary: duplicates summed above
    norms = np.sqrt(np.asarray(x.sum(axis=0), dtype=np.float64).ravel()) + 1e-12
    by_item = x.T.tocsr()
    blocks = [_similar_rows(by_item[lo:hi], x, lo, norms, neighbours)
              for lo, hi in _row_blocks(by_item, np.asarray(x.sum(axis=1)).ravel())]
    return sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, n_items), dtype=np.float32)


def _row_blocks(by_item: sparse.csr_matrix, degrees: np.ndarray) -> list[tuple[int, int]]:
    """Runs of item rows whose products hold about ``BLOCK_ENTRIES`` entries together: a row's bound is the
    sum of its users' item counts, so the many items nobody touched share one block (a block per
    ``BLOCK_ENTRIES / catalogue`` rows cost 230 s of overhead on a million items)."""
    n = by_item.shape[0]
    if not n:
        return []
    total = np.cumsum(np.asarray(by_item @ degrees, dtype=np.float64).ravel())
    cuts = np.searchsorted(total, np.arange(BLOCK_ENTRIES, total[-1], BLOCK_ENTRIES), side="right")
    edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, n), [n]]))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _similar_rows(block: sparse.csr_matrix, x: sparse.csr_matrix, first: int, norms: np.ndarray,
                  neighbours: int) -> sparse.csr_matrix:
    """Rows ``first``.. of the cosine, each row's ``neighbours`` best, zero diagonal."""
    together = (block @ x).tocoo()
    off = together.row + first != together.col
    rows, cols = together.row[off], together.col[off]
    # in float64, in this order, then float32: what Spark's tasks compute (training/spark_recommend.py),
    # bit for bit, so that both break ties between candidates alike
    cosine = (together.data[off].astype(np.float64) / (norms[rows + first] * norms[cols])).astype(np.float32)
    return _top_per_row(sparse.csr_matrix((cosine, (rows, cols)), shape=together.shape), neighbours)


def _top_per_row(m: sparse.csr_matrix, k: int) -> sparse.csr_matrix:
    """Each row's ``k`` largest entries (the rows holding more than ``k`` are cut one by one)."""
    lengths = np.diff(m.indptr)
    keep = np.ones(m.nnz, dtype=bool)
    for r in np.flatnonzero(lengths > k):
        a, b = m.indptr[r], m.indptr[r + 1]
        mask = np.zeros(b - a, dtype=bool)
        mask[np.argpartition(-m.data[a:b], k - 1)[:k]] = True
        keep[a:b] = mask
    rows = np.repeat(np.arange(m.shape[0]), lengths)[keep]
    return sparse.csr_matrix((m.data[keep], (rows, m.indices[keep])), shape=m.shape)


class CooccurrenceSource:
    name = "often together with your items"

    def __init__(self, events: pd.DataFrame | None, index: dict[str, int], types: list[str],
                 similarity: sparse.csr_matrix | None = None):
        """From the events, or from a ``similarity`` already computed (by Spark's tasks)."""
        self.sim = similarity if similarity is not None else item_similarity(events, index, types)
        self.n_items = len(index)

    def scores(self, recent: Recent, now: float, query: str | None) -> SparseScores:
        order = np.argsort(-recent.times, kind="stable")
        distinct = list(dict.fromkeys(int(i) for i in recent.items[order] if i >= 0))
        if not distinct:
            return SparseScores(np.zeros(0, np.int64), np.zeros(0, np.float32), self.n_items)
        weights = 1.0 / np.sqrt(1.0 + np.arange(len(distinct), dtype=np.float32))
        row = (sparse.csr_matrix(weights[None, :]) @ self.sim[distinct]).tocsr()  # the neighbours only
        row.sum_duplicates()
        keep = row.data > 0
        return SparseScores(row.indices[keep].astype(np.int64), row.data[keep].astype(np.float32), self.n_items)
