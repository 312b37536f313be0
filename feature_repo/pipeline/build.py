"""``persona features build`` and the push path, both reading the event log."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import sqlalchemy as sa

from eventlog.store import EventLog, events
from feature_repo.pipeline.compute import compute_all, latest_user_state
from feature_repo.pipeline.stores import push_latest, write_offline

# A user's state depends only on events in the 30 days before their newest one (the longest window);
# fetching a day more is harmless, since every window bounds itself.
FETCH_WINDOW = timedelta(days=31)


def build(log: EventLog, profile: str, workspace) -> dict[str, pd.DataFrame]:
    """Recompute every feature table from the whole event log and replace the offline tables."""
    tables = compute_all(log.read_table("events"), log.read_table("items"), log.read_table("users"))
    write_offline(profile, workspace, tables)
    return tables


def recent_user_events(log: EventLog, user_ids: list[str]) -> pd.DataFrame:
    """Each user's events in the 30 days up to their newest event: enough to rebuild their state."""
    newest = (sa.select(events.c.user_id, sa.func.max(events.c.event_timestamp).label("newest"))
              .where(events.c.user_id.in_(user_ids)).group_by(events.c.user_id).subquery())
    stmt = (sa.select(events).join(newest, events.c.user_id == newest.c.user_id)
            .where(events.c.event_timestamp > newest.c.newest - FETCH_WINDOW))
    with log.engine.connect() as conn:
        if conn.dialect.name == "sqlite":  # SQLite has no interval arithmetic on datetimes
            since = sa.func.julianday(newest.c.newest) - FETCH_WINDOW.days
            stmt = (sa.select(events).join(newest, events.c.user_id == newest.c.user_id)
                    .where(sa.func.julianday(events.c.event_timestamp) > since))
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
