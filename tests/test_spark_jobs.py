"""The spark profile's jobs past the build: `persona recommend` (users scored in Spark's tasks from Feast's
Spark join and the log read where it lives) and the training set (Feast's Spark join written as Parquet
shards), each equal to the one-process path on the same log."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from core.config import DEFAULT_SEQUENCE_TYPES
from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import feast_config, registry
from feature_repo.pipeline.build import build
from ingestion.ingest import ingest
from persona import sample_data
from persona.cli import app
from training import dataset
from training.model import ModelConfig, ProfileModel
from training.model_store import save_to_bentoml
from training.recall.fit import Behaviours, make_recall
from training.recall.lexical import item_texts
from training.recall.package import TwoStageSpec
from training.recall.ranker import Ranker, RankerConfig
from training.workflow import RunConfig, feature_spec, recommend
from validation.gate import Gate

pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")

POSITIVES = {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0, "review": 3.0}


@pytest.fixture(scope="module")
def spark_shop(tmp_path_factory, shop, tiny_bert):
    """A spark-profile workspace built from the log, and an untrained model over its features (the
    scoring path, not the weights, is under test)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    root = tmp_path_factory.mktemp("spark_recommend")
    ws, folder = root / "ws", root / "data"
    ws.mkdir()
    (ws / "persona.yaml").write_text("profile: spark\n")
    sample_data.write(shop, folder)
    url = f"sqlite:///{ws / 'eventlog.db'}"
    log = EventLog(url)
    assert ingest(load_batch(folder), log, Gate())[0].quarantined == 0
    store, _ = registry.apply(ws, "spark")
    build(log, "spark", ws)
    events, items = log.read_table("events"), log.read_table("items")
    frame = dataset.fetch_features(store, dataset.build_examples(events, items, POSITIVES).head(300))
    torch.manual_seed(0)
    model = ProfileModel.build(ModelConfig(bert_path=tiny_bert, dim=16, hidden=32, embed_dim=4, seq_len=10),
                               feature_spec(store, frame)).eval()
    behaviours = Behaviours(list(DEFAULT_SEQUENCE_TYPES), list(POSITIVES), POSITIVES)
    names = make_recall(events, items, behaviours, True, item_texts(items)).feature_names()
    torch.manual_seed(1)  # a random ranker: its scores seldom tie, so the order is a sharp check
    ranker = Ranker(len(names), RankerConfig(), np.zeros(len(names)), np.ones(len(names))).eval()
    two_stage = (ranker, TwoStageSpec(names, behaviours, with_tower=True, lexical=True))
    yield ws, url, log, store, model, events, items, two_stage
    log.dispose()
    mp.undo()


@pytest.mark.parametrize("ranking", ["towers", "recall + rank"])
def test_spark_tasks_score_users_as_the_local_recommend_does(spark_shop, tmp_path, ranking):
    """Several ranges of the log (rows_per_partition below the log's size), every user with an event, and
    one as-of time inside the log: the same top 5 per user, the same scores, as the one-process path;
    with a ranker, the same reasons too (its sources' shop-wide counts taken by Spark's tasks)."""
    from feature_repo.pipeline.spark_build import spark_session
    from training.spark_recommend import recommend_on_spark

    ws, url, _, store, model, events, items, two_stage = spark_shop
    two_stage = two_stage if ranking == "recall + rank" else None
    as_of = events["event_timestamp"].quantile(0.8).floor("s")
    local = recommend(model, store, events, items, POSITIVES, 5, None, as_of, two_stage=two_stage)
    spark = spark_session(feast_config.feature_store_config("spark", ws)["offline_store"]["spark_conf"])
    out = tmp_path / "recs.parquet"
    written = recommend_on_spark(spark, store, model, items, POSITIVES, 5, None, as_of, url, out,
                                 two_stage=two_stage, rows_per_partition=1_000)
    assert written["users"] == events["user_id"].nunique() and written["rows"] == len(local)
    assert list(out.glob("part-*.parquet"))  # written by the tasks, never collected
    got = pd.read_parquet(out).sort_values(["user_id", "rank"]).reset_index(drop=True)
    want = local.sort_values(["user_id", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["user_id", "rank"]], want[["user_id", "rank"]], check_dtype=False)
    # the same items where the scores are not tied (a tie may come out in either order)
    ties = want.groupby("user_id")["score"].transform(lambda s: s.round(4).duplicated(keep=False))
    same = (got["item_id"] == want["item_id"]) & ~ties
    assert same.sum() == (~ties).sum()
    np.testing.assert_allclose(got["score"][same], want["score"][same], rtol=1e-5, atol=1e-4)
    if two_stage is not None:
        assert list(got.columns) == list(want.columns) == ["user_id", "rank", "item_id", "score", "reasons"]
        assert (got["reasons"][same] == want["reasons"][same]).all() and got["reasons"].str.len().gt(0).any()
    engaged = events[events["event_type"].isin(list(POSITIVES)) & (events["event_timestamp"] <= as_of)]
    pairs = set(zip(engaged["user_id"], engaged["item_id"], strict=True))
    assert not any((u, i) in pairs for u, i in zip(got["user_id"], got["item_id"], strict=True))


def test_cli_recommend_on_the_spark_profile_writes_parquet_from_the_tasks(spark_shop, tmp_path, monkeypatch):
    """`persona recommend` on a spark workspace with a model that has a ranker: the users asked for, recall +
    rank with reasons (or the towers, asked), a folder of Parquet parts; CSV is refused there (one file
    would be written by one process)."""
    ws, _, _, store, model, events, _, two_stage = spark_shop
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    save_to_bentoml(model, store, None, events, RunConfig(model=model.cfg), two_stage=two_stage)
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u000001", "u000002", "nobody"]}).to_csv(users, index=False)
    out = tmp_path / "recs.parquet"
    result = CliRunner().invoke(app, ["recommend", "-w", str(ws), "--k", "4", "--users", str(users),
                                      "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.is_dir() and "in Spark's tasks" in " ".join(result.output.split())
    recs = pd.read_parquet(out)
    assert set(recs["user_id"]) == {"u000001", "u000002", "nobody"}  # a user with no events gets the towers' best
    assert (recs.groupby("user_id").size() == 4).all() and "reasons" in recs
    towers = CliRunner().invoke(app, ["recommend", "-w", str(ws), "--k", "2", "--no-recall-rank", "--output",
                                      str(tmp_path / "towers.parquet")], catch_exceptions=False)
    assert towers.exit_code == 0, towers.output
    assert list(pd.read_parquet(tmp_path / "towers.parquet").columns) == ["user_id", "rank", "item_id", "score"]
    refused = CliRunner().invoke(app, ["recommend", "-w", str(ws), "--output", str(tmp_path / "r.csv")])
    assert refused.exit_code != 0 and ".parquet" in refused.output


def test_spark_tasks_take_the_counts_the_sources_take_from_the_events(spark_shop):
    """The item-to-item cosine and every window's item counts, taken by Spark's tasks, equal those the
    sources compute from the whole log in one process (an hour inside the log, so windows cut it)."""
    from feature_repo.pipeline import spark_source
    from feature_repo.pipeline.spark_build import spark_session
    from training.recall.cooccurrence import item_similarity
    from training.recall.history import HOUR
    from training.recall.popular import WINDOWS, ItemCounts
    from training.spark_recommend import EVENT_COLUMNS, shop_counts

    ws, url, _, _, _, events, items, (_, spec) = spark_shop
    spark = spark_session(feast_config.feature_store_config("spark", ws)["offline_store"]["spark_conf"])
    item_ids = items["item_id"].astype(str).tolist()
    index = {i: k for k, i in enumerate(item_ids)}
    hour = int(events["event_timestamp"].quantile(0.6).value // 10**9 // HOUR)
    log = spark_source.read_table(spark, url, "events", "user_id", 1_000).select(*EVENT_COLUMNS)
    counts = shop_counts(spark, log, item_ids, spec.behaviours, hour)
    want = item_similarity(events, index, spec.behaviours.sequence)
    assert counts.similarity.nnz == want.nnz
    assert abs(counts.similarity - want).max() == 0  # bit for bit: both break ties between candidates alike
    for got, types in ((counts.behaviour, spec.behaviours.sequence), (counts.targets, list(spec.behaviours.targets))):
        local = ItemCounts(events, index, types)
        for w in WINDOWS:
            np.testing.assert_array_equal(got.window(hour, w), local.window(hour, w))
    with pytest.raises(ValueError, match="taken for hour"):
        counts.behaviour.window(hour + 1, WINDOWS[0])


def test_the_training_set_on_spark_equals_the_local_profiles_rows(spark_shop, tmp_path):
    """The same labelled rows through Feast's Spark join, written as shards by the tasks, read back with
    the on-demand views applied: the rows `dataset.fetch_features` gives on the local profile (DuckDB),
    value for value."""
    from feature_repo.pipeline.spark_build import spark_session
    from training.spark_training_set import TrainingShards, write_training_set

    ws, _, log, store, _, events, items, _ = spark_shop
    local_ws = tmp_path / "local"
    local_ws.mkdir()
    local_store, _ = registry.apply(local_ws, "local")
    build(log, "local", local_ws)
    examples = dataset.build_examples(events, items, POSITIVES)
    want = dataset.fetch_features(local_store, examples)
    spark = spark_session(feast_config.feature_store_config("spark", ws)["offline_store"]["spark_conf"])
    ddl = ("user_id string, item_id string, session string, event_timestamp timestamp, device string, "
           "channel string, label bigint, weight double, kind string, query string, request_timestamp timestamp, "
           "example_id bigint")
    columns = [part.split()[0] for part in ddl.split(", ")]
    written = write_training_set(store, spark.createDataFrame(examples[columns], ddl).repartition(3), tmp_path / "set",
                                 rows_per_shard=300)
    assert written["rows"] == len(examples) and written["shards"] >= 3
    got = TrainingShards(tmp_path / "set").frame()
    assert sorted(got.columns) == sorted(want.columns)
    _assert_same_rows(want, got)


def _assert_same_rows(want: pd.DataFrame, got: pd.DataFrame) -> None:
    """Column for column, row for row: lists as lists, numbers to rounding, the rest as text (nulls alike)."""
    got = got[list(want.columns)]
    for col in want.columns:
        a, b = want[col], got[col]
        if a.map(lambda v: isinstance(v, (list, np.ndarray))).any():
            assert [_listed(x) for x in a] == [_listed(x) for x in b], col
        elif pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=1e-9, err_msg=col)
        else:
            assert [_text(v) for v in a] == [_text(v) for v in b], col


def _listed(value):
    return list(value) if isinstance(value, (list, np.ndarray)) else value


def _text(value):
    return None if pd.isna(value) else str(value)


def test_labelled_rows_on_spark_are_the_one_process_rows_of_each_range(spark_shop, tmp_path):
    """`build_examples` in Spark's tasks, a range of whole users each (several here): the positives and the
    exposures are the one-process rows, field for field (every exposure kept, so no draw differs); each
    negative existed at its time in the whole log and is not its positive's item; ids are unique. Then
    the rows go through Feast's Spark join into shards, none lost."""
    from feature_repo.pipeline.spark_build import spark_session
    from training.spark_training_set import examples_on_spark, write_training_set

    ws, url, _, store, _, events, items, _ = spark_shop
    spark = spark_session(feast_config.feature_store_config("spark", ws)["offline_store"]["spark_conf"])
    labelled = examples_on_spark(spark, url, items, POSITIVES, exposure_ratio=1e9, rows_per_partition=1_000)
    assert labelled.rdd.getNumPartitions() >= 4
    got = labelled.toPandas()  # the test's small log only: the job itself never collects
    want = dataset.build_examples(events, items, POSITIVES, exposure_ratio=1e9)
    assert got["example_id"].is_unique
    key = ["kind", "user_id", "item_id", "session"]
    fields = key + ["event_timestamp", "weight", "label", "device", "channel", "query"]

    def seen(frame):
        frame = frame[frame["kind"] != "negative"][fields].copy()
        frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
        frame = frame.apply(lambda col: col.map(lambda v: None if pd.isna(v) else str(v)))
        return frame.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(seen(got), seen(want))
    negatives = got[got["kind"] == "negative"]
    assert 0.9 * 2 * (got["kind"] == "positive").sum() <= len(negatives) <= 2 * (got["kind"] == "positive").sum()
    first = events.groupby("item_id")["event_timestamp"].min()
    at = pd.to_datetime(negatives["event_timestamp"], utc=True)
    assert (negatives["item_id"].map(first).fillna(pd.Timestamp.min.tz_localize("UTC")) <= at).all()
    written = write_training_set(store, labelled, tmp_path / "set", rows_per_shard=500)
    assert written["rows"] == len(got) and written["shards"] >= 2


def test_cli_training_set_gives_the_same_shards_on_spark_and_in_one_process(spark_shop, tmp_path, monkeypatch):
    """`persona training-set` on the spark workspace and on a local one over the same log: the log fits one
    range, so the tasks draw what one process draws, and the two sets are the same rows, feature for
    feature, whichever way they were written."""
    from training.spark_training_set import TrainingShards

    ws, url, log, _, _, _, _, _ = spark_shop
    local_ws = tmp_path / "local"
    local_ws.mkdir()
    (local_ws / "persona.yaml").write_text("profile: local\n")
    registry.apply(local_ws, "local")
    build(log, "local", local_ws)
    runner = CliRunner()
    on_spark = runner.invoke(app, ["training-set", "-w", str(ws), "--output", str(tmp_path / "spark")],
                             catch_exceptions=False)
    assert on_spark.exit_code == 0, on_spark.output
    monkeypatch.setenv("PERSONA_EVENT_LOG_URL", url)  # the local workspace reads the same log
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))  # else the command sets it for later tests
    here = runner.invoke(app, ["training-set", "-w", str(local_ws), "--output", str(tmp_path / "here"),
                               "--rows-per-shard", "400"], catch_exceptions=False)
    assert here.exit_code == 0, here.output
    a, b = TrainingShards(tmp_path / "spark").frame(), TrainingShards(tmp_path / "here").frame()
    assert len(list((tmp_path / "here").glob("part-*.parquet"))) > 1 and len(a) == len(b) > 0
    assert sorted(a.columns) == sorted(b.columns) and set(a["kind"]) == {"positive", "exposure"}
    _assert_same_rows(a, b)


def test_the_spark_profile_trains_from_its_shards_in_two_processes_and_recommends(spark_shop, tiny_bert, tmp_path,
                                                                                   monkeypatch):
    """The spark profile's whole path past ingest and build, no step reading the log into one process:
    `persona training-set` (Spark's tasks), `persona train --training-set --nproc 2` (two DDP processes,
    each streaming its own shards, Feast's on-demand views applied as they read), `persona recommend`
    (Spark's tasks) with the model it saved."""
    from training.model_store import load_from_bentoml

    ws, _, _, _, _, events, _, _ = spark_shop
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    runner = CliRunner()
    folder = tmp_path / "set"
    written = runner.invoke(app, ["training-set", "-w", str(ws), "--output", str(folder), "--rows-per-shard", "300"],
                            catch_exceptions=False)
    assert written.exit_code == 0, written.output
    trained = runner.invoke(app, ["train", "-w", str(ws), "--training-set", str(folder), "--nproc", "2", "--epochs",
                                  "2", "--bert", tiny_bert], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    _, meta, _ = load_from_bentoml("latest")
    assert meta["ranking"] == "two towers" and meta["data_window"]["to"] <= events["event_timestamp"].max().isoformat()
    history = meta["train_config"]
    assert history["nproc"] == 2 and history.get("max_seconds") is None  # an epoch count, no time budget
    out = tmp_path / "recs.parquet"
    recs = runner.invoke(app, ["recommend", "-w", str(ws), "--k", "3", "--output", str(out)], catch_exceptions=False)
    assert recs.exit_code == 0, recs.output
    got = pd.read_parquet(out)
    assert set(got["user_id"]) == set(events["user_id"]) and (got.groupby("user_id").size() == 3).all()
