"""Ingest a batch: read, pass the validation gate, write accepted rows and quarantine the rest.

All writes of one batch (accepted rows, quarantine records, the batch record) share one
transaction: a failure leaves no partial rows. Accepted plus quarantined always equals the input.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace

import pandas as pd

from core.contract import KEY_COLUMN
from core.privacy import Privacy
from eventlog import locks, tombstones
from eventlog.sources import Batch, normalise
from eventlog.store import EventLog, WriteCounts, new_batch_id
from eventlog.tombstones import ErasedSet
from ingestion.screen import Screened, screen
from validation.gate import Gate, GateResult, KnownIds, Violation

# How the batch record is filed, by how the batch arrived. Only "accepted" (file and SQL batches)
# is a column baseline for schema drift; held batches are filed "held" whatever their kind.
_STATUS = {"files": "accepted", "sql": "accepted", "replay": "replay", "api": "api"}


@dataclass
class TableReport:
    rows: int = 0
    accepted: int = 0
    quarantined: int = 0
    written: int = 0  # new rows (events) or inserted/updated rows (users, items)
    already_present: int = 0  # events already in the log: idempotent re-delivery
    duplicates: int = 0  # exact copies within the batch, collapsed
    rules: Counter = field(default_factory=Counter)


@dataclass
class IngestReport:
    batch_id: str
    source: str
    held: bool
    hold_reasons: list[str]
    tables: dict[str, TableReport]
    notes: list[str]
    # The events this ingest stored, as stored (after pseudonymisation): what the online push folds.
    new_events: pd.DataFrame | None = None
    quarantine_full: bool = False  # rejected rows of an API batch were answered but not stored

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    @property
    def quarantined(self) -> int:
        return sum(t.quarantined for t in self.tables.values())

    def to_dict(self) -> dict:
        return {"batch_id": self.batch_id, "source": self.source, "held": self.held,
                "hold_reasons": self.hold_reasons, "notes": self.notes,
                "tables": {k: {**v.__dict__, "rules": dict(v.rules)} for k, v in self.tables.items()}}


def ingest(batch: Batch, log: EventLog, gate: Gate, *, dry_run: bool = False,
           replayed: dict[str, dict[int, int]] | None = None, privacy: Privacy | None = None,
           erased: ErasedSet | None = None) -> tuple[IngestReport, GateResult]:
    """Screen ``batch`` (pseudonyms, erased users), gate it and write it. ``replayed`` maps table ->
    row -> quarantine id being retried. The screen and the write share the log's erasure lock, so a
    ``persona forget`` that starts in between waits for the write and then erases it."""
    privacy = tombstones.bound_to_log(privacy or Privacy.for_log(log.url), log.engine)
    with locks.held(log.engine):
        screened = screen(batch, privacy, (erased or ErasedSet(log.engine)).hashes())
        return admit(screened, log, gate, dry_run=dry_run, replayed=_renumbered(replayed, screened))


def admit(screened: Screened, log: EventLog, gate: Gate, *, dry_run: bool = False,
          replayed: dict[str, dict[int, int]] | None = None) -> tuple[IngestReport, GateResult]:
    """Gate a screened batch and write it: accepted rows to the log, the rest to the quarantine."""
    batch = screened.batch
    result = gate.check(batch, KnownIds(log))
    batch_id = new_batch_id()
    report = IngestReport(batch_id, batch.source, result.held, result.hold_reasons, {},
                          [n for t in batch.tables.values() for n in t.notes])
    for table, verdict in result.verdicts.items():
        tr = report.tables[table] = TableReport(rows=verdict.rows, duplicates=len(verdict.duplicates))
        tr.rules = verdict.rule_counts()
        tr.quarantined = verdict.rows if result.held else len(verdict.violations)
        tr.accepted = verdict.rows - tr.quarantined
    for table, n in screened.counts().items():
        report.notes.append(f"{table}: skipped {n} row(s) of erased users (tombstoned by `persona forget`)")
    if dry_run:
        return report, result
    replayed = replayed or {}
    with log.engine.begin() as conn:
        quarantine_rows: list[dict] = []
        resolved: list[int] = []
        for table, verdict in result.verdicts.items():
            tb = batch.tables[table]
            retried = replayed.get(table, {})
            failed = list(range(verdict.rows)) if result.held else verdict.rejected_rows
            if not result.held:
                mask = verdict.write_mask()
                counts: WriteCounts = log.write(conn, table, tb.frame[mask], tb.present, batch_id,
                                                checked=verdict.in_log)
                tr = report.tables[table]
                tr.written = counts.new if table == "events" else int(mask.sum())
                tr.already_present = counts.existing if table == "events" else 0
                if table == "events":
                    report.new_events = tb.frame[mask][tb.frame[mask]["event_id"].isin(counts.inserted)]
                late = _write_conflicts(tb, verdict, counts.conflicts)
                tr.quarantined += len(late)
                tr.accepted -= len(late)
                tr.rules.update(v.rule for row in late for v in verdict.violations[row])
                failed = sorted([*failed, *late])
                resolved += [qid for row, qid in retried.items() if row not in verdict.violations]
            for row in failed:
                record = _quarantine_record(batch_id, tb, row, verdict.violations.get(row),
                                            "held" if result.held else "open", result.hold_reasons)
                if row in retried:  # still failing: refresh its record with today's reasons
                    log.update_quarantine(conn, retried[row], {k: record[k] for k in (
                        "rule", "column_name", "reason", "status")})
                else:
                    quarantine_rows.append(record)
        quarantine_rows = _within_bound(quarantine_rows, conn, log, gate.settings.max_quarantined_rows, batch, report)
        log.quarantine_rows(conn, quarantine_rows)
        log.resolve_quarantine(conn, resolved)
        summary = report.to_dict() | {"kind": batch.kind,
                                      "columns": {t: b.present for t, b in batch.tables.items()}}
        log.record_batch(conn, batch_id, batch.source, "held" if result.held else _STATUS.get(batch.kind, "api"),
                         summary)
    return report, result


class QuarantineFull(RuntimeError):
    """A file or SQL batch would take the quarantine past its bound: nothing of it was written."""


def _within_bound(rows: list[dict], conn, log: EventLog, limit: int, batch: Batch, report: IngestReport) -> list[dict]:
    """The quarantine rows that fit under ``limit`` open rows. A batch from a file or a database is
    refused whole (raised inside its transaction: nothing is written, the source still has it); an
    API batch keeps its accepted events, and the answer lists the rejected ones that were not stored."""
    if not rows:
        return rows
    held = log.open_quarantined(conn)
    room = max(limit - held, 0)
    if len(rows) <= room:
        return rows
    if batch.kind not in ("api",):
        raise QuarantineFull(f"the quarantine holds {held:,} open rows and this batch would add {len(rows):,} "
                             f"(limit {limit:,}, setting validation.max_quarantined_rows): nothing was written. "
                             "Review and replay the quarantine (`persona quarantine list`), or raise the limit")
    report.quarantine_full = True
    report.notes.append(f"quarantine full ({held:,} open rows, limit {limit:,}): {len(rows) - room} rejected "
                        "row(s) were answered but not stored")
    return rows[:room]


def _renumbered(replayed: dict[str, dict[int, int]] | None, screened: Screened) -> dict[str, dict[int, int]] | None:
    """``replayed`` renumbered to the rows the screen kept."""
    if not replayed:
        return replayed
    out = dict(replayed)
    for table, mask in screened.kept.items():
        new_pos = mask.cumsum() - 1
        out[table] = {int(new_pos[r]): q for r, q in replayed.get(table, {}).items() if mask[r]}
    return out


def _write_conflicts(tb, verdict, conflicts: dict) -> list[int]:
    """Rows the write found in conflict with an event another writer stored after the gate looked.

    They become ``event_id_conflict`` violations (the gate's rule and wording), as do exact copies
    of them in this batch, so that nothing is dropped silently. Returns the rows, added to ``verdict``.
    """
    if not conflicts:
        return []
    ids = tb.frame["event_id"]
    rows = {int(row): cols for row, cols in conflicts.items()}
    by_id = {ids.iloc[row]: row for row in rows}
    rows |= {int(p): rows[by_id[ids.iloc[p]]] for p in verdict.duplicates if ids.iloc[p] in by_id}
    for row, cols in rows.items():
        verdict.violations[row] = [Violation(row, "event_id", "event_id_conflict",
                                             f"event_id {ids.iloc[row]!r} is already in the log with "
                                             f"different {', '.join(cols)}")]
    return sorted(rows)


def _quarantine_record(batch_id: str, tb, row: int, violations, status: str, hold: list[str]) -> dict:
    # Every column of the row, nulls included: a replay then has the columns the batch had.
    payload = dict(tb.raw.iloc[row].items())
    key = tb.frame[KEY_COLUMN[tb.table]].iloc[row]
    if violations:
        rule = "; ".join(dict.fromkeys(v.rule for v in violations))
        column = "; ".join(dict.fromkeys(v.column or "" for v in violations))
        reason = "; ".join(v.reason for v in violations)
    else:
        rule, column, reason = "batch_held", None, "the row passed, but its batch was held: " + "; ".join(hold)
    return {"batch_id": batch_id, "table_name": tb.table, "row_number": int(tb.row_numbers[row]),
            "record_key": None if pd.isna(key) else str(key), "rule": rule, "column_name": column,
            "reason": reason, "payload": json.dumps(payload, ensure_ascii=False), "status": status}


def replay(log: EventLog, gate: Gate, *, batch_id: str | None = None,
           corrected: Batch | None = None, privacy=None) -> tuple[IngestReport, GateResult]:
    """Re-validate quarantined rows and ingest what now passes.

    With ``corrected``, the fixed rows come from a corrected file: they are ingested like any batch
    and the quarantine records with the same keys are resolved. Without it, the stored rows are
    re-validated as they stand (after a rule or setting change, or once missing users arrived),
    one by one: the reject-share and schema-drift checks do not apply to them.

    Without ``batch_id`` only ``open`` rows (rows that broke a rule) are retried, never the rows of
    a held batch. A held batch is released only when named by ``batch_id``: its batch-level checks
    are then knowingly waived, for that batch alone.
    """
    pending = log.quarantined()
    if batch_id:
        pending = pending[(pending["batch_id"] == batch_id) & pending["status"].isin(["open", "held"])]
    elif corrected is not None:
        pending = pending[pending["status"].isin(["open", "held"])]  # a fixed row resolves its record
    else:
        pending = pending[pending["status"] == "open"]
    if corrected is not None:
        replayed: dict[str, dict[int, int]] = {}
        for table, tb in corrected.tables.items():
            keys = tb.frame[KEY_COLUMN[table]]
            ids = pending[pending["table_name"] == table].set_index("record_key")["id"]
            ids = ids[~ids.index.duplicated(keep="last")]
            replayed[table] = {int(r): int(ids[k]) for r, k in enumerate(keys) if k in ids.index}
        return ingest(corrected, log, gate, replayed=replayed, privacy=privacy)
    tables = {}
    replayed = {}
    for table, group in pending.groupby("table_name", sort=False):
        raw = pd.DataFrame([json.loads(p) for p in group["payload"]])
        tb = normalise(table, raw, f"quarantine:{table}")
        tb.row_numbers = group["row_number"].to_numpy()
        tables[table] = tb
        replayed[table] = dict(enumerate(group["id"].astype(int)))
    batch = Batch(source="quarantine replay", tables=tables, kind="replay")
    # Replayed rows are judged one by one: no batch-level hold for share or column drift.
    lenient = Gate(replace(gate.settings, max_reject_share=1.0, on_schema_drift="accept"), gate.now)
    report, result = ingest(batch, log, lenient, replayed=replayed, privacy=privacy)
    if batch_id and (pending["status"] == "held").any():
        reasons = json.loads(log.batch_summary(batch_id) or "{}").get("hold_reasons") or ["held"]
        report.notes.append(f"batch {batch_id} was held; its batch-level checks were waived on request: "
                            + "; ".join(reasons))
    return report, result
