"""Erase users from the event log: their events, their users row, their quarantined rows.

The log is otherwise append-only; erasure is the one rewrite. Deleted rows must not survive in
free pages either: SQLite runs with ``secure_delete`` and is vacuumed (and its WAL truncated),
Postgres gets ``VACUUM FULL`` on the touched tables, which rewrites them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd
import sqlalchemy as sa

from eventlog.store import EventLog, events, quarantine, users

TOUCHED = ("events", "users", "quarantine", "batches")


@dataclass
class LogErasure:
    events: int = 0
    users: int = 0
    quarantine: int = 0
    texts: set[str] = field(default_factory=set)  # the users' own query/review texts (to scrub elsewhere)


def user_texts(log: EventLog, user_ids: list[str]) -> set[str]:
    """Query and review texts only these users wrote (a text others wrote too identifies no one)."""
    with log.engine.connect() as conn:
        rows = conn.execute(sa.select(events.c.query, events.c.text).where(events.c.user_id.in_(user_ids))).all()
        mine = {t for r in rows for t in r if isinstance(t, str) and len(t.strip()) >= 6}
        mine |= {t for p in _quarantined_payloads(conn, user_ids).values() for t in
                 (p.get("query"), p.get("text")) if isinstance(t, str) and len(t.strip()) >= 6}
        shared = set()
        for text in mine:
            other = conn.execute(sa.select(sa.func.count()).select_from(events).where(
                sa.or_(events.c.query == text, events.c.text == text), events.c.user_id.not_in(user_ids))).scalar()
            if other:
                shared.add(text)
    return mine - shared


def erase_users(log: EventLog, user_ids: list[str]) -> LogErasure:
    """Delete the users' rows in one transaction, then reclaim the freed pages."""
    out = LogErasure(texts=user_texts(log, user_ids))
    with log.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA secure_delete = ON")
        out.events = conn.execute(events.delete().where(events.c.user_id.in_(user_ids))).rowcount
        out.users = conn.execute(users.delete().where(users.c.user_id.in_(user_ids))).rowcount
        ids = list(_quarantined_payloads(conn, user_ids))
        for start in range(0, len(ids), 5000):
            out.quarantine += conn.execute(quarantine.delete().where(
                quarantine.c.id.in_(ids[start:start + 5000]))).rowcount
    reclaim(log.engine)
    return out


def _quarantined_payloads(conn: sa.Connection, user_ids: list[str]) -> dict[int, dict]:
    """Quarantined rows that belong to the users: a users row keyed by one of them, or any row whose
    ``user_id`` is one of them, padding aside (the quarantine keeps a row as it came). An item or an
    event whose key happens to equal a user id is not theirs, nor a row that only mentions the id."""
    found: dict[int, dict] = {}
    wanted = {str(u).strip() for u in user_ids}
    for uid in user_ids:
        like = f"%{_like_escaped(str(uid).strip())}%"
        stmt = sa.select(quarantine.c.id, quarantine.c.table_name, quarantine.c.payload, quarantine.c.record_key).where(
            sa.or_(quarantine.c.record_key.like(like, escape="\\"), quarantine.c.payload.like(like, escape="\\")))
        for qid, table, payload, key in conn.execute(stmt):
            try:
                row = json.loads(payload)
            except ValueError:
                row = {}
            owner = row.get("user_id") if isinstance(row, dict) else None
            if (table == "users" and str(key).strip() in wanted) or (
                    owner is not None and str(owner).strip() in wanted):
                found[int(qid)] = row
    return found


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def reclaim(engine: sa.Engine, tables: tuple[str, ...] = TOUCHED) -> None:
    """Rewrite the database so deleted rows leave no bytes behind in free pages or the WAL."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("PRAGMA secure_delete = ON")
            conn.exec_driver_sql("VACUUM")
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            existing = set(sa.inspect(conn).get_table_names())
            for name in tables:
                if name in existing:
                    conn.exec_driver_sql(f'VACUUM FULL "{name}"')


def open_snapshots(engine: sa.Engine) -> int:
    """Other sessions of this Postgres database inside a transaction: while one runs, ``VACUUM FULL``
    must keep the rows it might still see, so an erasure is complete only once they end."""
    if engine.dialect.name != "postgresql":
        return 0
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL AND backend_type = 'client backend'")).scalar()


def holds(log: EventLog, user_ids: list[str]) -> dict[str, int]:
    """How many rows of the users each table still holds (an erasure is done when all are 0)."""
    with log.engine.connect() as conn:
        return {"events": conn.execute(sa.select(sa.func.count()).select_from(events)
                                       .where(events.c.user_id.in_(user_ids))).scalar(),
                "users": conn.execute(sa.select(sa.func.count()).select_from(users)
                                      .where(users.c.user_id.in_(user_ids))).scalar(),
                "quarantine": len(_quarantined_payloads(conn, user_ids))}


def user_rows(log: EventLog, user_ids: list[str]) -> dict[str, pd.DataFrame]:
    """Everything the log holds about the users (for `persona export`)."""
    with log.engine.connect() as conn:
        q = _quarantined_payloads(conn, user_ids)
        return {"users": pd.read_sql(sa.select(users).where(users.c.user_id.in_(user_ids)), conn),
                "events": pd.read_sql(sa.select(events).where(events.c.user_id.in_(user_ids))
                                      .order_by(events.c.event_timestamp), conn),
                "quarantine": pd.read_sql(sa.select(quarantine).where(quarantine.c.id.in_(list(q))), conn)
                if q else pd.DataFrame()}
