"""Approximate nearest neighbours over the catalogue's unit item vectors, for large catalogues.

Exact top-k multiplies the user vector with every item vector: at 10,000 items that is cheaper than
any index, at 1,000,000 it is most of a request. Above ``PERSONA_ANN_MIN_ITEMS`` items the ranker is
built with a FAISS HNSW graph (inner product on unit vectors: the cosine the towers rank by), off the
request path, when the ranker is built or refreshed. A request then asks the graph for the k best plus
as many as it leaves out, and falls back to the exact scan when too few remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

NEIGHBOURS = 32  # HNSW's links per node: recall against memory (8 bytes a link per layer-0 node)
BUILD_DEPTH = 80  # efConstruction: a better graph for a slower build
# efSearch per neighbour asked for (at least 128). At 1,000,000 clustered items (benchmarks/bench_ann.py)
# recall@100 against the exact scan was 0.872 at 5, 0.970 at 10, 0.994 at 20 and 0.999 at 40.
SEARCH_DEPTH = 20


@dataclass(frozen=True)
class NearestItems:
    """An HNSW graph over item rows; ``search`` gives rows and inner products, best first."""

    index: faiss.Index

    @classmethod
    def build(cls, unit_vectors: torch.Tensor) -> NearestItems:
        vectors = np.ascontiguousarray(unit_vectors.detach().float().cpu().numpy())
        index = faiss.IndexHNSWFlat(vectors.shape[1], NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = BUILD_DEPTH
        index.add(vectors)
        return cls(index)

    def search(self, unit_user: torch.Tensor, n: int, depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` rows nearest to the user (one vector), and their inner products; ``depth`` times ``n``
        candidates are explored (``SEARCH_DEPTH`` by default)."""
        query = np.ascontiguousarray(unit_user.detach().float().cpu().numpy().reshape(1, -1))
        params = faiss.SearchParametersHNSW(efSearch=max(128, (depth or SEARCH_DEPTH) * n))
        scores, rows = self.index.search(query, n, params=params)
        found = rows[0] >= 0  # fewer than n items: -1 fills the rest
        return rows[0][found], scores[0][found]

    def __len__(self) -> int:
        return self.index.ntotal
