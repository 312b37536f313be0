"""`persona recommend` on the spark profile: users scored in Spark's tasks, the model broadcast, Parquet out.

No process holds the log. The users' features as of the request time come from Feast's Spark offline
store (its own point-in-time join, left in the executors: ``to_spark_df``); their events from the
log where it lives (``spark_source``, a task per key range). Users go to buckets by a hash of their
id, and each bucket's features and events meet in one task (a cogroup). There, Feast's on-demand views
run on the bucket's rows, and the same code as the local ``recommend`` scores them against the
catalogue's vectors (computed once in the driver and broadcast) and keeps each user's best k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from feature_repo.pipeline import feast_adapter, spark_source
from training import dataset
from training.model import ProfileModel
from training.point_in_time import historical_job
from training.recall.cooccurrence import NEIGHBOURS
from training.recall.fit import Behaviours, ShopCounts
from training.recall.history import HOUR
from training.recall.package import stage_or_towers
from training.recall.popular import WINDOWS, WindowCounts
from training.workflow import _catalogue_vectors, requests_at, top_per_user, tower_scores, with_features

EVENT_COLUMNS = ["user_id", "item_id", "event_type", "event_timestamp"]  # what "already engaged" reads
USERS_PER_CHUNK = 512  # rows of the users x catalogue score matrix a task holds at once
OUTPUT_SCHEMA = "user_id string, rank bigint, item_id string, score float"


def recommend_on_spark(spark, store, model: ProfileModel, items: pd.DataFrame, positives: dict[str, float],
                       k: int, users: list[str] | None, as_of: pd.Timestamp, url: str, output: Path,
                       exclude_seen: bool = True, two_stage=None,
                       rows_per_partition: int | None = None) -> dict[str, int]:
    """Each user's best k as of ``as_of`` (``users``, or everyone with an event), written as Parquet part
    files in the folder ``output``: the towers' order, or with ``two_stage`` (the saved ranker and its
    spec) recall + rank with a reasons column, its sources' shop-wide counts taken by Spark's tasks
    (:func:`shop_counts`). Returns the rows and users written."""
    from pyspark.sql import functions as F

    per = rows_per_partition or spark_source.ROWS_PER_PARTITION
    events = spark_source.read_table(spark, url, "events", "user_id", per).select(*EVENT_COLUMNS)
    buckets = max(events.rdd.getNumPartitions(), 1)
    who = (spark.createDataFrame(pd.DataFrame({"user_id": users}), "user_id string") if users is not None
           else events.select("user_id").distinct())
    when = dataset.micro(pd.Series([as_of])).iloc[0].to_pydatetime()
    entity = who.select("user_id", F.lit(when).alias("event_timestamp"), F.lit(None).cast("string").alias("device"),
                        F.lit(None).cast("string").alias("channel"), F.lit(when).alias("request_timestamp"))
    job = historical_job(store, dataset.USER_SERVICE, entity)
    item_ids = items["item_id"].astype(str).tolist()
    catalogue = dataset.ItemCatalogue(store, item_ids, pd.Series([as_of]), max_buckets=1)
    stage = None
    if two_stage is not None and two_stage[1].serves(None):
        after = as_of + pd.Timedelta(microseconds=1)  # as ``top_per_user`` asks: the newest event counts
        counts = shop_counts(spark, events, item_ids, two_stage[1].behaviours, int(after.value // 10**9 // HOUR))
        stage = stage_or_towers(two_stage, None, items, item_ids, counts)
    payload = spark.sparkContext.broadcast({
        "model": model, "vectors": _catalogue_vectors(model, catalogue)(0), "item_ids": item_ids, "items": items,
        "positives": positives, "k": k, "as_of": as_of, "exclude_seen": exclude_seen, "stage": stage,
        "on_demand": feast_adapter.OnDemandApplier(job)})

    def bucketed(frame):
        return frame.withColumn("_bucket", F.pmod(F.hash("user_id"), F.lit(buckets)))

    feats = bucketed(job.to_spark_df())  # a row per user (Feast's join keeps every entity row)
    scored = (bucketed(events).groupBy("_bucket").cogroup(feats.groupBy("_bucket"))
              .applyInPandas(lambda ev, fe: _score_bucket(ev, fe, payload.value),
                             OUTPUT_SCHEMA + (", reasons string" if stage is not None else "")))
    scored.write.mode("overwrite").parquet(str(output))
    written = spark.read.parquet(str(output))
    return {"rows": written.count(), "users": written.select("user_id").distinct().count()}


def _score_bucket(events: pd.DataFrame, feats: pd.DataFrame, job: dict) -> pd.DataFrame:
    """One bucket's users: features with the on-demand views applied, scored, each user's best k."""
    if feats.empty:
        return pd.DataFrame({"user_id": [], "rank": [], "item_id": [], "score": []}
                            | ({"reasons": []} if job["stage"] is not None else {}))
    feats = _utc(feats.drop(columns=["_bucket"]).sort_values("user_id", kind="stable").reset_index(drop=True))
    feats = job["on_demand"](feats)
    feats = feats.drop(columns=[c for c in dataset.STATE_COLUMNS if c in feats])
    events = _utc(events.drop(columns=["_bucket"]))
    users = feats["user_id"].astype(str).tolist()
    parts = []
    for start in range(0, len(users), USERS_PER_CHUNK):
        chunk = users[start:start + USERS_PER_CHUNK]
        frame = with_features(requests_at(chunk, job["as_of"]), feats.iloc[start:start + USERS_PER_CHUNK])
        scores = tower_scores(job["model"], frame, job["vectors"])
        parts.append(top_per_user(events[events["user_id"].isin(chunk)], job["items"], job["item_ids"], chunk,
                                  scores, job["positives"], job["k"], job["as_of"], job["exclude_seen"],
                                  stage=job["stage"]))
    out = pd.concat(parts, ignore_index=True)
    out["score"] = out["score"].astype(np.float32)
    return out


def _utc(frame: pd.DataFrame) -> pd.DataFrame:
    """Spark hands timestamps over without their zone (in the session's, UTC): put it back."""
    for col in frame.columns:
        if pd.api.types.is_datetime64_dtype(frame[col]) and getattr(frame[col].dt, "tz", None) is None:
            frame[col] = frame[col].dt.tz_localize("UTC")
    return frame


def shop_counts(spark, events, item_ids: list[str], behaviours: Behaviours, hour: int) -> ShopCounts:
    """What recall's sources read from the whole shop, taken by Spark's tasks for requests in one hour:
    the item-to-item cosine (``cooccurrence.item_similarity``'s, each item's ``NEIGHBOURS`` best) and
    the item counts of each window (``popular.ItemCounts``'s). The driver receives a catalogue's worth."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    positions = spark.createDataFrame(pd.DataFrame({"item_id": item_ids, "pos": np.arange(len(item_ids))}),
                                      "item_id string, pos bigint")
    ev = events.join(F.broadcast(positions), "item_id").select(
        "user_id", "pos", "event_type", F.expr("unix_micros(event_timestamp) div 1000000").alias("s"))
    pairs = ev.where(F.col("event_type").isin(list(behaviours.sequence))).select("user_id", "pos").distinct()
    norms = pairs.groupBy("pos").agg(F.sqrt(F.count("*").cast("double")).alias("norm"))
    together = (pairs.alias("a").join(pairs.alias("b"), "user_id").where(F.col("a.pos") != F.col("b.pos"))
                .groupBy(F.col("a.pos").alias("i"), F.col("b.pos").alias("j")).count())
    cosine = (together.join(norms.withColumnRenamed("pos", "i").withColumnRenamed("norm", "ni"), "i")
              .join(norms.withColumnRenamed("pos", "j").withColumnRenamed("norm", "nj"), "j")
              .select("i", "j", (F.col("count") / ((F.col("ni") + 1e-12) * (F.col("nj") + 1e-12))).alias("sim")))
    best = Window.partitionBy("i").orderBy(F.col("sim").desc(), F.col("j"))
    top = cosine.withColumn("n", F.row_number().over(best)).where(F.col("n") <= NEIGHBOURS).toPandas()
    similarity = sparse.csr_matrix((top["sim"].to_numpy(np.float32), (top["i"].to_numpy(), top["j"].to_numpy())),
                                   shape=(len(item_ids), len(item_ids)))
    end = hour * HOUR
    kinds = {"behaviour": list(behaviours.sequence), "targets": list(behaviours.targets)}
    sums = [F.sum(F.when(F.col("event_type").isin(types) & (F.col("s") >= end - w) & (F.col("s") < end), 1)
                  .otherwise(0)).alias(f"{kind}_{w}") for kind, types in kinds.items() for w in WINDOWS]
    counted = ev.groupBy("pos").agg(*sums).toPandas()

    def window_counts(kind: str) -> WindowCounts:
        out = {}
        for w in WINDOWS:
            values = np.zeros(len(item_ids), dtype=np.float32)
            values[counted["pos"].to_numpy()] = counted[f"{kind}_{w}"].to_numpy(np.float32)
            out[w] = values
        return WindowCounts(hour, out)
    return ShopCounts(similarity, window_counts("behaviour"), window_counts("targets"))
