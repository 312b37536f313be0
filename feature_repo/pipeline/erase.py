"""Erase users from the feature stores: every offline table on every profile, and the online store.

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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from feature_repo.pipeline import stores

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
    """Rewrite every Parquet file under ``folder`` that holds the users (tables and Spark part files)."""
    removed: dict[str, int] = {}
    if not folder.exists():
        return removed
    wanted = pa.array(user_ids, pa.string())
    for path in sorted(folder.rglob("*.parquet")):
        if KEY not in pq.read_schema(path).names:
            continue
        table = pq.read_table(path)
        hit = pc.is_in(pc.cast(table[KEY], pa.string()), value_set=wanted)
        n = pc.sum(hit).as_py() or 0
        if n:
            tmp = path.with_name(f".{path.name}.erase.tmp")
            pq.write_table(table.filter(pc.invert(hit)), tmp)
            tmp.replace(path)
            removed[str(path.relative_to(folder.parent))] = n
    return removed


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


def erase_postgres(url: str, user_ids: list[str]) -> dict[str, int]:
    """Delete from every ``persona_*`` table keyed by user, then ``VACUUM FULL`` the touched ones."""
    engine = sa.create_engine(url)
    removed: dict[str, int] = {}
    try:
        with engine.begin() as conn:
            inspector = sa.inspect(conn)
            for name in inspector.get_table_names():
                if name.startswith("persona_") and KEY in {c["name"] for c in inspector.get_columns(name)}:
                    removed[name] = conn.execute(sa.text(f'DELETE FROM "{name}" WHERE {KEY} = ANY(:ids)'),
                                                 {"ids": user_ids}).rowcount
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for name in removed:
                conn.exec_driver_sql(f'VACUUM FULL "{name}"')
    finally:
        engine.dispose()
    return removed


def _entity_keys(user_ids: list[str]):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return [EntityKey(join_keys=[KEY], entity_values=[Value(string_val=u)]) for u in user_ids]


def erase_online(workspace: Path, user_ids: list[str], store=None) -> int:
    """Delete the users from every online view keyed by them. Returns the rows or keys removed."""
    if store is None and not stores.yaml_path(workspace).exists():
        return 0
    store = store or stores.feature_store(workspace)
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
            for k in _entity_keys(user_ids)]
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
    from feast.infra.online_stores.helpers import _redis_key

    config = store.config
    online = store._get_provider().online_store  # noqa: SLF001 - Feast has no public delete-by-key
    client = online._get_client(config.online_store)  # noqa: SLF001
    keys = [_redis_key(config.project, k, entity_key_serialization_version=config.entity_key_serialization_version)
            for k in _entity_keys(user_ids)]
    return int(client.delete(*keys)) if keys else 0
