"""Known answers for the per-target-behaviour protocol (``target_split``), the recent-behaviour list,
and the sparse ItemKNN / EASE against their dense formulas.

The tmall numbers are the reference numbers of ``../shared/data/tmall-2014/README.md``; every other
expected number is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import baselines
from training.baselines import (
    Histories,
    cooccurrence_scorer,
    cosine_neighbours,
    ease_scorer,
    interaction_matrix,
    popularity_scorer,
    recent_behaviour_scorer,
)
from training.evaluate import evaluate_scorers, seen_before, target_split
from training.workflow import RunConfig, baseline_scorers, make_split

TMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tmall-2014"
ITEMS = ["f", "p", "q", "x", "y", "z"]


def _log(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"event_id": f"e{k}", "user_id": u, "item_id": i, "event_type": t,
                          "event_timestamp": pd.Timestamp(ts, tz="UTC")} for k, (u, i, t, ts) in enumerate(rows)])


def _shop() -> pd.DataFrame:
    return _log([
        ("a", "x", "view", "2024-03-01 09:00"), ("a", "f", "favorite", "2024-03-01 10:00"),
        ("a", "p", "purchase", "2024-03-01 11:00"),
        ("a", "y", "view", "2024-03-02 12:00"), ("a", "q", "view", "2024-03-02 12:00"),  # same time: a tie
        ("a", "y", "purchase", "2024-03-03 10:00"), ("a", "p", "purchase", "2024-03-03 18:00"),  # last day
        ("a", "z", "view", "2024-03-04 09:00"),  # after the last purchase day: dropped
        ("b", "y", "view", "2024-03-01 08:00"), ("b", "z", "view", "2024-03-03 20:00"),  # after a's cut: stays
        ("b", "x", "purchase", "2024-03-04 10:00"),
        ("c", "y", "purchase", "2024-03-02 10:00"),  # no event before c's last purchase day: left out
    ])


def test_split_holds_out_the_last_target_day_and_drops_only_that_users_later_events():
    events = _shop()
    split = target_split(events, "purchase")
    held = split.requests[["user_id", "item_id", "event_timestamp"]].sort_values(["user_id", "item_id"])
    assert held.values.tolist() == [["a", "p", pd.Timestamp("2024-03-03", tz="UTC")],
                                    ["a", "y", pd.Timestamp("2024-03-03", tz="UTC")],
                                    ["b", "x", pd.Timestamp("2024-03-04", tz="UTC")]]
    assert {"device", "channel", "query", "cold"} <= set(split.requests)
    given = split.before(events, split.test_cut)
    assert given.loc[given["user_id"] == "a", "event_timestamp"].max() == pd.Timestamp("2024-03-02 12:00", tz="UTC")
    assert ("b", "z") in set(zip(given["user_id"], given["item_id"], strict=True))  # other users' events stay
    assert split.excluded_types == ("favorite", "purchase")  # every type of the log but browsing
    assert split.validation.empty  # a's earlier purchase day has no event before it


def test_a_viewed_item_stays_a_candidate_and_a_favourited_one_is_excluded():
    events = _shop()
    split = target_split(events, "purchase")
    index = {i: k for k, i in enumerate(ITEMS)}
    req = split.requests[split.requests["user_id"] == "a"].reset_index(drop=True)
    excluded = seen_before(events, split.exclusion({"purchase": 1.0}), req, index)
    assert [sorted(ITEMS[i] for i in ex) for ex in excluded] == [["f", "p"], ["f", "p"]]  # x, y, q only viewed


def test_recent_list_ties_count_half_and_an_engaged_target_is_a_miss():
    events = _shop()
    split = target_split(events, "purchase")
    metrics = evaluate_scorers({"recent": recent_behaviour_scorer(events, ITEMS)}, split, events,
                               {"purchase": 1.0}, ITEMS)
    row = metrics[metrics["segment"] == "all"].iloc[0]
    # a's history before 03-03 by time rank: x=1, f=2, p=3, y=q=4; f and p are excluded.
    #   target y ties with q at the top: rank 0 + 1/2 + 1 = 1.5
    #   target p was bought before: not a candidate, a miss
    # b's history before 03-04: y=1, z=2; target x scores 0 and ties with f, p, q: rank 2 + 3/2 + 1 = 4.5
    ndcg = (1 / math.log2(2.5) + 0 + 1 / math.log2(5.5)) / 3
    assert row["requests"] == 3 and row["NDCG@10"] == pytest.approx(ndcg)
    assert row["MRR@10"] == pytest.approx((1 / 1.5 + 1 / 4.5) / 3) and row["Recall@10"] == pytest.approx(2 / 3)


def test_recent_scores_newer_higher_and_never_the_future():
    events = _shop()
    req = pd.DataFrame({"user_id": ["a", "b"], "event_timestamp": pd.to_datetime(["2024-03-02 12:00",
                                                                                   "2024-03-01 00:00"], utc=True)})
    scores = recent_behaviour_scorer(events, ITEMS)(req)
    assert scores[0].tolist() == [2, 3, 0, 1, 0, 0]  # f, p, q, x, y, z: x 09:00 < f 10:00 < p 11:00; y, q not yet
    assert scores[1].tolist() == [0] * 6  # b's first event is on 03-01 08:00
    views = recent_behaviour_scorer(events, ITEMS, types=("view",))(req)
    assert views[0].tolist() == [0, 0, 0, 1, 0, 0]


def test_popularity_by_target_counts_counts_repeat_events():
    events = _shop()
    # purchases: p twice (by a), y twice (a, c), x once; per user p has one buyer
    by_events = popularity_scorer(events, ("purchase",), ITEMS, count_events=True)(events.head(1))
    by_users = popularity_scorer(events, ("purchase",), ITEMS)(events.head(1))
    assert by_events[0].tolist() == [0, 2, 0, 1, 2, 0] and by_users[0].tolist() == [0, 1, 0, 1, 2, 0]


def _random_log(seed: int = 0, users: int = 40, items: int = 15) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}", "purchase", f"2024-01-{1 + int(rng.integers(20)):02d}")
            for u in range(users) for i in range(items) if rng.random() < 0.25]
    return _log(rows), [f"i{i}" for i in range(items)]


def _dense(events: pd.DataFrame, item_ids: list[str]) -> np.ndarray:
    return interaction_matrix(events, ("purchase",), item_ids).toarray().astype(np.float64)


def test_sparse_itemknn_equals_the_dense_cosine():
    events, item_ids = _random_log()
    x = _dense(events, item_ids)
    norms = np.sqrt(x.sum(axis=0)) + 1e-12
    sim = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(sim, 0.0)
    req = pd.DataFrame({"user_id": [f"u{u}" for u in range(10)], "event_timestamp": pd.Timestamp("2024-02-01",
                                                                                                 tz="UTC")})
    history = Histories(events, ("purchase",), item_ids).matrix(req, len(item_ids))
    got = cooccurrence_scorer(events, ("purchase",), item_ids)(req)
    assert got == pytest.approx(history @ sim, abs=1e-5)
    top2 = cosine_neighbours(interaction_matrix(events, ("purchase",), item_ids), keep=2).toarray()
    for i in range(len(item_ids)):  # each item keeps its two most similar items, with their similarity
        keep = np.flatnonzero(top2[i])
        assert len(keep) <= 2 and np.all(sim[i, keep] >= np.sort(sim[i])[-2] - 1e-6)
        assert top2[i, keep] == pytest.approx(sim[i, keep], abs=1e-6)


def test_sparse_ease_equals_the_dense_closed_form_and_bounds_its_items(monkeypatch):
    events, item_ids = _random_log(1)
    lam = 5.0
    req = pd.DataFrame({"user_id": [f"u{u}" for u in range(10)], "event_timestamp": pd.Timestamp("2024-02-01",
                                                                                                 tz="UTC")})
    history = Histories(events, ("purchase",), item_ids).matrix(req, len(item_ids))

    def dense_ease(x: np.ndarray) -> np.ndarray:
        p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
        b = np.eye(x.shape[1]) - p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        return b

    x = _dense(events, item_ids)
    assert ease_scorer(events, ("purchase",), item_ids, lam)(req) == pytest.approx(history @ dense_ease(x), abs=1e-5)
    monkeypatch.setattr(baselines, "EASE_MAX_ITEMS", 5)  # only the 5 items with most users are modelled
    top = np.sort(np.argsort(-x.sum(axis=0), kind="stable")[:5])
    expected = np.zeros((len(req), len(item_ids)))
    expected[:, top] = history[:, top] @ dense_ease(x[:, top])
    assert ease_scorer(events, ("purchase",), item_ids, lam)(req) == pytest.approx(expected, abs=1e-5)
    assert "top 5 of 15 items" in baselines.ease_note(len(item_ids))


def test_workflow_baselines_with_a_target_add_ease_over_all_behaviour():
    events = _shop()
    cfg = RunConfig(models=("popularity", "cooccurrence", "ease", "recent", "ease-all"), target="purchase")
    split = target_split(events, "purchase")
    rows = list(baseline_scorers(split, events, {"purchase": 1.0}, ITEMS, cfg, progress=False))
    assert rows == ["popularity (purchase counts)", "recent behaviour (own items, newest day first)",
                    "item co-occurrence", "EASE (λ=100)", "EASE over all behaviour (λ=100)"]
    plain = RunConfig(models=("popularity", "recent", "ease-all"))  # no target: EASE over all stays out
    assert plain.wants("recent") and not plain.wants("ease-all") and plain.split_names() == ("loo",)


def test_the_default_split_has_the_recent_list_too():
    """persona train's leave-one-out table ranks the shop's strongest simple baseline beside Persona."""
    events = _shop()
    positives = {"purchase": 4.0}
    split = make_split("loo", events, positives, RunConfig())
    rows = baseline_scorers(split, events, positives, ITEMS, RunConfig(models=("recent",)), progress=False)
    assert list(rows) == ["recent behaviour (own items, newest day first)"]
    held = split.requests.set_index("user_id")["item_id"].to_dict()
    assert held["b"] == "x"  # b viewed y then z, and bought x: the list ranks z, y, then the rest tie
    scores = rows["recent behaviour (own items, newest day first)"](split.requests[split.requests["user_id"] == "b"])
    assert scores[0].tolist() == [0, 0, 0, 0, 1, 2]  # f p q x y z


@pytest.mark.skipif(not (TMALL / "events.parquet").exists(), reason="needs ../shared/data/tmall-2014")
def test_tmall_reference_numbers():
    events = pd.read_parquet(TMALL / "events.parquet")
    item_ids = pd.read_parquet(TMALL / "items.parquet")["item_id"].astype(str).tolist()
    split = target_split(events, "purchase")
    assert len(split.requests) == 843 and split.requests["user_id"].nunique() == 734
    given = split.before(events, split.test_cut)
    scorers = {"popularity": popularity_scorer(given, ("purchase",), item_ids, count_events=True),
               "recent": recent_behaviour_scorer(events, item_ids)}
    metrics = evaluate_scorers(scorers, split, events, {"purchase": 1.0}, item_ids)
    ndcg = metrics[metrics["segment"] == "all"].set_index("model")["NDCG@10"]
    assert ndcg["popularity"] == pytest.approx(0.0142, abs=0.002)
    assert ndcg["recent"] == pytest.approx(0.1474, abs=0.002)
