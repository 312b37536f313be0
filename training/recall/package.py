"""Recall + rank as saved with a model version, and rebuilt where it serves (``/rank``, ``persona recommend``).

What is saved is what was learnt: the ranker's weights and the feature layout it learnt on (its
sources and behaviour types). The rest is the shop's state, rebuilt from the event log where it
serves: co-occurrence, item counts, the lexical index. So a served ranking reads the same features,
computed by the same code, as the evaluated one.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.recall.fit import TOWER, Behaviours, ShopCounts, make_recall, refreshed
from training.recall.history import Recent
from training.recall.lexical import item_texts
from training.recall.ranker import Ranker
from training.recall.reasons import explain
from training.recall.scores import Scores
from training.recall.two_stage import Candidates, ranked

logger = logging.getLogger(__name__)
FOLDER = "two_stage"  # inside the model version's folder
SPEC_FILE, WEIGHTS_FILE = "spec.json", "ranker.pt"


class LayoutChanged(ValueError):
    """The shop's sources no longer give the features the ranker learnt on (a behaviour type declared
    or removed since training): serve the towers until the next ``persona train``."""


@dataclass
class TwoStageSpec:
    feature_names: list[str]  # the ranker's input columns, in order
    behaviours: Behaviours
    with_tower: bool  # the profile model's score is a source
    lexical: bool  # the query's text is a source
    scope: str = "all"  # the requests it ranks: "all", or "queries" (those with a search; the towers the rest)

    def serves(self, query: str | None) -> bool:
        """Whether this ranker ranks a request with this query (None: no search)."""
        return self.scope == "all" or bool(query)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> TwoStageSpec:
        return TwoStageSpec(data["feature_names"], Behaviours(**data["behaviours"]), data["with_tower"],
                            data["lexical"], data.get("scope", "all"))  # saved before scopes: every request


def save(folder: Path, ranker: Ranker, spec: TwoStageSpec) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ranker.save(folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=1))


def load(folder: Path) -> tuple[Ranker, TwoStageSpec] | None:
    """The saved ranker and its spec; None for a model saved without one (trained before, or with
    ``--models`` that left recall + rank out)."""
    if not (folder / SPEC_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        return None
    return Ranker.load(folder / WEIGHTS_FILE), TwoStageSpec.from_json(json.loads((folder / SPEC_FILE).read_text()))


def stage_or_towers(saved: tuple[Ranker, TwoStageSpec], events: pd.DataFrame | None, items: pd.DataFrame,
                    item_ids: list[str], counts: ShopCounts | None = None) -> TwoStage | None:
    """The saved ranker over this shop, or None (rank by the towers, as ``/rank`` does) when its layout no
    longer matches the shop's sources: a ranker saved before an upgrade, until the next ``persona train``."""
    try:
        return TwoStage(*saved, events, items, item_ids, counts)
    except LayoutChanged as exc:
        logger.warning("recall + rank unavailable until the next persona train, ranking by the towers: %s", exc)
        return None


@dataclass
class Top:
    items: list[int]  # catalogue positions, best first
    scores: list[float]
    reasons: list[list[str]]


class TwoStage:
    """A saved ranker with its sources rebuilt from the shop's events, over one catalogue order
    (``item_ids``: the towers' item vectors, so their scores line up)."""

    def __init__(self, ranker: Ranker, spec: TwoStageSpec, events: pd.DataFrame | None, items: pd.DataFrame,
                 item_ids: list[str], counts: ShopCounts | None = None):
        """``events``: the shop's, which the sources are built from; or ``counts``, taken elsewhere."""
        items = items.assign(item_id=items["item_id"].astype(str)).drop_duplicates("item_id", keep="last")
        items = items.set_index("item_id").reindex(item_ids).reset_index()
        self.ranker, self.spec, self.item_ids = ranker, spec, list(item_ids)
        self.index = {i: k for k, i in enumerate(self.item_ids)}
        self.texts = item_texts(items)
        self.titles = items["title"].astype(object).where(items["title"].notna(), None).tolist() \
            if "title" in items else [None] * len(items)
        self.recall = make_recall(events, items, spec.behaviours, spec.with_tower, self.texts if spec.lexical else None,
                                  counts)
        if self.recall.feature_names() != spec.feature_names:
            raise LayoutChanged("the ranker learnt on other features than this shop's sources give now")

    @property
    def codes(self):
        return self.recall.codes

    def with_counts(self, counts: ShopCounts) -> TwoStage:
        """The same stage over the same catalogue with the shop's counts taken again (new events): the
        catalogue's parts (texts, groups, the lexical index: 20 s at a million items) are kept."""
        fresh = copy.copy(self)
        fresh.recall = refreshed(self.recall, counts, self.index)
        return fresh

    def positions(self, item_ids) -> np.ndarray:
        return np.array([self.index[i] for i in item_ids if i in self.index], dtype=np.int64)

    def rank(self, recent: Recent, now: float, query: str | None, leave_out: np.ndarray,
             tower: Scores | None, only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Candidates]:
        """The candidates in the ranker's order: (catalogue positions, scores, their candidate rows)."""
        given = {TOWER: tower} if tower is not None and self.spec.with_tower else None
        return ranked(self.recall, self.ranker, recent, now, query or None, leave_out, given, only)

    def top(self, recent: Recent, now: float, query: str | None, leave_out: np.ndarray, tower: Scores,
            k: int, only: np.ndarray | None = None, recent_search: bool = False) -> Top:
        """The best k: the ranker's order over the candidates, then, when recall found fewer than k, the
        towers' order below them (scores kept below the ranker's, their gaps the towers')."""
        items, scores, cands = self.rank(recent, now, query, leave_out, tower, only)
        n = min(k, len(items))
        out = Top(items[:n].tolist(), scores[:n].tolist(),
                  explain(self.recall, cands, n, recent, now, query, self.titles, self.texts, recent_search))
        if n < k:
            allowed = np.zeros(len(self.item_ids), dtype=bool)
            allowed[only if only is not None else slice(None)] = True
            allowed[leave_out] = False
            allowed[items] = False
            if isinstance(tower, np.ndarray):
                rest = np.flatnonzero(allowed)
                rest = rest[np.argsort(-tower[rest], kind="stable")][:k - n]
                values = tower[rest]
            else:
                rest = tower.top(k - n, allowed)
                values = tower.at(rest)
            if len(rest):
                floor = (out.scores[-1] if out.scores else 0.0) - 1.0
                out.items += rest.tolist()
                out.scores += (floor - (values[0] - values)).tolist()
                out.reasons += [[] for _ in rest]
        return out
