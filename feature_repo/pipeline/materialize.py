"""Load the offline tables into the online store: Feast's materialization, and DuckDB's pick of each
user's newest row for the views too large for it."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from feature_repo.pipeline.feast_adapter import skip_dedup
from feature_repo.pipeline.push import push_latest
from feature_repo.pipeline.registry import feature_store

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Views whose offline table holds a user's 30-day state at each of their events: one busy month makes
# it large. Feast's local materialization reads a view's table whole into Arrow, which fails past
# 2 GiB of text ("Arrow Appender: The maximum total string size for regular string buffers is
# 2147483647"), so on DuckDB their newest rows are picked by DuckDB itself and written online here.
LARGE_STATE_VIEWS = ("user_activity",)
MATERIALIZED_FILE = "materialized.json"  # where each such view's last materialization ended


def materialize(workspace: Path, full: bool = False, end: datetime | None = None, store=None):
    """Incremental by default (Feast tracks what was loaded); ``full`` reloads everything.

    This loads only rows stamped inside the window: ``online.sync_online`` brings the rest."""
    store = store or feature_store(workspace)
    skip_dedup(store, False)  # a stale build's row never replaces a newer pushed one on Redis
    end = end or datetime.now(UTC)
    own = list(LARGE_STATE_VIEWS) if getattr(store.config.offline_store, "type", None) == "duckdb" else []
    views = [v.name for v in store.list_feature_views(allow_cache=True) if v.online and v.name not in own]
    if full:
        store.materialize(start_date=EPOCH, end_date=end, feature_views=views)
    else:
        store.materialize_incremental(end_date=end, feature_views=views)
    marks = _materialized_marks(workspace)
    for name in own:
        start = EPOCH if full else _last_end(store, name, marks)
        _write_newest(store, name, Path(workspace) / "offline" / f"{name}.parquet", start, end)
        marks[name] = end.isoformat()
    if own:
        (Path(workspace) / "feast" / MATERIALIZED_FILE).write_text(json.dumps(marks, indent=2))
    return store


def _materialized_marks(workspace: Path) -> dict[str, str]:
    path = Path(workspace) / "feast" / MATERIALIZED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _last_end(store, name: str, marks: dict[str, str]) -> datetime:
    """Where this view's previous materialization ended: ours, else Feast's (a workspace that Feast
    materialized before), else never."""
    if name in marks:
        return datetime.fromisoformat(marks[name])
    feast_end = store.get_feature_view(name).most_recent_end_time
    return feast_end.astimezone(UTC) if feast_end else EPOCH


def _write_newest(store, name: str, path: Path, start: datetime, end: datetime, chunk: int = 2_000) -> int:
    """Each user's newest row of a view's offline table stamped in (``start``, ``end``], written online
    (by the push's writer: on the local profile's SQLite, writes never compare stamps anyway)."""
    rows = newest_rows(path, start, end)
    for first in range(0, len(rows), chunk):
        push_latest(store, {name: rows.iloc[first:first + chunk]})
    return len(rows)


def newest_rows(path: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """Each user's newest row of an offline table (Parquet) stamped in (``start``, ``end``].

    DuckDB finds each user's newest stamp from the keys alone, then reads back only those rows' text."""
    import duckdb

    if not path.exists():
        return pd.DataFrame()
    query = """WITH newest AS (SELECT user_id, max(event_timestamp) AS ts FROM read_parquet($path)
                               WHERE event_timestamp > $start AND event_timestamp <= $end GROUP BY user_id)
               SELECT t.* FROM read_parquet($path) t JOIN newest n
               ON t.user_id = n.user_id AND t.event_timestamp = n.ts ORDER BY t.user_id"""
    with contextlib.closing(duckdb.connect()) as con:
        rows = con.execute(query, {"path": str(path), "start": start, "end": end}).df()
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    return rows
