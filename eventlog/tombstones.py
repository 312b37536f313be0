"""Tombstones of erased users, kept in the event-log database beside the events they outlive.

A tombstone holds the salted hash of the erased id and the time, never the id: enough to skip the
user's rows when an old file is ingested again, nothing to re-identify them by. It lives with the log
(not the workspace), so every workspace that shares one log honours every erasure made through it.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime

import sqlalchemy as sa

from core.privacy import Privacy

tombstone_metadata = sa.MetaData()
tombstones = sa.Table(
    "privacy_tombstones", tombstone_metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("erased_at", sa.DateTime, nullable=False),  # naive UTC, as in the event log
    sa.Column("reason", sa.Text),
    sa.Column("completed_at", sa.DateTime),  # set once every store is clean; null: re-run `forget`
)


# The salt every tombstone of this log is hashed with. It lives in the log, not in a workspace, so
# workspaces that share one log (``PERSONA_EVENT_LOG_URL``) hash alike and honour each other's erasures.
salt_table = sa.Table(
    "privacy_salt", tombstone_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # one row: id 1
    sa.Column("salt", sa.Text, nullable=False),
)

_ENSURED: set[str] = set()


def ensure(engine: sa.Engine) -> None:
    """Create the table once per database and process (ingest calls this on every batch)."""
    key = engine.url.render_as_string(hide_password=True)
    if key not in _ENSURED:
        tombstone_metadata.create_all(engine)
        _ENSURED.add(key)


def log_salt(engine: sa.Engine, candidate: bytes | None) -> bytes | None:
    """The log's salt; on first use, ``candidate`` (the environment's or the first workspace's salt,
    which that workspace's earlier tombstones were hashed with) becomes it."""
    ensure(engine)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(salt_table.c.salt).where(salt_table.c.id == 1)).scalar()
    if stored is None and candidate:
        try:
            with engine.begin() as conn:
                conn.execute(salt_table.insert().values(id=1, salt=candidate.decode()))
        except sa.exc.IntegrityError:  # another process stored one first: theirs holds
            pass
        with engine.connect() as conn:
            stored = conn.execute(sa.select(salt_table.c.salt).where(salt_table.c.id == 1)).scalar()
    return stored.encode() if stored is not None else None


def bound_to_log(privacy: Privacy, engine: sa.Engine) -> Privacy:
    """``privacy`` with the log's salt: what every tombstone hash of this log is made with."""
    salt = log_salt(engine, privacy.salt)
    return privacy if salt == privacy.salt else replace(privacy, salt=salt)


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


class ErasedSet:
    """The erased hashes, read whole only when the tombstones changed.

    Tombstones are only ever added, so their count is a version: each call costs one ``count(*)``
    and a full read happens once per erasure, whichever process (CLI, another replica) made it."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._version = -1
        self._hashes: frozenset[str] = frozenset()

    def hashes(self) -> frozenset[str]:
        version = count(self.engine)
        with self._lock:
            if version != self._version:
                self._hashes, self._version = frozenset(erased_hashes(self.engine)), version
            return self._hashes

    def invalidate(self) -> None:
        """Forget what was read (``persona forget`` in this process calls it; the count covers others)."""
        with self._lock:
            self._version = -1
