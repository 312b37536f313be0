"""Input files no careful sender would deliver: a list where the contract wants one value, a file that
is not text, a request path that tries to leave its folder.

Bad input gets a clear error naming the row (or the file), the column and the rule; nothing valid is lost.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eventlog.sources import Batch, StructuralError, load_batch, normalise
from eventlog.store import EventLog
from ingestion.ingest import ingest
from validation.gate import Gate, GateSettings

NOW = pd.Timestamp("2026-11-01 12:00", tz="UTC")
STAMP = (NOW - pd.Timedelta(hours=1)).to_pydatetime()


def _shop(folder: Path, events: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": ["u1", "u2"]}), folder / "users.parquet")
    pq.write_table(pa.table({"item_id": ["i1", "i2"], "title": ["Pen", "Ink"], "category": ["Office", "Office"]}),
                   folder / "items.parquet")
    pq.write_table(events, folder / "events.parquet")
    return folder


def _events(n: int, query: list) -> pa.Table:
    """n events; the query column is list<string>, set only where ``query`` says (a search)."""
    types = ["search" if q is not None else "view" for q in query]
    return pa.table({"event_id": [f"e{k}" for k in range(n)], "user_id": [f"u{k % 2 + 1}" for k in range(n)],
                     "event_timestamp": pa.array([STAMP] * n, pa.timestamp("us", tz="UTC")),
                     "event_type": types, "item_id": [None if q is not None else "i1" for q in query],
                     "query": pa.array(query, pa.list_(pa.string()))})


def test_a_list_in_a_parquet_text_column_is_quarantined_by_row_column_and_rule(tmp_path):
    """It was stored as its printed form ("['espresso', 'grinder']") and accepted."""
    query = [None] * 11 + [["espresso", "grinder"]]
    folder = _shop(tmp_path / "day1", _events(12, query))
    log = EventLog(f"sqlite:///{tmp_path / 'eventlog.db'}")
    try:
        report, result = ingest(load_batch(folder), log, Gate(GateSettings(max_reject_share=1.0), now=NOW))
        [(row, [violation])] = result.verdicts["events"].violations.items()
        assert (row, violation.column, violation.rule) == (11, "query", "scalar_value")
        assert "['espresso', 'grinder']" in violation.reason and "not a single value" in violation.reason
        stored = log.read_table("events")
        assert sorted(stored["event_id"]) == sorted(f"e{k}" for k in range(11))  # every valid row kept
        assert not stored["query"].astype(str).str.contains("[", regex=False).any()
        [held] = log.quarantined().to_dict("records")
        assert (held["record_key"], held["rule"], held["column_name"], held["row_number"]) == (
            "e11", "scalar_value", "query", 12)
        assert json.loads(held["payload"])["query"] == ["espresso", "grinder"]  # the list itself, not its repr
    finally:
        log.dispose()


def test_a_parquet_column_of_lists_is_refused_naming_file_and_column(tmp_path):
    """Every value a list: the column is of another type, a structural error like a column of words in `age`."""
    folder = tmp_path / "day1"
    folder.mkdir()
    pq.write_table(pa.table({"item_id": ["i1", "i2", "i3"], "title": [["a", "b"], ["c"], ["d"]],
                             "category": ["x", "y", "z"]}), folder / "items.parquet")
    with pytest.raises(StructuralError, match=r"items\.parquet: column 'title' holds lists or objects, not single "
                                              r"string values \(row 1 has \['a', 'b'\]\)"):
        load_batch(folder)


@pytest.mark.parametrize("engine", ["gx", "pandas"])
def test_nested_json_values_in_contract_fields_are_quarantined(engine):
    """POST /events bodies: an array or object in any contract field is that row's ``scalar_value``."""
    base = {"user_id": "u1", "event_timestamp": STAMP.isoformat(), "event_type": "view", "item_id": "i1"}
    records = [{**base, "event_id": "ok"},
               {**base, "event_id": "q", "event_type": "search", "item_id": None, "query": ["a", "b"]},
               {**base, "event_id": "uid", "user_id": {"id": "u1"}},
               {**base, "event_id": "rating", "event_type": "review", "rating": [5]},
               {**base, "event_id": "when", "event_timestamp": [STAMP.isoformat()]}]
    batch = Batch("request", {"users": normalise("users", [{"user_id": "u1"}], "u"),
                              "items": normalise("items", [{"item_id": "i1", "title": "Pen", "category": "x"}], "i"),
                              "events": normalise("events", records, "request")})
    gate = Gate(GateSettings(max_reject_share=1.0, on_schema_drift="accept", engine=engine), now=NOW.to_pydatetime())
    events = batch.tables["events"].frame
    found = {events["event_id"].iloc[r]: [(v.column, v.rule) for v in vs]
             for r, vs in gate.check(batch).verdicts["events"].violations.items()}
    assert found == {"q": [("query", "scalar_value")], "uid": [("user_id", "scalar_value")],
                     "rating": [("rating", "scalar_value")], "when": [("event_timestamp", "scalar_value")]}


def _no_pandas_read(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pandas was asked to read a file that is not text")
    monkeypatch.setattr(pd, "read_csv", refuse)


@pytest.mark.parametrize("content", [
    pytest.param(lambda: b"\x00" * 50_000_000, id="50MB-of-NUL"),
    pytest.param(lambda: b"user_id\n" + b"\x00\n" * 2_000_000, id="header-then-NUL-rows"),
    pytest.param(lambda: random.Random(7).randbytes(3_000_000), id="random-bytes"),
    pytest.param(lambda: "user_id,region\n".encode("utf-16") + "u1,north\n".encode("utf-16-le") * 5000, id="utf-16"),
    pytest.param(lambda: b"user_id\n" + b"u1\n" * 200_000 + b"\x00" * 5_000_000, id="text-then-NUL-junk"),
])
def test_a_binary_csv_is_refused_by_name_before_it_is_read(content, tmp_path, monkeypatch):
    """It was read whole into memory and held as rows (2M rows of NUL: 700 MB, 13 s)."""
    (tmp_path / "users.csv").write_bytes(content())
    _no_pandas_read(monkeypatch)
    started = time.monotonic()
    with pytest.raises(StructuralError) as caught:
        load_batch(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'users.csv'}: not a text CSV file:") and "\n" not in message
    assert time.monotonic() - started < 5


def test_a_large_csv_with_the_odd_nul_is_read_and_only_that_row_quarantined(tmp_path):
    rows = [{"user_id": f"u{k}", "occupation": "clerk"} for k in range(20_000)]
    rows[5_000]["user_id"] = "u_nul\x00x"
    rows[9_000]["occupation"] = "cl\x00erk"
    pd.DataFrame(rows).to_csv(tmp_path / "users.csv", index=False)
    batch = load_batch(tmp_path)
    users = batch.tables["users"].frame
    assert len(users) == 20_000 and users["user_id"].iloc[5_000] == "u_nul\x00x"
    result = Gate(GateSettings(max_reject_share=1.0)).check(batch)
    assert {r: [(v.column, v.rule) for v in vs] for r, vs in result.verdicts["users"].violations.items()} == {
        5_000: [("user_id", "id_characters")]}


# --- the sweep: a request value that becomes a path stays in its folder -------------------------------------
def test_a_report_path_never_leaves_the_reports_folder_nor_fails(tmp_path):
    """`/ui/api/reports/{path}` is the one route whose request value becomes a file path. A NUL in it was
    a 500, an over-long name a 503 ("a store is unavailable"); a way out of the folder, a 404."""
    from starlette.testclient import TestClient

    from bentos.explorer import create_app

    ws = tmp_path / "ws"
    (ws / "reports" / "validation" / "day1").mkdir(parents=True)
    (ws / "reports" / "validation" / "day1" / "summary.html").write_text("<p>fine</p>")
    (ws / "secret.json").write_text('{"secret": 1}')
    (ws / "reports" / "link.json").symlink_to(ws / "secret.json")
    client = TestClient(create_app(ws), raise_server_exceptions=False)
    assert client.get("/api/reports/validation/day1/summary.html").text == "<p>fine</p>"
    for path in ["../secret.json", "..%2Fsecret.json", "%2E%2E%2Fsecret.json", "%2Fetc%2Fpasswd",
                 "validation/day1/..%2F..%2F..%2Fsecret.json", "link.json", "a%00b.html", "x" * 5000 + ".html",
                 "..%5Csecret.json"]:
        answer = client.get("/api/reports/" + path)
        assert answer.status_code == 404 and "secret" not in answer.text, (path[:40], answer.status_code)
    for path in ["../../secret.json", "..%2F..%2Fsecret.json", "%2e%2e/%2e%2e/secret.json"]:
        assert client.get("/static/" + path).status_code == 404
