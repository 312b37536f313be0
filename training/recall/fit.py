"""Fitting recall and rank on a split: sources on the rows before the fit cut, the ranker on the
target events between the fit cut and the test cut (models never saw them), then the sources again
on every row before the test cut for scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.baselines import Histories
from training.recall.cooccurrence import CooccurrenceSource
from training.recall.history import EventHistories, Recent, TypeCodes
from training.recall.lexical import LexicalSource
from training.recall.pairs import ItemGroups
from training.recall.popular import ItemCounts, ItemStats, PopularSource
from training.recall.ranker import Lists, RankerConfig, fit
from training.recall.recent import RecentSource
from training.recall.two_stage import Recall, ranked

Scores = Callable[[pd.DataFrame], np.ndarray]  # requests -> [n, n_items] (the towers)
TOWER = "the profile model's match"


@dataclass
class Behaviours:
    """Which event types feed what: the behaviour the sequence keeps, what the user has 'engaged'
    with (left out of their candidates), and the targets with their weights."""

    sequence: list[str]
    engaged: list[str]
    targets: dict[str, float]


class TowerSource:
    """The two-tower retrieval: its scores come precomputed per request (they need the user's features)."""

    name = TOWER
    dense = True  # every item has a score, negative ones included

    def scores(self, recent: Recent, now: float, query: str | None) -> None:
        return None


@dataclass
class ShopCounts:
    """What the sources read from the whole shop's events, taken elsewhere (by Spark's tasks): the
    item-to-item similarity and the item counts of the behaviour and the target types."""

    similarity: object  # scipy.sparse.csr_matrix, as ``cooccurrence.item_similarity`` gives
    behaviour: object  # ItemCounts or WindowCounts
    targets: object


def make_recall(events: pd.DataFrame | None, items: pd.DataFrame, behaviours: Behaviours, with_tower: bool,
                texts: list[str] | None = None, counts: ShopCounts | None = None) -> Recall:
    """The sources and item statistics from the shop's ``events``, or from ``counts`` taken elsewhere."""
    index = {i: k for k, i in enumerate(items["item_id"].astype(str))}
    behaviour = counts.behaviour if counts else ItemCounts(events, index, behaviours.sequence)
    similarity = counts.similarity if counts else None
    sources = [RecentSource(len(index)), CooccurrenceSource(events, index, behaviours.sequence, similarity),
               PopularSource(behaviour)]
    if texts is not None:
        sources.append(LexicalSource(texts))
    if with_tower:
        sources.append(TowerSource())
    groups = ItemGroups.from_columns(_column(items, "category"), _column(items, "brand"))
    stats = ItemStats(behaviour, counts.targets if counts else ItemCounts(events, index, list(behaviours.targets)))
    return Recall(sources, groups, TypeCodes(behaviours.sequence), stats)


def refreshed(recall: Recall, counts: ShopCounts, index: dict[str, int]) -> Recall:
    """``recall`` with the shop's counts taken again (new events): the co-occurrence, the popular items and
    the item statistics replaced; the catalogue's parts (groups, the lexical index) kept as they are."""
    swap = {CooccurrenceSource: CooccurrenceSource(None, index, [], counts.similarity),
            PopularSource: PopularSource(counts.behaviour)}
    sources = [swap.get(type(source), source) for source in recall.sources]
    return Recall(sources, recall.groups, recall.codes, ItemStats(counts.behaviour, counts.targets),
                  recall.per_source)


def _column(items: pd.DataFrame, name: str) -> list:
    if name not in items:
        return [None] * len(items)
    return items[name].astype(object).where(items[name].notna(), None).tolist()


MAX_LISTS = 10_000  # training requests a ranker learns from (a seeded sample past it): bounds the fit's time


def target_requests(events: pd.DataFrame, behaviours: Behaviours, start: pd.Series | pd.Timestamp,
                    end: pd.Series | pd.Timestamp, per_event: bool = False) -> pd.DataFrame:
    """Training requests from the target events in [start, end), shaped as the split's test requests:
    ``per_event`` (the global and leave-one-out splits, as serving asks) one request at each target
    event, its item the target; else (the per-target-type split) one per (user, UTC day) at the day's
    first target event, its targets that day's items. Weights: the strongest type's."""
    ev = events[events["event_type"].isin(list(behaviours.targets)) & events["item_id"].notna()]
    t = pd.to_datetime(ev["event_timestamp"], utc=True)
    lo = ev["user_id"].map(start) if isinstance(start, pd.Series) else start
    hi = ev["user_id"].map(end) if isinstance(end, pd.Series) else end
    keep = ((t >= lo) & (t < hi)).fillna(False).astype(bool)  # a user without a cut has no request
    ev = ev[keep].assign(w=lambda f: f["event_type"].map(behaviours.targets))
    if ev.empty:
        return pd.DataFrame(columns=["user_id", "event_timestamp", "targets", "query"])
    key = ev["event_timestamp"] if per_event else t[keep].dt.floor("D")
    ev = ev.assign(key=key.to_numpy())
    grouped = ev.groupby(["user_id", "key"], sort=True)
    out = grouped.agg(event_timestamp=("event_timestamp", "min")).reset_index()
    weights = ev.groupby(["user_id", "key", "item_id"])["w"].max()
    out["targets"] = [weights.loc[(u, k)].to_dict() for u, k in zip(out["user_id"], out["key"], strict=True)]
    out = out.drop(columns="key")
    if len(out) > MAX_LISTS:
        out = out.sample(MAX_LISTS, random_state=0).sort_values(["user_id", "event_timestamp"]).reset_index(drop=True)
    return live_queries(out, events)


SESSION_GAP = pd.Timedelta(minutes=30)  # a search this recent is the live query (serving's rule)


def live_queries(requests: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Each request's live query: the user's newest search at most ``SESSION_GAP`` before it, as
    ``/rank`` takes it from the online store."""
    if "query" not in events or requests.empty:
        return requests.assign(query=None)
    searches = events[(events["event_type"] == "search") & events["query"].notna()]
    if searches.empty:
        return requests.assign(query=None)
    left = requests.assign(t=pd.to_datetime(requests["event_timestamp"], utc=True)).reset_index(names="_row")
    right = searches.assign(t=pd.to_datetime(searches["event_timestamp"], utc=True))[["user_id", "t", "query"]]
    merged = pd.merge_asof(left.sort_values("t"), right.sort_values("t"), on="t", by="user_id",
                           tolerance=SESSION_GAP, direction="backward")
    merged = merged.sort_values("_row").set_index("_row")
    return requests.assign(query=merged["query"].astype(object).where(merged["query"].notna(), None).to_numpy())


def training_lists(recall: Recall, requests: pd.DataFrame, histories: EventHistories, engaged: Histories,
                   index: dict[str, int], tower: Scores | None) -> Lists:
    """Each request's candidates and their target weights (0 for the rest)."""
    tower_scores = tower(requests) if tower is not None and len(requests) else None
    lists = Lists([], [])
    queries = requests["query"].tolist() if "query" in requests else [None] * len(requests)
    for r, (user, ts, targets) in enumerate(zip(requests["user_id"], requests["event_timestamp"],
                                                requests["targets"], strict=True)):
        given = {TOWER: tower_scores[r]} if tower_scores is not None else None
        cands = recall.candidates(histories.at(user, ts), pd.Timestamp(ts).value / 1e9, queries[r] or None,
                                  engaged.before(user, ts), given)
        weight = {index[i]: w for i, w in targets.items() if i in index}
        lists.features.append(cands.features)
        lists.labels.append(np.array([weight.get(int(i), 0.0) for i in cands.items], dtype=np.float32))
    return lists


def fit_ranker(events: pd.DataFrame, items: pd.DataFrame, behaviours: Behaviours, fit_cut, test_cut,
               before: Callable[[pd.DataFrame, object], pd.DataFrame], tower: Scores | None = None,
               texts: list[str] | None = None, cfg: RankerConfig | None = None, per_event: bool = False):
    """The ranker of a split, and the lists it learnt from (for the report)."""
    index = {i: k for k, i in enumerate(items["item_id"].astype(str))}
    fit_events = before(events, fit_cut)
    recall = make_recall(fit_events, items, behaviours, tower is not None, texts)
    requests = target_requests(before(events, test_cut), behaviours, fit_cut, test_cut, per_event)
    histories = EventHistories(events, index, recall.codes, behaviours.sequence)
    engaged = Histories(events, dict.fromkeys(behaviours.engaged, 1.0), list(index))
    lists = training_lists(recall, requests, histories, engaged, index, tower)
    return fit(lists, cfg, tower_column(recall) if tower is not None else None), lists


def tower_column(recall: Recall) -> int | None:
    """The profile model's score among the ranker's features: the order the ranker corrects."""
    name = f"{TOWER}: score"
    names = recall.feature_names()
    return names.index(name) if name in names else None


def two_stage_scorer(recall: Recall, ranker, histories: EventHistories, engaged: Histories,
                     tower: Scores | None = None) -> Scores:
    """A scorer for ``evaluate_scorers``: candidates in the ranker's order above every other item."""
    n_items = len(recall.groups.category)

    def score(requests: pd.DataFrame) -> np.ndarray:
        requests = requests.reset_index(drop=True)
        tower_scores = tower(requests) if tower is not None else None
        out = np.full((len(requests), n_items), -1e9, dtype=np.float32)
        queries = requests["query"].tolist() if "query" in requests else [None] * len(requests)
        for r, (user, ts) in enumerate(zip(requests["user_id"], requests["event_timestamp"], strict=True)):
            given = {TOWER: tower_scores[r]} if tower_scores is not None else None
            query = queries[r] if isinstance(queries[r], str) and queries[r] else None
            items, scores, _ = ranked(recall, ranker, histories.at(user, ts), pd.Timestamp(ts).value / 1e9,
                                      query, engaged.before(user, ts), given)
            out[r, items] = scores - scores.min() + 1.0 if len(scores) else scores
        return out
    return score
