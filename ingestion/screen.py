"""Pseudonymous ids at the door: user ids are replaced by their keyed hash before anything is stored.

Both the normalised frame and the raw text (what the quarantine keeps) change, so no raw id reaches
the event log, the quarantine, the features or the reports. A pseudonym maps to itself, so a replay
of quarantined rows or a re-ingest of already-pseudonymised data is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from core.privacy import Privacy
from eventlog.sources import Batch, TableBatch


def pseudonymise_batch(batch: Batch, privacy: Privacy) -> Batch:
    if not privacy.id_key:
        return batch
    tables = {name: pseudonymise_table(tb, privacy) if name in ("users", "events") else tb
              for name, tb in batch.tables.items()}
    return replace(batch, tables=tables)


def pseudonymise_table(tb: TableBatch, privacy: Privacy) -> TableBatch:
    def mapped(series: pd.Series) -> pd.Series:
        return series.map(lambda v: v if v is None or pd.isna(v) else privacy.user_id(str(v)))

    frame, raw = tb.frame.copy(), tb.raw.copy()
    frame["user_id"] = mapped(frame["user_id"]).astype(tb.frame["user_id"].dtype)
    if "user_id" in raw:
        raw["user_id"] = mapped(raw["user_id"])
    return replace(tb, frame=frame, raw=raw)
