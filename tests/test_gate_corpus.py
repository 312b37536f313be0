"""The data-quality corpus: each kind of bad input names its row, column and rule, keeps the valid
rows, and makes the counts add up (accepted + quarantined == input)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from eventlog.sources import StructuralError, load_batch
from eventlog.store import EventLog
from ingestion.ingest import ingest
from persona import sample_data
from validation.gate import Gate, GateSettings

N_EVENTS = 60


@pytest.fixture
def good(shop):
    """A clean batch: all users and items, and the first events."""
    return {"users": shop["users"].copy(), "items": shop["items"].copy(),
            "events": shop["events"].head(N_EVENTS).copy().reset_index(drop=True)}


def _events_with(good, bad_rows: list[dict]) -> pd.DataFrame:
    base = good["events"].iloc[0].to_dict()
    bad = pd.DataFrame([{**base, "event_id": f"bad{i}", **row} for i, row in enumerate(bad_rows)])
    return pd.concat([good["events"], bad], ignore_index=True)


def _run(tmp_path: Path, tables: dict, raw_events: bytes | None = None):
    folder = tmp_path / "batch"
    sample_data.write(tables, folder, "csv")
    if raw_events is not None:
        (folder / "events.csv").write_bytes(raw_events)
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    report, _ = ingest(load_batch(folder), log, Gate())
    quarantined = log.quarantined()
    counts = log.counts()
    log.dispose()
    return report, quarantined, counts


def _assert_caught(report, quarantined, counts, *, rule: str, column: str, rows: list[int], total: int):
    events = report.tables["events"]
    assert not report.held
    assert events.rows == total
    assert events.quarantined == len(rows)
    assert events.accepted + events.quarantined == events.rows  # nothing lost
    assert counts["events"] == events.accepted  # every valid row kept
    q = quarantined[quarantined.table_name == "events"]
    assert sorted(q["row_number"]) == rows  # 1-based data rows of events.csv
    for _, rec in q.iterrows():
        assert rule in rec["rule"].split("; ")
        assert column in rec["column_name"].split("; ")
        assert column in rec["reason"]
        assert json.loads(rec["payload"])  # the original row is kept for replay


BAD_ROWS = {
    # kind: (bad rows, rule, column)
    "null user": ([{"user_id": None}], "not_null", "user_id"),
    "wrong type": ([{"rating": "five"}, {"value": "12,5€"}], "type", None),
    "rating 7": ([{"event_type": "review", "rating": 7.0, "text": "great"}], "rating_range", "rating"),
    "negative value": ([{"event_type": "purchase", "value": -3.0}], "non_negative", "value"),
    "unknown event type": ([{"event_type": "wishlist"}], "event_type_allowed", "event_type"),
    "future timestamp": ([{"event_timestamp": datetime.now(UTC) + timedelta(days=2)}], "not_future",
                         "event_timestamp"),
    "orphan user": ([{"user_id": "u_nobody"}], "orphan_reference", "user_id"),
    "orphan item": ([{"item_id": "i_nothing"}], "orphan_reference", "item_id"),
    "search without query": ([{"event_type": "search", "item_id": None, "query": None}], "query_required",
                             "query"),
    "click without item": ([{"event_type": "click", "item_id": None}], "item_required", "item_id"),
    "1 MB text": ([{"event_type": "review", "rating": 4.0, "text": "x" * 1_000_000}], "max_length", "text"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_rows_are_quarantined(kind, tmp_path, good):
    bad_rows, rule, column = BAD_ROWS[kind]
    tables = {**good, "events": _events_with(good, bad_rows)}
    report, quarantined, counts = _run(tmp_path, tables)
    rows = list(range(N_EVENTS + 1, N_EVENTS + 1 + len(bad_rows)))
    if column is None:  # one bad cell per row, each in its own column
        for rec, expected in zip(quarantined.itertuples(), ("rating", "value"), strict=True):
            assert rec.column_name == expected and rec.rule == "type" and expected in rec.reason
        column = quarantined["column_name"].iloc[0]
        rows = rows[:1]
        quarantined = quarantined.head(1)
        report.tables["events"].quarantined -= 1
        report.tables["events"].rows -= 1
    _assert_caught(report, quarantined, counts, rule=rule, column=column, rows=rows,
                   total=report.tables["events"].rows)


def test_negative_price_quarantines_item_and_its_events(tmp_path, good):
    items = good["items"].copy()
    bad_item = good["events"]["item_id"].value_counts().idxmin()  # its orphaned events stay under the hold share
    items.loc[items.item_id == bad_item, "price"] = -10.0
    report, quarantined, counts = _run(tmp_path, {**good, "items": items})
    item_q = quarantined[quarantined.table_name == "items"]
    assert list(item_q["record_key"]) == [bad_item]
    assert item_q["rule"].iloc[0] == "non_negative" and item_q["column_name"].iloc[0] == "price"
    # Events of that item are now orphans: quarantined with that reason, not silently dropped.
    ev_q = quarantined[quarantined.table_name == "events"]
    assert (ev_q["rule"] == "orphan_reference").all()
    assert len(ev_q) == (good["events"]["item_id"] == bad_item).sum()
    assert counts["items"] == len(items) - 1
    assert counts["events"] + len(ev_q) == N_EVENTS


def test_duplicate_event_id_with_different_content(tmp_path, good):
    events = good["events"].copy()
    clash = events.iloc[[5]].copy()
    clash["item_id"] = events["item_id"].dropna().iloc[-1]
    report, quarantined, counts = _run(tmp_path, {**good, "events": pd.concat([events, clash])})
    q = quarantined[quarantined.table_name == "events"]
    assert set(q["rule"]) == {"unique_id"} and set(q["column_name"]) == {"event_id"}
    assert sorted(q["row_number"]) == [6, N_EVENTS + 1]  # both versions: which one is true is unknown
    assert counts["events"] == N_EVENTS - 1


def test_exact_duplicates_are_collapsed_not_rejected(tmp_path, good):
    events = pd.concat([good["events"], good["events"].head(3)])
    report, quarantined, counts = _run(tmp_path, {**good, "events": events})
    assert report.tables["events"].duplicates == 3
    assert report.tables["events"].quarantined == 0
    assert counts["events"] == N_EVENTS


def test_event_id_conflict_with_the_log(tmp_path, good):
    folder = tmp_path / "first"
    sample_data.write(good, folder)
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    ingest(load_batch(folder), log, Gate())
    changed = good["events"].head(20).copy()
    first_view = changed.index[changed.event_type == "view"][0]
    changed.loc[first_view, "event_type"] = "click"  # same id, other content
    second = tmp_path / "second"
    sample_data.write({"events": changed}, second)
    report, _ = ingest(load_batch(second), log, Gate(settings=_lenient()))
    q = log.quarantined()
    log.dispose()
    assert list(q["rule"]) == ["event_id_conflict"] and "event_type" in q["reason"].iloc[0]
    assert report.tables["events"].already_present == 19


def test_non_utf8_bytes(tmp_path, good):
    folder = tmp_path / "tmp"
    sample_data.write({"events": good["events"]}, folder)
    lines = (folder / "events.csv").read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",mobile,", b",mob\xffile,").replace(b",app,", b",a\xfe\xffpp,")
    lines[3] = lines[3].replace(b",desktop,", b",des\xfftop,").replace(b",tablet,", b",tab\xfflet,")
    report, quarantined, counts = _run(tmp_path, good, raw_events=b"\n".join(lines))
    _assert_caught(report, quarantined, counts, rule="valid_utf8", column="device", rows=[3],
                   total=N_EVENTS)


def test_a_literal_replacement_character_is_valid_text(tmp_path, good):
    """Real catalogues hold U+FFFD literally (amazon-office has six such descriptions): the file is
    valid UTF-8, so nothing is quarantined and the text is kept as it was."""
    items = good["items"].copy()
    items.loc[0, "title"] = "CD size (5-1/8\ufffd x 6\ufffd)"
    report, quarantined, counts = _run(tmp_path, {**good, "items": items})
    assert report.tables["items"].quarantined == 0 and quarantined.empty
    assert counts["items"] == len(items) and report.tables["events"].quarantined == 0
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    stored = log.read_table("items").set_index("item_id").loc[items.loc[0, "item_id"], "title"]
    log.dispose()
    assert stored == items.loc[0, "title"]


def test_mixed_timezone_formats_are_normalised(tmp_path, good):
    events = good["events"].head(4).copy()
    t = events["event_timestamp"]
    events["event_timestamp"] = [
        t.iloc[0].strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        t.iloc[1].tz_convert("Asia/Shanghai").isoformat(),
        t.iloc[2].tz_convert("America/New_York").strftime("%Y-%m-%d %H:%M:%S.%f%z"),
        t.iloc[3].strftime("%Y-%m-%d %H:%M:%S.%f"),  # naive: read as UTC, and said so
    ]
    folder = tmp_path / "b"
    sample_data.write({**good, "events": events}, folder)
    batch = load_batch(folder)
    assert list(batch.tables["events"].frame["event_timestamp"]) == list(t)
    assert any("1 naive timestamps read as UTC" in n for n in batch.tables["events"].notes)
    report, quarantined, counts = _run(tmp_path, {**good, "events": events})
    assert report.tables["events"].quarantined == 0 and counts["events"] == 4


def test_missing_column_fails_before_writing(tmp_path, good):
    with pytest.raises(StructuralError, match=r"events\.csv: required column 'user_id' is missing"):
        _run(tmp_path, {**good, "events": good["events"].drop(columns="user_id")})
    assert EventLog(f"sqlite:///{tmp_path / 'log.db'}").counts()["users"] == 0


def test_empty_file_fails_with_its_name(tmp_path, good):
    with pytest.raises(StructuralError, match=r"events\.csv: the file is empty"):
        _run(tmp_path, good, raw_events=b"")


def test_header_only_file_is_an_empty_batch(tmp_path, good):
    header = ",".join(good["events"].columns).encode() + b"\n"
    report, quarantined, counts = _run(tmp_path, good, raw_events=header)
    assert report.tables["events"].rows == 0 and counts["events"] == 0
    assert any("header only" in n for n in report.notes)
    assert counts["users"] == len(good["users"])  # the rest of the batch still lands


def test_mostly_bad_batch_is_held_whole(tmp_path, good):
    events = good["events"].copy()
    events.loc[:20, "rating"] = 9.0
    report, quarantined, counts = _run(tmp_path, {**good, "events": events})
    assert report.held and "events: 35% of rows break a rule" in report.hold_reasons[0]
    assert counts["events"] == 0 and counts["users"] == 0  # nothing ingested
    assert len(quarantined) == report.rows and set(quarantined["status"]) == {"held"}
    held_events = quarantined[quarantined.table_name == "events"]
    assert set(held_events.loc[held_events.row_number <= 21, "rule"]) == {"rating_range"}
    assert set(held_events.loc[held_events.row_number > 21, "rule"]) == {"batch_held"}


def _lenient():
    from validation.gate import GateSettings

    return GateSettings(on_schema_drift="accept")


def test_in_process_engine_gives_the_same_verdicts_as_gx(tmp_path, good):
    """`POST /events` evaluates the same suites in process (compiled checks over the records); on
    every kind of bad input, row for row, it must find exactly what GX finds (rule, column and
    reason)."""

    every_kind = [row for rows, _, _ in BAD_ROWS.values() for row in rows]
    every_kind += [{"event_id": "bad0", "event_type": "view", "value": 1.0},  # conflicting duplicate id
                   {"event_type": "search", "item_id": None, "query": "caf\ufffe au lait"},  # not UTF-8
                   {"event_type": None, "item_id": None}, {"session_id": "s" * 300}]
    users = pd.concat([good["users"], good["users"].head(2).assign(user_id=["old", None], age=[200, -1])])
    items = pd.concat([good["items"], good["items"].head(2).assign(item_id=["neg", "long"], price=[-1.0, 5.0],
                                                                   title=["t", "x" * 2000])])
    tables = {"users": users, "items": items, "events": _events_with(good, every_kind)}
    folder = tmp_path / "batch"
    sample_data.write(tables, folder, "csv")
    batch = load_batch(folder)

    def verdicts(engine: str) -> dict:
        result = Gate(GateSettings(engine=engine, max_reject_share=1.0)).check(batch)
        return {(t, row, v.column, v.rule, v.reason) for t, verdict in result.verdicts.items()
                for row, vs in verdict.violations.items() for v in vs}

    gx_found, in_process_found = verdicts("gx"), verdicts("pandas")
    assert len(gx_found) >= len(every_kind) + 4
    assert in_process_found == gx_found


@pytest.mark.parametrize("text", ["NaN", "nan", "inf", "-Infinity"])
def test_nan_or_infinity_in_a_csv_is_quarantined_like_json(text, tmp_path, good):
    """The same rule, column and reason as a NaN that arrives from JSON (tests/test_intake_life.py)."""
    tables = {**good, "events": _events_with(good, [{"value": text}])}
    report, quarantined, counts = _run(tmp_path, tables)
    _assert_caught(report, quarantined, counts, rule="finite_number", column="value", rows=[N_EVENTS + 1],
                   total=N_EVENTS + 1)
    assert "not a finite number" in quarantined["reason"].iloc[0]
