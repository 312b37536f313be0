"""Feast's point-in-time join, with a look-back that keeps its cost linear in a user's history.

Feast joins each entity row with *every* earlier row of its key, then keeps the newest
(``feast/infra/offline_stores/ibis.py``, ``point_in_time_join``). The user tables hold a row per
event, each carrying its state (the sequence, the hourly tiles), so a user with 3,328 events cost
3,328 x 1,664 matched rows on average: 77.6 s and 20.4 GB for that one user's training rows.

Feast's own TTL bounds the scan (``feature_ts + ttl >= entity_ts``). Here each entity row gets the
shortest look-back of ``LOOKBACKS`` that still reaches the newest row of each per-event view at or
before its time (read from the offline store's timestamps alone), so every row finds exactly the row
the unbounded join finds; rows that need more than the longest look-back use the view's own TTL.
The answer is Feast's, value for value (``tests/test_point_in_time.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from feast import FeatureStore

from feature_repo.pipeline import feast_adapter

# Entity rows per point-in-time call. The join carries each feature row's state (JSON tiles, the
# sequence) before it keeps the newest per entity row, so one call over a whole training set held
# 14 GB on a 53k-event log (3 GB in slices of this size), and the slices cost no more time there.
ENTITY_ROWS_PER_CALL = 5_000

# Look-backs tried, shortest first; a row that needs more reads the view without a bound.
LOOKBACKS = (timedelta(hours=1), timedelta(days=1), timedelta(days=30))

# A view is bounded only when its rows grow with the history (a few rows per key: per-event tables),
# and a join only when the bound saves: each look-back is another Feast call (about half a second
# each), and a matched row costs about 3.5 us (77.6 s for the 22M of the 3,328-event user), so below
# some 200 matched rows per entity row, over the bounded views, one unbounded call is as cheap.
MIN_ROWS_PER_KEY = 4
MIN_MATCHES_PER_ROW = 200


def in_slices(entity: pd.DataFrame, fetch: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """``fetch`` over slices of the entity rows, concatenated (each row's join is independent)."""
    if len(entity) <= ENTITY_ROWS_PER_CALL:
        return fetch(entity)
    return pd.concat([fetch(entity.iloc[s:s + ENTITY_ROWS_PER_CALL])
                      for s in range(0, len(entity), ENTITY_ROWS_PER_CALL)], ignore_index=True)


def historical_features(store, entity: pd.DataFrame, service_name: str) -> pd.DataFrame:
    """``get_historical_features`` for a FeatureService, in slices, with each row's look-back bounded
    where that saves work. Rows come back grouped by look-back, not in ``entity``'s order."""
    service = store.get_feature_service(service_name)
    if not isinstance(store, FeatureStore):  # a recording or replaying stand-in: the plain join
        return in_slices(entity, lambda rows: store.get_historical_features(entity_df=rows,
                                                                            features=service).to_df())
    plan = _Plan(store, service)
    rungs = plan.rungs(entity)
    if rungs is None:
        return in_slices(entity, plan.fetch)
    frames = []
    for rung in np.unique(rungs):
        lookback = LOOKBACKS[rung] if rung < len(LOOKBACKS) else None
        frames.append(in_slices(entity[rungs == rung], lambda rows, lb=lookback: plan.fetch(rows, lb)))
    return pd.concat(frames, ignore_index=True)


def historical_job(store: FeatureStore, service_name: str, entity):
    """Feast's point-in-time join for a FeatureService as a retrieval job, unbounded and not run: for an
    entity frame that stays where it is (a Spark DataFrame: ``job.to_spark_df()``)."""
    plan = _Plan(store, store.get_feature_service(service_name))
    return feast_adapter.provider(store).get_historical_features(
        store.config, plan.views, plan.provider_refs, entity, store.registry, store.project, False)


class _Plan:
    """What ``FeatureStore.get_historical_features`` resolves for a service, kept so that the views
    can be handed to the provider with a look-back as their TTL."""

    def __init__(self, store: FeatureStore, service) -> None:
        self.store = store
        self.refs, grouped = feast_adapter.service_views(store, service)
        self.views = [view for view, _ in grouped]
        known = set(self.refs)
        self.provider_refs = list(self.refs) + [
            ref for view, feats in grouped for ref in (f"{view.projection.name_to_use()}:{f}" for f in feats)
            if ref not in known]
        self.bounded: list = []  # the per-event views whose scan a look-back shortens

    def fetch(self, rows: pd.DataFrame, lookback: timedelta | None = None) -> pd.DataFrame:
        views = [self._bounded(v, lookback) if lookback and v.name in self.bounded else v for v in self.views]
        job = feast_adapter.provider(self.store).get_historical_features(
            self.store.config, views, self.provider_refs, rows, self.store.registry, self.store.project, False)
        return job.to_df()

    @staticmethod
    def _bounded(view, lookback: timedelta):
        view = copy.copy(view)
        view.ttl = min(lookback, view.ttl) if view.ttl else lookback
        return view

    def rungs(self, entity: pd.DataFrame) -> np.ndarray | None:
        """Each row's index into ``LOOKBACKS`` (``len(LOOKBACKS)``: no bound), or None when no view
        grows with the history enough for the bound to pay."""
        times = pd.to_datetime(entity["event_timestamp"], utc=True)
        need = np.zeros(len(entity), dtype="timedelta64[us]")
        matches = 0
        self.bounded = []  # this entity frame's: a second call does not add to the first's
        for view in self.views:
            stamps = self._stamps(view, times.max())
            if stamps is None or len(stamps) < MIN_ROWS_PER_KEY * max(stamps.iloc[:, 0].nunique(), 1):
                continue
            gap, before = _gaps(entity, times, stamps)
            self.bounded.append(view.name)
            need = np.maximum(need, gap)
            matches += int(before.sum())
        if not self.bounded or matches < MIN_MATCHES_PER_ROW * len(entity):
            return None
        limits = np.array([np.timedelta64(int(lb.total_seconds() * 1e6), "us") for lb in LOOKBACKS])
        return np.searchsorted(limits, need, side="left")

    def _stamps(self, view, until: pd.Timestamp) -> pd.DataFrame | None:
        """The view's (key, timestamp) rows up to ``until``, from the offline store; None for a view
        whose keys are renamed (not bounded)."""
        keys = [e.name for e in view.entity_columns]
        if view.projection.join_key_map or len(keys) != 1 or view.batch_source is None:
            return None
        source = view.batch_source
        offline = feast_adapter.provider(self.store).offline_store
        job = offline.pull_all_from_table_or_query(
            self.store.config, source, keys, [], source.timestamp_field,
            start_date=datetime(1970, 1, 1, tzinfo=UTC), end_date=until.to_pydatetime())
        frame = job.to_df()
        frame = frame.rename(columns={source.timestamp_field: "feature_ts"})[[keys[0], "feature_ts"]]
        frame["feature_ts"] = pd.to_datetime(frame["feature_ts"], utc=True)
        return frame


def _naive(values) -> np.ndarray:
    """UTC times as naive ``datetime64[ns]`` (one unit for merge_asof and searchsorted)."""
    return pd.to_datetime(pd.Series(values), utc=True).dt.tz_convert(None).to_numpy().astype("datetime64[ns]")


def _gaps(entity: pd.DataFrame, times: pd.Series, stamps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per entity row: how far back the newest feature row of its key at or before its time lies (0
    when there is none: nothing to find at any bound), and how many rows the unbounded join matches."""
    key = stamps.columns[0]
    right = pd.DataFrame({key: stamps[key].astype(str).to_numpy(), "feature_ts": _naive(stamps["feature_ts"])})
    right = right.sort_values([key, "feature_ts"], kind="stable").reset_index(drop=True)
    left = pd.DataFrame({key: entity[key].astype(str).to_numpy(), "t": _naive(times),
                         "row": np.arange(len(entity))}).sort_values("t", kind="stable")
    newest = pd.merge_asof(left, right.sort_values("feature_ts", kind="stable"), left_on="t",
                           right_on="feature_ts", by=key, direction="backward")
    gap = (newest["t"] - newest["feature_ts"]).fillna(pd.Timedelta(0))
    out = np.zeros(len(entity), dtype="timedelta64[us]")
    out[newest["row"].to_numpy()] = gap.to_numpy().astype("timedelta64[us]")
    # rows of a key at or before t: the key's block in ``right`` is sorted by time
    first = right.groupby(key, sort=False).indices
    before = np.zeros(len(entity), dtype=np.int64)
    for k, group in left.groupby(key, sort=False):
        idx = first.get(k)
        if idx is not None:
            ts = right["feature_ts"].to_numpy()[idx]
            before[group["row"].to_numpy()] = np.searchsorted(ts, group["t"].to_numpy(), side="right")
    return out, before
