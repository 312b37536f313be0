"""The event log: Persona's system of record, kept through SQLAlchemy (SQLite or Postgres).

Events are appended only and are idempotent on ``event_id``; users and items are upserted
(columns absent from a batch keep their stored values). Each write happens in one transaction,
so a failed batch leaves no partial rows. Timestamps are stored as naive UTC.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from core.contract import CONTRACT, KEY_COLUMN

_SQL_TYPES = {"string": sa.Text, "int": sa.BigInteger, "float": sa.Float, "timestamp": sa.DateTime}

metadata = sa.MetaData()


def _contract_table(name: str, *extra: sa.Column) -> sa.Table:
    cols = [sa.Column(c.name, _SQL_TYPES[c.type](), primary_key=c.name == KEY_COLUMN[name],
                      nullable=c.name != KEY_COLUMN[name]) for c in CONTRACT[name]]
    return sa.Table(name, metadata, *cols, sa.Column("extra", sa.Text), *extra)


users = _contract_table("users", sa.Column("updated_at", sa.DateTime))
items = _contract_table("items", sa.Column("updated_at", sa.DateTime))
events = _contract_table("events", sa.Column("batch_id", sa.String(36)),
                         sa.Column("ingested_at", sa.DateTime))
sa.Index("ix_events_user_time", events.c.user_id, events.c.event_timestamp)
sa.Index("ix_events_time", events.c.event_timestamp)
# /rank leaves out a user's engaged items: this index answers that query alone. Through the one above,
# a user with 10,000 events cost 10,000 row reads (4.5 ms on SQLite) whatever few of them counted.
sa.Index("ix_events_user_type_item", events.c.user_id, events.c.event_type, events.c.item_id)

batches = sa.Table(
    "batches", metadata,
    sa.Column("batch_id", sa.String(36), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    # accepted (a file or SQL batch: the column baseline) | held | replay | api (POST /events)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("summary", sa.Text, nullable=False),  # JSON: kind, counts, columns per table, notes
)
# Batches that older versions recorded as "accepted" although they set no column baseline.
_NOT_A_BASELINE = ("POST /events", "quarantine replay")

quarantine = sa.Table(
    "quarantine", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(36), nullable=False, index=True),
    sa.Column("table_name", sa.String(16), nullable=False),
    sa.Column("row_number", sa.Integer),  # 1-based data row in the source file or table
    sa.Column("record_key", sa.Text),  # event_id / user_id / item_id when the row had one
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("column_name", sa.String(128)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # JSON of the original row as text
    sa.Column("status", sa.String(16), nullable=False),  # open | held | replayed
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("resolved_at", sa.DateTime),
)

TABLES = {"users": users, "items": items, "events": events}


# What makes two events with one event_id the same event (an idempotent re-delivery).
COMPARED_COLUMNS = ["user_id", "event_timestamp", "event_type", "item_id", "query", "text", "rating",
                    "value", "device", "channel", "session_id"]


@dataclass
class WriteCounts:
    new: int = 0  # rows that were not in the log before
    existing: int = 0  # events already in the log with the same content (idempotent skip), or users/items updated
    # Events not written because the log holds their event_id with other content (another writer
    # got there first): frame index label -> the compared columns that differ. Not written, never
    # silently: the caller quarantines them.
    conflicts: dict = field(default_factory=dict)
    inserted: set = field(default_factory=set)  # the event ids this write stored (events only)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_batch_id() -> str:
    return str(uuid.uuid4())


class EventLog:
    """Thin, explicit access to the event-log database."""

    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:  # create_all skips a table that exists, and with it a newer index
            if self.engine.dialect.name == "postgresql":  # two opening at once: IF NOT EXISTS alone races there
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('persona_eventlog_indexes'))"))
            for index in events.indexes:
                conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))

    def dispose(self) -> None:
        self.engine.dispose()

    # --- writing ------------------------------------------------------------------------------
    def write(self, conn: sa.Connection, table: str, frame: pd.DataFrame, present: Iterable[str],
              batch_id: str, *, checked: Iterable[str] = ()) -> WriteCounts:
        """Append events (skip known ids) or upsert users/items, inside the caller's transaction.

        The counts come from the write itself (the ids the insert returned, or a keyed lookup of
        the batch's own keys), never from counting the table, so a write costs the same on a log
        of any size. An event whose id the log already holds is compared with the stored row: the
        same content is an idempotent re-delivery (``existing``), other content is a conflict
        (``conflicts``). ``checked`` names event ids already compared (by the gate) and found equal.
        """
        if frame.empty:
            return WriteCounts()
        tbl = TABLES[table]
        key = KEY_COLUMN[table]
        contract_cols = [c.name for c in CONTRACT[table]]
        extras = [c for c in frame.columns if c not in contract_cols]
        update_cols = [c for c in contract_cols if c in set(present) and c != key]
        if extras:
            update_cols.append("extra")
        records = _records(frame, contract_cols, extras)
        now = utcnow()
        stamp = {"batch_id": batch_id, "ingested_at": now} if table == "events" else {"updated_at": now}
        for rec in records:
            rec.update(stamp)
        keys = [r[key] for r in records]
        dialect = conn.dialect.name
        insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
        if table == "events":
            if insert is not None:
                stmt = insert(tbl).on_conflict_do_nothing(index_elements=[key]).returning(tbl.c[key])
                inserted: set = set()
                for chunk in _chunks(records, 20_000):
                    inserted.update(conn.execute(stmt, chunk).scalars())
            else:  # any other SQLAlchemy backend: look up existing keys first
                known = self._keys_in(conn, table, keys)
                fresh = [r for r in records if r[key] not in known]
                if fresh:
                    conn.execute(tbl.insert(), fresh)
                inserted = {r[key] for r in fresh}
            skipped = [k for k in keys if k not in inserted]
            unchecked = set(skipped) - set(checked)
            conflicts: dict = {}
            if unchecked:
                mine = frame[frame[key].isin(unchecked).to_numpy(dtype=bool)]
                stored = self._stored_events(conn, sorted(unchecked))
                conflicts = {label: cols for label, cols in differing_columns(mine, stored).items() if cols}
            return WriteCounts(new=len(inserted), existing=len(skipped) - len(conflicts), conflicts=conflicts,
                               inserted=inserted)
        known = self._keys_in(conn, table, keys)
        if insert is not None:
            ins = insert(tbl)
            stmt = ins.on_conflict_do_update(index_elements=[key], set_={
                c: ins.excluded[c] for c in update_cols + ["updated_at"]})
            for chunk in _chunks(records, 20_000):
                conn.execute(stmt, chunk)
        else:
            fresh = [r for r in records if r[key] not in known]
            if fresh:
                conn.execute(tbl.insert(), fresh)
            for r in (r for r in records if r[key] in known):
                conn.execute(tbl.update().where(tbl.c[key] == r[key]).values(
                    {c: r[c] for c in update_cols + ["updated_at"]}))
        return WriteCounts(new=len(records) - len(known), existing=len(known))

    def record_batch(self, conn: sa.Connection, batch_id: str, source: str, status: str,
                     summary: dict) -> None:
        conn.execute(batches.insert().values(batch_id=batch_id, source=source, created_at=utcnow(),
                                             status=status, summary=json.dumps(summary, default=str)))

    def quarantine_rows(self, conn: sa.Connection, rows: list[dict]) -> None:
        now = utcnow()
        for chunk in _chunks([{**r, "created_at": now} for r in rows], 5_000):
            conn.execute(quarantine.insert(), chunk)

    # --- reading ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            out = {name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                   for name, t in TABLES.items()}
            out["quarantined"] = conn.execute(
                sa.select(sa.func.count()).select_from(quarantine)
                .where(quarantine.c.status != "replayed")).scalar_one()
        return out

    def time_range(self) -> tuple[datetime | None, datetime | None]:
        with self.engine.connect() as conn:
            lo, hi = conn.execute(sa.select(sa.func.min(events.c.event_timestamp),
                                            sa.func.max(events.c.event_timestamp))).one()
        return _as_utc(lo), _as_utc(hi)

    def existing_keys(self, table: str, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` are already stored."""
        keys = list(dict.fromkeys(str(k) for k in keys))
        if not keys:
            return set()
        col = TABLES[table].c[KEY_COLUMN[table]]
        with self.engine.connect() as conn:
            if conn.execute(sa.select(col).limit(1)).first() is None:
                return set()  # an empty table holds none of them: the first load skips the lookup
            return self._keys_in(conn, table, keys)

    @staticmethod
    def _keys_in(conn: sa.Connection, table: str, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` ``table`` holds, seen from ``conn`` (a keyed lookup, not a scan).

        SQLite and Postgres take the whole key list as one parameter (a JSON array or a text
        array), which is far faster than rendering an IN list of a million bound values.
        """
        keys = list(dict.fromkeys(str(k) for k in keys))
        if not keys:
            return set()
        name = KEY_COLUMN[table]
        col = TABLES[table].c[name]
        dialect = conn.dialect.name
        if dialect == "sqlite":
            stmt = sa.text(f"SELECT {name} FROM {table} WHERE {name} IN (SELECT value FROM json_each(:keys))")
            return {r[0] for r in conn.execute(stmt, {"keys": json.dumps(keys)})}
        if dialect == "postgresql":
            stmt = sa.select(col).where(col == sa.func.any(sa.bindparam("keys", type_=postgresql.ARRAY(sa.Text))))
            return {r[0] for r in conn.execute(stmt, {"keys": keys})}
        found: set[str] = set()
        for chunk in _chunks(keys, 5_000):
            found |= {r[0] for r in conn.execute(sa.select(col).where(col.in_(chunk)))}
        return found

    def stored_events(self, event_ids: Iterable[str]) -> pd.DataFrame:
        """Full stored rows for those of ``event_ids`` the log already holds."""
        ids = sorted(self.existing_keys("events", event_ids))
        with self.engine.connect() as conn:
            return self._stored_events(conn, ids)

    @staticmethod
    def _stored_events(conn: sa.Connection, ids: list[str]) -> pd.DataFrame:
        frames = [pd.read_sql(sa.select(events).where(events.c.event_id.in_(chunk)), conn)
                  for chunk in _chunks(ids, 5_000)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def read_table(self, table: str) -> pd.DataFrame:
        with self.engine.connect() as conn:
            frame = pd.read_sql(sa.select(TABLES[table]), conn)
        for c in CONTRACT[table]:
            if c.type == "timestamp":
                frame[c.name] = pd.to_datetime(frame[c.name]).dt.tz_localize("UTC")
        return frame

    def event_chunks(self, columns: list[str], types: Iterable[str], since: datetime | None = None,
                     distinct: bool = False, rows: int = 200_000) -> Iterator[pd.DataFrame]:
        """The events of ``types`` with an item (from ``since`` on), only ``columns``, ``rows`` at a time
        (a server-side cursor on Postgres): a reader whose memory does not grow with the log.
        ``distinct``: each combination of the columns once."""
        query = sa.select(*[events.c[c] for c in columns]).where(
            events.c.event_type.in_(list(types)), events.c.item_id.is_not(None))
        if since is not None:
            query = query.where(events.c.event_timestamp >= _naive_utc(since))
        if distinct:
            query = query.distinct()
        with self.engine.connect().execution_options(stream_results=True, max_row_buffer=rows) as conn:
            for frame in pd.read_sql(query, conn, chunksize=rows):
                if "event_timestamp" in frame:
                    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"]).dt.tz_localize("UTC")
                yield frame

    def item_counts(self, types: Iterable[str], since: datetime | None = None,
                    before: datetime | None = None) -> pd.Series:
        """Each item's events of ``types`` in [since, before) (either end open when None), counted by the
        database: item_id -> count."""
        query = sa.select(events.c.item_id, sa.func.count().label("n")).where(
            events.c.event_type.in_(list(types)), events.c.item_id.is_not(None)).group_by(events.c.item_id)
        if since is not None:
            query = query.where(events.c.event_timestamp >= _naive_utc(since))
        if before is not None:
            query = query.where(events.c.event_timestamp < _naive_utc(before))
        with self.engine.connect() as conn:
            frame = pd.read_sql(query, conn)
        return frame.set_index("item_id")["n"]

    def last_columns(self, table: str) -> list[str] | None:
        """The columns of the newest accepted file or SQL batch that carried ``table`` (for schema drift).

        API requests and replays are recorded under their own status and never set the baseline.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(batches.c.source, batches.c.summary)
                                .where(batches.c.status == "accepted")
                                .order_by(batches.c.created_at.desc()))
            for source, summary in rows:
                data = json.loads(summary)
                if data.get("kind", "files" if source not in _NOT_A_BASELINE else None) not in ("files", "sql"):
                    continue
                cols = data.get("columns", {}).get(table)
                if cols is not None:
                    return cols
        return None

    def batch_summary(self, batch_id: str) -> str | None:
        """The JSON summary recorded for ``batch_id`` (None for an unknown batch)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(batches.c.summary).where(batches.c.batch_id == batch_id)).scalar()

    def quarantined(self, status: str | None = None) -> pd.DataFrame:
        stmt = sa.select(quarantine).order_by(quarantine.c.id)
        if status:
            stmt = stmt.where(quarantine.c.status == status)
        with self.engine.connect() as conn:
            return pd.read_sql(stmt, conn)

    @staticmethod
    def open_quarantined(conn: sa.Connection) -> int:
        """Rows the quarantine holds that were not replayed (its bound counts these)."""
        return conn.execute(sa.select(sa.func.count()).select_from(quarantine)
                            .where(quarantine.c.status != "replayed")).scalar_one()

    def update_quarantine(self, conn: sa.Connection, qid: int, values: dict) -> None:
        conn.execute(quarantine.update().where(quarantine.c.id == qid).values(**values))

    def resolve_quarantine(self, conn: sa.Connection, ids: list[int]) -> None:
        now = utcnow()
        for chunk in _chunks(ids, 20_000):
            conn.execute(quarantine.update().where(quarantine.c.id.in_(chunk))
                         .values(status="replayed", resolved_at=now))


def differing_columns(mine: pd.DataFrame, stored: pd.DataFrame) -> dict:
    """For each event of ``mine`` (by index label) whose event_id ``stored`` holds: the compared
    columns whose values differ (an empty list: the same event, re-delivered).

    ``stored`` is read from the log (naive UTC timestamps); ``mine`` is a normalised batch frame.
    """
    if stored.empty or mine.empty:
        return {}
    stored = stored[["event_id", *COMPARED_COLUMNS]].copy()
    stored["event_timestamp"] = pd.to_datetime(stored["event_timestamp"]).dt.tz_localize("UTC")
    left = mine[["event_id", *COMPARED_COLUMNS]].assign(_label=mine.index)
    both = left.merge(stored, on="event_id", suffixes=("", "_log"))
    differs = np.column_stack([~_equal(both[c], both[f"{c}_log"]) for c in COMPARED_COLUMNS]) \
        if len(both) else np.zeros((0, len(COMPARED_COLUMNS)), dtype=bool)
    return {label: [c for c, f in zip(COMPARED_COLUMNS, flags, strict=True) if f]
            for label, flags in zip(both["_label"], differs, strict=True)}


def _equal(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Element-wise equality where null equals null and numbers compare with a tolerance."""
    a_na, b_na = a.isna().to_numpy(), b.isna().to_numpy()
    if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
        close = np.isclose(a.to_numpy(dtype=float, na_value=np.nan), b.to_numpy(dtype=float, na_value=np.nan))
    elif pd.api.types.is_datetime64_any_dtype(a):
        close = (a == b).fillna(False).to_numpy(dtype=bool)
    else:
        close = (a.astype("string") == b.astype("string")).fillna(False).to_numpy(dtype=bool)
    return (a_na & b_na) | (~a_na & ~b_na & close)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _as_utc(value) -> datetime | None:
    if value is None:
        return None
    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def _naive_utc(value) -> datetime:
    """A time as the log stores it: naive UTC."""
    return _as_utc(value).replace(tzinfo=None)


def _records(frame: pd.DataFrame, contract_cols: list[str], extras: list[str]) -> list[dict]:
    """Rows as plain Python values: None for nulls, naive-UTC datetimes, extras folded into JSON."""
    data: dict[str, list] = {}
    for col in contract_cols:
        s = frame[col]
        if isinstance(s.dtype, pd.DatetimeTZDtype):
            naive = s.dt.tz_convert("UTC").dt.tz_localize(None).astype(object)
            data[col] = [None if pd.isna(v) else v.to_pydatetime() for v in naive]
        else:
            arr = s.astype(object).to_numpy()
            mask = pd.isna(arr)
            arr[mask] = None
            if s.dtype.kind in "iuf" or str(s.dtype) in ("Int64", "Float64"):
                arr = np.array([v if v is None else v.item() if hasattr(v, "item") else v for v in arr],
                               dtype=object)
            data[col] = arr.tolist()
    if extras:
        sub = frame[extras].astype(object).where(frame[extras].notna(), None)
        data["extra"] = [json.dumps(r, ensure_ascii=False) for r in sub.to_dict("records")]
    keys = list(data)
    return [dict(zip(keys, row, strict=True)) for row in zip(*data.values(), strict=True)]


def _chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
