"""``persona features build`` and the push path, both reading the event log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from eventlog.store import EventLog, events, utcnow
from feature_repo.pipeline.compute import ENGAGED, SEQUENCE_LENGTH, compute_all, latest_user_state
from feature_repo.pipeline.stores import feature_store_config, push_latest, write_offline

# A user's state depends only on events in the 30 days before their newest one (the longest window);
# fetching a day more is harmless, since every window bounds itself.
FETCH_WINDOW = timedelta(days=31)
TEXT_TYPES = ("search", *ENGAGED)  # the events the text part of a state folds


class FeatureChecksFailed(RuntimeError):
    """The new tables broke a feature-level rule: the previous offline tables stay in place."""

    def __init__(self, report) -> None:
        super().__init__(f"feature checks failed (see {report.path})")
        self.report = report


def build(log: EventLog, profile: str, workspace: Path,
          check: Callable[[dict[str, pd.DataFrame]], Any] | None = None) -> dict[str, pd.DataFrame]:
    """Recompute every feature table from the whole event log and replace the offline tables.

    ``check`` sees the new tables before they replace the old ones; a report with ``failed`` set
    raises :class:`FeatureChecksFailed` and leaves the previous tables (and online store) as they were.
    """
    workspace = Path(workspace)
    log_read_at = utcnow()  # keys touched after this are synced online from the log, not this build
    events_, items, users = log.read_table("events"), log.read_table("items"), log.read_table("users")
    if profile == "spark":
        from feature_repo.pipeline.spark_build import build_with_spark

        spark_conf = feature_store_config("spark", workspace)["offline_store"]["spark_conf"]
        staging = workspace / "offline" / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        build_with_spark(events_, items, users, workspace, spark_conf, out_dir=staging)
        tables = read_offline_spark(workspace, staging)
        _checked(check, tables)
        swap_in_spark_tables(workspace, staging)
    else:
        tables = compute_all(events_, items, users)
        _checked(check, tables)
        write_offline(profile, workspace, tables)
    newest = tables["user_behaviour"]["event_timestamp"].max() if len(tables["user_behaviour"]) else None
    (workspace / "feast").mkdir(parents=True, exist_ok=True)
    (workspace / "feast" / "last_build.json").write_text(json.dumps({
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"), "profile": profile,
        "log_read_at": log_read_at.isoformat(),
        "newest_feature_timestamp": newest.isoformat() if newest is not None else None,
        "rows": {k: len(v) for k, v in tables.items()}}, indent=2))
    return tables


def _checked(check, tables: dict[str, pd.DataFrame]) -> None:
    if check is not None and getattr(report := check(tables), "failed", False):
        raise FeatureChecksFailed(report)


def swap_in_spark_tables(workspace: Path, staging: Path) -> None:
    """Move each staged table folder over the live one (a rename per table)."""
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        live = workspace / "offline" / folder.name
        old = workspace / "offline" / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if live.exists():
            live.rename(old)
        folder.rename(live)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def read_offline_spark(workspace: Path, folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """The tables Spark wrote, for the feature-level checks (pyarrow reads the part files)."""
    folder = folder or workspace / "offline"
    return {name: pd.read_parquet(folder / name) for name in
            ("user_behaviour", "user_activity", "user_text", "user_sequence", "user_personal", "item_features")}


def recent_user_events(log: EventLog, user_ids: list[str]) -> pd.DataFrame:
    """Enough of each user's events to rebuild their newest state (``fold.py``): the 30 days up to
    their newest event (activity), the 30 days up to their newest search or engaged event (text),
    and their last ``SEQUENCE_LENGTH`` engaged events of any age (sequence). Older events fall
    outside every part, so the extra ones a day's margin fetches change nothing."""
    parts = [_windowed_user_events(log, user_ids), _windowed_user_events(log, user_ids, TEXT_TYPES),
             _last_engaged_events(log, user_ids)]
    frame = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    return frame.drop_duplicates("event_id", ignore_index=True)


def _last_engaged_events(log: EventLog, user_ids: list[str]) -> pd.DataFrame:
    ranked = (sa.select(events, sa.func.row_number().over(
        partition_by=events.c.user_id,
        order_by=(events.c.event_timestamp.desc(), events.c.item_id.desc(), events.c.event_type.desc()))
        .label("newest_rank"))
        .where(events.c.user_id.in_(user_ids), events.c.event_type.in_(ENGAGED), events.c.item_id.is_not(None))
        .subquery())
    stmt = sa.select(*[ranked.c[c.name] for c in events.columns]).where(ranked.c.newest_rank <= SEQUENCE_LENGTH)
    with log.engine.connect() as conn:
        frame = pd.read_sql(stmt, conn)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"]).dt.tz_localize("UTC")
    return frame


def _windowed_user_events(log: EventLog, user_ids: list[str], types: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Each user's events (of ``types``) in the ``FETCH_WINDOW`` up to their newest one (of ``types``)."""
    typed = events.c.event_type.in_(types) if types else sa.true()
    newest = (sa.select(events.c.user_id, sa.func.max(events.c.event_timestamp).label("newest"))
              .where(events.c.user_id.in_(user_ids), typed).group_by(events.c.user_id).subquery())
    with log.engine.connect() as conn:
        if conn.dialect.name == "sqlite":  # SQLite has no interval arithmetic on datetimes
            since = sa.func.julianday(newest.c.newest) - FETCH_WINDOW.days
            recent = sa.func.julianday(events.c.event_timestamp) > since
        else:
            recent = events.c.event_timestamp > newest.c.newest - FETCH_WINDOW
        stmt = sa.select(events).join(newest, events.c.user_id == newest.c.user_id).where(recent, typed)
        frame = pd.read_sql(stmt, conn)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"]).dt.tz_localize("UTC")
    return frame


def push_users(store, log: EventLog, user_ids: list[str], items: pd.DataFrame | None = None) -> dict:
    """Recompute the users' fresh behaviour and text state and push it to the online store."""
    if not user_ids:
        return {}
    items = items if items is not None else log.read_table("items")
    states = latest_user_state(recent_user_events(log, list(user_ids)), items)
    push_latest(store, states)
    return states
