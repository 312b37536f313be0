"""Models: train, evaluate against the baselines, and batch recommendations from a saved model."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from persona.cli.common import DEFAULT_WS, Profile, Workspace, _config, _event_log, _fail, _privacy, app, console
from persona.cli.provenance import _provenance, _without_erased
from privacy import outputs


def _training_inputs(cfg):
    from feature_repo.pipeline.registry import feature_store
    from training.model_store import bentoml_home

    bentoml_home(cfg.workspace)
    log = _event_log(cfg)
    events, items = log.read_table("events"), log.read_table("items")
    log.dispose()
    events = _without_erased(cfg, events)
    if events.empty:
        _fail("the event log is empty: run `persona ingest` first")
    try:
        store = feature_store(cfg.workspace)
    except FileNotFoundError as exc:
        _fail(f"{exc}; then `persona features build`")
    return store, events, items


def _run_config(epochs, batch_size, finetune_layers, max_positives, bert, device, splits, baselines, refit,
                models: str = "default", target: str | None = None, nproc: int = 1):
    from training.model import ModelConfig
    from training.train import TrainConfig
    from training.workflow import DEFAULT_MODELS, MODEL_ROWS, RunConfig

    model = ModelConfig(finetune_layers=finetune_layers, **({"bert_path": bert} if bert else {}))
    chosen = tuple(s.strip() for s in splits.split(",") if s.strip())
    if not set(chosen) <= {"global", "loo"} or not chosen:
        _fail("--splits takes global, loo or both (comma-separated)")
    named = {"default": DEFAULT_MODELS, "all": tuple(MODEL_ROWS)}
    rows = named.get(models.strip()) or tuple(m.strip() for m in models.split(",") if m.strip())
    if not rows or not set(rows) <= set(MODEL_ROWS):
        _fail(f"--models takes default, all (with the ablations) or a comma-separated subset of "
              f"{', '.join(MODEL_ROWS)}")
    return RunConfig(model=model, train=TrainConfig(epochs=epochs, batch_size=batch_size, device=device,
                                                    max_positives=max_positives or None, nproc=nproc),
                     splits=chosen, baselines=baselines, refit=refit, models=rows, target=target or None)


Epochs = Annotated[int, typer.Option(min=1, help="Training epochs (early stopping may end sooner).")]
NProc = Annotated[int, typer.Option(min=1, help="Processes that train each model together (PyTorch DDP: gloo on "
                                                "the CPU, NCCL with a GPU per process); each takes a share of "
                                                "every batch.")]
BatchSize = Annotated[int, typer.Option(min=2)]
Finetune = Annotated[int | None, typer.Option(help="BERT's top layers to train, on cached states of the frozen "
                                                    "layers below (default: 2 on a GPU, 0 on a CPU, where BERT "
                                                    "stays frozen and only the adapters on its vectors train).")]
MaxPositives = Annotated[int, typer.Option(help="Positives per epoch (0 = all): caps CPU time.")]
Bert = Annotated[str | None, typer.Option(help="A Hugging Face BERT folder (default: packaged MiniLM).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Splits = Annotated[str, typer.Option(help="global, loo, or global,loo.")]
Models = Annotated[str, typer.Option(help="Rows of the table: default, all (adds the ablations no-ids, "
                                          "no-sequence and rank-ablation), or some of persona, recall-rank, mlp, "
                                          "frozen, popularity, cooccurrence, ease, sequential, no-ids, no-sequence, "
                                          "rank-ablation, recent, ease-all.")]
Target = Annotated[str | None, typer.Option(
    "--target", metavar="TYPE", help="Evaluate per target behaviour instead of --splits: hold out each user's "
    "items of this event type (say, purchase) on their last day with one; items only viewed stay candidates. "
    "Adds the rows recent behaviour and EASE over all behaviour (--models keys recent, ease-all).")]


def _run_protocol(cfg, run_cfg, kind: str):
    """Train the model and baselines on the splits, print the metrics, write the report."""
    from training.workflow import run

    store, events, items = _training_inputs(cfg)
    folder = cfg.reports_dir / kind / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_cfg = replace(run_cfg, sequence_types=cfg.sequence_types, exposure_types=cfg.exposure_types)
    result = run(store, events, items, cfg.positives, run_cfg, folder)
    _print_metrics(result["metrics"])
    console.print(f"report: {result['report']}")
    return store, events, result


def _print_metrics(metrics) -> None:
    overall = metrics[metrics["segment"] == "all"]
    cols = [c for c in ("split", "model", "NDCG@10", "Recall@10", "Recall@50", "MRR@10", "coverage", "AUC")
            if c in overall]
    table = Table(title="ranking quality (full catalogue, seen items excluded)")
    for col in cols:
        table.add_column(col, justify="left" if col in ("split", "model") else "right")
    for row in overall[cols].itertuples(index=False):
        table.add_row(*["—" if isinstance(v, float) and v != v else f"{v:.4f}" if isinstance(v, float) else str(v)
                        for v in row])
    Console(width=max(console.width, 140)).print(table)  # wide enough for the model names


@app.command("train")
def train_cmd(workspace: Workspace = DEFAULT_WS, profile: Profile = None, epochs: Epochs = 40,
              batch_size: BatchSize = 256, finetune_layers: Finetune = None, max_positives: MaxPositives = 100_000,
              bert: Bert = None, device: Device = "auto", splits: Splits = "loo",
              baselines: Annotated[bool, typer.Option(help="Train and report the baselines too.")] = True,
              refit: Annotated[bool, typer.Option(help="Refit on all data before saving (else the evaluated "
                                                  "model is saved).")] = True,
              resume: Annotated[bool, typer.Option(help="Resume the refit from WORKSPACE/checkpoints/refit.")] = False,
              refit_from_scratch: Annotated[bool, typer.Option(
                  help="Refit a new model for the evaluated run's best epoch count, instead of continuing "
                       "the evaluated model for 2 epochs over the rows it never saw and as many others "
                       "(slower; refits statistics, "
                       "vocabularies and item ids).")] = False,
              target: Target = None, nproc: NProc = 1,
              serve: Annotated[str, typer.Option(
                  help="What /rank runs with this model: auto (recall + rank where the evaluation ranked it "
                       "above the profile model alone, else the towers), recall-rank, or towers.")] = "auto",
              training_set: Annotated[Path | None, typer.Option(
                  "--training-set", metavar="DIR",
                  help="Train the profile model from the Parquet shards `persona training-set` wrote, one shard "
                       "in memory at a time (with --nproc, each process reads its own shards), instead of "
                       "reading the log: for logs too big for one process. Every epoch passes over every "
                       "shard; a held-out share of the positives stops it. No baselines or ranking metrics "
                       "(they read the log): `persona evaluate` on a sample gives them.")] = None,
              ) -> None:
    """Train, evaluate against baselines, refit on everything, and save to the BentoML model store."""
    from training.distributed import launched
    from training.model_store import save_to_bentoml
    from training.workflow import refit as refit_model

    cfg = _config(workspace, profile)
    if serve not in ("auto", "recall-rank", "towers"):
        _fail("--serve takes auto, recall-rank or towers")
    try:
        launch = launched()  # one of several processes a launcher (torchrun) started
    except ValueError as exc:
        _fail(str(exc))
    if training_set is not None:
        if target or serve == "recall-rank":
            _fail("--training-set trains the profile model alone: --target and --serve recall-rank need the log")
        return _train_from_shards(cfg, training_set, epochs, batch_size, finetune_layers, bert or cfg.text_model,
                                  device, nproc)
    if launch:
        _fail("started by torchrun: across machines `persona train` trains from a training set "
              "(`persona training-set`, then `persona train --training-set DIR` in every process)")
    run_cfg = _run_config(epochs, batch_size, finetune_layers, max_positives, bert or cfg.text_model, device, splits,
                          baselines, refit, target=target, nproc=nproc)
    run_cfg.serve = serve
    store, events, result = _run_protocol(cfg, run_cfg, "training")
    if refit:
        console.print("refitting on all data up to the newest event")
        run_cfg.train.checkpoint_dir = str(cfg.workspace / "checkpoints" / "refit")  # one per epoch
        run_cfg.train.resume = resume
        started = time.perf_counter()
        model = refit_model(store, result["frame"], result["spec"], run_cfg,
                            result["best_epochs"].get("Persona", epochs), item_ids=result["item_ids"],
                            start=None if refit_from_scratch else result["model"], fit_cut=result.get("fit_cut"))
        console.print(f"refit: {time.perf_counter() - started:.1f} s")
    else:  # the evaluated model (trained before the first split's cut) is the one deployed
        model = result["model"]
    tag = save_to_bentoml(model, store, result["metrics"], events, run_cfg,
                          {"refit": refit, **_provenance(cfg, events)}, result.get("two_stage"))
    console.print(f"saved model {tag} (BENTOML_HOME={os.environ['BENTOML_HOME']}; "
                  "`bentoml models list` there shows it)", highlight=False)


def _train_from_shards(cfg, folder: Path, epochs: int, batch_size: int, finetune_layers, bert, device: str,
                       nproc: int) -> None:
    """`persona train --training-set DIR` (training/shard_train.py): the rows of erased users are left out as
    the shards are read, and the model's provenance names the users it trained on."""
    import pandas as pd

    from eventlog import tombstones
    from feature_repo.pipeline.registry import feature_store
    from training.model import ModelConfig
    from training.model_store import bentoml_home, save_to_bentoml
    from training.shard_train import WithoutErased, train_from_shards
    from training.spark_training_set import TrainingShards
    from training.train import TrainConfig
    from training.workflow import RunConfig

    shards = TrainingShards(folder)
    if not len(shards):
        _fail(f"no training set in {folder}: write one with `persona training-set --output {folder}`")
    bentoml_home(cfg.workspace)
    log = _event_log(cfg)
    try:
        item_ids = log.read_table("items")["item_id"].astype(str).tolist()  # the catalogue, not the log
        erased = tombstones.erased_hashes(log.engine)
    finally:
        log.dispose()
    keep = WithoutErased(_privacy(cfg).salt, frozenset(erased)) if erased else None
    try:
        store = feature_store(cfg.workspace)
    except FileNotFoundError as exc:
        _fail(f"{exc}; then `persona features build`")
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, device=device, nproc=nproc, max_seconds=None,
                       max_positives=None)
    model_cfg = ModelConfig(finetune_layers=finetune_layers, **({"bert_path": bert} if bert else {}))
    report_dir = cfg.reports_dir / "training" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        run = train_from_shards(store, shards, item_ids, model_cfg, tcfg, report_dir, keep,
                                engaged=list(cfg.positives))
    except ValueError as exc:
        _fail(str(exc))
    if not run.leader:
        console.print("trained as one of the launcher's processes; rank 0 reports and saves the model")
        return
    found = run.survey
    if len(run.metrics):
        console.print(run.metrics.to_string(index=False, float_format=lambda v: f"{v:.4f}"), highlight=False)
    console.print(f"trained on {found.rows:,} rows ({found.positives:,} positives) in {len(shards)} shards, "
                  f"{len(run.history)} epochs; report: {run.report}", highlight=False)
    window = {"from": found.first.isoformat(), "to": found.last.isoformat(), "events": found.rows}
    tag = save_to_bentoml(run.model, store, None, None, RunConfig(model=run.model.cfg, train=tcfg, splits=()),
                          {"refit": False, "training_set": str(folder.resolve()),
                           **_provenance(cfg, pd.DataFrame({"user_id": sorted(found.users)}))}, window=window)
    console.print(f"saved model {tag} (BENTOML_HOME={os.environ['BENTOML_HOME']}; "
                  "`bentoml models list` there shows it)", highlight=False)


@app.command("evaluate")
def evaluate_cmd(workspace: Workspace = DEFAULT_WS, profile: Profile = None, epochs: Epochs = 40,
                 batch_size: BatchSize = 256, finetune_layers: Finetune = None, max_positives: MaxPositives = 100_000,
                 bert: Bert = None, device: Device = "auto", splits: Splits = "loo",
                 models: Models = "default", target: Target = None, nproc: NProc = 1) -> None:
    """The ranking-quality protocol: model and baselines on the same temporal splits, with a report."""
    cfg = _config(workspace, profile)
    run_cfg = _run_config(epochs, batch_size, finetune_layers, max_positives, bert or cfg.text_model, device, splits,
                          True, False, models, target, nproc)
    _run_protocol(cfg, run_cfg, "evaluation")


@app.command("training-set")
def training_set_cmd(
    output: Annotated[Path, typer.Option(help="A folder: Parquet shards of the point-in-time training rows.")],
    workspace: Workspace = DEFAULT_WS, profile: Profile = None,
    neg_per_pos: Annotated[int, typer.Option(min=0, help="Sampled negatives per positive (as `persona train`).")] = 0,
    rows_per_shard: Annotated[int, typer.Option(min=100, help="Rows per shard, at most.")] = 50_000,
    seed: int = 0,
) -> None:
    """The labelled rows `persona train` learns from, with their point-in-time features, as Parquet shards.

    On the spark profile Spark's tasks build them from the log where it lives and Feast's Spark join
    adds the features: no process holds the log or the set. Read them with
    ``training.spark_training_set.TrainingShards`` (it applies Feast's on-demand views)."""
    cfg = _config(workspace, profile)
    from eventlog import locks

    log = _event_log(cfg)
    try:  # under the erasure lock: a user erased meanwhile is never written
        with locks.held(log.engine), console.status("building the training set"):
            outputs.record(cfg.workspace, output)  # before writing: a forget reaches even a half-written set
            written = (_training_set_on_spark(cfg, log, output, neg_per_pos, rows_per_shard, seed)
                       if cfg.profile == "spark" else
                       _training_set_here(cfg, output, neg_per_pos, rows_per_shard, seed))
    finally:
        log.dispose()
    console.print(f"wrote {written['rows']:,} rows in {written['shards']:,} shards to {output}")


def _training_set_on_spark(cfg, log, output: Path, neg_per_pos: int, rows_per_shard: int, seed: int) -> dict:
    from feature_repo.pipeline.feast_config import feature_store_config
    from feature_repo.pipeline.registry import feature_store
    from feature_repo.pipeline.spark_build import spark_session
    from training.spark_training_set import examples_on_spark, write_training_set

    try:
        store = feature_store(cfg.workspace)
    except FileNotFoundError as exc:
        _fail(f"{exc}; then `persona features build`")
    spark = spark_session(feature_store_config("spark", cfg.workspace)["offline_store"]["spark_conf"])
    url = log.engine.url.render_as_string(hide_password=False)
    labelled = examples_on_spark(spark, url, log.read_table("items"), cfg.positives, neg_per_pos, seed=seed,
                                 exposure_types=cfg.exposure_types)
    return write_training_set(store, labelled, output, rows_per_shard)


def _training_set_here(cfg, output: Path, neg_per_pos: int, rows_per_shard: int, seed: int) -> dict:
    """One process: ``build_examples`` and Feast's join, written as the same shards (features applied)."""
    import shutil

    from training import dataset

    store, events, items = _training_inputs(cfg)
    frame = dataset.fetch_features(store, dataset.build_examples(events, items, cfg.positives, neg_per_pos,
                                                                 seed=seed, exposure_types=cfg.exposure_types))
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    for n, start in enumerate(range(0, len(frame), rows_per_shard)):
        frame.iloc[start:start + rows_per_shard].to_parquet(output / f"part-{n:05d}.parquet", index=False)
    return {"rows": len(frame), "shards": -(-len(frame) // rows_per_shard)}


@app.command("recommend")
def recommend_cmd(
    output: Annotated[Path, typer.Option(help="CSV or Parquet, by extension.")],
    workspace: Workspace = DEFAULT_WS, profile: Profile = None,
    k: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    users: Annotated[Path | None, typer.Option(help="A file with a user_id column (or one id a line).")] = None,
    as_of: Annotated[str, typer.Option("--as-of", help="A timestamp, or latest (the newest event).")] = "latest",
    model_tag: Annotated[str, typer.Option("--model", help="BentoML model version.")] = "latest",
    include_seen: Annotated[bool, typer.Option(help="Keep items the user already engaged with.")] = False,
    recall_rank: Annotated[bool, typer.Option(help="Recall + rank when the model has a ranker (with a reasons "
                                                   "column), as /rank; --no-recall-rank: the towers' top K.")] = True,
) -> None:
    """Batch top-K recommendations per user: user_id, rank, item_id, score (and reasons)."""
    from training.model_store import saved_two_stage
    from training.workflow import recommend

    if output.suffix not in (".csv", ".parquet"):
        _fail("--output must end in .csv or .parquet")
    cfg = _config(workspace, profile)
    if cfg.profile == "spark":
        model, full_tag = _saved_model(cfg, model_tag)
        two_stage = saved_two_stage(full_tag) if recall_rank else None
        return _recommend_on_spark(cfg, model, output, k, users, as_of, include_seen, two_stage)
    store, events, items = _training_inputs(cfg)
    model, full_tag = _saved_model(cfg, model_tag)
    when = _as_of(as_of, events["event_timestamp"].max())
    user_ids = _user_ids(users)
    with console.status("scoring"):
        two_stage = saved_two_stage(full_tag) if recall_rank else None
        recs = recommend(model, store, events, items, cfg.positives, k, user_ids, when, not include_seen, two_stage)
    from eventlog import locks

    output.parent.mkdir(parents=True, exist_ok=True)
    log = _event_log(cfg)
    try:  # users erased while this scored are left out, under the lock a forget takes to erase files
        with locks.held(log.engine):
            outputs.record(cfg.workspace, output)
            recs = _without_erased(cfg, recs)
            if output.suffix == ".parquet":
                recs.to_parquet(output, index=False)
            else:
                recs.to_csv(output, index=False, encoding=csv_encoding(recs))
    finally:
        log.dispose()
    console.print(f"wrote {len(recs):,} rows for {recs['user_id'].nunique():,} users to {output} (as of {when})")


def _saved_model(cfg, model_tag: str):
    from training.model_store import bentoml_home, load_from_bentoml

    bentoml_home(cfg.workspace)
    try:
        model, _, full_tag = load_from_bentoml(model_tag)
    except Exception as exc:  # noqa: BLE001 - bentoml raises its own NotFound
        _fail(f"no trained model {model_tag!r} in {os.environ['BENTOML_HOME']}: {exc}. Run `persona train`.")
    return model, full_tag


def _as_of(as_of: str, newest):
    import pandas as pd

    when = newest if as_of == "latest" else pd.Timestamp(as_of)
    return when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")


def _user_ids(users: Path | None) -> list[str] | None:
    import pandas as pd

    if not users:
        return None
    frame = pd.read_csv(users) if users.suffix == ".csv" else pd.read_parquet(users)
    return frame["user_id" if "user_id" in frame else frame.columns[0]].astype(str).tolist()


def _recommend_on_spark(cfg, model, output: Path, k: int, users: Path | None, as_of: str, include_seen: bool,
                        two_stage) -> None:
    """The top k per user in Spark's tasks (training/spark_recommend.py), recall + rank when the model has
    a ranker: no process reads the whole log, and the Parquet parts are written where the tasks run.
    The erasure lock is held throughout, so a user erased meanwhile is never written."""
    import pandas as pd
    import sqlalchemy as sa

    from eventlog import locks, tombstones
    from feature_repo.pipeline.feast_config import feature_store_config
    from feature_repo.pipeline.registry import feature_store
    from feature_repo.pipeline.spark_build import spark_session
    from training.spark_recommend import recommend_on_spark

    if output.suffix != ".parquet":
        _fail("on the spark profile --output must end in .parquet: Spark's tasks write a folder of Parquet parts")
    try:
        store = feature_store(cfg.workspace)
    except FileNotFoundError as exc:
        _fail(f"{exc}; then `persona features build`")
    log = _event_log(cfg)
    try:
        with locks.held(log.engine):
            outputs.record(cfg.workspace, output)
            with log.engine.connect() as conn:
                newest = conn.execute(sa.text("SELECT max(event_timestamp) FROM events")).scalar_one()
            if newest is None:
                _fail("the event log is empty: run `persona ingest` first")
            when = _as_of(as_of, pd.Timestamp(newest))
            user_ids = _user_ids(users)
            erased = tombstones.erased_hashes(log.engine)
            if user_ids is not None and erased:
                privacy = _privacy(cfg)
                user_ids = [u for u in user_ids if privacy.hash(u) not in erased]
            items = log.read_table("items")  # the catalogue, not the log: its vectors are broadcast
            spark = spark_session(feature_store_config("spark", cfg.workspace)["offline_store"]["spark_conf"])
            with console.status("scoring in Spark's tasks"):
                written = recommend_on_spark(spark, store, model, items, cfg.positives, k, user_ids, when,
                                             log.engine.url.render_as_string(hide_password=False), output,
                                             exclude_seen=not include_seen, two_stage=two_stage)
    finally:
        log.dispose()
    console.print(f"wrote {written['rows']:,} rows for {written['users']:,} users to {output} in Spark's tasks "
                  f"(as of {when})")


def csv_encoding(frame) -> str:
    """UTF-8 with a BOM when any text is not ASCII (Chinese titles in the reasons): without it spreadsheet
    software reads the file in the system's legacy code page. Plain UTF-8 otherwise, as before."""
    text = frame.select_dtypes(include=["object", "string"])
    return "utf-8-sig" if any(not str(v).isascii() for col in text for v in text[col].dropna()) else "utf-8"
