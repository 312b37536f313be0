"""The privacy screen every incoming row passes once, before the gate: pseudonyms, then erased users.

User ids become their keyed hash when pseudonymous ids are on, in the normalised frame and in the raw
text (what the quarantine keeps), so no raw id reaches the log, the quarantine, the features or the
reports. A pseudonym maps to itself, so a replay or a re-ingest of pseudonymised data is unchanged.
Then rows of erased (tombstoned) users are taken out: they are never stored again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from core.privacy import Privacy
from eventlog.sources import Batch, TableBatch

ERASED_RULE = "erased_user"
KEYED_BY_USER = ("users", "events")


@dataclass
class Screened:
    """A batch after the screen, and per table that lost rows, the mask of the input rows kept."""

    batch: Batch
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    def removed(self, table: str) -> list[int]:
        """Input positions of ``table`` taken out as rows of erased users."""
        mask = self.kept.get(table)
        return [] if mask is None else [int(p) for p in np.flatnonzero(~mask)]

    def counts(self) -> dict[str, int]:
        return {t: int((~m).sum()) for t, m in self.kept.items()}


def screen(batch: Batch, privacy: Privacy, erased: frozenset[str] | set[str]) -> Screened:
    """Pseudonymise, then drop the rows of users whose salted hash is in ``erased``."""
    batch = pseudonymise_batch(batch, privacy)
    if not erased:
        return Screened(batch)
    tables, kept = {}, {}
    for name, tb in batch.tables.items():
        if name not in KEYED_BY_USER or tb.frame.empty:
            tables[name] = tb
            continue
        ids = tb.frame["user_id"].astype(object)
        gone = np.fromiter((v is not None and not pd.isna(v) and privacy.hash(str(v)) in erased for v in ids),
                           dtype=bool, count=len(ids))
        tables[name] = subset(tb, ~gone) if gone.any() else tb
        if gone.any():
            kept[name] = ~gone
    return Screened(replace(batch, tables=tables), kept)


def pseudonymise_batch(batch: Batch, privacy: Privacy) -> Batch:
    if not privacy.id_key:
        return batch
    tables = {name: pseudonymise_table(tb, privacy) if name in KEYED_BY_USER else tb
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


def subset(tb: TableBatch, keep: np.ndarray) -> TableBatch:
    """The rows of ``tb`` where ``keep`` is true, with cell issues renumbered to match."""
    new_pos = np.cumsum(keep) - 1
    issues = [replace(i, row=int(new_pos[i.row])) for i in tb.issues if keep[i.row]]
    return replace(tb, frame=tb.frame[keep].reset_index(drop=True), raw=tb.raw[keep].reset_index(drop=True),
                   row_numbers=tb.row_numbers[keep], issues=issues)


def erased_rejection(index: int) -> dict:
    """How ``POST /events`` reports an erased user's event: rejected, with the reason, never stored."""
    return {"index": index, "event_id": None, "reasons": [
        {"rule": ERASED_RULE, "column": "user_id", "reason": "this user was erased (persona forget); not stored"}]}
