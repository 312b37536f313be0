"""`persona features`: apply the Feast repo, build the offline store from the event log, materialize."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from persona.cli.common import DEFAULT_WS, Profile, Workspace, _config, _event_log, _fail, console, err, features_app


@features_app.command("apply")
def features_apply(workspace: Workspace = DEFAULT_WS, profile: Profile = None) -> None:
    """Write WORKSPACE/feature_store.yaml for the profile and register the feature repo."""
    from feature_repo.pipeline import feast_config, registry

    cfg = _config(workspace, profile)
    try:
        with console.status(f"feast apply ({cfg.profile})"):
            _, objects = registry.apply(cfg.workspace, cfg.profile)
    except ValueError as exc:
        _fail(str(exc))
    path = feast_config.yaml_path(cfg.workspace)
    console.print(f"applied {len(objects)} Feast objects; config: {path}\n"
                  f"Feast CLI: feast -c {feast_config.REPO_DIR} -f {path} plan", highlight=False)


@features_app.command("build")
def features_build(workspace: Workspace = DEFAULT_WS, profile: Profile = None,
                   check: Annotated[bool, typer.Option(help="Run the feature-level GX suite.")] = True) -> None:
    """Compute every feature view from the event log and write the offline store.

    The feature checks run on the new tables before they replace the old ones: a failing build
    leaves the previous tables in place."""
    from feature_repo.pipeline.build import FeatureChecksFailed, build, row_counts

    cfg = _config(workspace, profile)
    log = _event_log(cfg)
    started = time.perf_counter()
    checks = (lambda tables: _check_features(cfg, tables)) if check else None
    try:
        with console.status(f"building features from the event log ({cfg.profile})"):
            tables = build(log, cfg.profile, cfg.workspace, check=checks, sequence_types=cfg.sequence_types)
    except FeatureChecksFailed as exc:
        err.print(f"[bold red]feature checks failed[/] (see {exc.report.path}); the previous offline tables "
                  "are unchanged", highlight=False)
        raise typer.Exit(1) from None
    finally:
        log.dispose()
    for name, rows in row_counts(tables).items():
        console.print(f"{name:>15}: {rows:,} rows")
    console.print(f"built in {time.perf_counter() - started:.1f} s")


def _check_features(cfg, tables):
    from validation.feature_suite import check_features

    report = check_features(tables, cfg.reports_dir / "features", cfg.validation.feature_drift,
                            encoder_vocabulary(cfg.text_model))
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
    from tqdm import tqdm

    from eventlog import locks
    from feature_repo.pipeline.materialize import materialize
    from feature_repo.pipeline.online import sync_online

    cfg = _config(workspace, profile)
    log = _event_log(cfg)
    bar = None

    def progress(total: int):
        nonlocal bar
        bar = tqdm(total=total, desc="sync changed keys online", unit="key", disable=total == 0)
        return bar.update

    try:
        with locks.held(log.engine):  # a forget meanwhile waits, then erases what this wrote online
            try:
                with console.status("feast materialize"):
                    store = materialize(cfg.workspace, full=full)
            except FileNotFoundError as exc:
                _fail(str(exc))
            synced = sync_online(store, log, cfg.workspace, progress, sequence_types=cfg.sequence_types)
    finally:
        log.dispose()
        if bar is not None:
            bar.close()
    console.print(f"materialized; synced {synced['users']:,} changed users and {synced['items']:,} changed items "
                  f"from the event log (changes since {synced['since']})", highlight=False)


def encoder_vocabulary(text_model: str | None):
    """The configured encoder's tokenizer as the feature checks' ``TextEncoderVocabulary`` (its name is
    the folder's, or all-MiniLM-L6-v2): each text's share of tokens it maps to unknown."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from training.model import default_bert_path
    from validation.feature_suite import TextEncoderVocabulary

    path = text_model or default_bert_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    unknown = tokenizer.unk_token_id

    def unknown_share(texts: list[str]) -> list[float]:
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=256)["input_ids"]
        return [sum(t == unknown for t in row) / len(row) if row else 0.0 for row in ids]
    return TextEncoderVocabulary(Path(path).name if text_model else "all-MiniLM-L6-v2", unknown_share)
