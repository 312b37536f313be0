"""Recall and rank: known answers for each part, and point in time for every feature it reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from training.baselines import Histories
from training.recall import pairs
from training.recall.cooccurrence import CooccurrenceSource, item_similarity
from training.recall.fit import Behaviours, make_recall, target_requests, two_stage_scorer
from training.recall.history import EventHistories, Recent, TypeCodes, from_columns
from training.recall.lexical import LexicalSource, tokens
from training.recall.popular import ItemCounts, PopularSource
from training.recall.ranker import Lists, RankerConfig, fit, listwise_loss
from training.recall.recent import RecentSource

TYPES = ["view", "favorite", "add_to_cart", "purchase"]
T0 = pd.Timestamp("2026-01-05 10:00", tz="UTC")


def _events(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """(user, item, type, hours after T0) rows as a contract-shaped event frame."""
    return pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "event_type": [r[2] for r in rows],
                         "event_timestamp": [T0 + pd.Timedelta(hours=r[3]) for r in rows]})


ITEMS = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["red pen", "blue pen", "HP 61XL ink", "墨盒 黑色"],
                      "category": ["pens", "pens", "ink", "ink"], "brand": ["x", "y", "hp", None]})
INDEX = {i: k for k, i in enumerate(ITEMS["item_id"])}


def test_slots_collapse_an_hour_of_one_item_and_type_and_keep_the_newest():
    rows = [("u", "a", "view", 0.01 * k) for k in range(30)] + [("u", "b", "view", 2), ("u", "c", "view", 3)]
    hist = EventHistories(_events(rows), INDEX, TypeCodes(TYPES), TYPES)
    recent = hist.at("u", T0 + pd.Timedelta(hours=5))
    assert recent.items.tolist() == [0, 1, 2]  # the burst of 30 views of a takes one slot
    assert recent.counts.tolist() == [30, 1, 1]
    assert hist.at("u", T0 + pd.Timedelta(hours=5), slots=2).items.tolist() == [1, 2]
    assert hist.at("u", T0 + pd.Timedelta(hours=2)).items.tolist() == [0]  # strictly before the request
    assert hist.at("nobody", T0).items.size == 0


def test_stored_columns_read_as_the_same_slots_and_old_rows_count_once():
    codes = TypeCodes(TYPES)
    r = from_columns('["a", "zz", "b"]', '["view", "share", "purchase"]', "[0, 3600, 7200]", None, INDEX, codes)
    assert r.items.tolist() == [0, -1, 1]
    assert r.types.tolist() == [0, len(codes) - 1, 3]  # a type not declared reads as "other"
    assert r.counts.tolist() == [1, 1, 1]
    assert from_columns(None, None, None, None, INDEX, codes).items.size == 0


def test_pair_features_count_and_time_what_the_user_did_to_the_item_its_category_and_brand():
    codes = TypeCodes(TYPES)
    now = 10 * 3600.0
    recent = Recent(np.array([0, 0, 1]), np.array([0, 2, 0]), np.array([0.0, 3600.0, 7200.0]), np.array([3.0, 1, 2]))
    groups = pairs.ItemGroups.from_columns(ITEMS["category"].tolist(), ITEMS["brand"].tolist())
    f = pairs.pair_features(recent, np.array([0, 1, 2, 3]), groups, len(codes), now)
    names = pairs.names(codes.names)
    col = {n: f[:, names.index(n)] for n in names}
    assert np.allclose(col["item_view_count"], np.log1p([3, 2, 0, 0]))
    assert np.allclose(col["item_view_hours"][:2], np.log1p([10, 8]))
    assert col["item_view_hours"][2] == pytest.approx(np.log1p(pairs.NEVER_HOURS))
    assert np.allclose(col["item_add_to_cart_count"], np.log1p([1, 0, 0, 0]))
    assert np.allclose(col["category_view_count"], np.log1p([5, 5, 0, 0]))  # a and b are both pens
    assert np.allclose(col["brand_view_count"], np.log1p([3, 2, 0, 0]))  # d has no brand: never matches
    assert col["recent_rank"].tolist() == pytest.approx(np.log1p([1, 0, pairs.RECENT_LIMIT, pairs.RECENT_LIMIT]))
    assert col["item_share_of_user"].tolist() == pytest.approx([4 / 6, 2 / 6, 0, 0])


def test_attention_columns_count_visits_first_sight_and_the_users_latest_day():
    codes = TypeCodes(TYPES)
    now = 100 * 3600.0
    # a seen at hours 0 and 70 (3 events then 1), b at 80 (2 events), c at 20; the user's newest event: hour 80
    recent = Recent(np.array([0, 2, 0, 1]), np.array([0, 0, 0, 0]), np.array([0.0, 20, 70, 80]) * 3600,
                    np.array([3.0, 1, 1, 2]))
    groups = pairs.ItemGroups.from_columns(ITEMS["category"].tolist(), ITEMS["brand"].tolist())
    f = pairs.pair_features(recent, np.array([0, 1, 2, 3]), groups, len(codes), now)
    names = pairs.names(codes.names)
    assert f.shape[1] == len(names)
    col = {n: f[:, names.index(n)] for n in pairs.ATTENTION}
    never = np.log1p(pairs.NEVER_HOURS)
    assert np.allclose(col["item_visits"], np.log1p([2, 1, 1, 0]))
    assert np.allclose(col["item_first_hours"], [np.log1p(100), np.log1p(20), np.log1p(80), never])
    assert np.allclose(col["item_hours_before_user_last"], [np.log1p(10), 0, np.log1p(60), never])
    # the latest day is hours 56..80: a's one event at 70 and b's two at 80
    assert np.allclose(col["item_latest_day_count"], np.log1p([1, 2, 0, 0]))
    assert col["item_latest_day_share"].tolist() == pytest.approx([1 / 3, 2 / 3, 0, 0])
    empty = pairs.pair_features(Recent.empty(), np.array([0, 1]), groups, len(codes), now)
    assert empty[:, names.index("item_first_hours")].tolist() == pytest.approx([never, never])


def test_sources_know_their_answers():
    ev = _events([("u", "a", "view", 0), ("u", "b", "view", 1), ("v", "a", "view", 0), ("v", "c", "view", 0),
                  ("w", "a", "purchase", 0), ("w", "c", "purchase", 0)])
    recent = EventHistories(ev, INDEX, TypeCodes(TYPES), TYPES).at("u", T0 + pd.Timedelta(hours=3))
    assert RecentSource(4).scores(recent, 0, None).dense().tolist() == [0.5, 1.0, 0, 0]  # b is newest
    sim = item_similarity(ev, INDEX, TYPES).toarray()
    assert sim[0, 2] == pytest.approx(2 / np.sqrt(3 * 2))  # a (3 users) and c (2 users) share 2 users
    assert np.allclose(np.diag(sim), 0)
    co = CooccurrenceSource(ev, INDEX, TYPES).scores(recent, 0, None).dense()
    # b (newest) weighs 1 and a (second) 1/sqrt(2): c is reached through a only, d through nothing
    assert co[2] == pytest.approx(sim[0, 2] / np.sqrt(2)) and co[3] == 0
    lex = LexicalSource(ITEMS["title"].tolist())
    assert lex.scores(recent, 0, "61xl").argmax() == 2
    assert lex.scores(recent, 0, "墨盒").argmax() == 3  # Chinese matches by characters, no dictionary
    assert lex.scores(recent, 0, None) is None
    assert "61xl" in tokens("HP 61XL") and "墨盒" in tokens("黑色墨盒")


def test_item_counts_are_point_in_time():
    ev = _events([("u", "a", "view", 0), ("v", "a", "view", 5), ("w", "b", "view", 5.5)])
    counts = ItemCounts(ev, INDEX, TYPES)
    at = (T0 + pd.Timedelta(hours=5)).value / 1e9
    assert counts.window(int(at // 3600), 7 * 86_400).tolist() == [1, 0, 0, 0]  # the hour of the request is out
    later = (T0 + pd.Timedelta(hours=6)).value / 1e9
    assert PopularSource(counts).scores(Recent.empty(), later, None).dense().argmax() == 0


def test_the_listwise_loss_and_a_ranker_that_learns_a_plain_signal():
    scores = torch.tensor([[2.0, 0.0, 5.0]])
    loss = listwise_loss(scores, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx(-np.log(np.exp(2) / (np.exp(2) + 1)), rel=1e-5)
    rng = np.random.default_rng(0)
    lists = Lists([], [])
    for _ in range(200):
        x = rng.normal(size=(30, 3)).astype(np.float32)
        lists.features.append(x)
        lists.labels.append((x[:, 1] == x[:, 1].max()).astype(np.float32))  # the target has the largest column 1
    model = fit(lists, RankerConfig(epochs=30))
    x = rng.normal(size=(30, 3)).astype(np.float32)
    assert model.score(x).argmax() == x[:, 1].argmax()


def test_training_requests_are_a_users_target_days_in_the_window():
    ev = _events([("u", "a", "purchase", 0), ("u", "b", "purchase", 1), ("u", "c", "view", 30),
                  ("u", "c", "purchase", 48), ("v", "a", "purchase", 0)])
    b = Behaviours(TYPES, TYPES[1:], {"purchase": 4.0, "favorite": 2.0})
    out = target_requests(ev, b, pd.Series({"u": T0}), pd.Series({"u": T0 + pd.Timedelta(hours=40)}))
    assert out["user_id"].tolist() == ["u"]  # v has no window; u's day-3 purchase is at the test cut
    assert out["targets"].iloc[0] == {"a": 4.0, "b": 4.0}
    assert out["event_timestamp"].iloc[0] == T0


def test_a_two_stage_score_never_sees_events_after_its_request():
    """Point in time: events after the request (the user's and others') change nothing it scores."""
    base = [("u", "a", "view", 0), ("u", "b", "view", 1), ("v", "a", "view", 0), ("v", "c", "purchase", 2)]
    late = [("u", "d", "purchase", 10), ("v", "d", "view", 10), ("w", "d", "view", 10), ("u", "c", "view", 10)]
    b = Behaviours(TYPES, TYPES[1:], {"purchase": 1.0})
    rng = np.random.default_rng(0)
    lists = Lists([rng.normal(size=(5, 40)).astype(np.float32) for _ in range(30)],
                  [np.eye(5, dtype=np.float32)[k % 5] for k in range(30)])
    request = pd.DataFrame({"user_id": ["u"], "event_timestamp": [T0 + pd.Timedelta(hours=5)], "query": [None]})

    def scores(ev: pd.DataFrame) -> np.ndarray:
        recall = make_recall(ev, ITEMS, b, False)
        n = len(recall.feature_names())
        model = fit(Lists([f[:, :1].repeat(n, axis=1) for f in lists.features], lists.labels), RankerConfig(epochs=2))
        hist = EventHistories(ev, INDEX, recall.codes, b.sequence)
        engaged = Histories(ev, dict.fromkeys(b.engaged, 1.0), list(INDEX))
        return two_stage_scorer(recall, model, hist, engaged)(request)

    # the item-to-item weights are a model fitted on the split's training rows: give both the same rows
    cut = _events(base + late)
    assert np.array_equal(scores(_events(base)), scores(_events(base)))
    early = scores(_events(base))
    with_late = scores(cut[cut["event_timestamp"] < T0 + pd.Timedelta(hours=5)])
    assert np.array_equal(early, with_late)


def test_slots_rebuilt_from_events_are_the_slots_the_fold_stores():
    """The offline path (``EventHistories``) and the feature store's ``user_sequence`` agree, bursts,
    ties within an hour and the length bound included."""
    from feature_repo.pipeline import fold

    rng = np.random.default_rng(1)
    items = [f"i{k}" for k in range(40)]
    rows = [("u", items[rng.integers(40)], TYPES[rng.integers(4)], float(rng.integers(0, 400)) + rng.random())
            for _ in range(600)]
    ev = _events(rows)
    catalogue = pd.DataFrame({"item_id": items, "title": items, "category": "c"})
    stored = fold.user_tables(ev, catalogue, sequence_types=tuple(TYPES))["user_sequence"].iloc[-1]
    index = {i: k for k, i in enumerate(items)}
    codes = TypeCodes(TYPES)
    from_store = from_columns(stored["sequence_items"], stored["sequence_types"], stored["sequence_times"],
                              stored["sequence_counts"], index, codes)
    rebuilt = EventHistories(ev, index, codes, TYPES).at("u", ev["event_timestamp"].max() + pd.Timedelta(seconds=1))
    for part in ("items", "types", "times", "counts"):
        assert getattr(from_store, part).tolist() == getattr(rebuilt, part).tolist(), part


ZH = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "zh-catalogue"


@pytest.mark.skipif(not (ZH / "items.csv").exists(), reason="needs ../shared/data/zh-catalogue (real Chinese titles)")
def test_the_query_source_finds_real_chinese_titles_by_brand_without_a_dictionary():
    items = pd.read_csv(ZH / "items.csv", dtype=str, keep_default_na=False)
    texts = (items["title"] + " " + items["brand"] + " " + items["category"]).tolist()
    source = LexicalSource(texts)
    chinese = items["brand"].str.extract(r"([\u4e00-\u9fff]{2,})", expand=False)
    asked = items[chinese.notna()].drop_duplicates("brand").head(100)
    found = 0
    for brand, query in zip(asked["brand"], chinese[asked.index], strict=True):
        top = np.argsort(-source.scores(Recent.empty(), 0, query), kind="stable")[:10]
        found += bool((items["brand"].to_numpy()[top] == brand).any())
    assert found / len(asked) >= 0.9, found


def test_recall_rank_serves_only_where_it_ranked_better():
    """The evaluation decides what /rank runs: the ranker is kept only above the profile model alone."""
    from training.workflow import PERSONA, RECALL_RANK, serving_choice

    def metrics(ours: float, towers: float | None) -> pd.DataFrame:
        rows = [{"model": RECALL_RANK, "segment": "all", "NDCG@10": ours},
                {"model": RECALL_RANK, "segment": "cold users", "NDCG@10": 0.9}]
        if towers is not None:
            rows.append({"model": PERSONA, "segment": "all", "NDCG@10": towers})
        return pd.DataFrame(rows)

    ranker = ("ranker", "spec")
    assert serving_choice(metrics(0.31, 0.50), ranker)[0] == PERSONA
    assert "0.3100, not above the profile model's 0.5000" in serving_choice(metrics(0.31, 0.50), ranker)[1]
    assert serving_choice(metrics(0.50, 0.50), ranker)[0] == PERSONA  # a tie keeps the simpler path
    assert serving_choice(metrics(0.17, 0.05), ranker)[0] == RECALL_RANK
    assert serving_choice(metrics(0.17, None), ranker)[0] == RECALL_RANK  # no towers in the run (no text)
    assert serving_choice(metrics(0.17, 0.05), None)[0] == PERSONA  # nothing to serve
    assert serving_choice(metrics(0.17, 0.05), ranker)[2] == "all"


def test_recall_rank_serves_searches_where_only_they_ranked_better():
    """Better only on the requests with a search (enough of them): it serves those, the towers the rest."""
    from training.recall.package import TwoStageSpec
    from training.workflow import MIN_QUERY_REQUESTS, PERSONA, RECALL_RANK, serving_choice

    def metrics(searched: int, ours: float, towers: float) -> pd.DataFrame:
        return pd.DataFrame([
            {"model": RECALL_RANK, "segment": "all", "NDCG@10": 0.30, "requests": 500},
            {"model": PERSONA, "segment": "all", "NDCG@10": 0.50, "requests": 500},
            {"model": RECALL_RANK, "segment": "with query", "NDCG@10": ours, "requests": searched},
            {"model": PERSONA, "segment": "with query", "NDCG@10": towers, "requests": searched}])

    ranker = ("ranker", "spec")
    served, verdict, scope = serving_choice(metrics(80, 0.61, 0.20), ranker)
    assert (served, scope) == (RECALL_RANK, "queries")
    assert "on the 80 test requests with a search it scored 0.6100 against 0.2000" in verdict
    assert serving_choice(metrics(80, 0.20, 0.61), ranker)[:3:2] == (PERSONA, "all")
    assert serving_choice(metrics(MIN_QUERY_REQUESTS - 1, 0.61, 0.20), ranker)[0] == PERSONA  # too few to tell
    assert serving_choice(metrics(80, 0.61, 0.20), ranker, "towers")[0] == PERSONA
    spec = TwoStageSpec(["f"], None, True, True, "queries")
    assert spec.serves("落地窗") and not spec.serves(None) and not spec.serves("")
    behaviours = {"sequence": [], "engaged": [], "targets": {}}
    assert TwoStageSpec.from_json({**spec.to_json(), "behaviours": behaviours}).scope == "queries"
    legacy = {k: v for k, v in spec.to_json().items() if k != "scope"}  # saved before scopes
    assert TwoStageSpec.from_json({**legacy, "behaviours": behaviours}).scope == "all"
