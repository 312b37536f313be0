"""Keep the online store equal to the event log: every key a batch touched is written online from
the log, by the same code as the ``/events`` push.

Feast's incremental materialization loads only rows stamped after its previous run. That misses
what a shop's second day brings: a new user's personal row and a new or edited item (stamped at
the epoch so that every training row sees the catalogue), and a late event that changes a state
row stamped earlier. So ``persona features materialize`` runs Feast's materialization and then
syncs every user and item the log touched since the previous sync (an ``updated_at`` or an event's
``ingested_at`` after it): their newest state is recomputed from the log and written online. The
event log stays the one source of truth, and the write does not depend on stamps being newer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from core.config import DEFAULT_SEQUENCE_TYPES
from eventlog.store import EventLog, utcnow
from feature_repo.pipeline.history import item_rows, personal_rows, touched_since
from feature_repo.pipeline.push import push_latest, push_users

SYNC_FILE = "online_sync.json"
# Keys touched a little before the previous sync are synced again: a batch whose transaction was
# still open then stamped its rows before it committed. Writing a key twice changes nothing.
OVERLAP = timedelta(minutes=10)
CHUNK = 2_000  # keys per push: bounds memory on a day that touches every user


def sync_keys(store, log: EventLog, user_ids: list[str], item_ids: list[str],
              progress: Callable[[int], None] | None = None,
              sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> None:
    """Write the newest state of these users and items online, recomputed from the log
    (``sequence_types``: the workspace's ``Config.sequence_types``, as the build and the push use them)."""
    now = utcnow()
    catalogue = log.read_table("items") if user_ids else None
    for chunk in _chunks(user_ids):
        push_latest(store, {"user_personal": personal_rows(log, chunk)})
        push_users(store, log, chunk, items=catalogue, sequence_types=sequence_types)
        if progress:
            progress(len(chunk))
    for chunk in _chunks(item_ids):
        push_latest(store, {"item_features": item_rows(log, chunk, now)})
        if progress:
            progress(len(chunk))


def sync_online(store, log: EventLog, workspace: Path,
                progress: Callable[[int, int], Callable[[int], None] | None] | None = None,
                sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict:
    """Sync every key touched since the previous sync (or, the first time, since the build read the
    log), then move the mark. ``progress(total, done)`` may return a per-chunk callback.
    ``sequence_types``: the workspace's ``Config.sequence_types``."""
    started = utcnow()
    since = _last_mark(workspace)
    user_ids, item_ids = touched_since(log, since - OVERLAP)
    tick = progress(len(user_ids) + len(item_ids)) if progress else None
    sync_keys(store, log, user_ids, item_ids, tick, sequence_types)
    _mark_path(workspace).write_text(json.dumps({"synced_at": started.isoformat(), "users": len(user_ids),
                                                 "items": len(item_ids)}, indent=2))
    return {"users": len(user_ids), "items": len(item_ids), "since": since.isoformat()}


def _mark_path(workspace: Path) -> Path:
    return Path(workspace) / "feast" / SYNC_FILE


def _last_mark(workspace: Path) -> datetime:
    """The previous sync's start; before any sync, the time the last build read the log."""
    for path, key in ((_mark_path(workspace), "synced_at"),
                      (Path(workspace) / "feast" / "last_build.json", "log_read_at")):
        if path.exists() and (value := json.loads(path.read_text()).get(key)):
            return datetime.fromisoformat(value).replace(tzinfo=None)
    return datetime(1970, 1, 1)


def _chunks(keys: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(keys), CHUNK):
        yield keys[start:start + CHUNK]
