"""Known answers for the ranking metrics, the tie rule, the splits and the id baselines.

Every expected number here is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from training.baselines import Histories, cooccurrence_scorer, ease_weights, popularity_scorer, sequential_scorer
from training.evaluate import auc, last_per_user_split, ranking_metrics, summarise, tie_aware_ranks, top_k

NONE = np.array([], dtype=int)


def test_rank_counts_strictly_higher_items_plus_one():
    scores = np.array([[0.9, 0.5, 0.7, 0.1]])
    assert tie_aware_ranks(scores, np.array([1]), [NONE]).tolist() == [3.0]  # 0.9 and 0.7 beat 0.5
    assert tie_aware_ranks(scores, np.array([0]), [NONE]).tolist() == [1.0]


def test_a_tie_is_half_a_loss():
    # target 0.5 tied with two others, one item higher: 1 + 2/2 + 1 = 3
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert tie_aware_ranks(scores, np.array([0]), [NONE]).tolist() == [3.0]


def test_an_all_zero_row_never_wins():
    # 100 items, all zero: the target ties with 99 others, rank 0 + 99/2 + 1 = 50.5
    ranks = tie_aware_ranks(np.zeros((1, 100)), np.array([7]), [NONE])
    assert ranks.tolist() == [50.5]
    m = summarise(ranks, np.zeros((1, 10), dtype=int), 100)
    assert m["NDCG@10"] == 0.0 and m["Recall@10"] == 0.0 and m["MRR@10"] == 0.0 and m["Recall@50"] == 0.0


def test_excluded_items_do_not_count_and_the_target_is_never_excluded():
    scores = np.array([[0.9, 0.8, 0.5, 0.5]])
    # items 0 and 1 were seen (excluded) and the target 2 is listed too: it stays, ties with item 3
    assert tie_aware_ranks(scores, np.array([2]), [np.array([0, 1, 2])]).tolist() == [1.5]


def test_nan_scores_rank_last():
    scores = np.array([[np.nan, 0.2, np.nan]])
    assert tie_aware_ranks(scores, np.array([1]), [NONE]).tolist() == [1.0]
    assert tie_aware_ranks(scores, np.array([0]), [NONE]).tolist() == [2.5]  # below 0.2, tied with item 2


def test_summary_on_hand_computed_ranks():
    # ranks 1, 3, 10.5, 12 and 60 over 5 requests
    ranks = np.array([1.0, 3.0, 10.5, 12.0, 60.0])
    top10 = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]])
    m = summarise(ranks, top10, n_items=12)
    # NDCG@10: (1/log2(2) + 1/log2(4)) / 5 = (1 + 0.5) / 5 = 0.3; 10.5 is outside the top 10
    assert m["NDCG@10"] == pytest.approx(0.3)
    assert m["Recall@10"] == pytest.approx(2 / 5)  # 10.5 is a miss
    assert m["Recall@50"] == pytest.approx(4 / 5)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 3) / 5)
    assert m["coverage"] == pytest.approx(6 / 12)  # items 0..5 appear in some top list
    assert m["requests"] == 5


def test_ndcg_of_one_tie_inside_the_top_ten():
    # target tied with one other at the top: rank 1.5, NDCG = 1/log2(2.5), MRR = 1/1.5
    ranks = tie_aware_ranks(np.array([[1.0, 1.0, 0.0]]), np.array([0]), [NONE])
    m = summarise(ranks, np.zeros((1, 2), dtype=int), 3)
    assert m["NDCG@10"] == pytest.approx(1 / math.log2(2.5)) and m["MRR@10"] == pytest.approx(1 / 1.5)


def test_top_k_skips_excluded_items():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert set(top_k(scores, [np.array([0, 2])], k=2)[0]) == {1, 3}


def test_ranking_metrics_combines_rank_and_top_list():
    m = ranking_metrics(np.array([[0.1, 0.3, 0.2]]), np.array([2]), [NONE])
    assert m["rank"].tolist() == [2.0] and set(m["top10"][0]) == {0, 1, 2}


def test_auc_known_answers_with_ties():
    assert auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == 0.0
    # one positive at 0.5, negatives at 0.5 and 0.2: pairs (win, tie) = (1 + 0.5) / 2 = 0.75
    assert auc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0])) == pytest.approx(0.75)
    assert auc(np.zeros(4), np.array([1, 0, 1, 0])) == pytest.approx(0.5)  # all tied: a coin
    assert math.isnan(auc(np.array([0.3, 0.4]), np.array([1, 1])))


def _log(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"event_id": f"e{k}", "user_id": u, "item_id": i, "event_type": "purchase",
                          "event_timestamp": pd.Timestamp(t, tz="UTC")} for k, (u, i, t) in enumerate(rows)])


def test_leave_one_out_holds_out_the_newest_by_time_then_item_id():
    events = _log([("a", "x", "2024-01-01"), ("a", "y", "2024-01-02"), ("a", "z", "2024-01-03"),
                   ("a", "w", "2024-01-03"),  # same time as z: z holds out (item id order, z after w)
                   ("b", "x", "2024-01-05"), ("b", "y", "2024-01-04")])
    split = last_per_user_split(events, {"purchase": 1.0})
    test = split.requests.set_index("user_id")["item_id"].to_dict()
    val = split.validation.set_index("user_id")["item_id"].to_dict()
    assert test == {"a": "z", "b": "x"} and val == {"a": "w", "b": "y"}
    # training for a model stops before each user's validation target, for baselines before the test one
    fit = split.before(events, split.fit_cut)
    assert set(fit["item_id"][fit["user_id"] == "a"]) == {"x", "y"} and fit[fit["user_id"] == "b"].empty
    final = split.before(events, split.test_cut)
    assert set(final["item_id"][final["user_id"] == "b"]) == {"y"}


def test_id_baselines_on_a_tiny_matrix():
    # users: a={x,y}, b={x,y}, c={x,z}; item x co-occurs with y twice and with z once
    events = _log([("a", "x", "2024-01-01"), ("a", "y", "2024-01-02"), ("b", "x", "2024-01-01"),
                   ("b", "y", "2024-01-02"), ("c", "x", "2024-01-01"), ("c", "z", "2024-01-02")])
    items = ["x", "y", "z"]
    req = pd.DataFrame({"user_id": ["d", "c"], "event_timestamp": pd.Timestamp("2024-02-01", tz="UTC")})
    pop = popularity_scorer(events, {"purchase": 1.0}, items)(req)
    assert pop.tolist() == [[3, 2, 1], [3, 2, 1]]
    knn = cooccurrence_scorer(events, {"purchase": 1.0}, items)(req)
    # cosine(x, y) = 2 / sqrt(3 * 2), cosine(x, z) = 1 / sqrt(3), cosine(y, z) = 0
    assert knn[0].tolist() == [0, 0, 0]  # d has no history: an all-zero row, which ranks nothing first
    assert knn[1] == pytest.approx([1 / math.sqrt(3), 2 / math.sqrt(6) + 0, 1 / math.sqrt(3)])


def test_ease_matches_its_closed_form():
    x = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1]], dtype=float)
    lam = 1.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(3))
    expected = np.eye(3) - p / np.diag(p)  # B = I - P diag(1/diag(P)), zero diagonal
    assert ease_weights(x, lam) == pytest.approx(expected, abs=1e-6)
    assert np.allclose(np.diag(ease_weights(x, lam)), 0.0)


@pytest.mark.parametrize("users, items", [(30, 200), (200, 30)])
def test_ease_from_the_users_side_is_the_items_side_inverse(users, items):
    """Fewer users than items: P comes from a users x users system (Woodbury); it must be the same B."""
    rng = np.random.default_rng(0)
    x = (rng.random((users, items)) < 0.1).astype(float)
    x[:, 5] = 0.0  # an item nobody touched: P_jj = 1 / λ, a zero column of B
    for lam in (0.5, 100.0):
        p = np.linalg.inv(x.T @ x + lam * np.eye(items))
        expected = np.eye(items) - p / np.diag(p)
        assert ease_weights(x, lam) == pytest.approx(expected, abs=1e-5)
        assert ease_weights(sparse.csr_matrix(x), lam) == pytest.approx(expected, abs=1e-5)


def test_sequential_baseline_learns_a_deterministic_order():
    # every user buys a prefix of i0 -> i1 -> ... -> i5 in order: after i0..i3 the next item must be i4
    rows = [(f"u{u}", f"i{k}", f"2024-01-{1 + k:02d}") for u in range(60) for k in range(2 + u % 5)]
    events = _log(rows)
    items = [f"i{k}" for k in range(6)]
    from training.baselines import SequentialConfig

    scorer = sequential_scorer(events, {"purchase": 1.0}, items, Histories(events, {"purchase": 1.0}, items),
                               cfg=SequentialConfig(max_epochs=300, max_seconds=30, dim=16, max_len=8), progress=False)
    req = pd.DataFrame({"user_id": ["u3", "u3"],  # u3 bought i0..i4
                        "event_timestamp": pd.to_datetime(["2024-01-05", "2024-01-03"], utc=True)})
    assert np.argmax(scorer(req), axis=1).tolist() == [4, 2]  # after i0..i3 comes i4; after i0, i1 comes i2


def test_events_before_counts_strictly_older_events_of_the_same_user():
    from training.evaluate import _events_before

    events = _log([("a", "x", "2024-01-01"), ("a", "y", "2024-01-02"), ("a", "z", "2024-01-03"),
                   ("b", "x", "2024-01-01")])
    requests = pd.DataFrame({"user_id": ["a", "a", "b", "c"],
                             "event_timestamp": pd.to_datetime(["2024-01-02", "2024-01-05", "2024-01-01",
                                                                "2024-01-09"], utc=True)})
    assert _events_before(events, requests).tolist() == [1, 3, 0, 0]  # an event at the same time is not before
