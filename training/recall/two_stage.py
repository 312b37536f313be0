"""Recall then rank: the union of each source's best items, described and ordered by the ranker.

The same code serves evaluation, ``persona recommend`` and ``/rank``: give it the request's
``Recent`` behaviour, time and query, and the items to leave out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from training.recall import pairs
from training.recall.history import Recent, TypeCodes
from training.recall.popular import ItemStats
from training.recall.ranker import Ranker
from training.recall.scores import Scores, SparseScores

PER_SOURCE = 100  # candidates each source proposes
UNRANKED = PER_SOURCE + 1  # a candidate's rank in a source that did not propose it


class Source(Protocol):
    name: str

    def scores(self, recent: Recent, now: float, query: str | None) -> Scores | None: ...


@dataclass
class Candidates:
    items: np.ndarray  # catalogue positions
    features: np.ndarray  # [n, n_features]
    ranks: np.ndarray  # [n, n_sources]: each source's rank of the item (UNRANKED if not proposed)


class Recall:
    """The candidate sources and the features the ranker reads."""

    def __init__(self, sources: Sequence[Source], groups: pairs.ItemGroups, codes: TypeCodes, stats: ItemStats,
                 per_source: int = PER_SOURCE):
        self.sources, self.groups, self.codes, self.per_source = list(sources), groups, codes, per_source
        self.stats = stats

    def feature_names(self) -> list[str]:
        per_source = [f"{s.name}: {part}" for s in self.sources for part in ("score", "rank", "proposed")]
        return per_source + pairs.names(self.codes.names) + self.stats.names

    def candidates(self, recent: Recent, now: float, query: str | None, leave_out: np.ndarray | None = None,
                   given: dict[str, np.ndarray] | None = None, only: np.ndarray | None = None) -> Candidates:
        """The union of each source's best ``per_source`` items (never one in ``leave_out``) and their
        features. ``given``: scores computed elsewhere, by source name (the towers'). ``only``: the
        caller's own candidates (catalogue positions), described in full whatever the sources propose."""
        given = given or {}
        scored = [given[s.name] if s.name in given else s.scores(recent, now, query) for s in self.sources]
        allowed = np.ones(len(self.groups.category), dtype=bool)
        if leave_out is not None and len(leave_out):
            allowed[leave_out] = False
        tops = [None if vector is None else self._top(source, vector, allowed)
                for source, vector in zip(self.sources, scored, strict=True)]
        if only is not None:
            items = np.unique(only[allowed[only]]) if len(only) else np.zeros(0, dtype=np.int64)
        else:
            proposed = [top for top in tops if top is not None]
            items = np.unique(np.concatenate(proposed)) if proposed else np.zeros(0, dtype=np.int64)
        return self.describe(items, recent, now, scored, tops)

    def describe(self, items: np.ndarray, recent: Recent, now: float, scored: list[Scores | None],
                 tops: list[np.ndarray | None]) -> Candidates:
        """The ranker's features of ``items``: each source's score, rank and whether it proposed the item,
        the pair features and the item statistics."""
        ranks = np.full((len(items), len(self.sources)), float(UNRANKED), dtype=np.float32)
        values = np.zeros((len(items), len(self.sources)), dtype=np.float32)
        if len(items):
            for s, (vector, top) in enumerate(zip(scored, tops, strict=True)):
                if vector is None:
                    continue
                values[:, s] = vector[items] if isinstance(vector, np.ndarray) else vector.at(items)
                ranks[:, s] = _places(top, items)
        source_cols = np.stack([values, np.log1p(ranks), (ranks < UNRANKED).astype(np.float32)], axis=2)
        source_cols = source_cols.reshape(len(items), 3 * len(self.sources))
        pair_cols = pairs.pair_features(recent, items, self.groups, len(self.codes), now)
        item_cols = self.stats.features(items, now)
        return Candidates(items, np.concatenate([source_cols, pair_cols, item_cols], axis=1), ranks)

    def _top(self, source: Source, vector: Scores, allowed: np.ndarray) -> np.ndarray:
        """The source's best allowed items, best first. A score of 0 is "no opinion" unless the source
        scores every item (``dense``: the towers' cosine may be negative); a sparse source's few
        scored items are sorted alone."""
        if isinstance(vector, SparseScores):
            keep = allowed[vector.items]
            pool, values = vector.items[keep], vector.values[keep]
        elif not isinstance(vector, np.ndarray):
            return vector.top(self.per_source, allowed)
        else:
            if getattr(source, "dense", False):
                pool = np.flatnonzero(allowed)
            else:
                pool = np.flatnonzero(vector > 0)
                pool = pool[allowed[pool]]
            values = vector[pool]
        k = min(self.per_source, len(pool))
        if not k:
            return np.zeros(0, dtype=np.int64)
        top = np.argpartition(-values, k - 1)[:k] if len(pool) > k else np.arange(len(pool))
        return pool[top[np.argsort(-values[top], kind="stable")]]


def _places(top: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each item's place (1 = first) in a source's proposals ``top``, ``UNRANKED`` where it is not."""
    if not len(top):
        return np.full(len(items), UNRANKED, dtype=np.float32)
    order = np.argsort(top, kind="stable")
    pos = np.clip(np.searchsorted(top[order], items), 0, len(top) - 1)
    return np.where(top[order][pos] == items, order[pos] + 1, UNRANKED).astype(np.float32)


def ranked(recall: Recall, ranker: Ranker, recent: Recent, now: float, query: str | None,
           leave_out: np.ndarray | None = None, given: dict[str, np.ndarray] | None = None,
           only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Candidates]:
    """Candidates in the ranker's order: (items, scores, candidates), the candidates' rows in that order."""
    cands = recall.candidates(recent, now, query, leave_out, given, only)
    if not len(cands.items):
        return cands.items, np.zeros(0, dtype=np.float32), cands
    scores = ranker.score(cands.features)
    order = np.argsort(-scores, kind="stable")
    cands = Candidates(cands.items[order], cands.features[order], cands.ranks[order])
    return cands.items, scores[order], cands
