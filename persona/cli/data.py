"""Data in: generate sample data, ingest and validate batches, the quarantine, status, the suites."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from persona.cli.common import (
    DEFAULT_WS,
    Profile,
    Workspace,
    _config,
    _event_log,
    _fail,
    _gate,
    _load,
    _privacy,
    app,
    console,
    err,
    quarantine_app,
    suites_app,
)
from persona.cli.provenance import _erased_in_models, _models

# The keys of ``persona.sample_data.LOCALES``, written out so `persona --help` need not import NumPy
# and pandas (tests/test_sample_data.py keeps the two equal).
SampleLocale = Annotated[Literal["en", "zh"], typer.Option(
    help="Language and geography of the sample shop: en (English, dollars) or zh (Chinese, "
         "Taobao-style titles and queries, Chinese provinces, yuan). The behaviour is the same.")]


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder for users/items/events files.")] = Path("sample"),
    users: Annotated[int, typer.Option(min=1)] = 1000,
    items: Annotated[int, typer.Option(min=1)] = 500,
    days: Annotated[int, typer.Option(min=1)] = 30,
    seed: int = 0,
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
    locale: SampleLocale = "en",
) -> None:
    """Write a realistic synthetic shop (users, items, events) that follows the input contract."""
    from persona import sample_data

    if fmt not in ("csv", "parquet"):
        _fail("--format must be csv or parquet")
    start = time.perf_counter()
    with console.status("generating sample data"):
        tables = sample_data.generate(users, items, days, seed, locale=locale)
        # A BOM so that spreadsheet software reads Chinese CSV as UTF-8 (the loader skips it); English
        # files stay as they were.
        paths = sample_data.write(tables, out, fmt, encoding="utf-8" if locale == "en" else "utf-8-sig")
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
    try:
        with console.status(f"validating and ingesting {batch.rows:,} rows"), _writes_or_fails():
            report, _ = run_ingest(batch, log, _gate(cfg), privacy=_privacy(cfg))
    finally:
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


@contextlib.contextmanager
def _writes_or_fails():
    """A batch the event log cannot take ends in one clear line, never a traceback with row values
    (SQLAlchemy's message quotes the statement's parameters): the transaction wrote nothing."""
    import sqlalchemy as sa

    from ingestion.ingest import QuarantineFull

    try:
        yield
    except QuarantineFull as exc:
        _fail(str(exc), 1)
    except sa.exc.DBAPIError as exc:
        cause = str(exc.orig).splitlines()[0][:200] if exc.orig is not None else type(exc).__name__
        _fail(f"the event log could not be written ({type(exc.orig).__name__}: {cause}); nothing of this batch "
              "was written. Fix the cause (disk space, database) and run the same command again.", 1)


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
    from validation.report import data_docs, rejected_rows, rule_table, summary_tables, write_summary

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
    built = None
    if docs:
        with console.status("building GX Data Docs"):
            built = data_docs(cfg.workspace, batch, now, timedelta(minutes=cfg.validation.clock_skew_minutes),
                              shown, event_types=cfg.event_types)
    md, html_path = write_summary(folder, batch, result, shown, built)
    console.print(summary_tables(result).to_string(index=False))
    rules = rule_table(result)
    if len(rules):
        console.print("\n" + rules.to_string(index=False))
        console.print("\n" + rejected_rows(batch, result, shown).head(20).to_string(index=False), highlight=False)
    if built is not None:
        console.print(f"GX Data Docs: {built.index}")
    console.print(f"summary: {md} and {html_path}")
    if result.held:
        err.print("[bold red]this batch would be held:[/] " + "; ".join(result.hold_reasons), highlight=False)
        raise typer.Exit(1)
    if strict and result.rejected:
        err.print(f"[bold red]--strict:[/] {result.rejected} row(s) break a rule", highlight=False)
        raise typer.Exit(1)


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
    with _writes_or_fails():
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


@suites_app.command("write")
def suites_write() -> None:
    """Regenerate validation/gx/expectations/*.json from the contract (review the diff)."""
    from validation.suites import write_suites

    for path in write_suites():
        console.print(f"wrote {path}")
