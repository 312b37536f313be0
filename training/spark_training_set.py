"""Point-in-time training rows on the spark profile: Feast's own Spark join, written as Parquet shards.

The labelled rows (a Spark DataFrame: user, item, time, label, context) are joined with the user and
the item FeatureServices by Feast's Spark offline store (``get_historical_features``, its
point-in-time join), and the result is written where the tasks run, a shard per task: no process
collects it. Feast's on-demand views (the request-time windows, the context) are functions of a row's
joined values and its request: they run when a shard is read (:class:`TrainingShards`), by Feast's own
``to_df`` (``feast_adapter.OnDemandApplier``, kept beside the shards), so the frame a reader gets is
the frame ``dataset.fetch_features`` gives on the local profile, row for row.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.config import DEFAULT_EXPOSURE_TYPES
from feature_repo.pipeline import feast_adapter, spark_source
from training import dataset
from training.point_in_time import historical_job

ON_DEMAND_FILE = "_on_demand.pickle"  # the user service's on-demand views, as their registry protos
USER_KEYS = ["user_id", "event_timestamp", "device", "channel", "request_timestamp"]
ROWS_PER_SHARD = 50_000  # a shard is what one training process reads at once (~100 MB with the sequences)
EXAMPLE_COLUMNS = ["event_id", "user_id", "item_id", "event_type", "event_timestamp", "session_id", "device",
                   "channel", "query"]  # what ``dataset.build_examples`` reads
EXAMPLES_DDL = ("user_id string, item_id string, session string, event_timestamp timestamp, device string, "
                "channel string, label bigint, weight double, kind string, query string, "
                "request_timestamp timestamp, example_id bigint")
RANGE_BITS = 32  # example ids: a range's number above these bits, the row's place in its range below


def examples_on_spark(spark, url: str, items: pd.DataFrame, positives: dict[str, float], neg_per_pos: int = 2,
                      exposure_ratio: float = 1.0, seed: int = 0,
                      exposure_types: Collection[str] = DEFAULT_EXPOSURE_TYPES,
                      rows_per_partition: int | None = None):
    """``dataset.build_examples`` in Spark's tasks, a range of whole users each, read from the log where it
    lives: a Spark DataFrame, never collected. Each task gets what only the whole log knows (each
    item's first event, whether the log has session ids); its positives and exposures are the one-process
    rows of its users. The draws differ: a task samples its exposures to ``exposure_ratio`` of its own
    positives, and draws negatives with its own seed (``seed`` and the range)."""
    from pyspark import TaskContext
    from pyspark.sql import functions as F

    per = rows_per_partition or spark_source.ROWS_PER_PARTITION
    events = spark_source.read_table(spark, url, "events", "user_id", per).select(*EXAMPLE_COLUMNS)
    first = events.where(F.col("item_id").isNotNull()).groupBy("item_id").agg(F.min("event_timestamp").alias("t"))
    first = first.toPandas()  # a catalogue's worth
    first_seen = pd.Series(pd.to_datetime(first["t"], utc=True).to_numpy(), index=first["item_id"].astype(str))
    session_ids = events.where(F.col("session_id").isNotNull()).limit(1).count() > 0
    catalogue = items[["item_id"]].astype({"item_id": str})
    columns = [part.split()[0] for part in EXAMPLES_DDL.split(", ")]

    def labelled(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        parts = list(batches)
        if not parts:
            return
        part = TaskContext.get().partitionId()
        rows = dataset.build_examples(pd.concat(parts, ignore_index=True), catalogue, positives, neg_per_pos,
                                      exposure_ratio, seed + part, exposure_types, first_seen, session_ids)
        rows["example_id"] = (part << RANGE_BITS) + rows["example_id"]
        for col in ("event_timestamp", "request_timestamp"):
            rows[col] = rows[col].dt.tz_convert("UTC").dt.tz_localize(None)
        yield rows[columns].astype({"session": str})
    return events.mapInPandas(labelled, EXAMPLES_DDL)


def write_training_set(store, examples, output: Path, rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, int]:
    """Features for ``examples`` (a Spark DataFrame with ``dataset.build_examples``' columns), point in
    time, written as Parquet shards of at most ``rows_per_shard`` rows in the folder ``output``.
    Returns the rows and shards written."""
    from pyspark.sql import functions as F

    micro = [F.col(c).cast("timestamp").alias(c) for c in ("event_timestamp", "request_timestamp")]
    user_entity = examples.select("example_id", "user_id", "device", "channel", *micro)
    users = historical_job(store, dataset.USER_SERVICE, user_entity)
    item_entity = examples.select("example_id", "item_id", F.col("event_timestamp").cast("timestamp"))
    items = historical_job(store, dataset.ITEM_SERVICE, item_entity)
    user_cols = users.to_spark_df().drop(*[c for c in USER_KEYS])
    item_df = items.to_spark_df().drop("item_id", "event_timestamp")
    item_df = item_df.select("example_id", *[F.col(c).alias(f"{dataset.ITEM_PREFIX}{c}")
                                             for c in item_df.columns if c != "example_id"])
    rows = examples.join(user_cols, "example_id", "left").join(item_df, "example_id", "left")
    output.mkdir(parents=True, exist_ok=True)
    rows.write.mode("overwrite").option("maxRecordsPerFile", rows_per_shard).parquet(str(output))
    (output / ON_DEMAND_FILE).write_bytes(pickle.dumps(feast_adapter.OnDemandApplier(users)))
    return {"rows": sum(pq.ParquetFile(p).metadata.num_rows for p in shards(output)),
            "shards": len(shards(output))}


def shards(folder: Path) -> list[Path]:
    """The Parquet shards of a training set, in a stable order."""
    return sorted(Path(folder).glob("part-*.parquet"))


class TrainingShards:
    """A training set written by :func:`write_training_set`, read a shard at a time, each with Feast's
    on-demand views applied: the columns and values of ``dataset.fetch_features``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.paths = shards(self.folder)
        views = self.folder / ON_DEMAND_FILE  # none: written in one process, with the views applied
        self.on_demand = pickle.loads(views.read_bytes()) if views.exists() else None  # noqa: S301 - ours

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        for path in self.paths:
            yield self.read(path)

    def read(self, path: Path, rows: Callable[[pd.DataFrame], np.ndarray] | None = None) -> pd.DataFrame:
        """One shard; ``rows``: a mask of the rows wanted, taken before the on-demand views run on them."""
        frame = pd.read_parquet(path)
        for col in ("event_timestamp", "request_timestamp"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        if rows is not None:
            frame = frame[rows(frame)].reset_index(drop=True)
        if self.on_demand is not None:
            frame = self.on_demand(frame)
        return frame.drop(columns=[c for c in dataset.STATE_COLUMNS if c in frame])

    def frame(self) -> pd.DataFrame:
        """Every shard in one frame, in ``example_id`` order (what a one-process reader wants)."""
        parts = list(self)
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        return out.sort_values("example_id").reset_index(drop=True) if len(out) else out
