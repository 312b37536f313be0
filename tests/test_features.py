"""Feast end to end on real stores, for every profile: apply -> build -> materialize -> historical
-> online, with the leakage, offline/online parity and push tests."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import redis

from core import config as config_mod
from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import feast_config, materialize, registry
from feature_repo.pipeline.build import build
from feature_repo.pipeline.push import push_users
from ingestion.ingest import ingest
from persona import sample_data
from validation.gate import Gate, GateSettings

BEHAVIOUR = ["view_count_30d", "click_count_30d", "purchase_count_1d", "purchase_count_30d", "spend_30d",
             "distinct_items_30d", "top_category_1_30d", "hours_since_last_view"]


def _leak_user(shop) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """A user whose purchase count changes exactly at the label time T0 (with a tie at T0)."""
    t0 = shop["events"]["event_timestamp"].max() - pd.Timedelta(hours=1)
    item = shop["items"]["item_id"].iloc[0]
    user = shop["users"].head(1).assign(user_id="u_leak")
    rows = [("purchase", t0 - pd.Timedelta(hours=3)), ("purchase", t0 - pd.Timedelta(hours=2)),
            ("purchase", t0), ("view", t0)]
    events = pd.DataFrame([{"event_id": f"leak{i}", "user_id": "u_leak", "event_timestamp": ts, "event_type": et,
                            "item_id": item, "value": 10.0} for i, (et, ts) in enumerate(rows)])
    return user, events, t0


@pytest.fixture(params=["local", "prod", "spark", "spark-serving"])
def workspace(request, tmp_path, shop, monkeypatch):
    """A workspace of each profile; ``spark-serving``: the spark profile with PERSONA_POSTGRES_URL, whose
    registry, event log and online store are then the prod profile's (what the service reads)."""
    profile = request.param
    if profile in ("prod", "spark-serving"):
        pg_url = request.getfixturevalue("pg_url")
        db = 5 + (uuid.uuid4().int % 8)
        monkeypatch.setenv("PERSONA_POSTGRES_URL", pg_url)
        monkeypatch.setenv("PERSONA_REDIS_URL", f"redis://127.0.0.1:6379/{db}")
        redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    if profile.startswith("spark"):
        pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
        monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    ws = tmp_path / f"ws_{profile}"
    profile = profile.split("-")[0]
    cfg = config_mod.load(ws, profile)
    user, leak_events, t0 = _leak_user(shop)
    folder = tmp_path / "batch"
    sample_data.write({"users": pd.concat([shop["users"], user]), "items": shop["items"],
                       "events": pd.concat([shop["events"], leak_events])}, folder)
    log = EventLog(cfg.resolved_event_log_url())
    report, _ = ingest(load_batch(folder), log, Gate())
    assert report.quarantined == 0
    yield cfg, log, t0
    log.dispose()


def test_profile_end_to_end(workspace, shop):
    cfg, log, t0 = workspace
    store, objects = registry.apply(cfg.workspace, cfg.profile)
    assert {fv.name for fv in store.list_feature_views()} == {"user_personal", "user_behaviour", "user_activity",
                                                              "user_text", "user_sequence", "item_features"}
    for view in store.list_feature_views() + store.list_on_demand_feature_views():
        assert view.tags["family"] in {"personal", "behaviour", "context", "item", "text"}
    tables = build(log, cfg.profile, cfg.workspace)
    materialize.materialize(cfg.workspace)
    if cfg.profile == "local":  # user_activity's newest rows come from DuckDB, not Feast's whole-table read
        assert "user_activity" in json.loads((cfg.workspace / "feast" / "materialized.json").read_text())
        assert store.get_feature_view("user_activity").most_recent_end_time is None
    service = store.get_feature_service("profile_v2")

    # Leakage: the label event at T0 (and its tie) must not be in its own training row.
    entity = pd.DataFrame({"user_id": ["u_leak"] * 3,
                           "event_timestamp": [t0, t0 + timedelta(microseconds=1), t0 - timedelta(hours=2)],
                           "device": "app", "channel": "search",
                           "request_timestamp": [t0, t0, t0]})
    hist = store.get_historical_features(entity_df=entity, features=service).to_df()
    ts = pd.to_datetime(hist["event_timestamp"])
    hist["event_timestamp"] = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    hist = hist.sort_values("event_timestamp").set_index("event_timestamp")
    assert hist.loc[t0 - timedelta(hours=2), "purchase_count_1d"] == 1  # only the purchase 3h before
    assert hist.loc[t0, "purchase_count_1d"] == 2  # not the purchase at T0
    assert hist.loc[t0, "view_count_1d"] == 0  # nor the tie at T0
    assert hist.loc[t0 + timedelta(microseconds=1), "purchase_count_1d"] == 3
    # The sequence too: two purchases before T0, the third and the view (at T0) only after it.
    assert len(json.loads(hist.loc[t0 - timedelta(hours=2), "sequence_items"])) == 1
    assert json.loads(hist.loc[t0, "sequence_types"]) == ["purchase", "purchase"]
    assert json.loads(hist.loc[t0 + timedelta(microseconds=1), "sequence_types"])[-2:] == ["purchase", "view"]
    assert hist["age"].notna().all() and hist["hour_sin"].notna().all()

    # Offline/online parity, after the last event: the service online equals Feast's offline answer
    # at the same request time (windows summed by the same code on both sides)...
    after_all = shop["events"]["event_timestamp"].max() + timedelta(hours=1)
    users = list(shop["users"]["user_id"].sample(12, random_state=1)) + ["u_leak"]
    rows = [{"user_id": u, "device": "app", "channel": "search", "request_timestamp": after_all} for u in users]
    online = pd.DataFrame(store.get_online_features(features=service, entity_rows=rows).to_dict())
    offline = store.get_historical_features(entity_df=pd.DataFrame(rows).assign(event_timestamp=after_all),
                                            features=service).to_df().set_index("user_id")
    for _, row in online.iterrows():
        for col in [*BEHAVIOUR, "ctr_30d", "top_device_30d", "age"]:
            _assert_same(row[col], offline.loc[row["user_id"], col], f"{row['user_id']}.{col}")
    # ...and the user_behaviour view (windows at each user's newest event) equals its newest offline row.
    refs = [f"user_behaviour:{c}" for c in BEHAVIOUR]
    direct = pd.DataFrame(store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in users])
                          .to_dict())
    newest = tables["user_behaviour"].sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    for _, row in direct.iterrows():
        if row["user_id"] not in newest.index:
            assert pd.isna(row["view_count_30d"])  # a user with no events has no behaviour row
            continue
        for col in BEHAVIOUR:
            _assert_same(row[col], newest.loc[row["user_id"], col], f"{row['user_id']}.{col}")
    sequences = tables["user_sequence"].sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    for _, row in online.iterrows():
        for col in ("sequence_items", "sequence_types", "sequence_times", "sequence_counts"):
            expected = sequences.loc[row["user_id"], col] if row["user_id"] in sequences.index else None
            _assert_same(row[col], expected, f"{row['user_id']}.{col}")
    assert online.loc[online.user_id == "u_leak", "purchase_count_1d"].item() == 3

    if cfg.profile == "spark" and os.environ.get("PERSONA_POSTGRES_URL"):
        _assert_the_service_reads_what_spark_built(cfg, store, service, rows, online)

    # Windows end at the request time: two days on, the 1-day window is empty; 40 days on, all are.
    idle = [{"user_id": "u_leak", "device": None, "channel": None, "request_timestamp": after_all + timedelta(days=d)}
            for d in (2, 40)]
    later = store.get_online_features(features=service, entity_rows=idle).to_dict()
    assert later["purchase_count_1d"] == [0, 0] and later["purchase_count_7d"][0] == 3
    assert later["purchase_count_30d"] == [3, 0] and later["view_count_30d"][1] == 0
    assert later["hours_since_last_purchase"][0] > 48 and later["hours_since_last_purchase"][1] is None

    # Push: a new event reaches the log, and the pushed state is online at once.
    user = "u_leak"
    new_event = pd.DataFrame([{"event_id": "fresh1", "user_id": user, "item_id": shop["items"]["item_id"].iloc[1],
                               "event_timestamp": t0 + timedelta(minutes=5), "event_type": "purchase",
                               "value": 99.0}])
    folder = cfg.workspace / "fresh"
    sample_data.write({"events": new_event}, folder)
    ingest(load_batch(folder), log, Gate(GateSettings(on_schema_drift="accept")))
    push_users(store, log, [user])
    after = store.get_online_features(features=["user_behaviour:purchase_count_1d", "user_behaviour:spend_30d"],
                                      entity_rows=[{"user_id": user}]).to_dict()
    assert after["purchase_count_1d"] == [4]
    pushed = store.get_online_features(features=["user_sequence:sequence_items"],
                                       entity_rows=[{"user_id": user}]).to_dict()["sequence_items"][0]
    assert json.loads(pushed)[-1] == shop["items"]["item_id"].iloc[1] and len(json.loads(pushed)) == 5
    assert after["spend_30d"][0] == pytest.approx(3 * 10.0 + 99.0)
    rebuilt_tables = build(log, cfg.profile, cfg.workspace)
    rebuilt = rebuilt_tables["user_behaviour"]
    assert rebuilt.loc[rebuilt.user_id == user, "purchase_count_1d"].max() == 4  # rebuilt offline from the log
    seq = rebuilt_tables["user_sequence"].sort_values("event_timestamp")
    assert seq.loc[seq.user_id == user, "sequence_items"].iloc[-1] == pushed  # the push equals the rebuild


def _assert_the_service_reads_what_spark_built(cfg, store, service, rows: list[dict], online: pd.DataFrame) -> None:
    """The spark profile with Postgres: its registry and online store are the prod profile's, so a prod
    workspace that never built or applied anything (the service's) reads the same features."""
    assert store.config.online_store.type == "redis" and store.config.registry.registry_type == "sql"
    assert store.config.offline_store.type == "spark"
    assert cfg.resolved_event_log_url() == os.environ["PERSONA_POSTGRES_URL"]
    serving = cfg.workspace.parent / "service_ws"
    feast_config.write_yaml("prod", serving)
    prod = registry.feature_store(serving)
    assert prod.config.offline_store.type == "postgres"
    got = pd.DataFrame(prod.get_online_features(features=prod.get_feature_service(service.name),
                                                entity_rows=rows).to_dict())
    pd.testing.assert_frame_equal(got, online[got.columns])


def _assert_same(a, b, what: str) -> None:
    if pd.isna(a) or pd.isna(b):
        assert pd.isna(a) and pd.isna(b), what
    elif isinstance(a, float | int) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=1e-6), what
    else:
        assert a == b, what


def test_feast_cli_plan_works_with_the_workspace_yaml(tmp_path, shop_dir):
    ws = tmp_path / "ws"
    registry.apply(ws, "local")
    import subprocess
    import sys

    feast = os.path.join(os.path.dirname(sys.executable), "feast")
    out = subprocess.run([feast, "-c", str(feast_config.REPO_DIR), "-f", str(ws / "feature_store.yaml"), "plan"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PERSONA_WORKSPACE": ""})
    assert out.returncode == 0, out.stderr
    assert "user_behaviour" in out.stdout


def test_spark_build_equals_the_duckdb_build(tmp_path, shop, monkeypatch):
    pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
    from feature_repo.pipeline.build import read_offline_spark
    from feature_repo.pipeline.compute import compute_all
    from feature_repo.pipeline.spark_build import build_with_spark

    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    conf = feast_config.feature_store_config("spark", tmp_path)["offline_store"]["spark_conf"]
    build_with_spark(shop["events"], shop["items"], shop["users"], tmp_path, conf, partitions=3)
    _assert_same_tables(compute_all(shop["events"], shop["items"], shop["users"]), read_offline_spark(tmp_path))


def _assert_same_tables(local_tables: dict, spark_tables: dict) -> None:
    for name, local in local_tables.items():
        key = [c for c in ("user_id", "item_id") if c in local][0]
        a = local.sort_values([key, "event_timestamp"]).reset_index(drop=True)
        b = spark_tables[name][list(local.columns)].sort_values([key, "event_timestamp"]).reset_index(drop=True)
        b["event_timestamp"] = pd.to_datetime(b["event_timestamp"], utc=True).astype(a["event_timestamp"].dtype)
        pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=1e-9, obj=name)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_the_spark_build_reads_the_log_in_user_ranges_never_in_the_driver(tmp_path, shop_dir, monkeypatch,
                                                                         request, database):
    """On the spark profile the tasks read the log where it lives, a range of whole users each (several
    ranges here), and the tables equal the local build's of the same log. The driver only asks where
    the ranges start: every statement this process sends is a count or a one-row look-up."""
    pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
    import sqlalchemy as sa

    from feature_repo.pipeline import spark_source
    from feature_repo.pipeline.build import read_offline_spark
    from feature_repo.pipeline.compute import compute_all
    from feature_repo.pipeline.spark_build import build_from_log

    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    url = f"sqlite:///{tmp_path / 'log.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    log = EventLog(url)
    assert ingest(load_batch(shop_dir), log, Gate())[0].quarantined == 0
    local = compute_all(log.read_table("events"), log.read_table("items"), log.read_table("users"))
    log.dispose()
    engine = sa.create_engine(url)
    ranges = spark_source.key_ranges(engine, "events", "user_id", 600)
    with engine.connect() as conn:
        per_range = [conn.execute(sa.text("SELECT count(DISTINCT user_id) FROM events WHERE (CAST(:lo AS TEXT) IS "
                                          "NULL OR user_id >= :lo) AND (CAST(:hi AS TEXT) IS NULL OR user_id < :hi)"),
                                  {"lo": lo, "hi": hi}).scalar_one() for lo, hi in ranges]
        users = conn.execute(sa.text("SELECT count(DISTINCT user_id) FROM events")).scalar_one()
    engine.dispose()
    assert len(ranges) >= 4 and sum(per_range) == users  # each user in exactly one range

    sent: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        sent.append(" ".join(statement.split()).lower())
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        conf = feast_config.feature_store_config("spark", tmp_path)["offline_store"]["spark_conf"]
        rows = build_from_log(url, tmp_path, conf, rows_per_partition=600)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    reads = [s for s in sent if s.startswith("select")]
    assert reads and all("count(" in s or "limit" in s for s in reads), reads
    assert rows == {name: len(frame) for name, frame in local.items()}
    _assert_same_tables(local, read_offline_spark(tmp_path))

    # Day two: a new user and item, an edited title, late events inside an old history, then day one
    # replayed (nothing new). The rebuild still equals the local build of the whole log.
    log = EventLog(url)
    events, items = log.read_table("events"), log.read_table("items")
    item_cols = ["item_id", "title", "category", "brand", "description", "price"]
    edited = items[item_cols].iloc[[1]].assign(title="第二天 day-two kettle, edited")
    new_item = items[item_cols].iloc[[0]].assign(item_id="i_day2", title="新品 day-two item")
    newest = events["event_timestamp"].max()
    busy = events["user_id"].value_counts().index[0]
    day2 = pd.DataFrame([
        {"event_id": f"d2_{k}", "user_id": user, "item_id": item, "event_type": kind, "event_timestamp": ts}
        for k, (user, item, kind, ts) in enumerate([
            ("u_day2", "i_day2", "view", newest + pd.Timedelta(hours=1)),
            ("u_day2", "i_day2", "purchase", newest + pd.Timedelta(hours=2)),
            ("u_day2", edited["item_id"].iloc[0], "click", newest + pd.Timedelta(hours=3)),
            (busy, "i_day2", "click", newest - pd.Timedelta(days=2)),  # late: inside the user's history
            (busy, edited["item_id"].iloc[0], "purchase", newest - pd.Timedelta(days=3))])])
    sample_data.write({"users": pd.DataFrame({"user_id": ["u_day2"]}), "items": pd.concat([edited, new_item]),
                       "events": day2}, tmp_path / "day2")
    assert ingest(load_batch(tmp_path / "day2"), log, Gate(GateSettings(on_schema_drift="accept")))[0].quarantined == 0
    replay = ingest(load_batch(shop_dir), log, Gate())[0]
    assert replay.new_events is None or replay.new_events.empty  # the replay adds nothing
    local = compute_all(log.read_table("events"), log.read_table("items"), log.read_table("users"))
    log.dispose()
    assert build_from_log(url, tmp_path, conf, rows_per_partition=600) == {n: len(f) for n, f in local.items()}
    _assert_same_tables(local, read_offline_spark(tmp_path))


def test_a_log_url_with_a_password_reaches_the_tasks_through_the_environment(monkeypatch):
    """The URL's secret never enters Spark's plan: the tasks read the variable the driver read."""
    from feature_repo.pipeline import spark_source

    secret = "postgresql://persona:s3cret@db:5432/log"
    monkeypatch.delenv("PERSONA_EVENT_LOG_URL", raising=False)
    monkeypatch.delenv("PERSONA_POSTGRES_URL", raising=False)
    with pytest.raises(ValueError, match="environment"):
        spark_source.url_options(secret)
    monkeypatch.setenv("PERSONA_EVENT_LOG_URL", secret)
    options = spark_source.url_options(secret)
    assert options == {"url_env": "PERSONA_EVENT_LOG_URL"} and spark_source.log_url(options) == secret
    assert spark_source.url_options("sqlite:///ws/eventlog.db") == {"url": "sqlite:///ws/eventlog.db"}


def test_pushed_sequence_equals_the_rebuild_for_an_old_history(tmp_path, shop, sqlite_log):
    """A user's sequence reaches back past every 30-day window: the push path must fetch it too, every
    event of each kept slot included (a burst in the oldest kept hour)."""
    from feature_repo.pipeline.compute import SEQUENCE_LENGTH, compute_user_tables, latest_user_state
    from feature_repo.pipeline.history import recent_user_events

    items = shop["items"]["item_id"].tolist()
    start = pd.Timestamp("2010-01-01", tz="UTC")
    rows = [{"event_id": f"old{k}", "user_id": "u_old", "item_id": items[k % len(items)], "event_type": "purchase",
             "event_timestamp": start + pd.Timedelta(days=40 * k)} for k in range(SEQUENCE_LENGTH + 5)]
    oldest_kept = rows[6]  # the 105 slots and the view's: 6 fall out
    rows += [{**oldest_kept, "event_id": f"burst{n}", "event_timestamp": oldest_kept["event_timestamp"]
              + pd.Timedelta(minutes=n + 1)} for n in range(3)]
    rows.append({"event_id": "new", "user_id": "u_old", "item_id": items[3], "event_type": "view",
                 "event_timestamp": rows[SEQUENCE_LENGTH + 4]["event_timestamp"] + pd.Timedelta(days=90)})
    user = shop["users"].head(1).assign(user_id="u_old")
    folder = tmp_path / "old"
    sample_data.write({"users": user, "items": shop["items"], "events": pd.DataFrame(rows)}, folder)
    ingest(load_batch(folder), sqlite_log, Gate(GateSettings(on_schema_drift="accept")))
    catalogue = sqlite_log.read_table("items")
    pushed = latest_user_state(recent_user_events(sqlite_log, ["u_old"]), catalogue)["user_sequence"]
    rebuilt = compute_user_tables(sqlite_log.read_table("events"), catalogue)["user_sequence"]
    newest = rebuilt.sort_values("event_timestamp").tail(1)
    assert pushed["sequence_items"].item() == newest["sequence_items"].item()
    assert pushed["sequence_counts"].item() == newest["sequence_counts"].item()
    assert len(json.loads(pushed["sequence_items"].item())) == SEQUENCE_LENGTH  # the newest slots, 6 dropped
    assert json.loads(pushed["sequence_counts"].item())[0] == 4  # the oldest kept slot: all its events fetched
    assert json.loads(pushed["sequence_types"].item())[-1] == "view"  # views are in the sequence


def test_newest_rows_of_a_large_state_view(tmp_path):
    """What the local profile writes online for ``user_activity``: each user's newest row in the window."""
    t = pd.Timestamp("2026-11-01", tz="UTC")
    frame = pd.DataFrame({"user_id": ["a", "a", "a", "b"],
                          "event_timestamp": [t, t + timedelta(hours=1), t + timedelta(hours=2), t],
                          "activity_tiles": ["a0", "a1", "a2", "b0"], "activity_last": "{}"})
    frame["event_timestamp"] = frame["event_timestamp"].astype("datetime64[us, UTC]")
    path = tmp_path / "user_activity.parquet"
    frame.to_parquet(path)
    everything = materialize.newest_rows(path, materialize.EPOCH, t + timedelta(days=1))
    assert everything[["user_id", "activity_tiles"]].values.tolist() == [["a", "a2"], ["b", "b0"]]
    window = materialize.newest_rows(path, t, t + timedelta(hours=1))  # (start, end]: b's row at start is out
    assert window[["user_id", "activity_tiles"]].values.tolist() == [["a", "a1"]]
    assert window["event_timestamp"].tolist() == [t + timedelta(hours=1)]
    assert materialize.newest_rows(tmp_path / "missing.parquet", materialize.EPOCH, t).empty


@pytest.mark.parametrize("workspace", ["local"], indirect=True)
def test_materialize_continues_where_feast_left_user_activity(workspace, shop):
    """A workspace that Feast materialized before (no ``materialized.json``): the next incremental
    run starts at Feast's own end for ``user_activity``, and the online rows equal the newest offline."""
    import duckdb

    cfg, log, _ = workspace
    store, _ = registry.apply(cfg.workspace, cfg.profile)
    build(log, cfg.profile, cfg.workspace)
    feast_end = datetime.now(UTC)
    store.materialize(start_date=materialize.EPOCH, end_date=feast_end)  # every view, the old way
    assert materialize._last_end(store, "user_activity", {}) == feast_end
    materialize.materialize(cfg.workspace)
    mark = json.loads((cfg.workspace / "feast" / materialize.MATERIALIZED_FILE).read_text())["user_activity"]
    assert datetime.fromisoformat(mark) > feast_end
    users = list(shop["users"]["user_id"].head(5))
    online = store.get_online_features(features=["user_activity:activity_tiles"],
                                       entity_rows=[{"user_id": u} for u in users]).to_dict()
    path = cfg.workspace / "offline" / "user_activity.parquet"
    newest = dict(duckdb.sql(f"SELECT user_id, arg_max(activity_tiles, event_timestamp) FROM read_parquet('{path}') "
                             "GROUP BY user_id").fetchall())
    assert online["activity_tiles"] == [newest.get(u) for u in users]


@pytest.mark.parametrize("workspace", ["local"], indirect=True)
def test_the_service_reads_a_catalogue_larger_than_one_sqlite_statement_binds(workspace, shop, monkeypatch):
    """A million items failed the service's start: Feast's SQLite read binds one variable per key, past
    SQLite's limit. Here the limit is lowered to 50 on Feast's own connection: one read of every item
    fails as it did, and the chunked read returns every item, equal to reads of a few items at a time."""
    import sqlite3

    from training import dataset

    cfg, log, _ = workspace
    store, _ = registry.apply(cfg.workspace, cfg.profile)
    build(log, cfg.profile, cfg.workspace)
    materialize.materialize(cfg.workspace, full=True, store=store)
    item_ids = sorted(shop["items"]["item_id"].astype(str))
    assert len(item_ids) > 100
    expected = pd.concat([dataset.online_catalogue(store, item_ids[k:k + 20]) for k in range(0, len(item_ids), 20)],
                         ignore_index=True)
    store._get_provider().online_store._get_conn(store.config).setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
    monkeypatch.setattr(dataset, "ONLINE_CHUNK", len(item_ids))
    with pytest.raises(sqlite3.OperationalError, match="too many SQL variables"):
        dataset.online_catalogue(store, item_ids)
    monkeypatch.setattr(dataset, "ONLINE_CHUNK", 40)
    got = dataset.online_catalogue(store, item_ids)
    assert got["item_id"].tolist() == item_ids
    pd.testing.assert_frame_equal(got, expected)


def test_a_user_with_ten_thousand_views_keeps_a_bounded_sequence_that_serving_and_ranking_read_alike(
        tmp_path, shop, sqlite_log):
    """A heavy browser: 10,000 views in 30 days, bursts of up to 60 views of one item in an hour. The push
    path and the rebuild give the same sequence, bounded at ``SEQUENCE_LENGTH`` slots (a burst is one slot
    with its count); the ranker reads the stored row as the slots it rebuilds from raw events."""
    import numpy as np

    from core.config import DEFAULT_SEQUENCE_TYPES
    from feature_repo.pipeline.compute import SEQUENCE_LENGTH, compute_user_tables, latest_user_state
    from feature_repo.pipeline.history import recent_user_events
    from training.recall import history, pairs

    rng = np.random.default_rng(3)
    items = shop["items"]["item_id"].tolist()
    start = pd.Timestamp("2026-10-01", tz="UTC")
    minutes = np.sort(rng.integers(0, 30 * 24 * 60, 10_000))
    picks = rng.integers(0, len(items), 10_000)
    picks[-60:] = 7  # the last hour's burst: one item viewed 60 times
    minutes[-60:] = minutes[-61] + 61 + np.arange(60) // 2
    rows = pd.DataFrame({"event_id": [f"v{k}" for k in range(10_000)], "user_id": "heavy",
                         "item_id": [items[p] for p in picks], "event_type": "view",
                         "event_timestamp": start + pd.to_timedelta(minutes, unit="min")})
    folder = tmp_path / "heavy"
    sample_data.write({"users": shop["users"].head(1).assign(user_id="heavy"), "items": shop["items"],
                       "events": rows}, folder)
    report, _ = ingest(load_batch(folder), sqlite_log, Gate(GateSettings(on_schema_drift="accept")))
    assert report.quarantined == 0
    catalogue = sqlite_log.read_table("items")
    pushed = latest_user_state(recent_user_events(sqlite_log, ["heavy"]), catalogue)["user_sequence"]
    events = sqlite_log.read_table("events")
    rebuilt = compute_user_tables(events, catalogue)["user_sequence"]
    newest = rebuilt.sort_values("event_timestamp").tail(1)
    for col in ("sequence_items", "sequence_types", "sequence_times", "sequence_counts"):
        assert pushed[col].item() == newest[col].item(), col
    counts = json.loads(pushed["sequence_counts"].item())
    assert len(counts) == SEQUENCE_LENGTH
    assert counts[-1] == 60 and json.loads(pushed["sequence_items"].item())[-1] == items[7]  # the burst: one slot

    index = {i: k for k, i in enumerate(sorted(items))}
    codes = history.TypeCodes(list(DEFAULT_SEQUENCE_TYPES))
    stored = history.from_frame(pushed, index, codes)[0]
    raw = history.EventHistories(events, index, codes, DEFAULT_SEQUENCE_TYPES).at(
        "heavy", rows["event_timestamp"].max() + pd.Timedelta(microseconds=1), slots=SEQUENCE_LENGTH)
    for field in ("items", "types", "times", "counts"):
        assert getattr(stored, field).tolist() == getattr(raw, field).tolist(), field
    groups = pairs.ItemGroups.from_columns([None] * len(index), [None] * len(index))
    features = pairs.pair_features(stored, np.arange(len(index)), groups, len(codes), stored.times.max() + 3600)
    assert features.shape == (len(index), len(pairs.names(codes.names))) and np.isfinite(features).all()
