"""The erasure lock of one event log: forget is final against every job that copies from the log.

A job that reads the log and writes a copy later (a feature build, a materialization, an ingest, a
push, batch recommendations, an export) holds the lock *shared* from its read to its write. ``persona
forget`` records the tombstone first and then takes the lock *exclusively* for its erasure: it waits
for every such job already running, and erases what they wrote; a job that starts afterwards reads a
log without the user, or is screened by the tombstone. Jobs never wait for each other.

The lock belongs to the log, not the workspace, so workspaces (and machines) that share one log share
it: Postgres advisory locks on a Postgres log; on a SQLite log, ``flock`` on a file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

ADVISORY_KEY = zlib.crc32(b"persona-erasure")  # one advisory lock id per database


def lock_file(url: str) -> Path | None:
    """Beside a SQLite log's database file (every process that opens the log finds it); None for an
    in-memory log, which no other process can open."""
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(f"{Path(database).resolve()}.erasure.lock")


@contextlib.contextmanager
def held(engine: sa.Engine, *, exclusive: bool = False) -> Iterator[None]:
    """Hold the log's erasure lock (shared by default) for the block."""
    if engine.dialect.name == "postgresql":
        kind = "" if exclusive else "_shared"
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sa.text(f"SELECT pg_advisory_lock{kind}(:k)"), {"k": ADVISORY_KEY})
            try:
                yield
            finally:
                conn.execute(sa.text(f"SELECT pg_advisory_unlock{kind}(:k)"), {"k": ADVISORY_KEY})
        return
    path = lock_file(engine.url.render_as_string(hide_password=False)) if engine.dialect.name == "sqlite" else None
    if path is None:  # another backend, or an in-memory log: forget's re-run finds anything written back
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
