"""Keyed reads of the event log for the push and the sync: just the events, users and items that a
set of users' (or items') newest state depends on, never the whole log."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime, timedelta

import pandas as pd
import sqlalchemy as sa

from core.config import DEFAULT_SEQUENCE_TYPES
from eventlog.store import EventLog, events, items, users
from feature_repo.pipeline.compute import (
    SEQUENCE_LENGTH,
    compute_item_table,
    last_event_day,
    user_personal,
)

# A user's state depends only on events in the 30 days before their newest one (the longest window);
# fetching a day more is harmless, since every window bounds itself.
FETCH_WINDOW = timedelta(days=31)


def recent_user_events(log: EventLog, user_ids: list[str],
                       sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> pd.DataFrame:
    """Enough of each user's events to rebuild their newest state (``fold.py``): the 30 days up to
    their newest event (activity), the 30 days up to their newest search or sequence-type event
    (text), and every event of their newest ``SEQUENCE_LENGTH`` sequence slots, of any age. Older
    events fall outside every part, so the extra ones a margin fetches change nothing."""
    types = tuple(sequence_types)
    parts = [_windowed_user_events(log, user_ids), _windowed_user_events(log, user_ids, ("search", *types)),
             _sequence_events(log, user_ids, types)]
    frame = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    return frame.drop_duplicates("event_id", ignore_index=True)


def _hour(dialect: str, column) -> sa.ColumnElement | None:
    """The UTC hour (floor of epoch seconds / 3600) of a naive-UTC timestamp column, as the fold keys
    slots; None for a database without a known expression."""
    if dialect == "sqlite":
        # Whole seconds from the text (SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff'): its own parse rounds to
        # the millisecond, so 00:59:59.9996 would read as the next hour.
        seconds = sa.cast(sa.func.strftime("%s", sa.func.substr(column, 1, 19)), sa.Integer)
        return (seconds - ((seconds % 3600) + 3600) % 3600) // 3600  # exact, and a floor before 1970 too
    if dialect == "postgresql":
        return sa.func.floor(sa.extract("epoch", column) / 3600)
    return None


def _sequence_events(log: EventLog, user_ids: list[str], types: tuple[str, ...]) -> pd.DataFrame:
    """Each user's events of the sequence types from the hour of their ``SEQUENCE_LENGTH``-th newest
    slot on: every event of the kept slots, plus the other slots of that hour, which the fold drops
    again (so the database's collation of item ids need not match the fold's order)."""
    of_types = sa.and_(events.c.user_id.in_(user_ids), events.c.event_type.in_(types), events.c.item_id.is_not(None))
    with log.engine.connect() as conn:
        hour = _hour(conn.dialect.name, events.c.event_timestamp)
        if hour is None:  # any other database: every such event (a superset)
            stmt = sa.select(events).where(of_types)
        else:
            slots = (sa.select(events.c.user_id, hour.label("hour"), sa.func.dense_rank().over(
                partition_by=events.c.user_id, order_by=(hour.desc(), events.c.item_id.desc(),
                                                         events.c.event_type.desc())).label("slot"))
                     .where(of_types).subquery())
            since = (sa.select(slots.c.user_id, sa.func.min(slots.c.hour).label("since"))
                     .where(slots.c.slot <= SEQUENCE_LENGTH).group_by(slots.c.user_id).subquery())
            stmt = (sa.select(events).join(since, events.c.user_id == since.c.user_id)
                    .where(of_types, hour >= since.c.since))
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


def personal_rows(log: EventLog, user_ids: list[str]) -> pd.DataFrame:
    """The users' ``user_personal`` rows, from their rows in the log."""
    with log.engine.connect() as conn:
        frame = pd.read_sql(sa.select(users).where(users.c.user_id.in_(user_ids)), conn)
    return user_personal(frame)


def item_rows(log: EventLog, item_ids: list[str], now: datetime) -> pd.DataFrame:
    """Each item's newest ``item_features`` row stamped at or before ``now``: what a full
    materialization of an offline build of today's log would put online."""
    with log.engine.connect() as conn:
        catalogue = pd.read_sql(sa.select(items).where(items.c.item_id.in_(item_ids)), conn)
        frame = pd.read_sql(sa.select(events).where(events.c.item_id.in_(item_ids)), conn)
        newest = conn.execute(sa.select(sa.func.max(events.c.event_timestamp))).scalar()
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"]).dt.tz_localize("UTC")
    last_day = last_event_day(pd.DataFrame({"event_timestamp": [newest]})) if newest is not None else None
    rows = compute_item_table(frame, catalogue, last_day)
    rows = rows[rows["event_timestamp"] <= pd.Timestamp(now).tz_localize("UTC")]
    return rows.sort_values("event_timestamp").groupby("item_id", as_index=False).tail(1)


def catalogue(log: EventLog, item_ids: Iterable[str]) -> dict:
    """item_id -> (category, price, title) for these items, read from the log (a keyed lookup)."""
    wanted = sorted({i for i in item_ids if i is not None})
    if not wanted:
        return {}
    with log.engine.connect() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.category, items.c.price, items.c.title)
                            .where(items.c.item_id.in_(wanted))).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def touched_since(log: EventLog, since: datetime) -> tuple[list[str], list[str]]:
    """Users and items with a change in the log after ``since`` (naive UTC): an upsert or a new event."""
    with log.engine.connect() as conn:
        user_ids = {r[0] for r in conn.execute(sa.select(users.c.user_id).where(users.c.updated_at > since))}
        item_ids = {r[0] for r in conn.execute(sa.select(items.c.item_id).where(items.c.updated_at > since))}
        for user_id, item_id in conn.execute(sa.select(events.c.user_id, events.c.item_id).distinct().where(
                events.c.ingested_at > since)):
            user_ids.add(user_id)
            if item_id is not None:
                item_ids.add(item_id)
    return sorted(user_ids), sorted(item_ids)
