"""What recall's sources read from the whole shop, taken from the event log in chunks.

Serving rebuilds these as events arrive. Reading the log into one frame made its memory grow with the
log's length; this holds what the sources keep instead: the distinct (user, item) pairs of the
behaviour types (the co-occurrence), each item's count of the older events, and the events of the last
month and a day (the week's and the month's windows of every request from the build on).
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd

from eventlog.store import EventLog
from training.recall.cooccurrence import coded_pairs, similarity_from_pairs
from training.recall.fit import Behaviours, ShopCounts
from training.recall.history import HOUR
from training.recall.popular import MONTH, LogCounts

REACH = MONTH + 24 * HOUR  # the events held in full, back from the build


def counts_from_log(log: EventLog, item_ids: list[str], behaviours: Behaviours, now: datetime) -> ShopCounts:
    """The sources' shop-wide state as of ``now`` for a catalogue in ``item_ids``' order; what
    ``make_recall`` computes from the whole log as a frame, the same values."""
    index = {i: k for k, i in enumerate(item_ids)}
    since = int(now.timestamp()) - REACH
    return ShopCounts(log_similarity(log, index, behaviours.sequence),
                      log_counts(log, index, list(behaviours.sequence), since),
                      log_counts(log, index, list(behaviours.targets), since))


def log_similarity(log: EventLog, index: dict[str, int], types: list[str]):
    """``cooccurrence.item_similarity`` over the log's distinct (user, item) pairs, read in chunks."""
    users, items = coded_pairs(log.event_chunks(["user_id", "item_id"], types, distinct=True), index)
    return similarity_from_pairs(users, items, len(index))


def log_counts(log: EventLog, index: dict[str, int], types: list[str], since: int) -> LogCounts:
    """Item counts of ``types``: the database counts the events before ``since``; those after are held."""
    seconds, items = [], []
    for chunk in log.event_chunks(["item_id", "event_timestamp"], types, since=_time(since)):
        chunk = chunk[chunk["item_id"].isin(index)]
        t = chunk["event_timestamp"]
        seconds.append(((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64))
        items.append(chunk["item_id"].map(index).to_numpy(np.int64))

    def count(start: int, end: int) -> np.ndarray:
        return _in_order(log.item_counts(types, since=_time(start) if start > 0 else None, before=_time(end)),
                         index)

    before = _in_order(log.item_counts(types, before=_time(since)), index)
    return LogCounts(before, since, _joined(seconds), _joined(items), count)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _in_order(counts: pd.Series, index: dict[str, int]) -> np.ndarray:
    out = np.zeros(len(index), dtype=np.float32)
    known = counts[counts.index.isin(index)]
    out[known.index.map(index).to_numpy(np.int64)] = known.to_numpy(np.float32)
    return out


def _time(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
