"""`persona train --training-set DIR`: the profile model trained from a training set's Parquet shards, one
shard in memory at a time, in one process or in a DDP group of processes that each read their own shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from core import config
from core.privacy import Privacy
from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import materialize, registry
from feature_repo.pipeline.build import build
from ingestion.ingest import ingest
from persona import sample_data
from persona.cli import app
from training.model import ModelConfig, ProfileModel
from training.shard_train import held_out, train_from_shards
from training.spark_training_set import TrainingShards
from training.train import TrainConfig
from validation.gate import Gate


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A local workspace and its training set in several shards, written by `persona training-set`."""
    shop = sample_data.generate(n_users=400, n_items=150, days=14, seed=5)  # held-out positives enough to compare
    root = tmp_path_factory.mktemp("shards")
    ws, folder = root / "ws", root / "data"
    ws.mkdir()
    (ws / "persona.yaml").write_text("profile: local\n")
    sample_data.write(shop, folder)
    log = EventLog(f"sqlite:///{ws / 'eventlog.db'}")
    assert ingest(load_batch(folder), log, Gate())[0].quarantined == 0
    store, _ = registry.apply(ws, "local")
    build(log, "local", ws)
    materialize.materialize(ws)
    mp = pytest.MonkeyPatch()
    mp.setenv("BENTOML_HOME", str(root / "bentoml"))
    result = CliRunner().invoke(app, ["training-set", "-w", str(ws), "--output", str(root / "set"),
                                      "--rows-per-shard", "200"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    yield ws, log, store, root / "set"
    mp.undo()
    log.dispose()


def _small(tiny_bert: str) -> ModelConfig:
    return ModelConfig(bert_path=tiny_bert, dim=8, hidden=16, embed_dim=4, seq_len=10)


def test_held_out_rows_are_the_same_on_every_read():
    import pandas as pd

    ids = pd.Series(range(100_000))
    mask = held_out(ids, 0.05)
    assert (mask == held_out(ids.iloc[::-1], 0.05)[::-1]).all()  # by id, not by place
    assert 0.045 < mask.mean() < 0.055 and not held_out(ids, 0.0).any()


def test_two_processes_with_their_own_shards_reach_the_one_process_result(sharded, tiny_bert, tmp_path):
    """Two DDP processes (gloo), each streaming its own shards, against one process over all of them on the
    same seed and data: together they train on exactly the one process's rows, each on its shards only,
    and the held-out loss they reach is the one process's within the noise of a change of seed."""
    ws, log, store, folder = sharded
    shards = TrainingShards(folder)
    assert len(shards) >= 4
    items = log.read_table("items")["item_id"].astype(str).tolist()

    def run(nproc: int, seed: int):
        cfg = TrainConfig(epochs=4, batch_size=64, device="cpu", nproc=nproc, seed=seed, max_seconds=None,
                          max_positives=None, patience=10)
        return train_from_shards(store, shards, items, _small(tiny_bert), cfg, tmp_path / f"{nproc}-{seed}",
                                 progress=False)

    one, other_seed, two = run(1, 0), run(1, 1), run(2, 0)
    assert len(two.history) == len(one.history) == 4
    for a, b in zip(one.history, two.history, strict=True):
        assert sum(b["shards_per_process"]) == len(shards) and min(b["shards_per_process"]) >= 4  # whole shards
        assert min(b["rows_per_process"]) > 0.35 * sum(b["rows_per_process"])  # shared out by their rows
        assert sum(b["rows_per_process"]) == a["rows_per_process"][0]
        assert b["held_out_rows"] == a["held_out_rows"] > 0  # the same rows held out, wherever they were read
    first, last = one.history[0]["held_out_loss"], one.history[-1]["held_out_loss"]
    assert last < first  # it learns
    losses = [h["held_out_loss"] for h in one.history]
    lrs = [h["lr"] for h in one.history]  # each epoch's rate: lowered only after an epoch that did not improve
    for k in range(1, len(losses)):
        assert lrs[k] == pytest.approx(lrs[k - 1] * (1.0 if losses[k - 1] < min(losses[:k - 1] or [np.inf]) else 0.3))
    noise = abs(other_seed.history[-1]["held_out_loss"] - last)
    assert abs(two.history[-1]["held_out_loss"] - last) <= max(3 * noise, 0.02 * last)
    assert (tmp_path / "2-0" / "report.md").exists() and (tmp_path / "2-0" / "training_curve.png").exists()
    # the held-out rows ranked, by the model, by popularity as of each row's time, and by the id baselines
    assert list(two.metrics["model"])[:3] == ["Persona (profile model)", "popularity (as of the request's bucket)",
                                              "ItemKNN (cosine over the trained positives)"]
    assert two.metrics["model"].iloc[3].startswith("EASE (λ=") and len(two.metrics) == 4
    assert (two.metrics["requests"] == two.history[0]["held_out_rows"]).all()
    assert two.metrics["NDCG@10"].between(0, 1).all()
    assert "Held-out ranking" in (tmp_path / "2-0" / "report.md").read_text()


def test_with_few_shards_every_process_reads_each_and_keeps_its_rows(sharded, tiny_bert, tmp_path):
    """Three shards for two processes (fewer than 4 each): both read all three and split their rows by a
    hash of the example id; together they train on the one process's rows, the held-out ones aside."""
    from training.dataset import ItemCatalogue
    from training.shard_train import Plan, fit, survey
    from training.workflow import feature_spec

    _, log, store, folder = sharded
    shards = TrainingShards(folder)
    shards.paths = shards.paths[:3]
    found = survey(shards, progress=False)
    items = log.read_table("items")["item_id"].astype(str).tolist()
    catalogue = ItemCatalogue(store, items, found.position_times(), max_buckets=2)
    plan = Plan(shards, catalogue, found.held_out_share)
    assert plan.split_rows(2) and not plan.split_rows(1)
    histories = []
    for nproc in (1, 2):
        model = ProfileModel.build(_small(tiny_bert), feature_spec(store, found.sample_frame()))
        cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", nproc=nproc, max_seconds=None, max_positives=None)
        histories.append(fit(model, plan, cfg, progress=False)[0])
    alone, shared = histories
    assert shared["shards_per_process"] == [3, 3]
    assert sum(shared["rows_per_process"]) == alone["rows_per_process"][0] and min(shared["rows_per_process"]) > 0
    assert shared["held_out_rows"] == alone["held_out_rows"]


def test_cli_trains_from_shards_leaves_out_erased_users_and_recommends(sharded, tiny_bert, tmp_path, monkeypatch):
    """The command on a set written before a user was erased: their rows never train, the saved model says
    what it trained on (the set, the window, the users), and `persona recommend` serves it. The forget
    reaches what Persona wrote outside the workspace (the training set, the recommendations), not a copy
    made by hand: training from that copy leaves the user out as it reads."""
    import shutil

    from training.model_store import load_from_bentoml
    from training.provenance import METADATA_KEY, might_contain

    ws, log, _, written = sharded
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    gone = log.read_table("events")["user_id"].value_counts().index[0]  # the busiest user
    folder = tmp_path / "copied-set"  # a copy Persona did not write: forget cannot reach it, training must
    shutil.copytree(written, folder)
    total, theirs = (sum(len(f) for f in TrainingShards(written)),
                     sum(int((f["user_id"] == gone).sum()) for f in TrainingShards(written)))
    assert theirs > 0
    runner = CliRunner()
    forgot = runner.invoke(app, ["forget", "-w", str(ws), "--user", gone], catch_exceptions=False)
    assert forgot.exit_code == 0, forgot.output
    # the set `persona training-set` wrote outside the workspace lost the user's rows, and only those
    assert sum(len(f) for f in TrainingShards(written)) == total - theirs
    assert not any((f["user_id"] == gone).any() for f in TrainingShards(written))
    result = runner.invoke(app, ["train", "-w", str(ws), "--training-set", str(folder), "--nproc", "2", "--epochs",
                                 "2", "--bert", tiny_bert], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "saved model persona-profile:" in result.output
    _, meta, _ = load_from_bentoml("latest")
    assert meta["training_set"] == str(folder.resolve()) and meta["refit"] is False
    rows = sum(len(f[f["user_id"] != gone]) for f in TrainingShards(folder))
    assert meta["data_window"]["events"] == rows
    privacy = Privacy.for_workspace(ws, config.load(ws))
    assert not might_contain(meta[METADATA_KEY], privacy.hash(gone))
    kept = next(u for u in log.read_table("events")["user_id"] if u != gone)
    assert might_contain(meta[METADATA_KEY], privacy.hash(kept))
    report = next((ws / "reports" / "training").glob("*/report.md")).read_text()
    assert "erased users were left out" in report
    assert "| ItemKNN (cosine over the trained positives) |" in report and "| EASE (λ=" in report
    out = tmp_path / "recs.csv"
    recs = runner.invoke(app, ["recommend", "-w", str(ws), "--k", "3", "--output", str(out)], catch_exceptions=False)
    assert recs.exit_code == 0, recs.output
    assert out.exists()
    listed = pd.read_csv(out)
    second = str(listed["user_id"].iloc[0])  # recommendations written outside the workspace: forget reaches them
    forgot = runner.invoke(app, ["forget", "-w", str(ws), "--user", second], catch_exceptions=False)
    assert forgot.exit_code == 0, forgot.output
    after = pd.read_csv(out)
    assert second not in set(after["user_id"].astype(str))
    assert len(after) == (listed["user_id"].astype(str) != second).sum()


def test_cli_refuses_what_a_training_set_cannot_give(sharded, tmp_path, monkeypatch):
    ws, _, _, _ = sharded
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["train", "-w", str(ws), "--training-set", str(empty)])
    assert result.exit_code != 0 and "no training set in" in result.output
    result = CliRunner().invoke(app, ["train", "-w", str(ws), "--training-set", str(empty), "--target", "purchase"])
    assert result.exit_code != 0 and "--target" in result.output


def test_popularity_as_of_each_bucket_counts_only_earlier_positives(tmp_path):
    """Known answer: positives at 09:00 and 11:00 on item a, 10:00 on b (and a negative, and an erased user's
    positive) against buckets starting 08:00, 10:00 and 12:00."""
    import pandas as pd

    from training.dataset import ItemCatalogue
    from training.shard_train import bucket_popularity

    day = pd.Timestamp("2026-01-01", tz="UTC")
    rows = pd.DataFrame({"user_id": ["u1", "u2", "u1", "u3", "gone"], "item_id": ["a", "b", "a", "b", "a"],
                         "label": [1, 1, 1, 0, 1], "example_id": range(5),
                         "event_timestamp": [day + pd.Timedelta(hours=h) for h in (9, 10, 11, 9, 9)]})
    folder = tmp_path / "set"
    folder.mkdir()
    rows.iloc[:2].to_parquet(folder / "part-00000.parquet")
    rows.iloc[2:].to_parquet(folder / "part-00001.parquet")
    catalogue = ItemCatalogue.__new__(ItemCatalogue)  # the buckets only: no feature store
    catalogue.item_ids, catalogue.starts = ["a", "b", "c"], [day + pd.Timedelta(hours=h) for h in (8, 10, 12)]
    got = bucket_popularity(TrainingShards(folder), catalogue, lambda users: (users != "gone").to_numpy())
    assert got.tolist() == [[0, 0, 0], [1, 0, 0], [2, 1, 0]]  # b at 10:00 is not before the 10:00 bucket


def test_shards_are_shared_out_by_their_positives(tmp_path):
    """Known answers for the sharing: whole shards, the heaviest first to the lightest rank; the rows split
    instead when a rank would get no positive, or when the shards are too few."""
    from training.shard_train import Plan

    shards = TrainingShards.__new__(TrainingShards)
    shards.paths = [tmp_path / f"part-{k}.parquet" for k in range(8)]

    def plan(positives):
        return Plan(shards, None, 0.05, positives=positives)

    even = plan([5, 1, 4, 2, 3, 3, 0, 6])
    assert not even.split_rows(2)
    mine = [even.mine(r, 2) for r in range(2)]
    assert sorted(mine[0] + mine[1]) == sorted(shards.paths)
    loads = [sum(p for p, path in zip(even.positives, shards.paths, strict=True) if path in m) for m in mine]
    assert loads == [12, 12]
    assert plan([9, 0, 0, 0, 0, 0, 0, 0]).split_rows(2)  # one rank would train on nothing
    assert plan([1] * 8).split_rows(3)  # fewer than 4 shards a process
    assert not plan([1] * 8).split_rows(1) and plan([1] * 8).mine(0, 1) == shards.paths


def test_id_baselines_on_the_shards_know_their_answers(tmp_path):
    """Known answers: the matrix holds the trained-on positives only (not a held-out row's, a negative, an
    erased user's), and people who take a take b, so a held-out row whose history is a ranks b first."""
    import pandas as pd

    from training.shard_baselines import baseline_rows, trained_interactions

    users = [f"u{k}" for k in range(20)]
    rows = pd.DataFrame({"user_id": users * 2 + ["v1", "v2", "gone", "u0"],
                         "item_id": ["a"] * 20 + ["b"] * 20 + ["c", "c", "c", "d"],
                         "label": [1] * 43 + [0], "example_id": range(44)})
    folder = tmp_path / "set"
    folder.mkdir()
    rows.iloc[:25].to_parquet(folder / "part-00000.parquet")
    rows.iloc[25:].to_parquet(folder / "part-00001.parquet")
    index = {i: k for k, i in enumerate("abcde")}
    held = {3, 30}  # u3's a and u10's b were held out

    def trained(frame):
        return (frame["label"] == 1).to_numpy() & (frame["user_id"] != "gone").to_numpy() \
            & ~frame["example_id"].isin(held).to_numpy()
    x = trained_interactions(sorted(folder.glob("*.parquet")), index, trained)
    assert x.shape == (22, 5) and x.sum() == 38 + 2  # 40 a/b positives less 2 held out, v1's and v2's c
    assert x[:, 3].sum() == 0  # d was a negative
    got = {r["model"].split(" ")[0]: r for r in baseline_rows(x, np.array([1, 0]), [np.array([0]), np.array([2])])}
    assert set(got) == {"ItemKNN", "EASE"}
    for row in got.values():
        assert row["requests"] == 2
        assert row["Recall@10"] == 1.0  # the first row's b ranks first ...
        assert row["MRR@10"] == pytest.approx((1.0 + 1 / 2.5) / 2)  # ... the second's a ties with d and e


def test_a_second_day_reaches_the_next_training_set_and_model(sharded, tiny_bert, tmp_path, monkeypatch):
    """Day two for the shard path: a batch with new users, a new item and late events of old users, then
    features build and a new training set. The new users' and the late events' positives are rows of it,
    each with the features as of its own time (the new user's first purchase sees none of their later
    events); the model trained from it knows the new item, and the old set is left as it was."""
    import json

    import pandas as pd

    from training.model_store import load_from_bentoml

    ws, log, store, folder = sharded
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    before = {path.name: path.stat().st_mtime_ns for path in TrainingShards(folder).paths}
    events, items = log.read_table("events"), log.read_table("items")
    end = events["event_timestamp"].max()
    old_user = events["user_id"].value_counts().index[3]
    new_item = items.head(1).assign(item_id="day2-lamp", title="Day-two brass desk lamp")
    rows = [("day2-u1", "day2-lamp", "view", 1), ("day2-u1", "day2-lamp", "purchase", 2),
            ("day2-u1", items["item_id"].iloc[5], "purchase", 3), ("day2-u2", "day2-lamp", "purchase", 4),
            (old_user, "day2-lamp", "purchase", -30)]  # late: stamped a day before day one ended
    batch = pd.DataFrame([{"event_id": f"day2-{n}", "user_id": u, "item_id": i, "event_type": t,
                           "event_timestamp": end + pd.Timedelta(hours=h)} for n, (u, i, t, h) in enumerate(rows)])
    users = log.read_table("users").head(2).assign(user_id=["day2-u1", "day2-u2"])
    day2 = tmp_path / "day2"
    sample_data.write({"users": users, "items": new_item, "events": batch}, day2)
    from validation.gate import GateSettings

    assert ingest(load_batch(day2), log, Gate(GateSettings(on_schema_drift="accept")))[0].quarantined == 0
    build(log, "local", ws)
    materialize.materialize(ws)
    runner = CliRunner()
    second = tmp_path / "set2"
    result = runner.invoke(app, ["training-set", "-w", str(ws), "--output", str(second), "--rows-per-shard", "200"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    frame = TrainingShards(second).frame()
    positives = frame[frame["label"] == 1]
    for user, item, kind, hours in rows:
        if kind != "purchase":
            continue
        at = end + pd.Timedelta(hours=hours)
        row = positives[(positives["user_id"] == user) & (positives["item_id"] == item)
                        & (positives["event_timestamp"] == at)]
        assert len(row) == 1, (user, item)
        seen = json.loads(row["sequence_items"].iloc[0] or "[]")
        times = json.loads(row["sequence_times"].iloc[0] or "[]")
        assert all(pd.Timestamp(t, unit="s", tz="UTC") < at for t in times), (user, times)  # nothing from after
        if (user, hours) == ("day2-u1", 2):
            assert seen == ["day2-lamp"]  # its view an hour before, not its later purchase
    assert {path.name: path.stat().st_mtime_ns for path in TrainingShards(folder).paths} == before
    trained = runner.invoke(app, ["train", "-w", str(ws), "--training-set", str(second), "--epochs", "1",
                                  "--bert", tiny_bert], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    model, meta, _ = load_from_bentoml("latest")
    assert "day2-lamp" in model.spec.item_ids and meta["training_set"] == str(second.resolve())


def _latest_history(ws) -> pd.DataFrame:
    return pd.read_csv(sorted((ws / "reports" / "training").glob("*/history.csv"))[-1])


def test_processes_a_launcher_starts_on_two_machines_train_as_nproc_does(sharded, tiny_bert, tmp_path, monkeypatch):
    """Pods, as a Kubernetes Job starts them: two `torchrun` launchers (one a "machine", `--nnodes 2`), each
    running the same `persona train --training-set DIR`. Each process reads its own shards, rank 0 saves
    the model, and the epochs are those of `--nproc 2` on the same seed and data (the same rows per
    process, the same held-out loss up to the order of floating-point sums)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from training.distributed import free_port

    ws, _, _, folder = sharded
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    args = ["train", "-w", str(ws), "--training-set", str(folder), "--epochs", "2", "--bert", tiny_bert]
    local = CliRunner().invoke(app, [*args, "--nproc", "2"], catch_exceptions=False)
    assert local.exit_code == 0, local.output
    spawned = _latest_history(ws)

    persona = str(Path(sys.executable).parent / "persona")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "HF_HUB_OFFLINE": "1"}
    pods = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                              "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", persona,
                              *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in (0, 1)]
    outputs = [pod.communicate(timeout=900)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], outputs
    assert "saved model persona-profile:" in outputs[0] and "saved model" not in outputs[1]
    assert "rank 0 reports and saves the model" in outputs[1]
    launched = _latest_history(ws)
    assert len(launched) == len(spawned) == 2
    assert launched["rows_per_process"].tolist() == spawned["rows_per_process"].tolist()
    assert launched["shards_per_process"].tolist() == spawned["shards_per_process"].tolist()
    assert launched["held_out_loss"].tolist() == pytest.approx(spawned["held_out_loss"].tolist(), rel=1e-3)

    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)  # as the launcher leaves them: what a process refuses before it joins
    both = CliRunner().invoke(app, [*args, "--nproc", "2"])
    assert both.exit_code != 0 and "leave out --nproc" in both.output
    alone = CliRunner().invoke(app, ["train", "-w", str(ws), "--epochs", "1"])
    assert alone.exit_code != 0 and "--training-set DIR" in alone.output
    monkeypatch.delenv("MASTER_PORT")
    unset = CliRunner().invoke(app, args)
    assert unset.exit_code != 0 and "MASTER_PORT not set" in unset.output


POD = '''
import json
import sys
from pathlib import Path

from core.privacy import id_hash
from eventlog.store import EventLog
from feature_repo.pipeline.registry import feature_store
from training.model import ModelConfig
from training.shard_train import WithoutErased, train_from_shards
from training.spark_training_set import TrainingShards
from training.train import TrainConfig

ws, folder, bert, erased, out = sys.argv[1:]
log = EventLog(f"sqlite:///{ws}/eventlog.db")
items = log.read_table("items")["item_id"].astype(str).tolist()
log.dispose()
keep = WithoutErased(b"salt", frozenset({id_hash(erased, b"salt")}))
cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", max_seconds=None, max_positives=None)
run = train_from_shards(feature_store(Path(ws)), TrainingShards(Path(folder)), items,
                        ModelConfig(bert_path=bert, dim=8, hidden=16, embed_dim=4, seq_len=10), cfg,
                        Path(out).with_suffix(".report"), keep, progress=False)
Path(out).write_text(json.dumps({"rows": run.survey.rows, "dropped": run.survey.dropped,
                                 "users": sorted(run.survey.users), "history": run.history}, default=str))
'''


def test_pods_that_read_different_tombstones_leave_out_the_union(sharded, tiny_bert, tmp_path):
    """Each pod reads the tombstones as it starts, so a forget between two pods' starts leaves them with
    different erased sets. Joined first, they agree on the union: both leave out both users' rows, survey
    the same rows and plan the same epoch, and neither user is among those trained on."""
    import json
    import os
    import subprocess
    import sys

    from training.distributed import free_port

    ws, log, _, folder = sharded
    users = log.read_table("events")["user_id"].value_counts().index[1:3].tolist()  # busy, not the one erased above
    rows = {u: sum(int((f["user_id"] == u).sum()) for f in TrainingShards(folder)) for u in users}
    assert min(rows.values()) > 0
    script = tmp_path / "pod.py"
    script.write_text(POD)
    port = free_port()
    pods = []
    for rank, user in enumerate(users):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        pods.append(subprocess.Popen([sys.executable, str(script), str(ws), str(folder), tiny_bert, user,
                                      str(tmp_path / f"pod{rank}.json")], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    outputs = [pod.communicate(timeout=900)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], outputs
    zero, one = (json.loads((tmp_path / f"pod{rank}.json").read_text()) for rank in (0, 1))
    assert zero["dropped"] == one["dropped"] == sum(rows.values())  # each pod left out both users
    assert zero["rows"] == one["rows"] and zero["users"] == one["users"]
    assert not set(users) & set(zero["users"])
    assert len(zero["history"]) == 1 and one["history"] == []  # rank 0 keeps the epochs ...
    assert len(zero["history"][0]["rows_per_process"]) == 2 and min(zero["history"][0]["rows_per_process"]) > 0
