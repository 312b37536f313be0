"""Recall and rank in the ranking report: its rows, what each feature group adds, and how many
held-out targets each source reaches.

The ranker learns from the target events between a split's fit cut and its test cut (the rows the
towers and sources were not fitted on) and is scored on the test requests like every other row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.baselines import Histories
from training.recall import pairs
from training.recall.fit import TOWER, Behaviours, Scores, fit_ranker, make_recall, tower_column, two_stage_scorer
from training.recall.history import EventHistories
from training.recall.package import TwoStageSpec
from training.recall.ranker import Lists, Ranker, RankerConfig, fit
from training.recall.two_stage import Recall

ROW = "Persona: recall + rank"


def feature_groups(recall: Recall) -> dict[str, np.ndarray]:
    """Column positions of each feature group (what an ablation leaves out)."""
    names = recall.feature_names()
    pair_names = set(pairs.names(recall.codes.names))
    groups = {"pair features": [k for k, n in enumerate(names) if n in pair_names],
              "source scores and ranks": [k for k, n in enumerate(names) if ": " in n and not n.startswith(TOWER)],
              "item statistics": [k for k, n in enumerate(names) if n in recall.stats.names],
              "the profile model's score": [k for k, n in enumerate(names) if n.startswith(TOWER)]}
    return {g: np.array(cols) for g, cols in groups.items() if cols}


class Without:
    """A ranker trained with some columns held constant (an ablation), scoring full feature rows."""

    def __init__(self, ranker: Ranker, dropped: np.ndarray):
        self.ranker, self.dropped = ranker, dropped

    def score(self, features: np.ndarray) -> np.ndarray:
        return self.ranker.score(_blank(features, self.dropped))


def _blank(features: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = features.copy()
    out[:, cols] = 0.0
    return out


@dataclass
class RecallRank:
    scorers: dict[str, Scores]  # report rows: the model, then one per ablation
    ablation: list[tuple[str, str]]  # (group left out, row name)
    lists: int  # training requests with a target among their candidates
    recall_table: Callable[[pd.DataFrame], pd.DataFrame]
    ranker: Ranker  # what serving runs, with ``spec``
    spec: TwoStageSpec


def recall_and_rank(events: pd.DataFrame, items: pd.DataFrame, behaviours: Behaviours, fit_cut, test_cut,
                    before: Callable, tower: Scores | None = None, texts: list[str] | None = None,
                    ablate: bool = True, cfg: RankerConfig | None = None, per_event: bool = False) -> RecallRank:
    """Fit the ranker (and, with ``ablate``, one per feature group left out) and build its scorers."""
    index = {i: k for k, i in enumerate(items["item_id"].astype(str))}
    ranker, lists = fit_ranker(events, items, behaviours, fit_cut, test_cut, before, tower, texts, cfg, per_event)
    given = before(events, test_cut)
    recall = make_recall(given, items, behaviours, tower is not None, texts)
    histories = EventHistories(given, index, recall.codes, behaviours.sequence)
    engaged = Histories(given, dict.fromkeys(behaviours.engaged, 1.0), list(index))
    scorers = {ROW: two_stage_scorer(recall, ranker, histories, engaged, tower)}
    ablation = []
    tower_base = tower_column(recall) if tower is not None else None
    if ablate:
        for group, cols in feature_groups(recall).items():
            blanked = Lists([_blank(f, cols) for f in lists.features], lists.labels)
            name = f"{ROW} without {group}"
            base = None if tower_base in set(cols.tolist()) else tower_base  # without the towers' score: no base
            scorers[name] = two_stage_scorer(recall, Without(fit(blanked, cfg, base), cols), histories, engaged, tower)
            ablation.append((group, name))

    def recall_table(requests: pd.DataFrame) -> pd.DataFrame:
        return source_recall(recall, requests, histories, engaged, index, tower)
    spec = TwoStageSpec(recall.feature_names(), behaviours, tower is not None, texts is not None)
    return RecallRank(scorers, ablation, len(lists.useful().labels), recall_table, ranker, spec)


def source_recall(recall: Recall, requests: pd.DataFrame, histories: EventHistories, engaged: Histories,
                  index: dict[str, int], tower: Scores | None) -> pd.DataFrame:
    """Share of held-out targets among each source's candidates, and among their union."""
    requests = requests[requests["item_id"].isin(index)].reset_index(drop=True)
    tower_scores = tower(requests) if tower is not None and len(requests) else None
    hits = np.zeros(len(recall.sources))
    union = 0
    for r, (user, ts, item) in enumerate(zip(requests["user_id"], requests["event_timestamp"], requests["item_id"],
                                             strict=True)):
        given = {TOWER: tower_scores[r]} if tower_scores is not None else None
        query = requests["query"].iloc[r] if "query" in requests else None
        cands = recall.candidates(histories.at(user, ts), pd.Timestamp(ts).value / 1e9,
                                  query if isinstance(query, str) and query else None, engaged.before(user, ts), given)
        row = np.flatnonzero(cands.items == index[item])
        if len(row):
            union += 1
            hits += cands.ranks[row[0]] <= recall.per_source
    n = max(len(requests), 1)
    rows = [{"source": s.name, f"recall@{recall.per_source}": hits[k] / n} for k, s in enumerate(recall.sources)]
    rows.append({"source": "all sources (the ranker's candidates)", f"recall@{recall.per_source}": union / n})
    return pd.DataFrame(rows)
