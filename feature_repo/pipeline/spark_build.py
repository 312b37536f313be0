"""The spark profile's feature build: Spark partitions the event log by user (or item) and each
partition runs the same DuckDB kernel as the local build and the push path (``compute.py``).

So one definition of every feature serves all three paths, and Spark supplies the scale-out: on a
cluster, point ``PERSONA_SPARK_MASTER`` at it. Output goes straight to the Spark offline store's
parquet directories, with microsecond timestamps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from pathlib import Path

import pandas as pd

from core.config import DEFAULT_SEQUENCE_TYPES
from feature_repo.pipeline import compute

_SPARK_TYPES = {"int64": "bigint", "Int64": "bigint", "float64": "double", "Float64": "double",
                "bool": "boolean", "datetime64[us, UTC]": "timestamp", "datetime64[ns, UTC]": "timestamp"}
EVENT_COLUMNS = ["user_id", "event_timestamp", "event_type", "item_id", "query", "value", "device", "channel"]


def _ddl(frame: pd.DataFrame) -> str:
    return ", ".join(f"`{c}` {_SPARK_TYPES.get(str(t), 'string')}" for c, t in frame.dtypes.items())


def _concat(batches) -> pd.DataFrame:
    """A partition's batches as one frame; an empty partition (fewer users than partitions) has none."""
    batches = list(batches)
    return pd.concat(batches, ignore_index=True) if batches else pd.DataFrame()


def spark_session(spark_conf: dict[str, str]):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers use this venv
    builder = SparkSession.builder.appName("persona-features")
    for key, value in {**spark_conf, "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS"}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def build_with_spark(events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, workspace: Path,
                     spark_conf: dict[str, str], partitions: int = 8, out_dir: Path | None = None,
                     sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict[str, int]:
    """Compute and write every feature table with Spark (to ``out_dir``, by default the workspace's
    offline store); returns row counts per table. ``sequence_types``: the workspace's
    ``Config.sequence_types`` (the push folds with the same)."""
    sequence_types = tuple(sequence_types)  # shipped to the workers with the closures
    spark = spark_session(spark_conf)
    ev = events[EVENT_COLUMNS].copy()
    ev["event_timestamp"] = pd.to_datetime(ev["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
    for col in ("user_id", "event_type", "item_id", "query", "device", "channel"):
        ev[col] = ev[col].astype(object).where(ev[col].notna(), None)
    catalogue = items.reindex(columns=["item_id", "category", "price", "title", "brand", "description"]).copy()
    sdf = spark.createDataFrame(ev, schema="user_id string, event_timestamp timestamp, event_type string, "
                                           "item_id string, query string, value double, device string, "
                                           "channel string")
    # Output schemas from a run of the same kernel on a small sample.
    sample = compute.compute_all(ev.head(2000), catalogue, users.head(10), sequence_types)

    def per_users(kind: str):
        def run(batches):
            frame = _concat(batches)
            if len(frame):
                tables = compute.compute_user_tables(frame, catalogue, sequence_types)
                yield tables[kind]
        return run

    last_day = compute.last_event_day(ev)

    def per_items(batches):
        frame = _concat(batches)
        if len(frame):
            present = catalogue[catalogue["item_id"].isin(frame["item_id"])]
            yield compute.compute_item_table(frame, present, last_day)

    folder = out_dir or workspace / "offline"
    counts = {}
    by_user = sdf.repartition(partitions, "user_id")
    for kind in ("user_behaviour", "user_activity", "user_text", "user_sequence"):
        out = by_user.mapInPandas(per_users(kind), schema=_ddl(sample[kind]))
        out.write.mode("overwrite").parquet(str(folder / kind))
        counts[kind] = spark.read.parquet(str(folder / kind)).count()
    with_items = sdf.where("item_id IS NOT NULL").repartition(partitions, "item_id")
    out = with_items.mapInPandas(per_items, schema=_ddl(sample["item_features"]))
    out.write.mode("overwrite").parquet(str(folder / "item_features"))
    # Items nobody has touched still need their catalogue row.
    idle = catalogue[~catalogue["item_id"].isin(ev["item_id"].dropna().unique())]
    idle_rows = compute.compute_item_table(ev.iloc[:0], idle, last_day)
    if len(idle_rows):
        idle_rows.to_parquet(folder / "item_features" / "part-idle.parquet", index=False)
    counts["item_features"] = spark.read.parquet(str(folder / "item_features")).count()
    personal = compute.user_personal(users)
    target = folder / "user_personal"
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.parquet"):
        old.unlink()
    personal.to_parquet(target / "part-00000.parquet", index=False)
    counts["user_personal"] = len(personal)
    return counts
