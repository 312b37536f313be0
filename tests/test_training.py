"""Training and evaluation on real Feast stores and a real BentoML model store. Unit-level runs use a
tiny randomly initialised BERT; one test loads the packaged all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import materialize, registry
from feature_repo.pipeline.build import build
from ingestion.ingest import ingest
from persona import sample_data
from persona.cli import app
from training import dataset
from training.model import Catalogue, ModelConfig, ProfileModel
from training.model_store import load_from_bentoml, save_to_bentoml
from training.train import TrainConfig
from training.workflow import PERSONA, RunConfig, refit, refit_rows, run
from validation.gate import Gate

POSITIVES = {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0, "review": 3.0}


def _workspace(root: Path, tables: dict[str, pd.DataFrame]):
    ws = root / "ws"
    folder = root / "data"
    sample_data.write(tables, folder)
    log = EventLog(f"sqlite:///{ws / 'eventlog.db'}") if ws.mkdir(parents=True) is None else None
    report, _ = ingest(load_batch(folder), log, Gate())
    assert report.quarantined == 0
    store, _ = registry.apply(ws, "local")
    build(log, "local", ws)
    materialize.materialize(ws)
    return ws, log, store


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory, shop):
    root = tmp_path_factory.mktemp("training")
    ws, log, store = _workspace(root, shop)
    yield ws, log, store
    log.dispose()


def _run_cfg(bert: str, splits=("global", "loo")) -> RunConfig:
    return RunConfig(model=ModelConfig(bert_path=bert, dim=16, hidden=32, embed_dim=4, seq_len=10),
                     train=TrainConfig(epochs=2, batch_size=32, max_positives=400, device="cpu"), splits=splits)


def test_examples_never_see_their_own_event(trained_ws):
    ws, log, store = trained_ws
    events, items = log.read_table("events"), log.read_table("items")
    examples = dataset.build_examples(events, items, POSITIVES, neg_per_pos=2)
    assert set(examples["kind"]) == {"positive", "exposure", "negative"}
    assert examples.loc[examples.kind == "positive", "weight"].isin(POSITIVES.values()).all()
    sample = examples[examples.kind == "positive"].sample(40, random_state=0)
    feats = dataset.fetch_features(store, sample.reset_index(drop=True))
    for row in feats.itertuples():
        mine = events[(events.user_id == row.user_id) & (events.event_type == "click")]
        before = mine[(mine.event_timestamp < row.event_timestamp)
                      & (mine.event_timestamp > row.event_timestamp - pd.Timedelta(days=30))]
        # The state just before T0: every click strictly before it, none at or after it.
        assert row.click_count_30d == len(before), row
        assert pd.notna(row.item_title) and pd.notna(row.hour_sin)


def test_sampled_negatives_existed_at_the_time(trained_ws):
    _, log, _ = trained_ws
    events, items = log.read_table("events"), log.read_table("items")
    examples = dataset.build_examples(events, items, POSITIVES, neg_per_pos=3, seed=1)
    first_seen = events.groupby("item_id")["event_timestamp"].min()
    neg = examples[examples.kind == "negative"]
    seen = neg["item_id"].map(first_seen)
    assert (seen.isna() | (seen <= neg["event_timestamp"])).all()


def test_train_evaluate_refit_and_bentoml_roundtrip(trained_ws, tiny_bert, tmp_path, monkeypatch):
    ws, log, store = trained_ws
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    events, items = log.read_table("events"), log.read_table("items")
    cfg = _run_cfg(tiny_bert)
    result = run(store, events, items, POSITIVES, cfg, tmp_path / "report", progress=False)
    metrics = result["metrics"]
    assert set(metrics["split"]) == {"global time cut", "last interaction per user"}
    assert {"popularity", "item co-occurrence", "EASE (λ=100)", "sequential (SASRec-style, ids only)",
            "MLP tower, no text", "frozen BERT, no training", PERSONA} <= set(metrics["model"])
    assert {"all", "cold users", "active users", "with query", "without query"} <= set(metrics["segment"])
    overall = metrics[metrics.segment == "all"]
    for col in ("NDCG@10", "Recall@10", "Recall@50", "MRR@10", "coverage"):
        assert overall[col].between(0, 1).all()
    assert (overall["Recall@50"] >= overall["Recall@10"]).all()
    assert overall.loc[overall.model == PERSONA, "AUC"].notna().all()
    for name in ("report.md", "metrics.png", "training_curve.png", "metrics.csv"):
        assert (tmp_path / "report" / name).exists()
    assert "Where the time went" in (tmp_path / "report" / "report.md").read_text()
    assert result["stages"]["evaluation on the test requests"] > 0

    # The default refit continues the evaluated model (its vocabulary, new weights); the start stays as it was.
    evaluated = result["model"]
    before = {k: v.clone() for k, v in evaluated.state_dict().items()}
    warm = refit(store, result["frame"], result["spec"], cfg, epochs=1, progress=False, start=evaluated,
                 fit_cut=result["fit_cut"])
    assert warm is not evaluated and warm.spec is evaluated.spec
    assert all(torch.equal(before[k], v) for k, v in evaluated.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in warm.state_dict().items())

    model = refit(store, result["frame"], result["spec"], cfg, epochs=1, progress=False)
    tag = save_to_bentoml(model, store, metrics, events, cfg)
    loaded, meta, _ = load_from_bentoml(str(tag.version))
    assert meta["feature_services"] == {"user": "profile_v2", "item": "items_v1"}
    assert {"click_count_30d", "sequence_items"} <= set(meta["features"]["user"]) and meta["normalisation"]
    frame = result["frame"].head(50)
    catalogue = dataset.ItemCatalogue(store, items["item_id"].tolist(), frame["event_timestamp"], max_buckets=1)

    def scores(m):
        vectors = m.item_vectors(catalogue.frames[0])
        lookup = Catalogue({i: k for k, i in enumerate(catalogue.item_ids)}, vectors)
        return m.score(m.user_vectors(frame, catalogue=lookup), vectors)

    with torch.no_grad():
        a, b = scores(model), scores(loaded)
    assert torch.allclose(a, b, atol=1e-5)  # loading back gives identical scores
    import bentoml as bentoml_sdk

    home = Path(bentoml_sdk.models.get(tag).path).parents[2]  # BENTOML_HOME/models/<name>/<version>
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    listed = subprocess.run([bentoml, "models", "list"], capture_output=True, text=True,
                            env={**os.environ, "BENTOML_HOME": str(home)})
    assert str(tag) in listed.stdout


def test_workflow_with_trained_bert_layers(trained_ws, tiny_bert, tmp_path, monkeypatch):
    """Evaluation, warm refit and the BentoML round trip with BERT's top layer trained (the GPU default,
    here on a CPU): the refit moves that layer further, and the stored model scores as trained."""
    _, log, store = trained_ws
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    events, items = log.read_table("events"), log.read_table("items")
    cfg = _run_cfg(tiny_bert, splits=("loo",))
    cfg.model.finetune_layers, cfg.models, cfg.train.bert_lr = 1, ("persona", "frozen", "popularity"), 1e-2
    result = run(store, events, items, POSITIVES, cfg, tmp_path / "report", progress=False)
    assert {PERSONA, "frozen BERT, no training"} <= set(result["metrics"]["model"])
    evaluated = result["model"]
    assert evaluated.cfg.finetune_layers == 1 and evaluated.text_top is not None
    top = "bert.encoder.layer.1.output.dense.weight"
    before = evaluated.state_dict()[top].clone()
    warm = refit(store, result["frame"], result["spec"], cfg, epochs=1, progress=False, start=evaluated)
    assert torch.equal(evaluated.state_dict()[top], before) and not torch.equal(warm.state_dict()[top], before)

    tag = save_to_bentoml(warm, store, result["metrics"], events, cfg)
    loaded, _, _ = load_from_bentoml(str(tag.version))
    frame = result["frame"].head(30)
    catalogue = dataset.ItemCatalogue(store, items["item_id"].tolist(), frame["event_timestamp"], max_buckets=1)
    with torch.no_grad():
        for model in (warm, loaded):
            model.eval()
        vectors = [m.item_vectors(catalogue.frames[0]) for m in (warm, loaded)]
        users = [m.user_vectors(frame, catalogue=Catalogue({i: k for k, i in enumerate(catalogue.item_ids)}, v))
                 for m, v in zip((warm, loaded), vectors, strict=True)]
    assert torch.allclose(vectors[0], vectors[1], atol=1e-4) and torch.allclose(users[0], users[1], atol=1e-4)


def test_a_warm_refit_passes_over_the_rows_the_model_never_saw_and_as_many_it_did():
    t = pd.Timestamp("2024-01-01", tz="UTC")
    frame = pd.DataFrame({"user_id": ["a"] * 6 + ["b"] * 4 + ["c"] * 2,
                          "event_timestamp": [t + pd.Timedelta(days=d) for d in (*range(6), *range(4), *range(2))],
                          "label": 1}, index=range(100, 112))
    cut = pd.Series({"a": t + pd.Timedelta(days=4), "b": t + pd.Timedelta(days=3)})  # c: no cut, all seen
    rows = refit_rows(frame, cut, seed=0)
    new = {104, 105, 109}  # a's days 4 and 5, b's day 3: at or after their cuts
    assert new <= set(rows.index) and len(rows) == 2 * len(new)
    assert set(rows.index) - new <= set(frame.index) - new  # the replay: rows the model learnt from
    assert rows.index.is_monotonic_increasing and rows.equals(refit_rows(frame, cut, seed=0))  # seeded: a resume
    assert refit_rows(frame, None).equals(frame)  # no cut known: every row
    everything_seen = pd.Series({"a": t + pd.Timedelta(days=9), "b": t + pd.Timedelta(days=9)})
    assert refit_rows(frame, everything_seen).equals(frame)  # nothing new: every row, as before
    few_seen = refit_rows(frame, pd.Series({"a": t, "b": t, "c": t + pd.Timedelta(days=1)}), seed=0)
    assert len(few_seen) == len(frame)  # more new rows than seen ones: every seen row is replayed
    global_cut = refit_rows(frame, t + pd.Timedelta(days=3), seed=0)
    assert {103, 104, 105, 109} <= set(global_cut.index) and len(global_cut) == 8  # a single time cut


def test_cli_train_and_recommend(trained_ws, tiny_bert, tmp_path, monkeypatch):
    ws, log, _ = trained_ws
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "-w", str(ws), "--bert", tiny_bert, "--epochs", "1", "--max-positives",
                                 "200", "--splits", "global", "--no-baselines", "--finetune-layers", "1"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "NDCG@10" in result.output and "saved model persona-profile" in result.output
    out = tmp_path / "recs.csv"
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u000001", "u000002", "u000003"]}).to_csv(users, index=False)
    result = runner.invoke(app, ["recommend", "-w", str(ws), "--k", "5", "--users", str(users), "--output", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recs = pd.read_csv(out)
    # the towers' columns, and the reasons when training chose recall + rank to serve (tiny, noisy shop)
    assert list(recs.columns) in (["user_id", "rank", "item_id", "score"],
                                  ["user_id", "rank", "item_id", "score", "reasons"])
    assert (recs.groupby("user_id").size() == 5).all()
    events = log.read_table("events")
    for user, group in recs.groupby("user_id"):
        engaged = set(events[(events.user_id == user) & events.event_type.isin(list(POSITIVES))]["item_id"])
        assert not engaged & set(group["item_id"])  # already-engaged items are excluded
        assert list(group["rank"]) == [1, 2, 3, 4, 5] and group["score"].is_monotonic_decreasing
    parquet = tmp_path / "recs.parquet"
    result = runner.invoke(app, ["recommend", "-w", str(ws), "--k", "3", "--output", str(parquet),
                                 "--as-of", "2026-06-25T00:00:00Z"], catch_exceptions=False)
    assert result.exit_code == 0 and pd.read_parquet(parquet)["user_id"].nunique() > 10


@pytest.mark.parametrize("stripped", ["ratings with titles", "days only"])
def test_stripped_dataset_runs_end_to_end(stripped, tmp_path, tiny_bert, shop, monkeypatch):
    """Only ids, titles, categories (the contract's required columns) and reviews with ratings: no
    queries, descriptions, context, prices or sessions. Then the same with timestamps no finer than a
    day (many ties in time), on the leave-one-out split."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    rng = np.random.default_rng(0)
    users = shop["users"][["user_id"]]
    bare = stripped == "days only"
    items = shop["items"][["item_id", "title", "category"]]
    n = 1500
    reviews = pd.DataFrame({
        "user_id": rng.choice(users["user_id"], n), "item_id": rng.choice(items["item_id"], n),
        "event_type": "review", "rating": rng.integers(1, 6, n).astype(float),
        "event_timestamp": pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(rng.uniform(0, 60 * 86400, n), "s"),
    })
    if bare:
        reviews["event_timestamp"] = reviews["event_timestamp"].dt.floor("D")
    ws, log, store = _workspace(tmp_path, {"users": users, "items": items, "events": reviews})
    cfg = _run_cfg(tiny_bert, splits=("loo",) if bare else ("global",))
    events, items_ = log.read_table("events"), log.read_table("items")
    result = run(store, events, items_, POSITIVES, cfg, tmp_path / "report", progress=False)
    assert result["metrics"]["requests"].max() > 0
    model = refit(store, result["frame"], result["spec"], cfg, epochs=1, progress=False)
    save_to_bentoml(model, store, result["metrics"], events, cfg)
    recs = CliRunner().invoke(app, ["recommend", "-w", str(ws), "--k", "3", "--output", str(tmp_path / "r.csv")],
                              catch_exceptions=False)
    assert recs.exit_code == 0, recs.output
    log.dispose()


def test_real_minilm_weights_understand_text():
    """Integration: the packaged all-MiniLM-L6-v2 loads offline and embeds meaningfully."""
    spec_users = pd.DataFrame({"age": [30.0]})
    from training.encoding import FeatureSpec

    spec = FeatureSpec.fit(spec_users, spec_users, ["age"], [], [], [])
    model = ProfileModel.build(ModelConfig(), spec).eval()
    assert model.bert.config.hidden_size == 384
    with torch.no_grad():
        vecs = model.encode_text(["waterproof trail running shoes", "off-road running sneakers",
                                  "espresso machine with milk frother"], 32)
    sims = torch.nn.functional.cosine_similarity(vecs[0:1], vecs[1:])
    assert sims[0] > sims[1] + 0.2
    with torch.no_grad():
        u = model.user_vectors(pd.DataFrame({"age": [30.0], "query": ["trail shoes"]}))
    assert u.shape == (1, model.cfg.dim) and torch.isfinite(u).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs only where CUDA is present")
def test_training_uses_cuda_when_present(trained_ws, tiny_bert, tmp_path):
    _, log, store = trained_ws
    cfg = _run_cfg(tiny_bert, splits=("global",))
    cfg.train.device = "auto"
    result = run(store, log.read_table("events"), log.read_table("items"), POSITIVES, cfg, tmp_path, progress=False)
    assert result["metrics"]["requests"].max() > 0
    model = refit(store, result["frame"], result["spec"], cfg, epochs=1, progress=False)
    assert model.device.type == "cuda"
    assert model.cfg.finetune_layers == 2 and model.text_top is not None  # "auto" trains BERT's top layers here
    json.dumps(result["best_epochs"])


def test_gpu_check_replays_exactly_what_feast_gave(trained_ws, tmp_path):
    """benchmarks/gpu_check.py runs training where Feast is not: its replayed answers must be the
    recorded ones, found by the entity rows asked for, and an entity frame never recorded is an error."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_check import RecordingStore, ReplayStore, entity_key

    from training.workflow import feature_spec

    _, log, store = trained_ws
    events, items = log.read_table("events"), log.read_table("items")
    sample = dataset.build_examples(events, items, POSITIVES).sample(60, random_state=1).reset_index(drop=True)
    recorder = RecordingStore(store, tmp_path)
    recorded = dataset.fetch_features(recorder, sample)
    recorder.save_index()
    replayer = ReplayStore(tmp_path)
    replayed = dataset.fetch_features(replayer, sample)
    assert replayer.replayed == len(recorder.calls) == 2
    pd.testing.assert_frame_equal(replayed, recorded, check_dtype=False)
    assert feature_spec(replayer, replayed).to_dict() == feature_spec(recorder, recorded).to_dict()

    entity = sample[["user_id", "event_timestamp"]]
    reordered = entity[["event_timestamp", "user_id"]].assign(
        event_timestamp=lambda f: f["event_timestamp"].astype("datetime64[ns, UTC]"))
    assert entity_key("s", reordered) == entity_key("s", entity)  # column order and time unit do not matter
    moved = sample.assign(event_timestamp=sample["event_timestamp"] + pd.Timedelta(microseconds=1))
    with pytest.raises(LookupError, match="no recorded answer"):
        dataset.fetch_features(replayer, moved)


def test_finetuned_top_layers_train_and_serve_as_saved(trained_ws, tiny_bert, tmp_path):
    """k trained top layers over cached lower states: the same vectors as the whole BERT, only those
    layers move, and the saved model serves (whole BERT, frozen) exactly what training scored."""
    from training.train import train

    frame, spec, catalogue = _small_training_set(trained_ws, buckets=2)
    base = ModelConfig(bert_path=tiny_bert, dim=8, hidden=16, embed_dim=4, seq_len=10)
    texts = ["waterproof trail running shoes", "a mug", "", "waterproof trail running shoes"]
    frozen = ProfileModel.build(replace(base, finetune_layers=0), spec)
    model = ProfileModel.build(replace(base, finetune_layers=1), spec)
    assert torch.allclose(model.encode_text(texts, 16), frozen.encode_text(texts, 16), atol=1e-5)

    before = {n: p.detach().clone() for n, p in model.bert.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", patience=5, bert_lr=1e-2)
    train(model, frame, catalogue, cfg, progress=False)
    moved = {n for n, p in model.bert.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("encoder.layer.1.") for n in moved)  # the top layer, nothing below
    assert not torch.allclose(model.encode_text(texts, 16), frozen.encode_text(texts, 16), atol=1e-4)

    model.save(tmp_path / "model")
    served = ProfileModel.load(tmp_path / "model")
    assert served.text_top is None and served.cfg.finetune_layers == 1
    with torch.no_grad():
        assert torch.allclose(served.item_vectors(catalogue.frames[0]), model.item_vectors(catalogue.frames[0]),
                              atol=1e-4)
        users = frame[frame["label"] == 1].head(20)
        assert torch.allclose(served.user_vectors(users), model.user_vectors(users), atol=1e-4)


def _small_training_set(trained_ws, buckets: int):
    """600 examples with their point-in-time features, their spec and catalogue."""
    from training.workflow import feature_spec

    _, log, store = trained_ws
    events, items = log.read_table("events"), log.read_table("items")
    frame = dataset.fetch_features(store, dataset.build_examples(events, items, POSITIVES).head(600))
    catalogue = dataset.ItemCatalogue(store, items["item_id"].tolist(), frame["event_timestamp"],
                                      max_buckets=buckets)
    return frame, feature_spec(store, frame), catalogue


def test_weight_average_is_what_validation_scores_and_training_keeps(trained_ws, tiny_bert):
    """Known answers on one weight; then two seeded runs, with and without the average: the same steps,
    validation scores the averaged weights, and training keeps the best epoch's average."""
    from training.train import WeightAverage, train

    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight.data.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    for value in (1.0, 3.0):
        layer.weight.data.fill_(value)
        average.update()
    first = 1.0 * (1 - 2 / 11)  # the decay ramps up: min(0.5, 2/11), then min(0.5, 3/12)
    with average.applied():
        assert layer.weight.item() == pytest.approx(first * 0.25 + 3.0 * 0.75)
    assert layer.weight.item() == 3.0  # its own weight again

    frame, spec, catalogue = _small_training_set(trained_ws, buckets=2)
    mcfg = ModelConfig(bert_path=tiny_bert, dim=8, hidden=16, embed_dim=4, seq_len=10)

    def run(decay: float | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        seen: list[torch.Tensor] = []

        def weights(m) -> torch.Tensor:
            return torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])

        def validate(m) -> float:
            seen.append(weights(m))
            return [0.3, 0.5, 0.4][len(seen) - 1]  # the second epoch is the best

        model = ProfileModel.build(mcfg, spec)
        train(model, frame, catalogue, TrainConfig(epochs=3, batch_size=32, device="cpu", patience=5,
                                                   average_decay=decay), validate, progress=False)
        return seen, weights(model)

    last_steps, kept_plain = run(None)
    averaged, kept = run(0.9)
    assert torch.equal(kept_plain, last_steps[1]) and torch.equal(kept, averaged[1])
    assert all(not torch.allclose(a, b) for a, b in zip(averaged, last_steps, strict=True))


def test_time_budget_bounds_training_not_the_epoch_that_crosses_it(trained_ws, tiny_bert):
    """Known answers for the budget rule; then a budget far shorter than an epoch stops training after
    the first epoch, and no budget runs every epoch (no timings: the outcomes hold on any machine)."""
    from training.train import budget_spent, train

    assert not budget_spent(100.0, 20.0, 240.0) and not budget_spent(220.0, 20.0, 240.0)
    assert budget_spent(221.0, 20.0, 240.0)  # the next epoch would end at 241 s
    assert not budget_spent(10_000.0, 500.0, None) and not budget_spent(10_000.0, 500.0, 0.0)

    frame, spec, catalogue = _small_training_set(trained_ws, buckets=2)
    mcfg = ModelConfig(bert_path=tiny_bert, dim=8, hidden=16, embed_dim=4, seq_len=10)
    for budget, epochs in ((1e-6, 1), (None, 3)):
        cfg = TrainConfig(epochs=3, batch_size=32, device="cpu", patience=5, max_seconds=budget)
        history = train(ProfileModel.build(mcfg, spec), frame, catalogue, cfg, None, progress=False)
        assert len(history) == epochs


def test_checkpoint_resume_and_grad_accumulation(trained_ws, tiny_bert, tmp_path):
    from training.train import train

    frame, spec, catalogue = _small_training_set(trained_ws, buckets=4)
    mcfg = ModelConfig(bert_path=tiny_bert, dim=8, hidden=16, embed_dim=4, seq_len=10)
    first = TrainConfig(epochs=1, batch_size=16, grad_accum=2, device="cpu", checkpoint_dir=str(tmp_path),
                        patience=5)
    history = train(ProfileModel.build(mcfg, spec), frame, catalogue, first, progress=False)
    assert (tmp_path / "checkpoint.pt").exists() and len(history) == 1
    steps = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["average"]["steps"]
    assert steps > 0  # the weight average and its ramp are checkpointed
    resumed = TrainConfig(epochs=2, batch_size=16, grad_accum=2, device="cpu", checkpoint_dir=str(tmp_path),
                          resume=True, patience=5)
    history = train(ProfileModel.build(mcfg, spec), frame, catalogue, resumed, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 came from the checkpoint
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["average"]["steps"] == 2 * steps  # went on
    assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 2


def test_cli_evaluate_last_interaction_per_user(trained_ws, tiny_bert, tmp_path, monkeypatch):
    ws, _, _ = trained_ws
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    result = CliRunner().invoke(app, ["evaluate", "-w", str(ws), "--bert", tiny_bert, "--epochs", "1",
                                      "--max-positives", "200", "--splits", "loo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "popularity" in result.output and "NDCG@10" in result.output
    reports = list((ws / "reports" / "evaluation").glob("*/report.md"))
    assert reports and "last interaction per user" in reports[-1].read_text()
    bad = CliRunner().invoke(app, ["evaluate", "-w", str(ws), "--splits", "yesterday"])
    assert bad.exit_code == 2 and "--splits takes global, loo or both" in bad.output


def test_cli_train_with_two_processes(trained_ws, tiny_bert, tmp_path, monkeypatch):
    """`persona train --nproc 2` end to end: each model (the evaluated ones and the refit) trains in two
    processes, rank 0 validating through the feature store, and the model is saved."""
    ws, _, _ = trained_ws
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    result = CliRunner().invoke(app, ["train", "-w", str(ws), "--bert", tiny_bert, "--epochs", "2", "--max-positives",
                                      "200", "--splits", "loo", "--no-baselines", "--nproc", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "saved model persona-profile:" in result.output
    history = json.loads(next((ws / "checkpoints" / "refit").glob("history.json")).read_text())
    assert all(len(h["rows_per_process"]) == 2 and min(h["rows_per_process"]) > 0 for h in history)


def test_request_features_are_fetched_once_per_request_set(trained_ws):
    """Every epoch's validation reads the same requests: one Feast fetch, the same frame as a fresh one."""
    from training.evaluate import last_per_user_split
    from training.workflow import RequestFeatures, user_features

    _, log, store = trained_ws
    split = last_per_user_split(log.read_table("events"), POSITIVES)
    features = RequestFeatures(store)
    first = features(split.validation)
    again = features(split.validation.iloc[::-1].iloc[::-1])  # another frame, the same requests
    assert len(features.cache) == 1
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(first, user_features(store, split.validation))
    features(split.requests)
    assert len(features.cache) == 2


def test_finetune_layers_default_by_device_and_catalogue(tiny_bert):
    from training.model import FINETUNE_MAX_ITEMS, GPU_FINETUNE_LAYERS, resolve_finetune

    auto = ModelConfig(bert_path=tiny_bert)
    assert resolve_finetune(auto, "cpu", 100).finetune_layers == 0  # minutes on a laptop: BERT frozen
    assert resolve_finetune(auto, "cuda", 100).finetune_layers == GPU_FINETUNE_LAYERS
    assert resolve_finetune(auto, "cuda", FINETUNE_MAX_ITEMS + 1).finetune_layers == 0
    assert resolve_finetune(replace(auto, use_text=False), "cuda", 100).finetune_layers == 0
    assert resolve_finetune(replace(auto, finetune_layers=1), "cpu", 100).finetune_layers == 1  # asked for


def test_categorical_text_is_the_same_for_one_row_and_many():
    """Serving converts a one-row frame value by value; training, column-wise. Same vocabulary keys."""
    from training.encoding import SMALL_FRAME, _as_text

    values = ["app", None, float("nan"), 3, 2.5, True, pd.NA, "web", np.int64(7), np.float64(1.0)]
    for dtype in (object, "string"):
        column = pd.Series(values if dtype is object else [v if isinstance(v, str) or v is None else None
                                                           for v in values], dtype=dtype)
        big = pd.concat([column] * (SMALL_FRAME // len(values) + 1), ignore_index=True)
        assert len(big) > SMALL_FRAME
        assert _as_text(big, len(big))[:len(values)] == _as_text(column, len(column))
    assert _as_text(None, 2) == ["<missing>", "<missing>"]


def test_numbers_and_times_are_the_same_for_one_row_and_many():
    """A request's one-row frame of Python objects converts value by value; training frames column-wise.
    Both give the same floats and the same epoch seconds, nulls and odd values included."""
    from training.encoding import SMALL_FRAME, _epoch_seconds, _floats

    numbers = pd.DataFrame({"a": [1, None, 2.5, float("nan"), True, np.int64(7), None, float("inf"), -3, 0],
                            "b": [np.float32(0.5), 4, None, 1e300, False, -0.0, 2, np.nan, 1.5, 10**12]},
                           dtype=object)
    times = pd.DataFrame({"request_timestamp": [
        pd.Timestamp("2024-03-01 12:00:00.123456789", tz="UTC"), datetime(2024, 3, 1, 12, tzinfo=UTC),
        datetime(2024, 3, 1, 12), pd.Timestamp("2024-03-01 14:00", tz="Europe/Berlin"), "2024-03-01T12:00:00Z",
        None, pd.NaT, float("nan"), "not a time", pd.Timestamp("1970-01-01", tz="UTC")]}, dtype=object)
    for frame, convert in ((numbers, _floats), (times, _epoch_seconds)):
        big = pd.concat([frame] * (SMALL_FRAME // len(frame) + 1), ignore_index=True)
        assert len(big) > SMALL_FRAME
        many = convert(big)[:len(frame)]
        for r in range(len(frame)):
            one = convert(frame.iloc[[r]].reset_index(drop=True))
            np.testing.assert_array_equal(one.reshape(many[r:r + 1].shape), many[r:r + 1])
    assert np.isnan(_epoch_seconds(times)[5:9]).all() and _epoch_seconds(times)[9] == 0.0


def test_two_processes_take_the_steps_of_one(trained_ws, tiny_bert):
    """`--nproc 2`: PyTorch DDP over gloo, a second process started on this machine. Each takes half of
    every batch, and without dropout their parts add up to the one-process step: both runs end with
    the same weights and losses (float sums aside), and each process trained on its half of the rows."""
    from training.model import Catalogue
    from training.train import Positives, train

    frame, spec, catalogue = _small_training_set(trained_ws, buckets=2)
    mcfg = ModelConfig(bert_path=tiny_bert, dim=8, hidden=16, embed_dim=4, seq_len=10, dropout=0.0, id_dropout=0.0)

    def run(nproc: int) -> tuple[ProfileModel, list[dict]]:
        torch.manual_seed(0)
        model = ProfileModel.build(mcfg, spec)
        for module in model.modules():  # no dropout: every random draw would differ between the processes
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
        cfg = TrainConfig(epochs=2, batch_size=32, device="cpu", patience=5, average_decay=None, max_seconds=None,
                          nproc=nproc)
        return model, train(model, frame, catalogue, cfg, None, progress=False)

    (one, alone), (two, shared) = run(1), run(2)
    assert [h["loss"] for h in shared] == pytest.approx([h["loss"] for h in alone], rel=1e-4)
    # What the weights compute, not the weights: a key bias has no gradient but float noise, which Adam
    # turns into full steps, and no effect on any score.
    data = Positives.build(one, frame, catalogue, torch.device("cpu"))
    users = data.users.select(torch.arange(min(200, len(data.targets))))
    with torch.no_grad():
        for bucket, items in data.items.items():
            vectors = [m.item_tower(m.with_text_vectors(items)) for m in (one, two)]
            assert torch.allclose(*vectors, atol=1e-4), bucket
            scores = [m.score(m.user_tower(m.with_text_vectors(users), Catalogue(data.index, v)), v)
                      for m, v in zip((one, two), vectors, strict=True)]
            assert torch.allclose(*scores, atol=1e-3), bucket
    rows = shared[0]["rows_per_process"]
    assert len(rows) == 2 and min(rows) > 0.4 * sum(rows) and sum(rows) == sum(alone[0]["rows_per_process"])


def test_a_resumed_run_trains_in_one_process():
    """A checkpoint holds one process's optimizer: `--resume` with `--nproc` is refused before any work."""
    from training.train import train

    with pytest.raises(ValueError, match="one process"):
        train(None, None, None, TrainConfig(nproc=2, resume=True))
