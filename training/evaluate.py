"""The ranking-quality protocol of DESIGN.md: temporal splits, full-catalogue ranking with seen
items excluded, NDCG@10 / Recall@10 / Recall@50 / MRR@10 / coverage / AUC, and breakdowns for
cold vs active users and requests with vs without a query.

Nothing here can flatter a model:
- ties are broken at random in expectation: a target tied with m other items has rank
  (items scored strictly higher) + m/2 + 1, so a row of equal scores never wins;
- every split has a validation set before its test set, so early stopping and hyper-parameters never
  see a test target;
- in leave-one-out each user has their own cut; training rows and every feature a request sees are
  from before that user's cut (``Split.before``);
- per target behaviour (``target_split``) each user's last day with the target type is held out and
  only engaged items are excluded: a viewed-only item stays a candidate, as people buy what they viewed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.baselines import Histories, Scorer
from training.dataset import attach_session_query, session_key

COLD_EVENTS = 5  # a user with fewer events before the request is "cold"
VALIDATION_REQUESTS = 1000  # validation is a sample: it runs after every epoch
CHUNK_CELLS = 20_000_000  # requests x items scored at once: a few float64 copies of it are the peak
BROWSING = ("view", "impression", "search")  # looking, not engaging: such items stay candidates


@dataclass
class Split:
    name: str
    requests: pd.DataFrame  # test: user_id, item_id (target), event_timestamp, device, channel, query, cold
    validation: pd.DataFrame  # the same columns, strictly before each user's test request
    fit_cut: pd.Timestamp | pd.Series  # models fit on rows before this (per user in leave-one-out)
    test_cut: pd.Timestamp | pd.Series  # baselines' final fit and seen items: rows before this
    excluded_types: tuple[str, ...] | None = None  # items with these events before a request leave its
    # ranking; None: the positives (the leave-one-out and global-cut protocol)

    def before(self, frame: pd.DataFrame, cut: pd.Timestamp | pd.Series) -> pd.DataFrame:
        """Rows stamped strictly before the cut (the row's user's own cut in leave-one-out)."""
        return rows_before(frame, cut)

    def exclusion(self, positives: Collection[str]) -> tuple[str, ...]:
        """The event types whose items a request's ranking leaves out."""
        return self.excluded_types if self.excluded_types is not None else tuple(positives)


def rows_before(frame: pd.DataFrame, cut: pd.Timestamp | pd.Series) -> pd.DataFrame:
    """Rows stamped strictly before the cut; a per-user cut (Series) leaves users without one whole."""
    if isinstance(cut, pd.Series):
        end = frame["user_id"].map(cut).fillna(pd.Timestamp.max.tz_localize("UTC"))
        return frame[frame["event_timestamp"] < end]
    return frame[frame["event_timestamp"] < cut]


def new_item_positives(events: pd.DataFrame, positives: dict[str, float]) -> pd.DataFrame:
    """First positive of each (user, item), ordered by time then item id: what a recommender predicts."""
    pos = events[events["event_type"].isin(list(positives)) & events["item_id"].notna()]
    pos = pos.sort_values(["event_timestamp", "item_id"], kind="stable").drop_duplicates(["user_id", "item_id"])
    return pos


def _with_context(requests: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Add the session's latest query and the user's event count before each request."""
    ev = events.assign(session=session_key(events))
    if "query" not in ev:  # a log without searches
        ev["query"] = None
    requests = requests.merge(ev[["event_id", "session"]], on="event_id", how="left") if "event_id" in requests \
        else requests.assign(session=None)
    requests = attach_session_query(requests, ev)
    requests["history_events"] = _events_before(ev, requests)
    requests["cold"] = requests["history_events"] < COLD_EVENTS
    requests["request_timestamp"] = requests["event_timestamp"]
    for col in ("device", "channel"):
        if col not in requests:
            requests[col] = None
    return requests.sort_values(["event_timestamp", "user_id"], kind="stable").reset_index(drop=True)


def _events_before(events: pd.DataFrame, requests: pd.DataFrame) -> np.ndarray:
    """How many of the user's events are strictly older than each request (one sort, no loop)."""
    if requests.empty:
        return np.zeros(0, dtype=np.int64)
    ev = pd.DataFrame({"user_id": events["user_id"].to_numpy(), "t": pd.to_datetime(events["event_timestamp"],
                       utc=True).to_numpy(), "is_request": 0, "row": -1})
    rq = pd.DataFrame({"user_id": requests["user_id"].to_numpy(), "t": pd.to_datetime(requests["event_timestamp"],
                       utc=True).to_numpy(), "is_request": 1, "row": np.arange(len(requests))})
    both = pd.concat([ev, rq], ignore_index=True)
    # at equal times the request sorts first: an event at the request's own time is not "before" it
    both = both.sort_values(["user_id", "t", "is_request"], ascending=[True, True, False], kind="stable")
    before = (1 - both["is_request"]).groupby(both["user_id"]).cumsum()
    out = np.zeros(len(requests), dtype=np.int64)
    mask = both["is_request"].to_numpy() == 1
    out[both["row"].to_numpy()[mask]] = before.to_numpy()[mask]
    return out


def global_split(events: pd.DataFrame, positives: dict[str, float], test_share: float = 0.2,
                 val_share: float = 0.1) -> Split:
    """One time cut for everyone: test on first-time positives after it, validate on those just before."""
    ts = events["event_timestamp"]
    cut = ts.quantile(1 - test_share).floor("us")  # quantiles interpolate to nanoseconds
    val_start = ts.quantile(1 - test_share - val_share).floor("us")
    firsts = new_item_positives(events, positives)
    requests = firsts[firsts["event_timestamp"] >= cut]
    val = firsts[(firsts["event_timestamp"] >= val_start) & (firsts["event_timestamp"] < cut)]
    val = val.sample(min(len(val), VALIDATION_REQUESTS), random_state=0)
    return Split("global time cut", _with_context(requests, events), _with_context(val, events), val_start, cut)


def last_per_user_split(events: pd.DataFrame, positives: dict[str, float]) -> Split:
    """Leave-one-out by time: each user's newest first-time positive (by time, then item id) is the
    test target; their one before it is the validation target. Models fit on what came before the
    validation target, baselines' final fit on what came before the test target."""
    firsts = new_item_positives(events, positives)
    last = firsts.groupby("user_id", sort=False).tail(1)
    val = firsts.drop(last.index).groupby("user_id", sort=False).tail(1)
    test_cut = last.set_index("user_id")["event_timestamp"]
    fit_cut = val.set_index("user_id")["event_timestamp"].reindex(test_cut.index).fillna(test_cut)
    val = val.sample(min(len(val), VALIDATION_REQUESTS), random_state=0)
    return Split("last interaction per user", _with_context(last, events), _with_context(val, events),
                 fit_cut, test_cut)


def non_browsing_types(events: pd.DataFrame, browsing: Collection[str] = BROWSING) -> tuple[str, ...]:
    """Every event type of the log but browsing: what makes an item no longer a candidate."""
    return tuple(sorted(set(events["event_type"].dropna().astype(str)) - set(browsing)))


def last_target_day(events: pd.DataFrame, target: str) -> pd.DataFrame:
    """Each user's distinct items of the target type on their last (UTC) day with one, stamped with
    that day's start: days, not seconds, so a log of whole days (tmall) holds out a whole basket."""
    hits = events[(events["event_type"] == target) & events["item_id"].notna()]
    day = pd.to_datetime(hits["event_timestamp"], utc=True).dt.floor("D")
    last = day.groupby(hits["user_id"]).transform("max")
    held = hits.loc[day == last, ["user_id", "item_id"]].assign(event_timestamp=last[day == last])
    return held.drop_duplicates(["user_id", "item_id"]).sort_values(["user_id", "item_id"], kind="stable")


def target_split(events: pd.DataFrame, target: str = "purchase",
                 engaged_types: Collection[str] | None = None) -> Split:
    """Per target behaviour: each user's items of ``target`` on their last day with one are the test
    targets at that day's start; that user's events from then on are dropped, other users' stay.

    Candidates are every item but those the user engaged with before (``engaged_types``, default: every
    type of the log but browsing); a held-out item the user engaged with before is therefore a miss. A
    user with no event before the day has nothing to rank from and is left out. Validation is the same
    rule one target day earlier.
    """
    engaged = tuple(engaged_types) if engaged_types is not None else non_browsing_types(events)
    test = _with_history(last_target_day(events, target), events)
    test_cut = test.groupby("user_id", sort=False)["event_timestamp"].first()
    given = rows_before(events, test_cut)
    val = _with_history(last_target_day(given, target), given)
    fit_cut = val.groupby("user_id", sort=False)["event_timestamp"].first().reindex(test_cut.index).fillna(test_cut)
    val = val.sample(min(len(val), VALIDATION_REQUESTS), random_state=0)
    return Split(f"last {target} day per user", _with_context(test, events), _with_context(val, events),
                 fit_cut, test_cut, engaged)


def _with_history(held: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Held-out rows of users who have some event before their held-out day."""
    first = pd.to_datetime(events["event_timestamp"], utc=True).groupby(events["user_id"]).min()
    return held[held["user_id"].map(first) < held["event_timestamp"]]


def seen_before(events: pd.DataFrame, positives: Collection[str], requests: pd.DataFrame,
                item_index: dict[str, int]) -> list[np.ndarray]:
    """Catalogue positions each user engaged with before the request (excluded from the ranking).

    ``positives``: the event types that count (a positives dict's keys, or a split's exclusion)."""
    histories = Histories(events, positives, list(item_index))
    return [np.unique(histories.before(user, ts)) for user, ts in
            zip(requests["user_id"], requests["event_timestamp"], strict=True)]


def tie_aware_ranks(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """The target's rank among the non-excluded items: higher + tied/2 + 1 (a tie is half a loss).

    A NaN score counts as the lowest possible score. The target itself is never excluded.
    """
    scores = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
    allowed = np.ones(scores.shape, dtype=bool)
    for r, ex in enumerate(excluded):
        allowed[r, ex[ex != targets[r]]] = False
    rows = np.arange(len(targets))
    allowed[rows, targets] = False  # the target does not tie with itself
    target_scores = scores[rows, targets][:, None]
    higher = ((scores > target_scores) & allowed).sum(axis=1)
    tied = ((scores == target_scores) & allowed).sum(axis=1)
    return higher + tied / 2 + 1


def protocol_ranks(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """Tie-aware ranks, with a target among the excluded items a miss (rank inf): per target
    behaviour a user may buy again what they engaged with, and such an item is not a candidate.
    (A first-time positive, the target of the other splits, is never among them.)"""
    ranks = tie_aware_ranks(scores, targets, excluded)
    ranks[[bool(np.isin(t, ex)) for t, ex in zip(targets, excluded, strict=True)]] = np.inf
    return ranks


def top_k(scores: np.ndarray, excluded: list[np.ndarray], k: int = 10) -> np.ndarray:
    """Indexes of each row's k best non-excluded items (for coverage); a copy, not a view that would
    keep the whole [rows, items] partition alive while the caller collects chunks."""
    scores = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
    for r, ex in enumerate(excluded):
        scores[r, ex] = -np.inf
    k = min(k, scores.shape[1])
    return np.argpartition(-scores, k - 1, axis=1)[:, :k].copy() if k else np.zeros((len(scores), 0), dtype=int)


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-request tie-aware rank of the target (``protocol_ranks``), and the top-10 lists."""
    return {"rank": protocol_ranks(scores, targets, excluded), "top10": top_k(scores, excluded)}


def summarise(ranks: np.ndarray, top10: np.ndarray, n_items: int) -> dict[str, float]:
    """NDCG@10, Recall@10/50, MRR@10 from ranks (a fractional rank such as 10.5 is a miss) and coverage."""
    if len(ranks) == 0:
        return {"requests": 0}
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        "requests": int(len(ranks)),
        "NDCG@10": float(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0))),
        "Recall@10": float(np.mean(ranks <= 10)),
        "Recall@50": float(np.mean(ranks <= 50)),
        "MRR@10": float(np.mean(np.where(ranks <= 10, 1 / ranks, 0.0))),
        "coverage": float(len(np.unique(top10)) / n_items),
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC of scores for labelled positives vs negatives (ties count one half)."""
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ndcg_at_10(scorer: Scorer, requests: pd.DataFrame, events: pd.DataFrame, positives: Collection[str],
               item_ids: list[str]) -> float:
    """NDCG@10 of one scorer on some requests (validation, hyper-parameter choice); ``positives``: the
    event types whose items are excluded (``Split.exclusion``)."""
    item_index = {i: k for k, i in enumerate(item_ids)}
    req = requests[requests["item_id"].isin(item_index)].reset_index(drop=True)
    if req.empty:
        return float("nan")
    ranks = protocol_ranks(scorer(req), req["item_id"].map(item_index).to_numpy(),
                           seen_before(events, positives, req, item_index))
    return float(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0)))


def evaluate_scorers(scorers: dict[str, Scorer], split: Split, events: pd.DataFrame, positives: dict[str, float],
                     item_ids: list[str], pair_scorers: dict[str, Callable] | None = None,
                     labelled: pd.DataFrame | None = None, chunk: int = 2048) -> pd.DataFrame:
    """One row per (model, segment): overall, cold/active users, cold/warm items, with/without query.

    A cold item had no positive in the models' training rows (before the split's fit cut): only its
    text and features can place it.
    """
    item_index = {i: k for k, i in enumerate(item_ids)}
    fit = split.before(events, split.fit_cut)
    warm = set(fit.loc[fit["event_type"].isin(list(positives)), "item_id"].dropna())
    req = split.requests[split.requests["item_id"].isin(item_index)].reset_index(drop=True)
    targets = req["item_id"].map(item_index).to_numpy()
    excluded = seen_before(events, split.exclusion(positives), req, item_index)
    chunk = max(1, min(chunk, CHUNK_CELLS // max(len(item_ids), 1)))  # a large catalogue: fewer rows
    rows = []
    segments = {"all": np.ones(len(req), bool), "cold users": req["cold"].to_numpy(),
                "active users": ~req["cold"].to_numpy(), "with query": req["query"].notna().to_numpy(),
                "without query": req["query"].isna().to_numpy(),
                "cold items": ~req["item_id"].isin(warm).to_numpy(), "warm items": req["item_id"].isin(warm).to_numpy()}
    for name, scorer in scorers.items():
        ranks, top10 = [], []
        for s in range(0, len(req), chunk):  # bounded memory: requests x catalogue per chunk
            m = ranking_metrics(scorer(req.iloc[s:s + chunk]), targets[s:s + chunk], excluded[s:s + chunk])
            ranks.append(m["rank"])
            top10.append(m["top10"])
        rank = np.concatenate(ranks) if ranks else np.zeros(0)
        top = np.concatenate(top10) if top10 else np.zeros((0, 10), dtype=int)
        for seg, mask in segments.items():
            row = {"split": split.name, "model": name, "segment": seg,
                   **summarise(rank[mask], top[mask], len(item_ids))}
            if seg == "all" and pair_scorers and name in pair_scorers and labelled is not None and len(labelled):
                row["AUC"] = auc(pair_scorers[name](labelled), labelled["label"].to_numpy())
            rows.append(row)
    return pd.DataFrame(rows)
