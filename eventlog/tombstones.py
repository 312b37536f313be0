"""Tombstones of erased users, kept in the event-log database, and the ingest filter that honours them.

A tombstone holds the salted hash of the erased id and the time, never the id: enough to skip the
user's rows when an old file is ingested again, nothing to re-identify them by.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa

from eventlog.sources import Batch, TableBatch

tombstone_metadata = sa.MetaData()
tombstones = sa.Table(
    "privacy_tombstones", tombstone_metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("erased_at", sa.DateTime, nullable=False),  # naive UTC, as in the event log
    sa.Column("reason", sa.Text),
    sa.Column("completed_at", sa.DateTime),  # set once every store is clean; null: re-run `forget`
)


_ENSURED: set[str] = set()


def ensure(engine: sa.Engine) -> None:
    """Create the table once per database and process (ingest calls this on every batch)."""
    key = engine.url.render_as_string(hide_password=True)
    if key not in _ENSURED:
        tombstone_metadata.create_all(engine)
        _ENSURED.add(key)


def record(engine: sa.Engine, hashes: list[str], reason: str | None) -> None:
    """A tombstone per hash (an existing one keeps its first erasure time)."""
    ensure(engine)
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        known = {r[0] for r in conn.execute(sa.select(tombstones.c.id_hash).where(tombstones.c.id_hash.in_(hashes)))}
        fresh = [{"id_hash": h, "erased_at": now, "reason": reason} for h in hashes if h not in known]
        if fresh:
            conn.execute(tombstones.insert(), fresh)
        conn.execute(tombstones.update().where(tombstones.c.id_hash.in_(hashes)).values(completed_at=None))


def pending(engine: sa.Engine, hashes: list[str]) -> set[str]:
    """Hashes whose erasure was started but not completed (a re-run must finish it)."""
    ensure(engine)
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.select(tombstones.c.id_hash).where(
            tombstones.c.id_hash.in_(hashes), tombstones.c.completed_at.is_(None)))}


def complete(engine: sa.Engine, hashes: list[str]) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(tombstones.update().where(tombstones.c.id_hash.in_(hashes)).values(completed_at=now))


def count(engine: sa.Engine) -> int:
    """How many tombstones there are (a running service checks this on each tick)."""
    ensure(engine)
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tombstones)).scalar() or 0)


def erased_hashes(engine: sa.Engine) -> set[str]:
    ensure(engine)
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.select(tombstones.c.id_hash))}


def listing(engine: sa.Engine) -> pd.DataFrame:
    ensure(engine)
    with engine.connect() as conn:
        return pd.read_sql(sa.select(tombstones).order_by(tombstones.c.erased_at), conn)


def drop_erased(batch: Batch, engine: sa.Engine, hash_id) -> tuple[Batch, dict[str, np.ndarray]]:
    """The batch without rows of erased users, and per table that lost rows, the mask of rows kept.

    ``hash_id`` maps a stored user id to its tombstone hash (the workspace's salt)."""
    erased = erased_hashes(engine)
    if not erased:
        return batch, {}
    tables, kept = {}, {}
    for name, tb in batch.tables.items():
        if name not in ("users", "events") or tb.frame.empty:
            tables[name] = tb
            continue
        ids = tb.frame["user_id"].astype(object)
        gone = np.fromiter((v is not None and not pd.isna(v) and hash_id(str(v)) in erased for v in ids),
                           dtype=bool, count=len(ids))
        tables[name] = subset(tb, ~gone) if gone.any() else tb
        if gone.any():
            kept[name] = ~gone
    return replace(batch, tables=tables), kept


def subset(tb: TableBatch, keep: np.ndarray) -> TableBatch:
    """The rows of ``tb`` where ``keep`` is true, with cell issues renumbered to match."""
    new_pos = np.cumsum(keep) - 1
    issues = [replace(i, row=int(new_pos[i.row])) for i in tb.issues if keep[i.row]]
    return replace(tb, frame=tb.frame[keep].reset_index(drop=True), raw=tb.raw[keep].reset_index(drop=True),
                   row_numbers=tb.row_numbers[keep], issues=issues)
