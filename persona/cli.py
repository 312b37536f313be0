"""The ``persona`` command line: one workspace per dataset, one command per pipeline stage."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core import config as config_mod

app = typer.Typer(help="Persona: user profiling and personalised ranking for online shops.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
quarantine_app = typer.Typer(help="Inspect and replay quarantined rows.", no_args_is_help=True)
suites_app = typer.Typer(help="Great Expectations suites of the input contract.", no_args_is_help=True)
features_app = typer.Typer(help="Feast features: apply the repo, build from the event log, materialize.",
                           no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(features_app, name="features")
app.add_typer(suites_app, name="suites")
console = Console()
err = Console(stderr=True, soft_wrap=True)

Workspace = Annotated[Path, typer.Option("--workspace", "-w", help="Folder holding one dataset's "
                                         "event log, stores, models and reports.")]
Profile = Annotated[str | None, typer.Option("--profile", help="Store profile: local, prod or spark "
                                             "(default: the workspace's persona.yaml).")]
DEFAULT_WS = Path("workspace")


def _config(workspace: Path, profile: str | None = None) -> config_mod.Config:
    try:
        return config_mod.load(workspace, profile)
    except ValueError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _event_log(cfg: config_mod.Config):
    from eventlog.store import EventLog

    return EventLog(cfg.resolved_event_log_url())


def _privacy(cfg: config_mod.Config):
    from core.privacy import Privacy

    try:
        return Privacy.for_workspace(cfg.workspace, cfg)
    except ValueError as exc:
        _fail(str(exc))


def _gate(cfg: config_mod.Config):
    from validation.gate import Gate, GateSettings

    v = cfg.validation
    return Gate(GateSettings(v.max_reject_share, v.clock_skew_minutes, v.on_schema_drift))


def _load(source: str):
    from eventlog.sources import StructuralError, load_batch

    try:
        return load_batch(source)
    except StructuralError as exc:
        _fail(f"{exc}\nNothing was written.")


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder for users/items/events files.")] = Path("sample"),
    users: Annotated[int, typer.Option(min=1)] = 1000,
    items: Annotated[int, typer.Option(min=1)] = 500,
    days: Annotated[int, typer.Option(min=1)] = 30,
    seed: int = 0,
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
) -> None:
    """Write a realistic synthetic shop (users, items, events) that follows the input contract."""
    from persona import sample_data

    if fmt not in ("csv", "parquet"):
        _fail("--format must be csv or parquet")
    start = time.perf_counter()
    with console.status("generating sample data"):
        tables = sample_data.generate(users, items, days, seed)
        paths = sample_data.write(tables, out, fmt)
    took = time.perf_counter() - start
    n = len(tables["events"])
    console.print(f"wrote {', '.join(str(p) for p in paths)}: {len(tables['users'])} users, "
                  f"{len(tables['items'])} items, {n} events in {took:.1f} s ({n / took:,.0f} events/s)")


@app.command()
def ingest(
    source: Annotated[str, typer.Option(help="Folder of users/items/events .csv/.parquet, or a "
                                        "SQLAlchemy URL whose tables have those names.")],
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    strict: Annotated[bool, typer.Option(help="Fail (exit 1) if any row is quarantined.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a batch and append it to the event log; bad rows go to the quarantine."""
    from ingestion.ingest import ingest as run_ingest

    cfg = _config(workspace, profile)
    batch = _load(source)
    log = _event_log(cfg)
    with console.status(f"validating and ingesting {batch.rows:,} rows"):
        report, _ = run_ingest(batch, log, _gate(cfg), privacy=_privacy(cfg))
    log.dispose()
    if as_json:
        console.print_json(json.dumps(report.to_dict(), default=str))
    else:
        _print_ingest(report)
    if report.held:
        err.print("[bold red]batch held:[/] " + "; ".join(report.hold_reasons)
                  + "\nNothing was ingested; the whole batch is in the quarantine "
                  "(`persona quarantine list`). Fix the data, or change the setting, then "
                  "`persona quarantine replay`.", highlight=False)
        raise typer.Exit(1)
    if strict and report.quarantined:
        err.print(f"[bold red]--strict:[/] {report.quarantined} row(s) quarantined", highlight=False)
        raise typer.Exit(1)


def _print_ingest(report) -> None:
    table = Table(title=f"batch {report.batch_id[:8]} from {report.source}")
    for col in ("table", "rows", "accepted", "written", "already in log", "duplicates", "quarantined"):
        table.add_column(col, justify="left" if col == "table" else "right")
    for name, t in report.tables.items():
        table.add_row(name, str(t.rows), str(t.accepted), str(t.written), str(t.already_present),
                      str(t.duplicates), str(t.quarantined))
    console.print(table)
    rules = [(name, rule, n) for name, t in report.tables.items() for rule, n in sorted(t.rules.items())]
    if rules:
        by_rule = Table(title="quarantined rows by rule")
        for col in ("table", "rule", "rows"):
            by_rule.add_column(col)
        for name, rule, n in rules:
            by_rule.add_row(name, rule, str(n))
        console.print(by_rule)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


@app.command()
def validate(
    source: Annotated[str, typer.Option(help="Folder or SQLAlchemy URL, as for ingest.")],
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any row breaks a rule.")] = False,
    docs: Annotated[bool, typer.Option(help="Also build GX Data Docs.")] = True,
) -> None:
    """Run the suites without ingesting; write a Markdown/HTML summary and GX Data Docs."""
    from ingestion.screen import pseudonymise_batch
    from validation.gate import KnownIds
    from validation.report import build_data_docs, rejected_rows, rule_table, summary_tables, write_summary

    cfg = _config(workspace, profile)
    batch = pseudonymise_batch(_load(source), _privacy(cfg))  # reports never see a raw id when pseudonymous
    log = _event_log(cfg)
    gate = _gate(cfg)
    now = datetime.now(UTC)
    gate.now = now
    with console.status(f"validating {batch.rows:,} rows"):
        result = gate.check(batch, KnownIds(log))
    log.dispose()
    folder = cfg.reports_dir / "validation" / now.strftime("%Y%m%dT%H%M%SZ")
    shown = cfg.privacy.show_personal_values
    md, html_path = write_summary(folder, batch, result, shown)
    console.print(summary_tables(result).to_string(index=False))
    rules = rule_table(result)
    if len(rules):
        console.print("\n" + rules.to_string(index=False))
        console.print("\n" + rejected_rows(batch, result, shown).head(20).to_string(index=False), highlight=False)
    if docs:
        with console.status("building GX Data Docs"):
            index = build_data_docs(cfg.workspace, batch, now, timedelta(minutes=cfg.validation.clock_skew_minutes),
                                    shown)
        console.print(f"GX Data Docs: {index}")
    console.print(f"summary: {md} and {html_path}")
    if result.held:
        err.print("[bold red]this batch would be held:[/] " + "; ".join(result.hold_reasons), highlight=False)
        raise typer.Exit(1)
    if strict and result.rejected:
        err.print(f"[bold red]--strict:[/] {result.rejected} row(s) break a rule", highlight=False)
        raise typer.Exit(1)


def _models(workspace: Path) -> list[dict]:
    """Trained profile models in the workspace's BentoML store, newest first."""
    if not (workspace / "bentoml").exists() and "BENTOML_HOME" not in os.environ:
        return []
    from training.workflow import MODEL_NAME, bentoml_home

    bentoml_home(workspace)
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        found = bentoml.models.list(MODEL_NAME)
    except NotFound:  # a model store without any Persona model yet
        return []
    models = sorted(found, key=lambda m: m.info.creation_time, reverse=True)
    return [{"tag": str(m.tag), "created": m.info.creation_time.isoformat()} for m in models]


@app.command()
def status(
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts of users, items, events and quarantined rows, and the event time range."""
    cfg = _config(workspace, profile)
    log = _event_log(cfg)
    info: dict = log.counts()
    lo, hi = log.time_range()
    log.dispose()
    info.update({"oldest_event": lo.isoformat() if lo else None, "newest_event": hi.isoformat() if hi else None,
                 "profile": cfg.profile, "workspace": str(cfg.workspace)})
    build_file = cfg.workspace / "feast" / "last_build.json"
    info["features"] = json.loads(build_file.read_text()) if build_file.exists() else None
    info["models"] = _models(cfg.workspace)
    info["models_trained_on_erased_users"] = _erased_in_models(cfg, info["models"])
    if as_json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        console.print(f"{key:>14}: {value}")


@quarantine_app.command("list")
def quarantine_list(
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines' array.")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="Include rows already replayed.")] = False,
    limit: Annotated[int, typer.Option(help="Rows to show in the table (JSON shows all).")] = 50,
) -> None:
    """Each quarantined row: id, batch, table, row number, key, rule, column and reason."""
    cfg = _config(workspace, profile)
    log = _event_log(cfg)
    rows = log.quarantined()
    log.dispose()
    if not all_rows:
        rows = rows[rows["status"] != "replayed"]
    cols = ["id", "batch_id", "table_name", "row_number", "record_key", "rule", "column_name", "reason", "status"]
    if as_json:
        print(rows[cols + ["payload"]].to_json(orient="records", date_format="iso"))
        return
    from core.privacy import mask_reason

    table = Table(title=f"{len(rows)} quarantined row(s)")
    for col in ("id", "batch", "table", "row", "key", "rule", "column", "reason", "status"):
        table.add_column(col, overflow="fold")
    for r in rows.head(limit).itertuples():
        table.add_row(str(r.id), r.batch_id[:8], r.table_name, str(r.row_number), str(r.record_key),
                      r.rule, str(r.column_name), r.reason if cfg.privacy.show_personal_values
                      else mask_reason(r.table_name, r.column_name, r.reason), r.status)
    console.print(table)


@quarantine_app.command("replay")
def quarantine_replay(
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    source: Annotated[str | None, typer.Option(help="Corrected files or URL; without it, stored rows "
                                               "are re-validated as they stand.")] = None,
    batch: Annotated[str | None, typer.Option(help="Only this batch id (a prefix works). A held batch is "
                                              "replayed only when named here, and its batch-level "
                                              "checks are then waived.")] = None,
) -> None:
    """Re-validate quarantined rows (fixed or as they stand) and ingest what now passes.

    Without --batch only rows that broke a rule are retried; held batches stay held until named.
    """
    from ingestion.ingest import replay

    cfg = _config(workspace, profile)
    log = _event_log(cfg)
    if batch:
        ids = {b for b in log.quarantined()["batch_id"] if b.startswith(batch)}
        if len(ids) != 1:
            _fail(f"--batch {batch!r} matches {len(ids)} quarantined batches")
        batch = ids.pop()
    corrected = _load(source) if source else None
    report, _ = replay(log, _gate(cfg), batch_id=batch, corrected=corrected, privacy=_privacy(cfg))
    remaining = log.counts()["quarantined"]
    held = log.quarantined("held")["batch_id"].unique()
    log.dispose()
    _print_ingest(report)
    console.print(f"{remaining} row(s) remain in the quarantine")
    if len(held) and not batch:
        console.print(f"{len(held)} held batch(es) were not replayed: {', '.join(b[:8] for b in held)}. "
                      "Release one with `persona quarantine replay --batch ID` (this waives its "
                      "batch-level checks).", highlight=False)
    if report.held:
        raise typer.Exit(1)


@features_app.command("apply")
def features_apply(workspace: Workspace = DEFAULT_WS, profile: Profile = None) -> None:
    """Write WORKSPACE/feature_store.yaml for the profile and register the feature repo."""
    from feature_repo.pipeline import stores

    cfg = _config(workspace, profile)
    try:
        with console.status(f"feast apply ({cfg.profile})"):
            _, objects = stores.apply(cfg.workspace, cfg.profile)
    except ValueError as exc:
        _fail(str(exc))
    path = stores.yaml_path(cfg.workspace)
    console.print(f"applied {len(objects)} Feast objects; config: {path}\n"
                  f"Feast CLI: feast -c {stores.REPO_DIR} -f {path} plan", highlight=False)


@features_app.command("build")
def features_build(workspace: Workspace = DEFAULT_WS, profile: Profile = None,
                   check: Annotated[bool, typer.Option(help="Run the feature-level GX suite.")] = True) -> None:
    """Compute every feature view from the event log and write the offline store.

    The feature checks run on the new tables before they replace the old ones: a failing build
    leaves the previous tables in place."""
    from feature_repo.pipeline.build import FeatureChecksFailed, build

    cfg = _config(workspace, profile)
    log = _event_log(cfg)
    started = time.perf_counter()
    checks = (lambda tables: _check_features(cfg, tables)) if check else None
    try:
        with console.status(f"building features from the event log ({cfg.profile})"):
            tables = build(log, cfg.profile, cfg.workspace, check=checks)
    except FeatureChecksFailed as exc:
        err.print(f"[bold red]feature checks failed[/] (see {exc.report.path}); the previous offline tables "
                  "are unchanged", highlight=False)
        raise typer.Exit(1) from None
    finally:
        log.dispose()
    for name, frame in tables.items():
        console.print(f"{name:>15}: {len(frame):,} rows")
    console.print(f"built in {time.perf_counter() - started:.1f} s")


def _check_features(cfg, tables):
    from validation.feature_suite import check_features

    report = check_features(tables, cfg.reports_dir / "features", cfg.validation.feature_drift)
    for line in report.lines:
        console.print(line, highlight=False)
    return report


@features_app.command("materialize")
def features_materialize(workspace: Workspace = DEFAULT_WS, profile: Profile = None,
                         full: Annotated[bool, typer.Option(help="Reload everything, not only new rows.")] = False,
                         ) -> None:
    """Load the offline store's newest values into the online store (incremental by default), then
    write online every user and item the event log changed since the last sync (new users and
    items, edits, late events), recomputed from the log."""
    from feature_repo.pipeline import stores
    from feature_repo.pipeline.online import sync_online

    cfg = _config(workspace, profile)
    try:
        with console.status("feast materialize"):
            store = stores.materialize(cfg.workspace, full=full)
    except FileNotFoundError as exc:
        _fail(str(exc))
    from tqdm import tqdm

    log = _event_log(cfg)
    bar = None

    def progress(total: int):
        nonlocal bar
        bar = tqdm(total=total, desc="sync changed keys online", unit="key", disable=total == 0)
        return bar.update

    try:
        synced = sync_online(store, log, cfg.workspace, progress)
    finally:
        log.dispose()
        if bar is not None:
            bar.close()
    console.print(f"materialized; synced {synced['users']:,} changed users and {synced['items']:,} changed items "
                  f"from the event log (changes since {synced['since']})", highlight=False)


def _training_inputs(cfg):
    from feature_repo.pipeline import stores
    from training.workflow import bentoml_home

    bentoml_home(cfg.workspace)
    log = _event_log(cfg)
    events, items = log.read_table("events"), log.read_table("items")
    log.dispose()
    events = _without_erased(cfg, events)
    if events.empty:
        _fail("the event log is empty: run `persona ingest` first")
    try:
        store = stores.feature_store(cfg.workspace)
    except FileNotFoundError as exc:
        _fail(f"{exc}; then `persona features build`")
    return store, events, items


def _run_config(epochs, batch_size, finetune_layers, max_positives, bert, device, splits, baselines, refit,
                models: str = "default"):
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
                                                    max_positives=max_positives or None),
                     splits=chosen, baselines=baselines, refit=refit, models=rows)


Epochs = Annotated[int, typer.Option(min=1, help="Training epochs (early stopping may end sooner).")]
BatchSize = Annotated[int, typer.Option(min=2)]
Finetune = Annotated[int | None, typer.Option(help="BERT's top layers to train, on cached states of the frozen "
                                                    "layers below (default: 2 on a GPU, 0 on a CPU, where BERT "
                                                    "stays frozen and only the adapters on its vectors train).")]
MaxPositives = Annotated[int, typer.Option(help="Positives per epoch (0 = all): caps CPU time.")]
Bert = Annotated[str | None, typer.Option(help="A Hugging Face BERT folder (default: packaged MiniLM).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Splits = Annotated[str, typer.Option(help="global, loo, or global,loo.")]
Models = Annotated[str, typer.Option(help="Rows of the table: default, all (adds the ablations no-ids and "
                                          "no-sequence), or some of persona, mlp, frozen, popularity, "
                                          "cooccurrence, ease, sequential, no-ids, no-sequence.")]


def _run_protocol(cfg, run_cfg, kind: str):
    """Train the model and baselines on the splits, print the metrics, write the report."""
    from training.workflow import run

    store, events, items = _training_inputs(cfg)
    folder = cfg.reports_dir / kind / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
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
                       "the evaluated model for 2 epochs over every example (slower; refits statistics, "
                       "vocabularies and item ids).")] = False,
              ) -> None:
    """Train, evaluate against baselines, refit on everything, and save to the BentoML model store."""
    from training.workflow import refit as refit_model
    from training.workflow import save_to_bentoml

    cfg = _config(workspace, profile)
    run_cfg = _run_config(epochs, batch_size, finetune_layers, max_positives, bert, device, splits, baselines, refit)
    store, events, result = _run_protocol(cfg, run_cfg, "training")
    if refit:
        console.print("refitting on all data up to the newest event")
        run_cfg.train.checkpoint_dir = str(cfg.workspace / "checkpoints" / "refit")  # one per epoch
        run_cfg.train.resume = resume
        started = time.perf_counter()
        model = refit_model(store, result["frame"], result["spec"], run_cfg,
                            result["best_epochs"].get("Persona", epochs), item_ids=result["item_ids"],
                            start=None if refit_from_scratch else result["model"])
        console.print(f"refit: {time.perf_counter() - started:.1f} s")
    else:  # the evaluated model (trained before the first split's cut) is the one deployed
        model = result["model"]
    tag = save_to_bentoml(model, store, result["metrics"], events, run_cfg,
                          {"refit": refit, **_provenance(cfg, events)})
    console.print(f"saved model {tag} (BENTOML_HOME={os.environ['BENTOML_HOME']}; "
                  "`bentoml models list` there shows it)", highlight=False)


@app.command("evaluate")
def evaluate_cmd(workspace: Workspace = DEFAULT_WS, profile: Profile = None, epochs: Epochs = 40,
                 batch_size: BatchSize = 256, finetune_layers: Finetune = None, max_positives: MaxPositives = 100_000,
                 bert: Bert = None, device: Device = "auto", splits: Splits = "loo",
                 models: Models = "default") -> None:
    """The ranking-quality protocol: model and baselines on the same temporal splits, with a report."""
    cfg = _config(workspace, profile)
    run_cfg = _run_config(epochs, batch_size, finetune_layers, max_positives, bert, device, splits, True, False,
                          models)
    _run_protocol(cfg, run_cfg, "evaluation")


@app.command("recommend")
def recommend_cmd(
    output: Annotated[Path, typer.Option(help="CSV or Parquet, by extension.")],
    workspace: Workspace = DEFAULT_WS, profile: Profile = None,
    k: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    users: Annotated[Path | None, typer.Option(help="A file with a user_id column (or one id a line).")] = None,
    as_of: Annotated[str, typer.Option("--as-of", help="A timestamp, or latest (the newest event).")] = "latest",
    model_tag: Annotated[str, typer.Option("--model", help="BentoML model version.")] = "latest",
    include_seen: Annotated[bool, typer.Option(help="Keep items the user already engaged with.")] = False,
) -> None:
    """Batch top-K recommendations per user: user_id, rank, item_id, score."""
    import pandas as pd

    from training.workflow import load_from_bentoml, recommend

    if output.suffix not in (".csv", ".parquet"):
        _fail("--output must end in .csv or .parquet")
    cfg = _config(workspace, profile)
    store, events, items = _training_inputs(cfg)
    try:
        model, _, _ = load_from_bentoml(model_tag)
    except Exception as exc:  # noqa: BLE001 - bentoml raises its own NotFound
        _fail(f"no trained model {model_tag!r} in {os.environ['BENTOML_HOME']}: {exc}. Run `persona train`.")
    when = events["event_timestamp"].max() if as_of == "latest" else pd.Timestamp(as_of)
    when = when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")
    user_ids = None
    if users:
        frame = pd.read_csv(users) if users.suffix == ".csv" else pd.read_parquet(users)
        user_ids = frame["user_id" if "user_id" in frame else frame.columns[0]].astype(str).tolist()
    with console.status("scoring"):
        recs = recommend(model, store, events, items, cfg.positives, k, user_ids, when, not include_seen)
    output.parent.mkdir(parents=True, exist_ok=True)
    recs.to_parquet(output, index=False) if output.suffix == ".parquet" else recs.to_csv(output, index=False)
    console.print(f"wrote {len(recs):,} rows for {recs['user_id'].nunique():,} users to {output} (as of {when})")


REPO_ROOT = Path(__file__).resolve().parents[1]


def _service_env(cfg) -> dict:
    from training.workflow import bentoml_home

    bentoml_home(cfg.workspace)
    return {**os.environ, "PERSONA_WORKSPACE": str(cfg.workspace.resolve()), "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


@app.command()
def serve(workspace: Workspace = DEFAULT_WS, profile: Profile = None,
          port: Annotated[int, typer.Option(min=1, max=65535)] = 3000, host: str = "127.0.0.1") -> None:
    """Serve /rank, /profile and /events for the workspace with `bentoml serve`.

    The command becomes `bentoml serve` (exec, same process id), so a supervisor's SIGTERM reaches
    BentoML itself, which stops its workers and frees the port."""
    import sys

    cfg = _config(workspace, profile)
    bentoml = str(Path(sys.executable).parent / "bentoml")
    console.print(f"serving {cfg.workspace} on http://{host}:{port} (OpenAPI at /docs; "
                  f"profile explorer at http://{host}:{port}/ui)", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(REPO_ROOT)
    os.execve(bentoml, [bentoml, "serve", "bentos.service:Persona", "--host", host, "--port", str(port)],
              _service_env(cfg))


@app.command("build")
def build_bento(workspace: Workspace = DEFAULT_WS, profile: Profile = None) -> None:
    """Build a bento (offline: lock_packages false; GPU resources and a CUDA base image declared)."""
    import subprocess
    import sys

    cfg = _config(workspace, profile)
    bentoml = str(Path(sys.executable).parent / "bentoml")
    result = subprocess.run([bentoml, "build", "-f", "bentos/bentofile.yaml", "."], cwd=REPO_ROOT,
                            env=_service_env(cfg), capture_output=True, text=True)
    if result.returncode != 0:
        _fail(f"bentoml build failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}", 1)
    tag = next((line.split('"')[1] for line in result.stdout.splitlines() if "Successfully built Bento" in line
                and '"' in line), None)
    console.print(f"built bento {tag or '(see bentoml list)'} in {os.environ['BENTOML_HOME']}\n"
                  f"serve it:  persona serve --workspace {workspace}\n"
                  f"call it:   curl -s -X POST http://127.0.0.1:3000/rank -H 'content-type: application/json' "
                  f"-d '{{\"user_id\": \"u000001\", \"k\": 5}}'", highlight=False)


@suites_app.command("write")
def suites_write() -> None:
    """Regenerate validation/gx/expectations/*.json from the contract (review the diff)."""
    from validation.suites import write_suites

    for path in write_suites():
        console.print(f"wrote {path}")


@app.command()
def quickstart(
    workspace: Workspace = DEFAULT_WS,
    users: int = 1000,
    items: int = 500,
    days: int = 30,
    seed: int = 0,
) -> None:
    """Run the whole pipeline on generated sample data inside the workspace."""
    cfg = _config(workspace)
    started = time.perf_counter()
    console.rule("1/6 generate sample data")
    generate(out=cfg.sample_dir, users=users, items=items, days=days, seed=seed, fmt="csv")
    console.rule("2/6 validate and ingest")
    validate(source=str(cfg.sample_dir), workspace=workspace, profile=None, strict=True, docs=True)
    ingest(source=str(cfg.sample_dir), workspace=workspace, profile=None, strict=True, as_json=False)
    console.rule("3/6 features: apply, build, materialize")
    features_apply(workspace=workspace, profile=None)
    features_build(workspace=workspace, profile=None, check=True)
    features_materialize(workspace=workspace, profile=None, full=False)
    console.rule("4/6 train and evaluate against the baselines, save to the BentoML store")
    # The global split only, and the evaluated model saved without a refit: within minutes on two cores.
    train_cmd(workspace=workspace, profile=None, epochs=40, batch_size=256, finetune_layers=None,
              max_positives=100_000, bert=None, device="auto", splits="global", baselines=True, refit=False,
              resume=False)
    console.rule("5/6 status")
    status(workspace=workspace, profile=None, as_json=False)
    console.rule("6/6 build the bento")
    build_bento(workspace=workspace, profile=None)
    console.print(f"[bold green]quickstart done[/] in {time.perf_counter() - started:.0f} s. "
                  f"Workspace: {workspace}", highlight=False)


@app.command()
def forget(
    user: Annotated[list[str], typer.Option("--user", help="A user id to erase (repeat for several).")],
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept with the tombstone, e.g. a ticket number).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Erase users everywhere (event log, quarantine, offline and online stores, reports, checkpoints).

    Leaves a tombstone (a salted hash and the time). Idempotent: re-run until it says complete."""
    from privacy.forget import forget as run_forget

    cfg = _config(workspace, profile)
    try:
        report = run_forget(cfg, user, reason)
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        console.print(f"erased {report.users} user(s): {report.event_log.get('events', 0)} events, "
                      f"{report.event_log.get('quarantine', 0)} quarantined rows, {report.online} online rows, "
                      f"{sum(report.offline.values())} offline rows, {len(report.files_changed)} files scrubbed, "
                      f"{len(report.files_deleted)} deleted", highlight=False)
    if not report.complete:
        err.print("[bold red]erasure incomplete:[/] " + "; ".join(report.remaining) + ". Re-run `persona forget`.",
                  highlight=False)
        raise typer.Exit(1)


@app.command()
def export(
    user: Annotated[str, typer.Option("--user", help="The user id.")],
    output: Annotated[Path, typer.Option(help="A .json file.")],
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
) -> None:
    """Everything Persona holds about a user (raw rows, offline and online features, tags) as JSON."""
    from privacy.export import export_with_ranking, write

    cfg = _config(workspace, profile)
    try:
        data = export_with_ranking(cfg, user)
    except ValueError as exc:
        _fail(str(exc))
    write(data, output)
    console.print(f"wrote {output}: {len(data['raw']['events'])} events", highlight=False)


def _erased_in_models(cfg, models: list[dict]) -> list[dict]:
    """The model versions whose training data held users erased since (by their Bloom filters)."""
    if not models:
        return []
    import bentoml

    from eventlog import tombstones
    from training.provenance import trained_on_erased

    log = _event_log(cfg)
    try:
        erased = tombstones.erased_hashes(log.engine)
    finally:
        log.dispose()
    out = []
    for m in models if erased else []:
        n = trained_on_erased(bentoml.models.get(m["tag"]).info.metadata, erased)
        if n:
            out.append({"tag": m["tag"], "erased_users": n})
    return out


def _provenance(cfg, events) -> dict:
    """The model's training users as a Bloom filter of salted hashes (see training/provenance.py)."""
    from core.privacy import Privacy
    from training.provenance import METADATA_KEY, bloom

    privacy = Privacy.for_workspace(cfg.workspace, cfg)
    return {METADATA_KEY: bloom([privacy.hash(u) for u in events["user_id"].astype(str).unique()])}


def _without_erased(cfg, events):
    """Events of tombstoned users never reach a new model (the log no longer holds them, but be sure)."""
    from core.privacy import Privacy
    from eventlog import tombstones

    log = _event_log(cfg)
    try:
        erased = tombstones.erased_hashes(log.engine)
    finally:
        log.dispose()
    if not erased:
        return events
    privacy = Privacy.for_workspace(cfg.workspace, cfg)
    gone = {u for u in events["user_id"].astype(str).unique() if privacy.hash(u) in erased}
    return events[~events["user_id"].isin(gone)]


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
