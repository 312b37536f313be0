"""The event log: idempotent appends, upserts, transactions, SQLite and Postgres."""

from __future__ import annotations

import pandas as pd
import pytest

from eventlog.sources import load_batch
from eventlog.store import EventLog
from ingestion.ingest import ingest
from persona import sample_data
from validation.gate import Gate


def test_ingest_twice_adds_nothing(shop_dir, sqlite_log, shop):
    first, _ = ingest(load_batch(shop_dir), sqlite_log, Gate())
    assert first.tables["events"].written == len(shop["events"])
    second, _ = ingest(load_batch(shop_dir), sqlite_log, Gate())
    assert second.tables["events"].written == 0
    assert second.tables["events"].already_present == len(shop["events"])
    assert sqlite_log.counts() == {"users": len(shop["users"]), "items": len(shop["items"]),
                                   "events": len(shop["events"]), "quarantined": 0}


def test_round_trip_keeps_values_and_extra_columns(tmp_path, sqlite_log, shop):
    events = shop["events"].head(20).copy()
    events["campaign"] = "spring"  # not in the contract: kept, ignored by features
    sample_data.write({"users": shop["users"], "items": shop["items"], "events": events}, tmp_path)
    ingest(load_batch(tmp_path), sqlite_log, Gate())
    stored = sqlite_log.read_table("events").set_index("event_id")
    original = events.set_index("event_id")
    assert (stored.loc[original.index, "event_timestamp"] == original["event_timestamp"]).all()
    assert stored["extra"].str.contains('"campaign": "spring"').all()


def test_users_are_upserted_partially(tmp_path, sqlite_log, shop):
    users = shop["users"].head(3)
    sample_data.write({"users": users}, tmp_path)
    ingest(load_batch(tmp_path), sqlite_log, Gate())
    update = pd.DataFrame({"user_id": [users["user_id"].iloc[0]], "membership": ["platinum"]})
    update_dir = tmp_path / "update"
    sample_data.write({"users": update}, update_dir)
    report, _ = ingest(load_batch(update_dir), sqlite_log, Gate(settings=_no_drift()))
    assert not report.held
    stored = sqlite_log.read_table("users").set_index("user_id").loc[users["user_id"].iloc[0]]
    assert stored["membership"] == "platinum"
    assert stored["age"] == users["age"].iloc[0]  # a column absent from the update keeps its value
    assert sqlite_log.counts()["users"] == 3


def test_failed_batch_leaves_no_partial_rows(shop_dir, sqlite_log, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(EventLog, "record_batch", crash)  # fails after the rows were written
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(load_batch(shop_dir), sqlite_log, Gate())
    assert sqlite_log.counts() == {"users": 0, "items": 0, "events": 0, "quarantined": 0}


@pytest.mark.postgres
def test_postgres_event_log(pg_url, shop_dir, shop):
    log = EventLog(pg_url)
    try:
        ingest(load_batch(shop_dir), log, Gate())
        ingest(load_batch(shop_dir), log, Gate())
        assert log.counts()["events"] == len(shop["events"])
        lo, hi = log.time_range()
        assert hi == shop["events"]["event_timestamp"].max().to_pydatetime()
        import sqlalchemy as sa

        names = {ix["name"] for ix in sa.inspect(log.engine).get_indexes("events")}
        assert {"ix_events_user_time", "ix_events_time", "ix_events_user_type_item"} <= names
        with log.engine.begin() as conn:  # a log from before that index, opened by two processes at once
            conn.execute(sa.text("DROP INDEX ix_events_user_type_item"))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            for opened in pool.map(lambda _: EventLog(pg_url), range(4)):
                opened.dispose()
        assert "ix_events_user_type_item" in {ix["name"] for ix in sa.inspect(log.engine).get_indexes("events")}
        assert log.counts()["events"] == len(shop["events"])
    finally:
        log.dispose()


def test_seen_items_come_from_one_covering_index_also_on_an_older_log(tmp_path, shop_dir):
    """A log made before the index gets it when opened; /rank's seen-items query then reads that index
    alone (SQLite's plan says so), not each of the user's rows."""
    import sqlalchemy as sa

    from bentos.user_state import UserHistory

    url = f"sqlite:///{tmp_path / 'eventlog.db'}"
    log = EventLog(url)
    ingest(load_batch(shop_dir), log, Gate())
    with log.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_events_user_type_item"))  # as a log from before it was
    log.dispose()
    log = EventLog(url)
    try:
        history = UserHistory(log, ["purchase", "add_to_cart"])
        events = log.read_table("events")
        user = events["user_id"].iloc[0]
        ran = []
        sa.event.listen(log.engine, "before_cursor_execute", lambda *args: ran.append(args[2:4]))
        seen = history.seen(user)  # the statement /rank runs, as it ran
        (sql, params), = ran
        with log.engine.connect() as conn:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "COVERING INDEX ix_events_user_type_item" in plan, plan
        mine = events[(events["user_id"] == user) & events["event_type"].isin(["purchase", "add_to_cart"])]
        assert seen == set(mine["item_id"].dropna())
    finally:
        log.dispose()


def _no_drift():
    from validation.gate import GateSettings

    return GateSettings(on_schema_drift="accept")
