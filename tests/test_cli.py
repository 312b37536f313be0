"""The persona CLI end to end on real files, a real SQLite event log and real GX."""

from __future__ import annotations

import json
import re

import pandas as pd
from typer.testing import CliRunner

from persona import sample_data
from persona.cli import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_quickstart_twice_and_status(tmp_path):
    ws = tmp_path / "ws"
    args = ("quickstart", "--workspace", str(ws), "--users", "120", "--items", "80", "--days", "10")
    first = _invoke(*args)
    assert first.exit_code == 0, first.output
    assert (ws / "sample" / "events.csv").exists()
    assert list((ws / "reports" / "validation").glob("*/summary.html"))
    assert (ws / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").exists()
    summary = next((ws / "reports" / "validation").glob("*/summary.md"))  # links each table's run page
    links = re.findall(r"\]\(([^)]+)\)", summary.read_text())
    assert len(links) == 4 and all((summary.parent / link).is_file() for link in links), links
    status = json.loads(_invoke("status", "--workspace", str(ws), "--json").output)
    n_events = len(pd.read_csv(ws / "sample" / "events.csv"))
    assert status["users"] == 120 and status["items"] == 80 and status["events"] == n_events
    assert status["quarantined"] == 0 and status["newest_event"].startswith("2026-06-2")
    assert "ranking quality" in first.output and "NDCG@10" in first.output  # the metrics table
    assert status["models"] and status["models"][0]["tag"].startswith("persona-profile:")
    assert status["features"]["rows"]["user_behaviour"] > 0
    assert list((ws / "reports" / "training").glob("*/metrics.png"))
    second = _invoke(*args)  # a second run works and adds nothing
    assert second.exit_code == 0, second.output
    assert json.loads(_invoke("status", "--workspace", str(ws), "--json").output)["events"] == n_events


def test_generated_sample_passes_validation_strictly(tmp_path):
    """Data-quality review in CI: the generator's output must never be rejected."""
    out = tmp_path / "sample"
    assert _invoke("generate", "--out", str(out), "--users", "400", "--items", "200", "--days", "20",
                   "--seed", "9", "--format", "parquet").exit_code == 0
    result = _invoke("validate", "--source", str(out), "--workspace", str(tmp_path / "ws"), "--strict",
                     "--no-docs")
    assert result.exit_code == 0, result.output
    summary = next((tmp_path / "ws" / "reports" / "validation").glob("*/summary.md")).read_text()
    assert "No row breaks a rule." in summary


def _batch_with_bad_rows(folder, shop, bad_user: str = "u_late"):
    events = shop["events"].head(100).copy()
    events.loc[3, "rating"] = 7.0
    events.loc[10, "user_id"] = bad_user  # an orphan until that user arrives
    sample_data.write({"users": shop["users"], "items": shop["items"], "events": events}, folder)
    return events


def test_ingest_keeps_good_rows_and_replay_after_fix(tmp_path, shop):
    ws = str(tmp_path / "ws")
    folder = tmp_path / "batch"
    events = _batch_with_bad_rows(folder, shop)
    result = _invoke("ingest", "--source", str(folder), "--workspace", ws)
    assert result.exit_code == 0, result.output
    assert "rating_range" in result.output and "orphan_reference" in result.output
    listed = json.loads(_invoke("quarantine", "list", "--workspace", ws, "--json").output)
    assert {(r["row_number"], r["rule"], r["column_name"]) for r in listed} == {
        (4, "rating_range", "rating"), (11, "orphan_reference", "user_id")}
    assert json.loads(_invoke("status", "--workspace", ws, "--json").output)["events"] == 98

    # Fix one row in a corrected file and replay it.
    fixed = events.iloc[[3]].copy()
    fixed["rating"] = 5.0
    fixed_dir = tmp_path / "fixed"
    sample_data.write({"events": fixed}, fixed_dir)
    result = _invoke("quarantine", "replay", "--workspace", ws, "--source", str(fixed_dir))
    assert result.exit_code == 0, result.output
    assert "1 row(s) remain" in result.output

    # The orphan passes as it stands once its user has arrived.
    late_user = shop["users"].head(1).assign(user_id="u_late")
    users_dir = tmp_path / "users"
    sample_data.write({"users": late_user}, users_dir)
    assert _invoke("ingest", "--source", str(users_dir), "--workspace", ws).exit_code == 0
    result = _invoke("quarantine", "replay", "--workspace", ws)
    assert result.exit_code == 0, result.output
    status = json.loads(_invoke("status", "--workspace", ws, "--json").output)
    assert status["events"] == 100 and status["quarantined"] == 0


def test_strict_fails_on_any_quarantined_row(tmp_path, shop):
    folder = tmp_path / "batch"
    _batch_with_bad_rows(folder, shop)
    result = _invoke("ingest", "--source", str(folder), "--workspace", str(tmp_path / "ws"), "--strict")
    assert result.exit_code == 1
    assert "2 row(s) quarantined" in result.output


def test_held_batch_exits_non_zero_and_replays_after_setting_change(tmp_path, shop):
    ws = tmp_path / "ws"
    folder = tmp_path / "batch"
    events = shop["events"].head(40).copy()
    events.loc[:9, "value"] = -1.0  # 25% bad
    sample_data.write({"users": shop["users"], "items": shop["items"], "events": events}, folder)
    result = _invoke("ingest", "--source", str(folder), "--workspace", str(ws))
    assert result.exit_code == 1 and "batch held" in result.output
    assert json.loads(_invoke("status", "--workspace", str(ws), "--json").output)["events"] == 0
    # A plain replay retries rows that broke a rule, never a held batch: it stays held.
    result = _invoke("quarantine", "replay", "--workspace", str(ws))
    assert "held batch(es) were not replayed" in result.output, result.output
    assert json.loads(_invoke("status", "--workspace", str(ws), "--json").output)["events"] == 0
    # A reviewer decides the batch may pass with its bad rows quarantined: replay it by name.
    batch_id = json.loads(_invoke("quarantine", "list", "--workspace", str(ws), "--json").output)[0]["batch_id"]
    result = _invoke("quarantine", "replay", "--workspace", str(ws), "--batch", batch_id[:8])
    assert result.exit_code == 0, result.output
    status = json.loads(_invoke("status", "--workspace", str(ws), "--json").output)
    assert status["events"] == 30 and status["quarantined"] == 10


def test_schema_drift_holds_a_new_column_and_warns_of_a_missing_one(tmp_path, shop):
    """The README's rule: a missing optional column is not an error (a warning); a new one is held."""
    ws = str(tmp_path / "ws")
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sample_data.write({"users": shop["users"], "items": shop["items"], "events": shop["events"].head(20)}, first)
    assert _invoke("ingest", "--source", str(first), "--workspace", ws).exit_code == 0
    sample_data.write({"events": shop["events"].iloc[20:40].drop(columns=["device"])}, second)
    result = _invoke("ingest", "--source", str(second), "--workspace", ws)
    assert result.exit_code == 0 and "columns missing since the previous batch: device" in result.output
    sample_data.write({"events": shop["events"].iloc[40:60].assign(coupon="SPRING")}, third)
    result = _invoke("ingest", "--source", str(third), "--workspace", ws)
    assert result.exit_code == 1 and "new: coupon" in result.output


def test_structural_error_is_clear_and_writes_nothing(tmp_path, shop):
    folder = tmp_path / "batch"
    sample_data.write({"users": shop["users"].drop(columns=["user_id"])}, folder)
    result = _invoke("ingest", "--source", str(folder), "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 2
    assert "users.csv: required column 'user_id' is missing" in result.output
    assert "Nothing was written" in result.output


def test_status_with_a_model_store_that_has_no_persona_model(tmp_path):
    """`status --json` answers (no models) when BENTOML_HOME is a store without any Persona model.
    A fresh process: BentoML reads BENTOML_HOME once, at import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    other = tmp_path / "bentoml-home"
    (other / "models").mkdir(parents=True)
    out = subprocess.run([str(Path(sys.executable).parent / "persona"), "status", "--workspace",
                          str(tmp_path / "ws"), "--json"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BENTOML_HOME": str(other)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["models"] == []


def test_recommend_csv_has_a_bom_only_when_its_text_is_not_ascii(tmp_path):
    """Chinese reasons open correctly in spreadsheet software (a UTF-8 BOM); an English file is unchanged."""
    from persona.cli.models import csv_encoding

    zh = pd.DataFrame({"user_id": ["u1"], "rank": [1], "item_id": ["z0001"], "score": [0.5],
                       "reasons": ["often together with '山水U3无线话筒'"]})
    en = zh.assign(reasons="popular this week")
    for frame, bom in ((zh, True), (en, False)):
        path = tmp_path / f"{bom}.csv"
        frame.to_csv(path, index=False, encoding=csv_encoding(frame))
        assert path.read_bytes().startswith(b"\xef\xbb\xbf") is bom
        pd.testing.assert_frame_equal(pd.read_csv(path), frame)
