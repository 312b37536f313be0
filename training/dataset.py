"""Point-in-time training sets: labelled (user, item, time) rows, then features through Feast.

Positives are the configured event types with their weights; exposures are events of the configured
exposure types (``behaviours:`` in persona.yaml; by default impressions) not followed by a positive on
the same item in the session; sampled negatives are items that already existed at
the time (seen in the log by then, or never seen at all). Every row carries the request context
(device, channel) and the session's latest query before it, which the user tower reads as the
live query. Features come only from ``get_historical_features`` through the model's
FeatureServices, so a row at time T sees feature values from before T (see feature_repo/).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd

from core.config import DEFAULT_EXPOSURE_TYPES
from training.point_in_time import historical_features

USER_SERVICE = "profile_v2"
ITEM_SERVICE = "items_v1"
ITEM_PREFIX = "item_"  # item features share names with user ones (ctr_30d): prefix them in frames


def service_features(store, name: str) -> list[str]:
    """The feature names a FeatureService serves, in its order."""
    service = store.get_feature_service(name)
    return [f.name for proj in service.feature_view_projections for f in proj.features]


def prefix_items(frame: pd.DataFrame, keep: tuple[str, ...] = ("item_id",)) -> pd.DataFrame:
    return frame.rename(columns={c: f"{ITEM_PREFIX}{c}" for c in frame.columns if c not in keep})


def session_key(events: pd.DataFrame, session_ids: bool | None = None) -> pd.Series:
    """session_id when the log has it, else the user and the 30-minute-gap session. ``session_ids``:
    whether the whole log has them, for a part of it (a Spark task's users)."""
    if session_ids is None:
        session_ids = "session_id" in events and bool(events["session_id"].notna().any())
    if session_ids:
        return events["session_id"].astype("string").fillna(events["user_id"].astype("string"))
    ev = events.sort_values(["user_id", "event_timestamp"])
    gap = ev.groupby("user_id")["event_timestamp"].diff() > pd.Timedelta(minutes=30)
    sid = gap.groupby(ev["user_id"]).cumsum().astype(int).astype(str)
    return (ev["user_id"].astype(str) + "#" + sid).reindex(events.index)


def build_examples(events: pd.DataFrame, items: pd.DataFrame, positives: dict[str, float],
                   neg_per_pos: int = 2, exposure_ratio: float = 1.0, seed: int = 0,
                   exposure_types: Collection[str] = DEFAULT_EXPOSURE_TYPES,
                   first_seen: pd.Series | None = None, session_ids: bool | None = None) -> pd.DataFrame:
    """Labelled rows: ``user_id, item_id, event_timestamp, label, weight, kind, device, channel, query``.

    ``exposure_types``: ``Config.exposure_types`` (shown, not opened: the negatives that were seen).
    For a part of the log (whole users: a Spark task's range), the whole log's ``first_seen`` (each
    item's first event) and ``session_ids`` (whether it has them) keep the rows those of the whole."""
    rng = np.random.default_rng(seed)
    ev = events.copy()
    ev["event_timestamp"] = pd.to_datetime(ev["event_timestamp"], utc=True)
    order = ["user_id", "event_timestamp"] + (["event_id"] if "event_id" in ev else [])
    ev = ev.sort_values(order, kind="stable")  # the log's order, however it was read: the same rows kept
    ev["session"] = session_key(ev, session_ids)
    for col in ("device", "channel", "query"):
        if col not in ev:
            ev[col] = None
    pos = ev[ev["event_type"].isin(list(positives)) & ev["item_id"].notna()].copy()
    pos["weight"] = pos["event_type"].map(positives).astype(float)
    # One positive per (user, item, session): the first time, with the strongest signal's weight.
    pos = (pos.sort_values("event_timestamp")
           .groupby(["user_id", "item_id", "session"], as_index=False)
           .agg(event_timestamp=("event_timestamp", "first"), weight=("weight", "max"),
                device=("device", "first"), channel=("channel", "first")))
    pos["label"], pos["kind"] = 1, "positive"
    shown = ev[ev["event_type"].isin(list(exposure_types)) & ev["item_id"].notna()]
    engaged = set(zip(pos["user_id"], pos["item_id"], pos["session"], strict=True))
    keys = list(zip(shown["user_id"], shown["item_id"], shown["session"], strict=True))
    exposures = shown.loc[np.array([k not in engaged for k in keys], dtype=bool)]
    exposures = exposures.drop_duplicates(["user_id", "item_id", "session"])
    n_exp = min(len(exposures), int(exposure_ratio * len(pos)))
    exposures = exposures.sample(n_exp, random_state=seed) if n_exp < len(exposures) else exposures
    exposures = exposures.assign(label=0, weight=1.0, kind="exposure")[
        ["user_id", "item_id", "session", "event_timestamp", "device", "channel", "label", "weight", "kind"]]
    if first_seen is None:
        first_seen = ev.groupby("item_id")["event_timestamp"].min()
    negatives = _sampled_negatives(pos, first_seen, items, neg_per_pos, rng)
    out = pd.concat([pos, exposures, negatives], ignore_index=True)
    out = attach_session_query(out, ev)
    out["request_timestamp"] = out["event_timestamp"]
    out = out.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    out["example_id"] = np.arange(len(out))
    return out


def _sampled_negatives(pos: pd.DataFrame, first_seen: pd.Series, items: pd.DataFrame, k: int,
                       rng: np.random.Generator) -> pd.DataFrame:
    """k items per positive drawn from those that existed at its time (time-aware sampling);
    ``first_seen``: each item's first event in the log."""
    if k <= 0 or pos.empty:
        return pos.iloc[:0].assign(kind="negative")
    item_ids = items["item_id"].astype(str).to_numpy()
    seen_at = pd.Series(item_ids).map(first_seen).fillna(pd.Timestamp.min.tz_localize("UTC")).to_numpy()
    rep = pos.loc[pos.index.repeat(k)].reset_index(drop=True)
    times = rep["event_timestamp"].to_numpy()
    pick = rng.integers(0, len(item_ids), len(rep))
    for _ in range(5):  # redraw items that did not exist yet
        bad = (seen_at[pick] > times) | (item_ids[pick] == rep["item_id"].to_numpy())
        if not bad.any():
            break
        pick[bad] = rng.integers(0, len(item_ids), int(bad.sum()))
    ok = ~((seen_at[pick] > times) | (item_ids[pick] == rep["item_id"].to_numpy()))
    rep = rep[ok].copy()
    rep["item_id"] = item_ids[pick[ok]]
    return rep.assign(label=0, weight=1.0, kind="negative")


def attach_session_query(rows: pd.DataFrame, ev: pd.DataFrame) -> pd.DataFrame:
    """The latest search query in the row's session at or before the row's time."""
    searches = ev[(ev["event_type"] == "search") & ev["query"].notna()][["session", "event_timestamp", "query"]]
    rows = rows.drop(columns=["query"], errors="ignore").sort_values("event_timestamp").reset_index(drop=True)
    if searches.empty:
        return rows.assign(query=None)
    merged = pd.merge_asof(rows, searches.sort_values("event_timestamp"), on="event_timestamp",
                           by="session", direction="backward")
    return merged


def micro(series) -> pd.Series:
    """Feast's stores keep microseconds: entity timestamps must not carry nanoseconds."""
    return pd.to_datetime(series, utc=True).dt.floor("us").astype("datetime64[us, UTC]")


# Inputs of an on-demand view that Feast hands back beside its outputs: state, not features.
STATE_COLUMNS = ("activity_tiles", "activity_last")


def historical_user_features(store, entity: pd.DataFrame) -> pd.DataFrame:
    """The user FeatureService, point in time, without the state columns its ODFVs read."""
    frame = historical_features(store, entity, USER_SERVICE)
    return frame.drop(columns=[c for c in STATE_COLUMNS if c in frame])


def fetch_features(store, examples: pd.DataFrame) -> pd.DataFrame:
    """User features (with the context ODFV) and item features, point in time, through Feast."""
    user_entity = examples[["example_id", "user_id", "event_timestamp", "device", "channel",
                            "request_timestamp"]].copy()
    user_entity["event_timestamp"] = micro(user_entity["event_timestamp"])
    user_entity["request_timestamp"] = micro(user_entity["request_timestamp"])
    user_entity["device"] = user_entity["device"].astype(object).where(user_entity["device"].notna(), None)
    user_entity["channel"] = user_entity["channel"].astype(object).where(user_entity["channel"].notna(), None)
    users = historical_user_features(store, user_entity)
    item_entity = examples[["example_id", "item_id", "event_timestamp"]].assign(
        event_timestamp=lambda f: micro(f["event_timestamp"]))
    item_feats = historical_features(store, item_entity, ITEM_SERVICE)
    users = users.drop(columns=["user_id", "event_timestamp", "device", "channel", "request_timestamp"])
    item_feats = prefix_items(item_feats.drop(columns=["item_id", "event_timestamp"]), keep=("example_id",))
    out = examples.merge(users, on="example_id", how="left").merge(item_feats, on="example_id", how="left")
    return out.sort_values("example_id").reset_index(drop=True)


def catalogue_features_at(store, item_ids: list[str], times: list[pd.Timestamp]) -> list[pd.DataFrame]:
    """Every item's features as of each of ``times`` (one Feast call), in ``item_ids`` order."""
    entity = pd.DataFrame({"item_id": np.tile(item_ids, len(times)),
                           "event_timestamp": np.repeat(micro(pd.Series(times)).to_numpy(), len(item_ids)),
                           "bucket": np.repeat(np.arange(len(times)), len(item_ids))})
    entity["event_timestamp"] = micro(entity["event_timestamp"])
    feats = historical_features(store, entity, ITEM_SERVICE)
    out = []
    for k in range(len(times)):
        one = feats[feats["bucket"] == k].drop(columns=["event_timestamp", "bucket"])
        out.append(prefix_items(one.set_index("item_id").loc[item_ids].reset_index()))
    return out


class ItemCatalogue:
    """The catalogue's features as of a handful of times, so that a request at time T ranks items with
    their features from before T (never after: the held-out clicks must not reach item counters).

    The times are quantiles of the request times, the earliest first; a request reads the newest one
    at or before its own time. Fetching per request would cost requests x items rows.
    """

    def __init__(self, store, item_ids: list[str], request_times: pd.Series, max_buckets: int = 16):
        t = micro(request_times)
        starts = t.quantile(np.linspace(0, 1, max_buckets, endpoint=False)).dt.floor("us") if len(t) else t
        self.item_ids = item_ids
        self.starts = sorted(set(starts.tolist()) | ({t.min()} if len(t) else set()))
        self.frames = catalogue_features_at(store, item_ids, self.starts) if self.starts else []

    def bucket_of(self, times: pd.Series) -> np.ndarray:
        """Index of the newest start at or before each time (a time before every start is an error)."""
        t = micro(times).dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        starts = np.array([s.tz_convert(None).to_datetime64() for s in self.starts], dtype="datetime64[us]")
        idx = np.searchsorted(starts, t, side="right") - 1
        if (idx < 0).any():
            raise ValueError("a request is older than the catalogue's first as-of time")
        return idx


# Items per online read: Feast's SQLite store binds one variable per key, and SQLite refuses more than
# 32,766 (250,000 in Debian's build); a million-item catalogue in one read failed at the service's start.
ONLINE_CHUNK = 10_000


def online_catalogue(store, item_ids: list[str]) -> pd.DataFrame:
    """Every item's current features from the online store (what serving ranks with), read in chunks."""
    service = store.get_feature_service(ITEM_SERVICE)
    parts = [store.get_online_features(features=service,
                                       entity_rows=[{"item_id": i} for i in item_ids[start:start + ONLINE_CHUNK]]
                                       ).to_df() for start in range(0, max(len(item_ids), 1), ONLINE_CHUNK)]
    return prefix_items(pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0])
