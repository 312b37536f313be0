"""Data-quality reports for reviewers: GX Data Docs plus a self-contained Markdown/HTML summary.

GX's Data Docs load their CSS from CDNs, so the summary written here is plain Markdown and an HTML
page with inline styles that reads well offline and in a CI artefact.
"""

from __future__ import annotations

import contextlib
import html
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

import great_expectations as gx
import pandas as pd

from core.privacy import PERSONAL_COLUMNS, mask_reason
from eventlog.sources import Batch
from validation.gate import ROW, GateResult
from validation.suites import GX_DIR, NOT_FUTURE_PARAM, load_suite

MAX_LISTED = 200  # rows listed per report; the quarantine table keeps all of them


def rejected_rows(batch: Batch, result: GateResult, personal_values: bool = False) -> pd.DataFrame:
    """One line per rejected row: table, row number, key, rule, column, reason (values of personal
    columns masked unless ``personal_values``)."""
    records = []
    for table, verdict in result.verdicts.items():
        tb = batch.tables[table]
        key = tb.frame.columns[0] if table != "events" else "event_id"
        for row, violations in sorted(verdict.violations.items()):
            for v in violations:
                records.append({"table": table, "row": int(tb.row_numbers[row]),
                                "key": tb.frame[key].iloc[row], "rule": v.rule, "column": v.column,
                                "reason": v.reason if personal_values else mask_reason(table, v.column, v.reason)})
    return pd.DataFrame(records, columns=["table", "row", "key", "rule", "column", "reason"])


def summary_tables(result: GateResult) -> pd.DataFrame:
    rows = []
    for table, verdict in result.verdicts.items():
        quarantined = verdict.rows if result.held else len(verdict.violations)
        rows.append({"table": table, "rows": verdict.rows, "accepted": verdict.rows - quarantined,
                     "quarantined": quarantined, "exact duplicates": len(verdict.duplicates)})
    return pd.DataFrame(rows)


def rule_table(result: GateResult) -> pd.DataFrame:
    rows = [{"table": t, "rule": rule, "rows": n}
            for t, v in result.verdicts.items() for rule, n in sorted(v.rule_counts().items())]
    return pd.DataFrame(rows, columns=["table", "rule", "rows"])


@dataclass
class DataDocs:
    """Where one run's GX Data Docs are: the site's index and each table's validation page."""

    index: Path
    runs: dict[str, Path] = field(default_factory=dict)

    def links(self, folder: Path) -> list[tuple[str, str]]:
        """(label, path relative to ``folder``) for each page: the links survive the workspace being
        copied as a CI artefact."""
        rel = [("index of every run", self.index)] + [(f"{t}: this run's results", p) for t, p in self.runs.items()]
        return [(label, os.path.relpath(path, folder)) for label, path in rel]


DOCS_OFFLINE = ("GX's index lists runs with scripts it loads from CDNs, so offline (or where those CDNs are "
                "blocked) it shows none; these links open each table's page directly.")


def write_summary(folder: Path, batch: Batch, result: GateResult,
                  personal_values: bool = False, docs: DataDocs | None = None) -> tuple[Path, Path]:
    """The summary as Markdown and as a self-contained HTML page, linking ``docs`` when built."""
    folder.mkdir(parents=True, exist_ok=True)
    rejected = rejected_rows(batch, result, personal_values)
    notes = [n for t in batch.tables.values() for n in t.notes]
    verdict = ("HELD: " + "; ".join(result.hold_reasons)) if result.held else "accepted"
    md = [f"# Data-quality report: {batch.source}", "",
          f"Validated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}. Batch verdict: **{verdict}**.", "",
          "## Rows", "", summary_tables(result).to_markdown(index=False), "",
          "## Broken rules", "", rule_table(result).to_markdown(index=False) if len(rejected) else
          "No row breaks a rule.", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if len(rejected):
        md += [f"## Rejected rows (first {MAX_LISTED})", "",
               rejected.head(MAX_LISTED).to_markdown(index=False), ""]
    if docs is not None:
        md += ["## GX Data Docs", "", DOCS_OFFLINE, ""] + [f"- [{label}]({href})" for label, href in
                                                            docs.links(folder)] + [""]
    md_path = folder / "summary.md"
    md_path.write_text("\n".join(md))
    style = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;color:#222}"
             "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;"
             "padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f3f3f3}"
             ".held{color:#b00020;font-weight:bold}.ok{color:#0a7d32;font-weight:bold}")
    cls = "held" if result.held else "ok"
    parts = [f"<!doctype html><meta charset='utf-8'><title>Data-quality report</title><style>{style}</style>",
             f"<h1>Data-quality report: {html.escape(batch.source)}</h1>",
             f"<p>Batch verdict: <span class='{cls}'>{html.escape(verdict)}</span></p>",
             "<h2>Rows</h2>", summary_tables(result).to_html(index=False),
             "<h2>Broken rules</h2>",
             rule_table(result).to_html(index=False) if len(rejected) else "<p>No row breaks a rule.</p>"]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    if len(rejected):
        parts += [f"<h2>Rejected rows (first {MAX_LISTED})</h2>", rejected.head(MAX_LISTED).to_html(index=False)]
    if docs is not None:
        parts += ["<h2>GX Data Docs</h2>", f"<p>{html.escape(DOCS_OFFLINE)}</p><ul>"]
        parts += [f"<li><a href='{html.escape(href)}'>{html.escape(label)}</a></li>" for label, href in
                  docs.links(folder)] + ["</ul>"]
    html_path = folder / "summary.html"
    html_path.write_text("\n".join(parts))
    return md_path, html_path


def build_data_docs(workspace: Path, batch: Batch, now: datetime, skew: timedelta,
                    personal_values: bool = False, event_types: tuple[str, ...] | None = None) -> Path:
    """The Data Docs' index after :func:`data_docs` (kept for callers that want only the index)."""
    return data_docs(workspace, batch, now, skew, personal_values, event_types).index


def data_docs(workspace: Path, batch: Batch, now: datetime, skew: timedelta,
              personal_values: bool = False, event_types: tuple[str, ...] | None = None) -> DataDocs:
    """Run the suites through a GX file context in the workspace and build its Data Docs.

    The workspace context is a copy of the checked-in ``validation/gx`` project, refreshed with
    the current suites each time, so results and docs stay with the dataset they describe.
    GX keeps sample unexpected values: for tables with personal columns none are kept unless
    ``personal_values`` (the workspace's ``privacy.show_personal_values``) allows it.
    ``event_types``: the workspace's declared behaviour types (``Config.event_types``), checked as the
    gate checks them; None: the built-in ones.
    """
    root = workspace / "gx"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(GX_DIR / "great_expectations.yml", root / "great_expectations.yml")
    context = gx.get_context(mode="file", project_root_dir=str(workspace))
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_or_update_pandas("persona")
    site = root / "uncommitted" / "data_docs" / "local_site"
    docs = DataDocs(site / "index.html")
    for table, tb in batch.tables.items():
        suite = load_suite(table, event_types=event_types)
        with contextlib.suppress(Exception):  # GX raises a private error type when absent
            context.suites.delete(table)
        suite = context.suites.add(suite)
        try:
            asset = source.get_asset(table)
        except LookupError:
            asset = source.add_dataframe_asset(table)
        try:
            bd = asset.get_batch_definition("batch")
        except (KeyError, LookupError):
            bd = asset.add_batch_definition_whole_dataframe("batch")
        vd = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{table}_contract", data=bd, suite=suite))
        checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=f"{table}_checkpoint", validation_definitions=[vd],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_docs")],
            result_format={"result_format": "SUMMARY"} if personal_values or not PERSONAL_COLUMNS.get(table)
            else {"result_format": "SUMMARY", "partial_unexpected_count": 0}))
        data = tb.frame.reset_index(drop=True).copy()
        data[ROW] = range(len(data))
        run = checkpoint.run(batch_parameters={"dataframe": data},
                             expectation_parameters={NOT_FUTURE_PARAM: pd.Timestamp(now + skew)})
        for key in run.run_results:
            for page in context.get_docs_sites_urls(resource_identifier=key, only_if_exists=True):
                if page.get("site_url", "").startswith("file://"):
                    docs.runs[table] = Path(unquote(urlparse(page["site_url"]).path))
    return docs
