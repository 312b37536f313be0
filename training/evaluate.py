"""The ranking-quality protocol of DESIGN.md: temporal splits, full-catalogue ranking with seen
items excluded, NDCG@10 / Recall@10 / Recall@50 / MRR@10 / coverage / AUC, the baselines, and
breakdowns for cold vs active users and requests with vs without a query."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

COLD_EVENTS = 5  # a user with fewer events before the request is "cold"


@dataclass
class Split:
    name: str
    train_end: pd.Timestamp  # global: the cut; loo: the newest training event
    val_start: pd.Timestamp  # validation requests from here to the test period
    requests: pd.DataFrame  # user_id, item_id (target), event_timestamp, device, channel, query, cold
    per_user_end: pd.Series | None = None  # loo: each user's held-out time


def new_item_positives(events: pd.DataFrame, positives: dict[str, float]) -> pd.DataFrame:
    """First positive of each (user, item), in time order: the events a recommender should predict."""
    pos = events[events["event_type"].isin(list(positives)) & events["item_id"].notna()]
    pos = pos.sort_values("event_timestamp", kind="stable").drop_duplicates(["user_id", "item_id"])
    return pos


def _with_context(requests: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Add the session's latest query and the user's event count before each request."""
    from training.dataset import _attach_session_query, _session_key

    ev = events.assign(session=_session_key(events))
    requests = requests.merge(ev[["event_id", "session"]], on="event_id", how="left")
    requests = _attach_session_query(requests, ev)
    times = ev.sort_values("event_timestamp")
    counts = []
    by_user = {u: _us(g["event_timestamp"]) for u, g in times.groupby("user_id")}
    for user, ts in zip(requests["user_id"], _us(requests["event_timestamp"]), strict=True):
        history = by_user.get(user, np.array([], dtype="datetime64[us]"))
        counts.append(int(np.searchsorted(history, ts, side="left")))
    requests["history_events"] = counts
    requests["cold"] = requests["history_events"] < COLD_EVENTS
    requests["request_timestamp"] = requests["event_timestamp"]
    return requests


def _us(series: pd.Series) -> np.ndarray:
    return pd.to_datetime(series, utc=True).dt.tz_convert(None).to_numpy().astype("datetime64[us]")


def global_split(events: pd.DataFrame, positives: dict[str, float], test_share: float = 0.2,
                 val_share: float = 0.1) -> Split:
    ts = events["event_timestamp"]
    cut = ts.quantile(1 - test_share).floor("us")  # quantiles interpolate to nanoseconds
    val_start = ts.quantile(1 - test_share - val_share).floor("us")
    firsts = new_item_positives(events, positives)
    requests = firsts[firsts["event_timestamp"] >= cut]
    return Split("global time cut", cut, val_start, _with_context(requests, events))


def last_per_user_split(events: pd.DataFrame, positives: dict[str, float]) -> Split:
    """Each user's newest first-time positive is held out; training sees what came before it."""
    firsts = new_item_positives(events, positives)
    counts = firsts.groupby("user_id")["item_id"].transform("size")
    last = firsts[counts >= 2].groupby("user_id").tail(1)
    per_user = last.set_index("user_id")["event_timestamp"]
    val_start = per_user.quantile(0.9).floor("us")
    return Split("last interaction per user", per_user.max(), val_start, _with_context(last, events), per_user)


def seen_before(events: pd.DataFrame, positives: dict[str, float], requests: pd.DataFrame,
                item_index: dict[str, int]) -> list[np.ndarray]:
    """Catalogue positions each user engaged with before the request (excluded from the ranking)."""
    pos = events[events["event_type"].isin(list(positives)) & events["item_id"].notna()]
    by_user = {u: g.sort_values("event_timestamp") for u, g in pos.groupby("user_id")}
    out = []
    for user, ts in zip(requests["user_id"], requests["event_timestamp"], strict=True):
        g = by_user.get(user)
        if g is None:
            out.append(np.array([], dtype=int))
            continue
        earlier = g.loc[g["event_timestamp"] < ts, "item_id"]
        out.append(np.array([item_index[i] for i in earlier.unique() if i in item_index], dtype=int))
    return out


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-request rank of the target among all non-excluded items, and the top-10 lists."""
    scores = scores.astype(np.float64, copy=True)
    for r, ex in enumerate(excluded):
        ex = ex[ex != targets[r]]
        scores[r, ex] = -np.inf
    target_scores = scores[np.arange(len(targets)), targets]
    ranks = (scores > target_scores[:, None]).sum(axis=1) + 1
    top10 = np.argpartition(-scores, min(10, scores.shape[1] - 1), axis=1)[:, :10]
    return {"rank": ranks, "top10": top10}


def summarise(ranks: np.ndarray, top10: np.ndarray, n_items: int) -> dict[str, float]:
    if len(ranks) == 0:
        return {"requests": 0}
    return {
        "requests": int(len(ranks)),
        "NDCG@10": float(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0))),
        "Recall@10": float(np.mean(ranks <= 10)),
        "Recall@50": float(np.mean(ranks <= 50)),
        "MRR@10": float(np.mean(np.where(ranks <= 10, 1 / ranks, 0.0))),
        "coverage": float(len(np.unique(top10)) / n_items),
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC of scores for labelled positives vs negatives."""
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


Scorer = Callable[[pd.DataFrame], np.ndarray]  # requests -> [n_requests, n_items] scores


def popularity_scorer(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str]) -> Scorer:
    pos = train_events[train_events["event_type"].isin(list(positives))]
    counts = pos["item_id"].value_counts().reindex(item_ids).fillna(0).to_numpy(dtype=float)

    def score(requests: pd.DataFrame) -> np.ndarray:
        return np.tile(counts, (len(requests), 1))
    return score


def cooccurrence_scorer(train_events: pd.DataFrame, positives: dict[str, float], item_ids: list[str]) -> Scorer:
    """Item-item cosine over the user x item matrix of training positives."""
    index = {i: k for k, i in enumerate(item_ids)}
    pos = train_events[train_events["event_type"].isin(list(positives)) & train_events["item_id"].isin(index)]
    users = {u: k for k, u in enumerate(pos["user_id"].unique())}
    x = np.zeros((len(users), len(item_ids)), dtype=np.float32)
    x[pos["user_id"].map(users).to_numpy(), pos["item_id"].map(index).to_numpy()] = 1.0
    norms = np.linalg.norm(x, axis=0) + 1e-9
    sim = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(sim, 0.0)
    history = {u: g for u, g in pos.groupby("user_id")}

    def score(requests: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(requests), len(item_ids)), dtype=np.float32)
        for r, (user, ts) in enumerate(zip(requests["user_id"], requests["event_timestamp"], strict=True)):
            g = history.get(user)
            if g is None:
                continue
            seen = g.loc[g["event_timestamp"] < ts, "item_id"].map(index).dropna().astype(int).unique()
            if len(seen):
                out[r] = sim[seen].sum(axis=0)
        return out
    return score


def evaluate_scorers(scorers: dict[str, Scorer], split: Split, events: pd.DataFrame, positives: dict[str, float],
                     item_ids: list[str], pair_scorers: dict[str, Callable] | None = None,
                     labelled: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (model, segment): overall, cold/active users, with/without query."""
    item_index = {i: k for k, i in enumerate(item_ids)}
    req = split.requests[split.requests["item_id"].isin(item_index)].reset_index(drop=True)
    targets = req["item_id"].map(item_index).to_numpy()
    excluded = seen_before(events, positives, req, item_index)
    rows = []
    segments = {"all": np.ones(len(req), bool), "cold users": req["cold"].to_numpy(),
                "active users": ~req["cold"].to_numpy(), "with query": req["query"].notna().to_numpy(),
                "without query": req["query"].isna().to_numpy()}
    for name, scorer in scorers.items():
        result = ranking_metrics(scorer(req), targets, excluded)
        for seg, mask in segments.items():
            row = {"split": split.name, "model": name, "segment": seg,
                   **summarise(result["rank"][mask], result["top10"][mask], len(item_ids))}
            if seg == "all" and pair_scorers and name in pair_scorers and labelled is not None and len(labelled):
                row["AUC"] = auc(pair_scorers[name](labelled), labelled["label"].to_numpy())
            rows.append(row)
    return pd.DataFrame(rows)
