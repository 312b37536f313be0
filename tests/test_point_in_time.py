"""The bounded point-in-time join (training/point_in_time.py) gives Feast's unbounded answer, value for
value, on a real DuckDB offline store: rows a minute, hours, days and months after the user's last
event, rows before the user's first one, and users idle longer than every look-back."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

from core import config
from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import registry
from feature_repo.pipeline.build import build
from ingestion.ingest import ingest
from persona import sample_data
from training import dataset, point_in_time
from validation.gate import Gate, GateSettings

OFFSETS = [pd.Timedelta(0), pd.Timedelta(seconds=1), pd.Timedelta(minutes=50), pd.Timedelta(hours=7),
           pd.Timedelta(days=3), pd.Timedelta(days=45), pd.Timedelta(days=400), pd.Timedelta(days=-30)]


@pytest.fixture(params=["local", "prod"])
def store(request, tmp_path, shop, monkeypatch):
    """A built workspace on DuckDB (local) or Postgres (prod): both joins honour Feast's TTL."""
    if request.param == "prod":
        db = 5 + (uuid.uuid4().int % 8)
        monkeypatch.setenv("PERSONA_POSTGRES_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("PERSONA_REDIS_URL", f"redis://127.0.0.1:6379/{db}")
    cfg = config.load(tmp_path / "ws", request.param)
    sample_data.write(shop, tmp_path / "data")
    log = EventLog(cfg.resolved_event_log_url())
    report, _ = ingest(load_batch(tmp_path / "data"), log, Gate())
    assert report.quarantined == 0
    feature_store, _ = registry.apply(cfg.workspace, cfg.profile)
    build(log, cfg.profile, cfg.workspace)
    yield feature_store, log.read_table("events")
    log.dispose()


def _entity(events: pd.DataFrame, key: str) -> pd.DataFrame:
    """Rows at each sampled event's time plus every offset (before the first event included)."""
    picked = events[events[key].notna()].sample(60, random_state=3)
    rows = pd.concat([picked.assign(event_timestamp=picked["event_timestamp"] + off) for off in OFFSETS],
                     ignore_index=True)
    rows = rows[[key, "event_timestamp", "device", "channel"]].copy()
    rows["event_timestamp"] = dataset.micro(rows["event_timestamp"])
    rows["request_timestamp"] = rows["event_timestamp"]
    rows["example_id"] = np.arange(len(rows))
    return rows if key == "user_id" else rows[["example_id", key, "event_timestamp"]]


def _plain(feature_store, entity: pd.DataFrame, service: str) -> pd.DataFrame:
    return feature_store.get_historical_features(
        entity_df=entity, features=feature_store.get_feature_service(service)).to_df()


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a = a.sort_values("example_id").reset_index(drop=True)
    b = b.sort_values("example_id").reset_index(drop=True)[list(a.columns)]
    assert len(a) == len(b) and set(a.columns) == set(b.columns)
    assert {c: str(t) for c, t in a.dtypes.items()} == {c: str(t) for c, t in b.dtypes.items()}
    for col in a.columns:
        left, right = a[col].tolist(), b[col].tolist()
        for x, y in zip(left, right, strict=True):
            if np.isscalar(x) or x is None or x is pd.NaT:
                assert (pd.isna(x) and pd.isna(y)) or x == y, col
                continue
            assert np.array_equal(np.asarray(x, dtype=object), np.asarray(y, dtype=object)), col


def test_bounded_join_equals_feasts_unbounded_one(store, monkeypatch):
    feature_store, events = store
    monkeypatch.setattr(point_in_time, "MIN_MATCHES_PER_ROW", 0)  # bound even this small log
    for key, service in (("user_id", dataset.USER_SERVICE), ("item_id", dataset.ITEM_SERVICE)):
        entity = _entity(events, key)
        plan = point_in_time._Plan(feature_store, feature_store.get_feature_service(service))
        rungs = plan.rungs(entity)
        if key == "user_id":  # the per-event user views are bounded, and every look-back is used
            assert rungs is not None and {"user_sequence", "user_activity"} <= set(plan.bounded)
            assert set(np.unique(rungs)) == set(range(len(point_in_time.LOOKBACKS) + 1))
        bounded = point_in_time.historical_features(feature_store, entity, service)
        _same(_plain(feature_store, entity, service), bounded)


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_the_bound_is_skipped_where_it_would_not_pay(store):
    """On short histories one unbounded call is cheaper than a call per look-back."""
    feature_store, events = store
    entity = _entity(events, "user_id")
    plan = point_in_time._Plan(feature_store, feature_store.get_feature_service(dataset.USER_SERVICE))
    assert plan.rungs(entity) is None


@pytest.mark.parametrize("store", ["local", "prod"], indirect=True)
def test_after_a_second_day_the_bounded_join_still_equals_feasts(store, shop, tmp_path, monkeypatch):
    """Day two: new users and items, more events for known users, late events stamped inside a user's
    history (hours and weeks back), and day one's batch replayed; then the build every day runs. Rows
    at, between and after both days' events get what Feast's unbounded join gives them."""
    feature_store, day_one = store
    monkeypatch.setattr(point_in_time, "MIN_MATCHES_PER_ROW", 0)  # bound even this small log
    cfg = config.load(tmp_path / "ws")
    log = EventLog(cfg.resolved_event_log_url())
    end = day_one["event_timestamp"].max()
    busy = day_one["user_id"].value_counts().index[:3].tolist()
    item = str(shop["items"]["item_id"].iloc[3])
    first = day_one.loc[day_one["user_id"] == busy[0], "event_timestamp"].min()
    events = pd.DataFrame(
        [{"event_id": f"d2-new-{n}", "user_id": "u_day2", "item_id": "i_day2", "event_type": t,
          "event_timestamp": end + pd.Timedelta(hours=2, minutes=n)} for n, t in enumerate(["view", "click"])]
        + [{"event_id": f"d2-more-{u}-{n}", "user_id": u, "item_id": item, "event_type": "click",
            "event_timestamp": end + pd.Timedelta(minutes=10 * n + 1)} for u in busy for n in range(4)]
        + [{"event_id": f"d2-late-{u}-{n}", "user_id": u, "item_id": item, "event_type": "view",
            "event_timestamp": first + pd.Timedelta(days=n, hours=5)} for u in busy for n in (0, 1, 9)])
    tables = {"users": shop["users"].head(1).assign(user_id="u_day2"),
              "items": shop["items"].head(1).assign(item_id="i_day2"), "events": events}
    sample_data.write(tables, tmp_path / "day2")
    accept = Gate(GateSettings(on_schema_drift="accept"))  # day two's files have fewer columns
    report, _ = ingest(load_batch(tmp_path / "day2"), log, accept)
    assert report.quarantined == 0
    replayed, _ = ingest(load_batch(tmp_path / "data"), log, accept)  # day one's batch again: no new rows
    assert replayed.tables["events"].written == 0 and replayed.quarantined == 0
    build(log, cfg.profile, cfg.workspace)
    log.dispose()

    after = pd.concat([day_one, events], ignore_index=True)
    for key, service in (("user_id", dataset.USER_SERVICE), ("item_id", dataset.ITEM_SERVICE)):
        entity = _entity(after[after[key].isin([*busy, "u_day2", "i_day2", item]) | (after.index % 7 == 0)], key)
        plan = point_in_time._Plan(feature_store, feature_store.get_feature_service(service))
        if key == "user_id":
            assert plan.rungs(entity) is not None  # the bound is what is tested
        _same(_plain(feature_store, entity, service), point_in_time.historical_features(feature_store, entity, service))
