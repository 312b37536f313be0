"""/rank's approximate top k on large catalogues (bentos/nearest.py): as good as the exact scan.

Known answers against the exact scan on clustered item vectors (as trained towers make them), the
seen items left out, and the exact scan where the graph would not pay or could not answer.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bentos import ranking, settings
from bentos.ranking import Ranker, nearest_items, top_items

TEMPERATURE = 0.05


def _vectors(n: int, dim: int = 32, clusters: int = 300, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return torch.from_numpy((centres[rng.integers(clusters, size=n)] + 0.4 * rng.normal(size=(n, dim)))
                            .astype(np.float32))


def _ranker(vectors: torch.Tensor, nearest=None) -> Ranker:
    ids = [f"i{n}" for n in range(len(vectors))]
    model = SimpleNamespace(cfg=SimpleNamespace(temperature=TEMPERATURE))
    return Ranker("t", model, {}, "c", ids, {i: n for n, i in enumerate(ids)}, frozenset(ids), [{}] * len(ids),
                  vectors, nearest=nearest)


@pytest.fixture(scope="module")
def catalogue():
    vectors = _vectors(30_000)
    exact = _ranker(vectors)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "ANN_MIN_ITEMS", 10_000)
        graph = nearest_items(vectors)
    assert graph is not None and len(graph) == len(vectors)
    return exact, _ranker(vectors, graph)


def test_the_graph_finds_what_the_exact_scan_finds(catalogue):
    exact, approximate = catalogue
    users = _vectors(200, seed=1)
    recall = []
    for user in users:
        seen = {f"i{n}" for n in np.random.default_rng(int(user[0].abs() * 1e6)).integers(30_000, size=40)}
        want, got = (top_items(r, user[None, :], 100, None, seen) for r in (exact, approximate))
        assert got.how == "two towers" and len(got.indices) == 100
        assert not {approximate.item_ids[i] for i in got.indices} & seen
        assert got.scores == sorted(got.scores, reverse=True)
        recall.append(len(set(want.indices) & set(got.indices)) / 100)
        same = dict(zip(want.indices, want.scores, strict=True))
        assert all(abs(same[i] - s) < 1e-3 for i, s in zip(got.indices, got.scores, strict=True) if i in same)
    assert np.mean(recall) >= 0.99, np.mean(recall)


def test_the_exact_scan_where_the_graph_would_not_pay_or_answer(catalogue, monkeypatch):
    exact, approximate = catalogue
    user = _vectors(1, seed=2)
    assert nearest_items(_vectors(500)) is None  # a small catalogue: no graph (default 100,000 items)
    many = {f"i{n}" for n in range(ranking.MAX_NEAREST)}  # a user who has seen thousands of items
    assert top_items(approximate, user, 10, None, many) == top_items(exact, user, 10, None, many)
    candidates = ["i5", "i7", "i11"]  # candidates and unreadable queries are scored exactly
    assert top_items(approximate, user, 3, candidates, set()) == top_items(exact, user, 3, candidates, set())
    everything_but_two = {f"i{n}" for n in range(2, 30_000)}
    monkeypatch.setattr(ranking, "MAX_NEAREST", 40_000)
    got = top_items(approximate, user, 10, None, everything_but_two)
    assert sorted(got.indices) == [0, 1]
