"""`persona recommend` on the spark profile: users scored in Spark's tasks from Feast's Spark join and the
log read where it lives, equal to the local scoring of the same store."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

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
    yield ws, url, log, store, model, events, items
    log.dispose()
    mp.undo()


def test_spark_tasks_score_users_as_the_local_recommend_does(spark_shop, tmp_path, monkeypatch):
    """Several ranges of the log (rows_per_partition below the log's size), every user with an event, and
    one as-of time inside the log: the same top 5 per user, the same scores, as the one-process path."""
    from feature_repo.pipeline.spark_build import spark_session
    from training.spark_recommend import recommend_on_spark

    ws, url, _, store, model, events, items = spark_shop
    as_of = events["event_timestamp"].quantile(0.8).floor("s")
    local = recommend(model, store, events, items, POSITIVES, 5, None, as_of)
    spark = spark_session(feast_config.feature_store_config("spark", ws)["offline_store"]["spark_conf"])
    out = tmp_path / "recs.parquet"
    written = recommend_on_spark(spark, store, model, items, POSITIVES, 5, None, as_of, url, out,
                                 rows_per_partition=1_000)
    assert written["users"] == events["user_id"].nunique() and written["rows"] == len(local)
    assert list(out.glob("part-*.parquet"))  # written by the tasks, never collected
    got = pd.read_parquet(out).sort_values(["user_id", "rank"]).reset_index(drop=True)
    want = local.sort_values(["user_id", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["user_id", "rank"]], want[["user_id", "rank"]], check_dtype=False)
    assert (got["score"] - want["score"]).abs().max() < 1e-4
    # the same items where the scores are not tied (a tie may come out in either order)
    ties = want.groupby("user_id")["score"].transform(lambda s: s.round(4).duplicated(keep=False))
    assert (got["item_id"][~ties] == want["item_id"][~ties]).all()
    engaged = events[events["event_type"].isin(list(POSITIVES)) & (events["event_timestamp"] <= as_of)]
    pairs = set(zip(engaged["user_id"], engaged["item_id"], strict=True))
    assert not any((u, i) in pairs for u, i in zip(got["user_id"], got["item_id"], strict=True))


def test_cli_recommend_on_the_spark_profile_writes_parquet_from_the_tasks(spark_shop, tmp_path, monkeypatch):
    """`persona recommend` on a spark workspace: the users asked for, a folder of Parquet parts; CSV is
    refused there (one file would be written by one process)."""
    ws, _, _, store, model, events, _ = spark_shop
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    save_to_bentoml(model, store, None, events, RunConfig(model=model.cfg))
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u000001", "u000002", "nobody"]}).to_csv(users, index=False)
    out = tmp_path / "recs.parquet"
    result = CliRunner().invoke(app, ["recommend", "-w", str(ws), "--k", "4", "--users", str(users),
                                      "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.is_dir() and "in Spark's tasks" in " ".join(result.output.split())
    recs = pd.read_parquet(out)
    assert set(recs["user_id"]) == {"u000001", "u000002", "nobody"}  # a user with no events gets the towers' best
    assert (recs.groupby("user_id").size() == 4).all()
    refused = CliRunner().invoke(app, ["recommend", "-w", str(ws), "--output", str(tmp_path / "r.csv")])
    assert refused.exit_code != 0 and ".parquet" in refused.output
