"""What a candidate source's scores are: a dense vector, a few items' (``SparseScores``), or computed
where asked (``LazyScores``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SparseScores:
    """A source's scores of a few items (ascending catalogue positions); every other item scores 0. What
    the user's own items, their neighbours and the popular items are: a dense vector of the catalogue's
    length per request cost milliseconds at a million items, for a few hundred values."""

    items: np.ndarray  # ascending positions
    values: np.ndarray  # float32, > 0
    n_items: int

    @staticmethod
    def of(dense: np.ndarray) -> SparseScores:
        items = np.flatnonzero(dense > 0)
        return SparseScores(items, dense[items].astype(np.float32, copy=False), len(dense))

    def at(self, items: np.ndarray) -> np.ndarray:
        """The scores of ``items`` (0 where the source has none)."""
        if not len(self.items):
            return np.zeros(len(items), dtype=np.float32)
        pos = np.clip(np.searchsorted(self.items, items), 0, len(self.items) - 1)
        return np.where(self.items[pos] == items, self.values[pos], 0.0).astype(np.float32)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.n_items, dtype=np.float32)
        out[self.items] = self.values
        return out


class LazyScores(Protocol):
    """Scores of every item, computed only where asked (the towers' through a nearest-neighbour graph)."""

    def top(self, k: int, allowed: np.ndarray) -> np.ndarray: ...

    def at(self, items: np.ndarray) -> np.ndarray: ...


Scores = np.ndarray | SparseScores | LazyScores


