"""``persona features build``: every feature table recomputed from the whole event log, checked, and
swapped into the offline store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import DEFAULT_SEQUENCE_TYPES
from eventlog import locks
from eventlog.store import EventLog, utcnow
from feature_repo.pipeline.compute import compute_all
from feature_repo.pipeline.feast_config import feature_store_config
from feature_repo.pipeline.offline import write_offline
from feature_repo.pipeline.spark_build import build_from_log


class FeatureChecksFailed(RuntimeError):
    """The new tables broke a feature-level rule: the previous offline tables stay in place."""

    def __init__(self, report) -> None:
        super().__init__(f"feature checks failed (see {report.path})")
        self.report = report


class SparkTables(Mapping):
    """The spark build's tables by name, as Parquet folders: their row counts at hand; a table is
    read into this process only when a caller asks for it as a frame (a test, a small shop), and
    through Spark (:meth:`spark`) by what must not hold it (the feature checks)."""

    def __init__(self, folder: Path, rows: dict[str, int]) -> None:
        self.folder, self.rows = folder, rows

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self.rows:
            raise KeyError(name)
        return pd.read_parquet(self.folder / name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def spark(self, name: str):
        """The table as a Spark DataFrame, in the session the build ran in."""
        from pyspark.sql import SparkSession

        return SparkSession.getActiveSession().read.parquet(str(self.folder / name))


def row_counts(tables: Mapping) -> dict[str, int]:
    """Rows per table, without reading a Spark build's tables."""
    return dict(tables.rows) if isinstance(tables, SparkTables) else {k: len(v) for k, v in tables.items()}


def build(log: EventLog, profile: str, workspace: Path,
          check: Callable[[Mapping], Any] | None = None,
          sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> Mapping:
    """Recompute every feature table from the whole event log and replace the offline tables.

    Returns the tables by name: frames, or on the spark profile :class:`SparkTables` (the log and the
    tables stay with Spark: this process reads neither).

    ``sequence_types``: the workspace's ``Config.sequence_types`` (the push must fold with the same).

    ``check`` sees the new tables before they replace the old ones; a report with ``failed`` set
    raises :class:`FeatureChecksFailed` and leaves the previous tables (and online store) as they were.
    The log's erasure lock is held from the read to the write: a ``persona forget`` meanwhile waits for
    the build and then erases what it wrote, so a build never brings an erased user back.
    """
    with locks.held(log.engine):
        return _build(log, profile, Path(workspace), check, sequence_types)


def _build(log: EventLog, profile: str, workspace: Path, check: Callable[[Mapping], Any] | None,
           sequence_types: Collection[str]) -> Mapping:
    log_read_at = utcnow()  # keys touched after this are synced online from the log, not this build
    if profile == "spark":
        spark_conf = feature_store_config("spark", workspace)["offline_store"]["spark_conf"]
        staging = workspace / "offline" / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        rows = build_from_log(log.engine.url.render_as_string(hide_password=False), workspace, spark_conf,
                              out_dir=staging, sequence_types=sequence_types)
        tables = SparkTables(staging, rows)
        _checked(check, tables)
        swap_in_spark_tables(workspace, staging)
        tables.folder = workspace / "offline"
        newest = _newest_spark(tables)
    else:
        events_, items, users = log.read_table("events"), log.read_table("items"), log.read_table("users")
        tables = compute_all(events_, items, users, sequence_types)
        _checked(check, tables)
        write_offline(profile, workspace, tables)
        newest = tables["user_behaviour"]["event_timestamp"].max() if len(tables["user_behaviour"]) else None
    (workspace / "feast").mkdir(parents=True, exist_ok=True)
    (workspace / "feast" / "last_build.json").write_text(json.dumps({
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"), "profile": profile,
        "log_read_at": log_read_at.isoformat(),
        "newest_feature_timestamp": newest.isoformat() if newest is not None else None,
        "rows": row_counts(tables)}, indent=2))
    return tables


def _newest_spark(tables: SparkTables) -> pd.Timestamp | None:
    from pyspark.sql import functions as F

    micros = tables.spark("user_behaviour").agg(F.unix_micros(F.max("event_timestamp"))).first()[0]
    return None if micros is None else pd.Timestamp(micros, unit="us", tz="UTC")


def _checked(check, tables: Mapping) -> None:
    if check is not None and getattr(report := check(tables), "failed", False):
        raise FeatureChecksFailed(report)


def swap_in_spark_tables(workspace: Path, staging: Path) -> None:
    """Move each staged table folder over the live one (a rename per table)."""
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        live = workspace / "offline" / folder.name
        old = workspace / "offline" / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if live.exists():
            live.rename(old)
        folder.rename(live)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def read_offline_spark(workspace: Path, folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """The tables Spark wrote, for the feature-level checks (pyarrow reads the part files)."""
    folder = folder or workspace / "offline"
    return {name: pd.read_parquet(folder / name) for name in
            ("user_behaviour", "user_activity", "user_text", "user_sequence", "user_personal", "item_features")}
