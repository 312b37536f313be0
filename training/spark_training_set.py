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
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from feature_repo.pipeline import feast_adapter
from training import dataset
from training.point_in_time import historical_job

ON_DEMAND_FILE = "_on_demand.pickle"  # the user service's on-demand views, as their registry protos
USER_KEYS = ["user_id", "event_timestamp", "device", "channel", "request_timestamp"]
ROWS_PER_SHARD = 50_000  # a shard is what one training process reads at once (~100 MB with the sequences)


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
        self.on_demand = pickle.loads((self.folder / ON_DEMAND_FILE).read_bytes())  # noqa: S301 - we wrote it

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        for path in self.paths:
            yield self.read(path)

    def read(self, path: Path) -> pd.DataFrame:
        frame = pd.read_parquet(path)
        for col in ("event_timestamp", "request_timestamp"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        frame = self.on_demand(frame)
        return frame.drop(columns=[c for c in dataset.STATE_COLUMNS if c in frame])

    def frame(self) -> pd.DataFrame:
        """Every shard in one frame, in ``example_id`` order (what a one-process reader wants)."""
        parts = list(self)
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        return out.sort_values("example_id").reset_index(drop=True) if len(out) else out
