"""The contract loader: good files, every structural error, SQL sources."""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa

from eventlog.sources import StructuralError, load_batch
from persona import sample_data


def test_reads_csv_and_normalises_types(shop_dir, shop):
    batch = load_batch(shop_dir)
    assert set(batch.tables) == {"users", "items", "events"}
    events = batch.tables["events"].frame
    assert len(events) == len(shop["events"])
    assert str(events["event_timestamp"].dtype) == "datetime64[us, UTC]"
    assert events["event_timestamp"].iloc[0] == shop["events"]["event_timestamp"].iloc[0]
    assert str(events["user_id"].dtype) == "string"
    assert str(batch.tables["users"].frame["age"].dtype) == "Int64"
    assert not batch.tables["events"].issues


def test_reads_parquet(tmp_path, shop):
    sample_data.write(shop, tmp_path, "parquet")
    batch = load_batch(tmp_path)
    assert len(batch.tables["events"]) == len(shop["events"])
    assert batch.tables["items"].frame["price"].sum() == pytest.approx(shop["items"]["price"].sum())


def test_any_subset_of_tables(tmp_path, shop):
    sample_data.write({"events": shop["events"].head(10)}, tmp_path)
    assert set(load_batch(tmp_path).tables) == {"events"}


def test_stable_event_id_when_absent(tmp_path, shop):
    events = shop["events"].head(50).drop(columns="event_id")
    sample_data.write({"events": events}, tmp_path)
    first = load_batch(tmp_path).tables["events"].frame["event_id"]
    # The same events with shuffled rows and another timestamp spelling get the same ids.
    shuffled = events.sample(frac=1, random_state=3)
    shuffled["event_timestamp"] = shuffled["event_timestamp"].dt.tz_convert("Asia/Shanghai").astype(str)
    sample_data.write({"events": shuffled}, tmp_path)
    second = load_batch(tmp_path).tables["events"].frame["event_id"]
    assert first.notna().all() and first.is_unique
    assert set(first) == set(second)


def test_ids_are_strings_even_when_numeric(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "age": [30, 40]}).to_parquet(tmp_path / "users.parquet")
    frame = load_batch(tmp_path).tables["users"].frame
    assert list(frame["user_id"]) == ["1", "2"]


def test_missing_required_column_names_file_and_column(tmp_path, shop):
    sample_data.write({"events": shop["events"].drop(columns="event_type").head(5)}, tmp_path)
    with pytest.raises(StructuralError, match=r"events\.csv: required column 'event_type' is missing"):
        load_batch(tmp_path)


def test_unreadable_file(tmp_path):
    (tmp_path / "items.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(StructuralError, match=r"items\.parquet: unreadable"):
        load_batch(tmp_path)


def test_uncoercible_column_is_structural(tmp_path, shop):
    events = shop["events"].head(5).copy()
    events["event_timestamp"] = "yesterday-ish"
    sample_data.write({"events": events}, tmp_path)
    with pytest.raises(StructuralError, match=r"column 'event_timestamp' cannot be read as timestamp"):
        load_batch(tmp_path)


def test_single_bad_cell_is_a_row_issue_not_structural(tmp_path, shop):
    users = shop["users"].head(5).astype({"age": object})
    users.loc[2, "age"] = "abc"
    sample_data.write({"users": users}, tmp_path)
    tb = load_batch(tmp_path).tables["users"]
    assert [(i.row, i.column, i.rule) for i in tb.issues] == [(2, "age", "type")]
    assert pd.isna(tb.frame["age"].iloc[2])


def test_empty_file_and_ambiguous_folder(tmp_path, shop):
    (tmp_path / "events.csv").write_text("")
    with pytest.raises(StructuralError, match=r"events\.csv: the file is empty"):
        load_batch(tmp_path)
    (tmp_path / "events.csv").unlink()
    sample_data.write({"users": shop["users"].head(2)}, tmp_path, "csv")
    shop["users"].head(2).to_parquet(tmp_path / "users.parquet")
    with pytest.raises(StructuralError, match="both users.csv and users.parquet"):
        load_batch(tmp_path)


def test_nothing_to_read(tmp_path):
    with pytest.raises(StructuralError, match="no contract table found"):
        load_batch(tmp_path)
    with pytest.raises(StructuralError, match="not a folder"):
        load_batch(tmp_path / "missing")


def _to_sql(url: str, shop) -> None:
    engine = sa.create_engine(url)
    for name in ("users", "items"):
        shop[name].to_sql(name, engine, index=False, if_exists="replace")
    shop["events"].head(300).to_sql("events", engine, index=False, if_exists="replace")
    engine.dispose()


def test_sqlite_source(tmp_path, shop):
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    _to_sql(url, shop)
    batch = load_batch(url)
    assert len(batch.tables["events"]) == 300
    assert batch.tables["events"].frame["event_timestamp"].dt.tz is not None


@pytest.mark.postgres
def test_postgres_source(pg_url, shop):
    _to_sql(pg_url, shop)
    batch = load_batch(pg_url)
    assert len(batch.tables["users"]) == len(shop["users"])
    assert batch.tables["events"].frame["event_timestamp"].iloc[0] == shop["events"]["event_timestamp"].iloc[0]


def test_sql_source_error_hides_password():
    with pytest.raises(StructuralError) as info:
        load_batch("postgresql+psycopg://someone:s3cret@127.0.0.1:1/none")
    assert "s3cret" not in str(info.value)


def test_duplicate_csv_column_is_structural_and_named(tmp_path, shop):
    """pandas would read a second ``user_id`` as ``user_id.1``: an extra column the gate holds as
    drift and a replay then ingests. Two columns of one name are a structural error instead."""
    events = shop["events"].head(5)
    header = ",".join([*events.columns, "user_id"])
    lines = [",".join([*(str(v) for v in row.astype(object).where(row.notna(), "")), "u_other"])
             for _, row in events.iterrows()]
    (tmp_path / "events.csv").write_text("\n".join([header, *lines]) + "\n")
    with pytest.raises(StructuralError, match=r"events\.csv: column 'user_id' appears more than once"):
        load_batch(tmp_path)
    # Spelled apart only by spaces around the name: the same column twice.
    (tmp_path / "events.csv").write_text("\n".join([header.replace(",user_id", ", user_id "), *lines]) + "\n")
    with pytest.raises(StructuralError, match=r"events\.csv: column 'user_id' appears more than once"):
        load_batch(tmp_path)


def test_duplicate_parquet_column_is_structural_and_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array(["u1"]), pa.array(["u2"]), pa.array([30])],
                                 names=["user_id", "user_id", "age"])
    pq.write_table(table, tmp_path / "users.parquet")
    with pytest.raises(StructuralError, match=r"users\.parquet: column 'user_id' appears more than once"):
        load_batch(tmp_path)


def test_duplicate_column_in_a_frame_is_structural():
    from eventlog.sources import normalise

    frame = pd.DataFrame([["u1", "u2", 30]], columns=["user_id", "user_id", "age"])
    with pytest.raises(StructuralError, match=r"request: column 'user_id' appears more than once"):
        normalise("users", frame, "request")


BASE_EVENT = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "click",
              "event_timestamp": "2026-11-26T07:52:18Z", "device": "app", "channel": "direct"}
ONE_RECORD_CASES = [
    ("events", {}),
    ("events", {"event_id": None}),  # the stable hash
    ("events", {"event_id": "  e2 ", "device": "", "channel": None}),  # stripped; empty is null
    ("events", {"event_timestamp": "2026-11-26T07:52:18"}),  # naive: read as UTC, with a note
    ("events", {"event_timestamp": "2026-11-26 07:52:18.123456+08:00"}),
    ("events", {"event_timestamp": "2026-11-26T07:52+05:30"}),
    ("events", {"event_timestamp": "2026-11-26"}),
    ("events", {"event_timestamp": " 2026-11-26T07:52:18.5Z "}),
    ("events", {"event_timestamp": "2026-11-26T07:52:18+0800"}),  # the general path's spellings from here on
    ("events", {"event_timestamp": "2026-11-26T07:52:18z"}),
    ("events", {"event_timestamp": "2026-11-26T07:52:18.123456789Z"}),
    ("events", {"event_timestamp": "1500-01-01T00:00:00Z"}),
    ("events", {"event_timestamp": "26/11/2026 07:52"}),
    ("events", {"event_timestamp": "not a time"}),
    ("events", {"event_type": "purchase", "value": 12, "rating": 4.5}),
    ("events", {"event_type": "purchase", "value": 9.99}),
    ("events", {"event_type": "purchase", "value": float("nan")}),
    ("events", {"event_type": "purchase", "value": float("inf")}),
    ("events", {"event_type": "purchase", "value": True}),
    ("events", {"event_type": "purchase", "value": "12.5"}),
    ("events", {"event_type": "purchase", "value": 2**60}),
    ("events", {"event_type": "search", "item_id": None, "query": "  red shoes "}),
    ("events", {"user_id": 42}),
    ("events", {"coupon": "X1"}),  # outside the contract
    ("events", {"coupon": {"code": "X1"}}),
    ("events", {"user_id": None, "event_type": None, "event_timestamp": None}),  # nulls are the gate's to reject
    ("events", {"user_id": "   ", "event_type": ""}),
    ("users", {"user_id": "u1", "age": 31, "signup_timestamp": "2020-01-02T03:04:05Z", "gender": "f"}),
    ("users", {"user_id": "u1", "age": 31.5}),
    ("users", {"user_id": "u1", "age": 31.0}),
]


@pytest.mark.parametrize("table,fields", ONE_RECORD_CASES)
def test_one_record_normalises_as_a_frame_would(table, fields):
    """``POST /events`` sends one record; its fast path must give what the general path gives."""
    from eventlog.sources import _records_frame, normalise

    record = {**BASE_EVENT, **fields} if table == "events" else fields
    general = normalise(table, _records_frame(table, [record]), "request")  # the general path, as before
    fast = normalise(table, [record], "request")
    pd.testing.assert_frame_equal(fast.frame, general.frame)
    pd.testing.assert_frame_equal(fast.raw, general.raw)
    assert (fast.present, list(fast.row_numbers), fast.issues, fast.notes) == (
        general.present, list(general.row_numbers), general.issues, general.notes)


def test_plain_records_take_the_fast_path():
    from eventlog.sources import _single_record

    plain = [{**BASE_EVENT, **fields} for _, fields in ONE_RECORD_CASES[:8]] + [
        {**BASE_EVENT, "event_type": "purchase", "value": 12, "rating": 4.5}]
    assert all(_single_record("events", [r], "request") is not None for r in plain)  # the usual spellings
    assert _single_record("users", [ONE_RECORD_CASES[-3][1]], "request") is not None
    for odd in ({"value": float("nan")}, {"value": True}, {"coupon": "X1"}, {"user_id": 42},
                {"event_timestamp": "26/11/2026 07:52"}):
        assert _single_record("events", [{**BASE_EVENT, **odd}], "request") is None  # the general path


@pytest.mark.parametrize("record", [{}, {"user_id": "u1", "event_type": "click"}])
def test_one_record_without_a_required_field_is_structural(record):
    """Found by schemathesis: ``{"events": [{}]}`` must be a 422 naming the column, as a file is."""
    from eventlog.sources import normalise

    with pytest.raises(StructuralError, match="required column"):
        normalise("events", [record], "request")
