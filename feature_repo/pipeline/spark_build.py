"""The spark profile's feature build: Spark partitions the event log by user (or item) and each
partition runs the same kernel as the local build and the push path (``compute.py``).

So one definition of every feature serves all three paths, and Spark supplies the scale-out: on a
cluster, point ``PERSONA_SPARK_MASTER`` at it. :func:`build_from_log` reads the log where it lives,
in key ranges (``spark_source.py``): the driver never holds the log, and each user range is folded
once into every user table (one pass, kept on the executors' disks while each table is written).
Output goes straight to the Spark offline store's parquet directories, with microsecond timestamps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from core.config import DEFAULT_SEQUENCE_TYPES
from feature_repo.pipeline import compute, spark_source

_SPARK_TYPES = {"int64": "bigint", "Int64": "bigint", "float64": "double", "Float64": "double",
                "bool": "boolean", "boolean": "boolean", "datetime64[us, UTC]": "timestamp",
                "datetime64[ns, UTC]": "timestamp"}
EVENT_COLUMNS = ["user_id", "event_timestamp", "event_type", "item_id", "query", "value", "device", "channel"]
ITEM_COLUMNS = ["item_id", "category", "price", "title", "brand", "description"]
USER_TABLES = ("user_behaviour", "user_activity", "user_text", "user_sequence")
TABLE = "_table"  # which user table a row of the one-pass output belongs to
CATALOGUE_ROW = "_catalogue"  # an item pass row from the catalogue (True) or from an event (False)

Catalogue = Callable[[Iterable[str]], pd.DataFrame]  # item ids -> their catalogue rows (ITEM_COLUMNS)


def _spark_type(dtype) -> str:
    return _SPARK_TYPES.get(str(dtype), "string")


def _ddl(frame: pd.DataFrame) -> str:
    return ", ".join(f"`{c}` {_spark_type(t)}" for c, t in frame.dtypes.items())


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


def _schema_sample(sequence_types: Collection[str]) -> dict[str, pd.DataFrame]:
    """Every table computed from a tiny shop with every column filled: the output schemas, whatever
    the log holds (a column that is null in a real sample would have no type)."""
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    types = list(dict.fromkeys([*sequence_types, "view", "click", "purchase", "search"]))
    events = pd.DataFrame({"user_id": "u", "event_timestamp": [t0 + pd.Timedelta(hours=k) for k in range(len(types))],
                           "event_type": types, "item_id": "i", "query": "q", "value": 1.0, "device": "app",
                           "channel": "search"})
    items = pd.DataFrame({"item_id": ["i"], "category": ["a>b"], "price": [1.0], "title": ["t"], "brand": ["b"],
                          "description": ["d"]})
    users = pd.DataFrame({"user_id": ["u"], "age": [30], "gender": ["f"], "region": ["r"], "occupation": ["o"],
                          "membership": ["m"], "signup_timestamp": [t0]})
    return compute.compute_all(events, items, users, tuple(sequence_types))


def _union(sample: dict[str, pd.DataFrame]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The user tables' columns as one schema (name -> Spark type) and each table's columns."""
    types: dict[str, str] = {}
    for kind in USER_TABLES:
        for col, dtype in sample[kind].dtypes.items():
            spark_type = _spark_type(dtype)
            if types.setdefault(col, spark_type) != spark_type:
                raise TypeError(f"{col} is {types[col]} in one user table and {spark_type} in {kind}")
    return types, {kind: list(sample[kind].columns) for kind in USER_TABLES}


def _as_spark(frame: pd.DataFrame, types: dict[str, str]) -> pd.DataFrame:
    """One table's rows in the union's columns, with nullable integers where another table's column is."""
    out = frame.reindex(columns=list(types))
    for col, spark_type in types.items():
        if spark_type == "bigint":
            out[col] = out[col].astype("Int64")
        elif spark_type == "boolean":
            out[col] = out[col].astype("boolean")
        elif spark_type == "string":
            out[col] = out[col].astype(object).where(out[col].notna(), None)
        elif spark_type == "timestamp":
            out[col] = pd.to_datetime(out[col], utc=True).astype("datetime64[us, UTC]")
        elif spark_type == "double":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
    return out


def build_with_spark(events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, workspace: Path,
                     spark_conf: dict[str, str], partitions: int = 8, out_dir: Path | None = None,
                     sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict[str, int]:
    """Every feature table from frames this process holds (small logs, tests): the frames are shipped
    to Spark and partitioned by user, then the same passes as :func:`build_from_log`."""
    spark = spark_session(spark_conf)

    def frame(table: str, data: pd.DataFrame, columns: list[str] | None = None):
        """A pandas table in the contract's types, as a Spark DataFrame (the log's reader types it the same)."""
        typed = spark_source.typed(data, table)
        typed = typed if columns is None else typed[columns]
        return typed, spark.createDataFrame(typed, schema=spark_source.spark_schema(table, columns))

    catalogue, listed = frame("items", items, ITEM_COLUMNS)

    def lookup(ids: Iterable[str]) -> pd.DataFrame:
        return catalogue[catalogue["item_id"].isin(set(ids))]

    by_user = frame("events", events, EVENT_COLUMNS)[1].repartition(partitions, "user_id")
    return _build(spark, by_user, listed, frame("users", users)[1], lookup, out_dir or workspace / "offline",
                  partitions, tuple(sequence_types))


def build_from_log(url: str, workspace: Path, spark_conf: dict[str, str], out_dir: Path | None = None,
                   sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES,
                   rows_per_partition: int | None = None) -> dict[str, int]:
    """Every feature table from the event log at ``url``, read by Spark's tasks in key ranges (the
    driver reads no table); returns row counts per table."""
    spark = spark_session(spark_conf)
    per = rows_per_partition or spark_source.ROWS_PER_PARTITION
    events = spark_source.read_table(spark, url, "events", "user_id", per).select(*EVENT_COLUMNS)
    items = spark_source.read_table(spark, url, "items", "item_id", per).select(*ITEM_COLUMNS)
    users = spark_source.read_table(spark, url, "users", "user_id", per)
    partitions = max(events.rdd.getNumPartitions(), items.rdd.getNumPartitions())
    return _build(spark, events, items, users, _LogCatalogue(spark_source.url_options(url)),
                  out_dir or workspace / "offline", partitions, tuple(sequence_types))


class _LogCatalogue:
    """The catalogue rows of some items, read by the task that needs them (never by the driver)."""

    CHUNK = 5_000

    def __init__(self, options: dict[str, str]) -> None:
        self.options = options

    def __call__(self, ids: Iterable[str]) -> pd.DataFrame:
        ids = sorted(set(ids))
        t = sa.table("items", *[sa.column(c) for c in ITEM_COLUMNS])
        engine = sa.create_engine(spark_source.log_url(self.options))
        try:
            with engine.connect() as conn:
                frames = [pd.read_sql(sa.select(*t.c).where(t.c.item_id.in_(ids[k:k + self.CHUNK])), conn)
                          for k in range(0, len(ids), self.CHUNK)]
        finally:
            engine.dispose()
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ITEM_COLUMNS)


def _build(spark, events, items, users, catalogue: Catalogue, folder: Path, partitions: int,
           sequence_types: tuple[str, ...]) -> dict[str, int]:
    """The passes over Spark DataFrames (the log's tables in the contract's types): ``events`` partitioned
    so that each user is in one partition."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    sample = _schema_sample(sequence_types)
    types, columns = _union(sample)

    def fold_users(batches):
        frame = _concat(batches)
        if len(frame):
            tables = compute.compute_user_tables(frame, catalogue(frame["item_id"].dropna().unique()),
                                                 sequence_types)
            for kind in USER_TABLES:
                if len(tables[kind]):
                    yield _as_spark(tables[kind], types).assign(**{TABLE: kind})

    counts: dict[str, int] = {}
    union_ddl = ", ".join(f"`{c}` {t}" for c, t in types.items()) + f", `{TABLE}` string"
    folded = events.mapInPandas(fold_users, schema=union_ddl).persist(StorageLevel.DISK_ONLY)
    for kind in USER_TABLES:
        out = folded.where(F.col(TABLE) == kind).select(*columns[kind])
        out.write.mode("overwrite").parquet(str(folder / kind))
        counts[kind] = spark.read.parquet(str(folder / kind)).count()
    folded.unpersist()

    micros = events.agg(F.unix_micros(F.max("event_timestamp"))).first()[0]  # no time zone on the way
    last_day = None if micros is None else int(micros // compute.DAY_US)

    def item_rows(batches):
        frame = _concat(batches)
        if len(frame):
            listed = frame[CATALOGUE_ROW].astype(bool)
            present = frame[listed]
            if len(present):
                touched = frame[~listed]
                yield compute.compute_item_table(touched[EVENT_COLUMNS], present[ITEM_COLUMNS], last_day)

    touched = events.where("item_id IS NOT NULL").withColumn(CATALOGUE_ROW, F.lit(False))
    listed = items.withColumn(CATALOGUE_ROW, F.lit(True))
    both = touched.unionByName(listed, allowMissingColumns=True).repartition(partitions, "item_id")
    both.mapInPandas(item_rows, schema=_ddl(sample["item_features"])).write.mode("overwrite").parquet(
        str(folder / "item_features"))
    counts["item_features"] = spark.read.parquet(str(folder / "item_features")).count()

    def personal(batches):
        for frame in batches:
            if len(frame):
                yield compute.user_personal(frame)

    users.mapInPandas(personal, schema=_ddl(sample["user_personal"])).write.mode("overwrite").parquet(
        str(folder / "user_personal"))
    counts["user_personal"] = spark.read.parquet(str(folder / "user_personal")).count()
    return counts
