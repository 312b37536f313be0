"""The workspace's Feast stores: write ``feature_store.yaml`` for a profile, write the offline
tables, apply the repo, materialize, and push fresh user state online."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
import yaml

REPO_DIR = Path(__file__).resolve().parents[1]
PROJECT = "persona"
TABLES = ("user_personal", "user_behaviour", "user_activity", "user_text", "user_sequence", "item_features")


def yaml_path(workspace: Path) -> Path:
    return workspace / "feature_store.yaml"


def _pg_parts(url: str) -> dict:
    u = sa.engine.make_url(url)
    return {"host": u.host or "127.0.0.1", "port": u.port or 5432, "database": u.database or "postgres",
            "user": u.username or "postgres", "sslmode": u.query.get("sslmode", "disable"),
            "has_password": bool(u.password)}


def feature_store_config(profile: str, workspace: Path) -> dict:
    """The Feast config of a profile. Secrets stay ``${ENV}`` references that Feast expands at load."""
    ws = workspace.resolve()
    local_registry = {"registry_type": "sql", "path": f"sqlite:///{ws / 'feast' / 'registry.db'}",
                      "cache_ttl_seconds": 60}
    sqlite_online = {"type": "sqlite", "path": str(ws / "feast" / "online.db")}
    cfg: dict = {"project": PROJECT, "provider": "local", "entity_key_serialization_version": 3}
    if profile == "local":
        cfg |= {"registry": local_registry, "online_store": sqlite_online, "offline_store": {"type": "duckdb"}}
    elif profile == "prod":
        pg_url = os.environ.get("PERSONA_POSTGRES_URL")
        if not pg_url:
            raise ValueError("profile 'prod' needs PERSONA_POSTGRES_URL (a SQLAlchemy URL) in the environment")
        parts = _pg_parts(pg_url)
        redis_url = os.environ.get("PERSONA_REDIS_URL", "redis://127.0.0.1:6379/0")
        r = sa.engine.make_url(redis_url)
        redis_conn = f"{r.host or '127.0.0.1'}:{r.port or 6379},db={r.database or 0}"
        if r.password:
            redis_conn += ",password=${PERSONA_REDIS_PASSWORD}"
        cfg |= {
            "registry": {"registry_type": "sql", "path": "${PERSONA_POSTGRES_URL}", "cache_ttl_seconds": 60},
            "online_store": {"type": "redis", "connection_string": redis_conn},
            "offline_store": {"type": "postgres", "host": parts["host"], "port": parts["port"],
                              "database": parts["database"], "db_schema": "public", "user": parts["user"],
                              "password": "${PERSONA_POSTGRES_PASSWORD}" if parts["has_password"] else "",
                              "sslmode": parts["sslmode"]},
        }
    elif profile == "spark":
        cfg |= {"registry": local_registry, "online_store": sqlite_online,
                "offline_store": {"type": "spark", "spark_conf": {
                    "spark.master": os.environ.get("PERSONA_SPARK_MASTER", "local[2]"),
                    "spark.driver.host": "127.0.0.1", "spark.ui.enabled": "false",
                    "spark.driver.memory": os.environ.get("PERSONA_SPARK_DRIVER_MEMORY", "4g"),
                    "spark.sql.session.timeZone": "UTC", "spark.sql.shuffle.partitions": "4",
                    "spark.sql.execution.arrow.pyspark.enabled": "true"}}}
    else:
        raise ValueError(f"unknown profile {profile!r}")
    return cfg


def write_yaml(profile: str, workspace: Path) -> Path:
    path = yaml_path(workspace)
    (workspace / "feast").mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Written by `persona features apply` for profile {profile!r}. Use it with\n"
                    f"#   feast -c {REPO_DIR} -f {path} plan\n"
                    + yaml.safe_dump(feature_store_config(profile, workspace), sort_keys=False))
    return path


@contextmanager
def _workspace_env(workspace: Path, profile: str):
    """The definitions module reads the workspace and profile from the environment at import."""
    old = {k: os.environ.get(k) for k in ("PERSONA_WORKSPACE", "PERSONA_PROFILE")}
    os.environ["PERSONA_WORKSPACE"] = str(workspace.resolve())
    os.environ["PERSONA_PROFILE"] = profile
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_definitions(workspace: Path, profile: str):
    """Import ``feature_repo/features.py`` fresh for this workspace (as Feast's CLI would)."""
    with _workspace_env(workspace, profile):
        spec = importlib.util.spec_from_file_location("persona_feature_definitions", REPO_DIR / "features.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling need the module registered
        spec.loader.exec_module(module)
    return module


def feature_store(workspace: Path):
    from feast import FeatureStore

    path = yaml_path(workspace)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `persona features apply` first")
    store = FeatureStore(repo_path=str(REPO_DIR), fs_yaml_file=path)
    _write_ahead_log(store)
    return store


def _write_ahead_log(store) -> None:
    """The SQLite online store in WAL mode (kept by the file): a push commits with one sync instead
    of several, and readers (the service) never wait for a writer (a materialize)."""
    online = store.config.online_store
    if getattr(online, "type", None) == "sqlite" and online.path and Path(online.path).exists():
        import sqlite3

        with contextlib.closing(sqlite3.connect(online.path, timeout=30)) as con:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")


def apply(workspace: Path, profile: str):
    """Write the yaml and register every Feast object of the definitions module."""
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    write_yaml(profile, workspace)
    module = load_definitions(workspace, profile)
    kinds = (Entity, FeatureView, OnDemandFeatureView, FeatureService, DataSource)
    objects = [v for v in vars(module).values() if isinstance(v, kinds)]
    store = feature_store(workspace)
    store.apply(objects)
    return store, objects


def write_offline(profile: str, workspace: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Replace each feature table in the profile's offline store (the event log is the truth)."""
    if profile == "prod":
        _write_postgres(tables)
        return
    folder = workspace / "offline"
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame = _microseconds(frame)
        if profile == "spark":  # Spark reads directories of parquet with microsecond timestamps
            target = folder / name
            target.mkdir(exist_ok=True)
            for old in target.glob("*.parquet"):
                old.unlink()
            frame.to_parquet(target / "part-00000.parquet", index=False, coerce_timestamps="us",
                             allow_truncated_timestamps=True)
        else:
            tmp = folder / f".{name}.parquet.tmp"
            frame.to_parquet(tmp, index=False)
            tmp.replace(folder / f"{name}.parquet")  # readers never see a half-written table


def _microseconds(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for col in frame.columns:
        if isinstance(frame[col].dtype, pd.DatetimeTZDtype):
            frame[col] = frame[col].astype("datetime64[us, UTC]")
    return frame


def _write_postgres(tables: dict[str, pd.DataFrame]) -> None:
    """COPY each table into ``persona_<name>`` in one transaction (fast, and atomic per build)."""
    engine = sa.create_engine(os.environ["PERSONA_POSTGRES_URL"])
    try:
        with engine.begin() as conn:
            for name, frame in tables.items():
                table = f"persona_{name}"
                frame = _microseconds(frame)
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
                frame.head(0).to_sql(table, conn, index=False)
                conn.execute(sa.text(f'CREATE INDEX ON "{table}" ({frame.columns[0]}, event_timestamp)'))
                buffer = io.StringIO()
                # An explicit NULL marker: in CSV, COPY would read an empty string as NULL.
                frame.to_csv(buffer, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S.%f%z",
                             na_rep="\\N")
                buffer.seek(0)
                cols = ", ".join(f'"{c}"' for c in frame.columns)
                with conn.connection.cursor() as cur, cur.copy(
                        f'COPY "{table}" ({cols}) FROM STDIN WITH (FORMAT csv, NULL \'\\N\')') as copy:
                    while chunk := buffer.read(1 << 20):
                        copy.write(chunk)
    finally:
        engine.dispose()


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Views whose offline table holds a user's 30-day state at each of their events: one busy month makes
# it large. Feast's local materialization reads a view's table whole into Arrow, which fails past
# 2 GiB of text ("Arrow Appender: The maximum total string size for regular string buffers is
# 2147483647"), so on DuckDB their newest rows are picked by DuckDB itself and written online here.
LARGE_STATE_VIEWS = ("user_activity",)
MATERIALIZED_FILE = "materialized.json"  # where each such view's last materialization ended


def materialize(workspace: Path, full: bool = False, end: datetime | None = None, store=None):
    """Incremental by default (Feast tracks what was loaded); ``full`` reloads everything.

    This loads only rows stamped inside the window: ``online.sync_online`` brings the rest."""
    store = store or feature_store(workspace)
    skip_dedup(store, False)  # a stale build's row never replaces a newer pushed one on Redis
    end = end or datetime.now(UTC)
    own = list(LARGE_STATE_VIEWS) if getattr(store.config.offline_store, "type", None) == "duckdb" else []
    views = [v.name for v in store.list_feature_views(allow_cache=True) if v.online and v.name not in own]
    if full:
        store.materialize(start_date=EPOCH, end_date=end, feature_views=views)
    else:
        store.materialize_incremental(end_date=end, feature_views=views)
    marks = _materialized_marks(workspace)
    for name in own:
        start = EPOCH if full else _last_end(store, name, marks)
        _write_newest(store, name, Path(workspace) / "offline" / f"{name}.parquet", start, end)
        marks[name] = end.isoformat()
    if own:
        (Path(workspace) / "feast" / MATERIALIZED_FILE).write_text(json.dumps(marks, indent=2))
    return store


def _materialized_marks(workspace: Path) -> dict[str, str]:
    path = Path(workspace) / "feast" / MATERIALIZED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _last_end(store, name: str, marks: dict[str, str]) -> datetime:
    """Where this view's previous materialization ended: ours, else Feast's (a workspace that Feast
    materialized before), else never."""
    if name in marks:
        return datetime.fromisoformat(marks[name])
    feast_end = store.get_feature_view(name).most_recent_end_time
    return feast_end.astimezone(UTC) if feast_end else EPOCH


def _write_newest(store, name: str, path: Path, start: datetime, end: datetime, chunk: int = 2_000) -> int:
    """Each user's newest row of a view's offline table stamped in (``start``, ``end``], written online
    (by the push's writer: on the local profile's SQLite, writes never compare stamps anyway)."""
    rows = newest_rows(path, start, end)
    for first in range(0, len(rows), chunk):
        push_latest(store, {name: rows.iloc[first:first + chunk]})
    return len(rows)


def newest_rows(path: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """Each user's newest row of an offline table (Parquet) stamped in (``start``, ``end``].

    DuckDB finds each user's newest stamp from the keys alone, then reads back only those rows' text."""
    import duckdb

    if not path.exists():
        return pd.DataFrame()
    query = """WITH newest AS (SELECT user_id, max(event_timestamp) AS ts FROM read_parquet($path)
                               WHERE event_timestamp > $start AND event_timestamp <= $end GROUP BY user_id)
               SELECT t.* FROM read_parquet($path) t JOIN newest n
               ON t.user_id = n.user_id AND t.event_timestamp = n.ts ORDER BY t.user_id"""
    with contextlib.closing(duckdb.connect()) as con:
        rows = con.execute(query, {"path": str(path), "start": start, "end": end}).df()
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    return rows


def push_latest(store, states: dict[str, pd.DataFrame]) -> None:
    """Write users' fresh state straight to the online store (the event log holds the events).

    This is what ``store.push`` does through the view's PushSource, minus its
    re-listing of every FeatureService from the registry on each call (for pre-computed vectors,
    which Persona does not use): about 10 ms per push on the SQL registry.

    The state comes from the event log, so it is written even when its stamp is not newer than the
    stored one (a late event, an edit): Feast's Redis writer would skip that row, so its timestamp
    check is turned off for these writes (``skip_dedup``). Materialization keeps it.
    """
    skip_dedup(store, True)
    for name, frame in states.items():
        if len(frame):
            store.write_to_online_store(name, _microseconds(frame), allow_registry_cache=True)


def skip_dedup(store, skip: bool) -> None:
    """Redis only: whether a write may replace a stored row that is not older."""
    online = store.config.online_store
    if hasattr(online, "skip_dedup"):
        online.skip_dedup = skip
