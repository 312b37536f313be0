"""Each feature store erases its own copies of users, and gives their rows to ``persona export``.

Erasure covers every offline table on every profile, and the online store.

Offline tables are derived copies of the event log, so erasure rewrites them without the users'
rows: Parquet files (local and spark part files, staging folders included) are rewritten and
swapped in, DuckDB files are copied into a fresh file, and the Postgres tables ``persona_<view>``
lose the rows and get ``VACUUM FULL``. Online, every view keyed by ``user_id`` loses the users' keys:
SQLite rows by their serialised entity key (then ``VACUUM``), Redis hashes by their key.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from core.plain import plain
from feature_repo.pipeline import feast_adapter
from feature_repo.pipeline.feast_config import TABLES, yaml_path
from feature_repo.pipeline.registry import feature_store

KEY = "user_id"


def erase_offline(profile: str, workspace: Path, user_ids: list[str]) -> dict[str, int]:
    """Rows removed per table. Files are handled whatever the profile (a workspace may have switched)."""
    removed = erase_parquet(workspace / "offline", user_ids)
    for path in sorted(Path(workspace).rglob("*.duckdb")):
        removed |= {str(path.relative_to(workspace)): erase_duckdb(path, user_ids)}
    if profile == "prod" or os.environ.get("PERSONA_POSTGRES_URL"):
        url = os.environ.get("PERSONA_POSTGRES_URL")
        if url:
            removed |= erase_postgres(url, user_ids)
    return removed


def erase_parquet(folder: Path, user_ids: list[str]) -> dict[str, int]:
    """Rewrite every Parquet file under ``folder`` that holds the users (tables and Spark part files), and
    delete what a killed build left half written (``*.tmp``, listed with 0 rows)."""
    removed: dict[str, int] = {}
    if not folder.exists():
        return removed
    for stale in sorted(folder.rglob("*.tmp")):  # a write killed half way: forget holds the lock, none is live
        stale.unlink()
        removed[str(stale.relative_to(folder.parent))] = 0
    for path in sorted(folder.rglob("*.parquet")):
        if n := erase_parquet_file(path, user_ids):
            removed[str(path.relative_to(folder.parent))] = n
    return removed


def erase_parquet_file(path: Path, user_ids: list[str]) -> int:
    """Rewrite one Parquet file without the users' rows (matched on ``user_id`` exactly), swapped in; the
    rows removed. Timestamps stay microseconds (what Spark reads), and Hadoop's checksum of the old bytes
    goes with them (Spark would refuse the new ones). A file without the column is left alone."""
    if KEY not in pq.read_schema(path).names:
        return 0
    table = pq.read_table(path)
    hit = pc.fill_null(pc.is_in(pc.cast(table[KEY], pa.string()), value_set=pa.array(user_ids, pa.string())), False)
    n = pc.sum(hit).as_py() or 0
    if n:
        tmp = path.with_name(f".{path.name}.erase.tmp")
        pq.write_table(table.filter(pc.invert(hit)), tmp, coerce_timestamps="us", allow_truncated_timestamps=True)
        tmp.replace(path)
        path.with_name(f".{path.name}.crc").unlink(missing_ok=True)
    return n


def erase_duckdb(path: Path, user_ids: list[str]) -> int:
    """Delete the users' rows, then copy the database into a new file: DuckDB keeps freed blocks."""
    import duckdb

    fresh = path.with_name(f".{path.name}.erase.tmp")
    fresh.unlink(missing_ok=True)
    n = 0
    con = duckdb.connect(str(path))
    try:
        tables = con.execute("SELECT table_schema, table_name FROM information_schema.columns "
                             "WHERE column_name = ?", [KEY]).fetchall()
        for schema, name in tables:
            n += con.execute(f'SELECT count(*) FROM "{schema}"."{name}" WHERE {KEY} IN (SELECT unnest(?))',
                             [user_ids]).fetchone()[0]
            con.execute(f'DELETE FROM "{schema}"."{name}" WHERE {KEY} IN (SELECT unnest(?))', [user_ids])
        db = con.execute("SELECT current_database()").fetchone()[0]
        con.execute(f"ATTACH '{fresh}' AS erased_copy")
        con.execute(f'COPY FROM DATABASE "{db}" TO erased_copy')
        con.execute("DETACH erased_copy")
    finally:
        con.close()
    fresh.replace(path)
    Path(f"{path}.wal").unlink(missing_ok=True)
    return n


def _postgres_user_tables(conn: sa.Connection) -> list[str]:
    """The offline tables ``persona_<view>`` keyed by user (erase and export scan the same ones)."""
    inspector = sa.inspect(conn)
    return sorted(name for name in inspector.get_table_names()
                  if name.startswith("persona_") and KEY in {c["name"] for c in inspector.get_columns(name)})


def erase_postgres(url: str, user_ids: list[str]) -> dict[str, int]:
    """Delete from every ``persona_*`` table keyed by user, then ``VACUUM FULL`` the touched ones."""
    engine = sa.create_engine(url)
    removed: dict[str, int] = {}
    try:
        with engine.begin() as conn:
            for name in _postgres_user_tables(conn):
                removed[name] = conn.execute(sa.text(f'DELETE FROM "{name}" WHERE {KEY} = ANY(:ids)'),
                                             {"ids": user_ids}).rowcount
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for name in removed:
                conn.exec_driver_sql(f'VACUUM FULL "{name}"')
    finally:
        engine.dispose()
    return removed


def erase_online(workspace: Path, user_ids: list[str], store=None) -> int:
    """Delete the users from every online view keyed by them. Returns the rows or keys removed."""
    if store is None and not yaml_path(workspace).exists():
        return 0
    store = store or feature_store(workspace)
    config = store.config
    views = [v for v in store.list_feature_views(allow_cache=False) if KEY in v.join_keys]
    online = config.online_store
    if online.type == "sqlite" or online.type.endswith("SqliteOnlineStore"):
        return _erase_sqlite_online(config, views, user_ids)
    if online.type == "redis" or online.type.endswith("RedisOnlineStore"):
        return _erase_redis_online(store, user_ids)
    raise ValueError(f"erasure from online store {online.type!r} is not supported")


def _erase_sqlite_online(config, views, user_ids: list[str]) -> int:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import compute_table_id

    path = Path(config.online_store.path)
    if not path.is_absolute() and config.repo_path:
        path = Path(config.repo_path) / path
    if not path.exists():
        return 0
    keys = [serialize_entity_key(k, entity_key_serialization_version=config.entity_key_serialization_version)
            for k in feast_adapter.entity_keys(user_ids)]
    versioning = getattr(config.registry, "enable_online_feature_view_versioning", False)
    con = sqlite3.connect(path, isolation_level=None, timeout=30)
    n = 0
    try:
        con.execute("PRAGMA secure_delete = ON")
        existing = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for view in views:
            table = compute_table_id(config.project, view, versioning)
            if table in existing:
                marks = ",".join("?" * len(keys))
                n += con.execute(f'DELETE FROM "{table}" WHERE entity_key IN ({marks})', keys).rowcount
        con.execute("VACUUM")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return n


def _erase_redis_online(store, user_ids: list[str]) -> int:
    """One Redis hash per entity holds every view's features: deleting the key removes them all."""
    keys = feast_adapter.redis_keys(store, user_ids)
    return int(feast_adapter.redis_client(store).delete(*keys)) if keys else 0


def offline_rows(profile: str, workspace: Path, user_id: str) -> dict[str, pd.DataFrame]:
    """The user's rows in every offline table of the profile (what ``persona export`` shows)."""
    if profile == "prod":
        engine = sa.create_engine(os.environ["PERSONA_POSTGRES_URL"])
        try:
            with engine.connect() as conn:
                return {name.removeprefix("persona_"): pd.read_sql(
                    sa.text(f'SELECT * FROM "{name}" WHERE {KEY} = :u'), conn, params={"u": user_id})
                    for name in _postgres_user_tables(conn)}
        finally:
            engine.dispose()
    out: dict[str, pd.DataFrame] = {}
    folder = Path(workspace) / "offline"
    for name in TABLES:
        path = folder / name if profile == "spark" else folder / f"{name}.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
            if KEY in frame:
                out[name] = frame[frame[KEY] == user_id]
    return out


def online_rows(store, user_id: str) -> dict[str, dict]:
    """Each user-keyed view's online values for the user, as plain JSON values."""
    out = {}
    for view in store.list_feature_views(allow_cache=True):
        if KEY not in view.join_keys:
            continue
        refs = [f"{view.name}:{f.name}" for f in view.features]
        row = store.get_online_features(features=refs, entity_rows=[{KEY: user_id}]).to_dict()
        out[view.name] = {k: plain(v[0]) for k, v in row.items() if k != KEY}
    return out
