"""Item counts as of a request (point in time), the popular-and-trending source, and item statistics.

Counts take the events strictly before the request's hour: a value computed after a request never
reaches it, offline or online.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pandas as pd

from training.recall.history import HOUR, Recent
from training.recall.scores import SparseScores

WEEK, MONTH = 7 * 86_400, 30 * 86_400
FOREVER = 1 << 40


class ItemCounts:
    """Each catalogue item's events of some types in a window ending at a request's hour."""

    def __init__(self, events: pd.DataFrame, index: dict[str, int], types: list[str]):
        ev = events[events["event_type"].isin(types) & events["item_id"].isin(index)]
        t = pd.to_datetime(ev["event_timestamp"], utc=True)
        seconds = ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
        order = np.argsort(seconds, kind="stable")
        self.seconds = seconds[order]
        self.items = ev["item_id"].map(index).to_numpy(np.int64)[order]
        self.n_items = len(index)
        self.window = lru_cache(maxsize=256)(self._window)

    def _window(self, hour: int, seconds: int) -> np.ndarray:
        end = hour * HOUR
        lo, hi = np.searchsorted(self.seconds, [end - seconds, end], side="left")
        counts = np.bincount(self.items[lo:hi], minlength=self.n_items).astype(np.float32)
        counts.setflags(write=False)  # shared by every request of the hour
        return counts


class WindowCounts:
    """Counts already taken (by Spark's tasks, ``training/spark_recommend.py``) for one request hour:
    what :class:`ItemCounts` answers for that hour, for a batch whose requests share it."""

    def __init__(self, hour: int, counts: dict[int, np.ndarray]):
        self.hour, self.counts = hour, counts
        self.n_items = len(next(iter(counts.values()))) if counts else 0
        for values in counts.values():
            values.setflags(write=False)

    def window(self, hour: int, seconds: int) -> np.ndarray:
        if hour != self.hour or seconds not in self.counts:
            raise ValueError(f"counts were taken for hour {self.hour}, windows {sorted(self.counts)}; "
                             f"asked for hour {hour}, {seconds} s")
        return self.counts[seconds]


class LogCounts:
    """What :class:`ItemCounts` answers, without holding the whole log: each item's count of the events
    before ``since`` (the base of the 'ever' window) and the events from ``since`` on, which the week's
    and the month's windows of any later request read. A request whose windows reach before ``since``
    (a context timestamp in the past) is counted by ``count``, the database, once per hour and window."""

    def __init__(self, before: np.ndarray, since: int, seconds: np.ndarray, items: np.ndarray,
                 count: Callable[[int, int], np.ndarray]):
        order = np.argsort(seconds, kind="stable")
        self.before, self.since = before.astype(np.float32), since
        self.seconds, self.items = seconds[order], items[order]
        self.n_items = len(before)
        self.count = count
        self.window = lru_cache(maxsize=256)(self._window)

    def _window(self, hour: int, seconds: int) -> np.ndarray:
        end = hour * HOUR
        start = end - seconds
        if end < self.since or (start < self.since and seconds < FOREVER):  # older events than it holds
            counts = np.asarray(self.count(start, end), dtype=np.float32)
        else:
            lo, hi = np.searchsorted(self.seconds, [max(start, self.since), end], side="left")
            counts = np.bincount(self.items[lo:hi], minlength=self.n_items).astype(np.float32)
            if start < self.since:  # the 'ever' window: the older events' counts as well
                counts += self.before
        counts.setflags(write=False)
        return counts


WINDOWS = (WEEK, MONTH, FOREVER)  # every window a source or a statistic reads


class PopularSource:
    name = "popular this week"

    def __init__(self, counts: ItemCounts):
        self.counts = counts
        self.last: tuple[int, SparseScores] | None = None  # the last hour's: its requests share them

    def scores(self, recent: Recent, now: float, query: str | None) -> SparseScores:
        """The week's count, plus a tenth of the month's so that a quiet week still ranks (log scale)."""
        hour = int(now // HOUR)
        last = self.last  # one read: another thread may replace it
        if last is None or last[0] != hour:
            dense = np.log1p(self.counts.window(hour, WEEK)) + 0.1 * np.log1p(self.counts.window(hour, MONTH))
            last = self.last = (hour, SparseScores.of(dense))
        return last[1]


class ItemStats:
    """Per-candidate item features: behaviour this week and month, targets this month and ever, and the
    share of behaviour that became a target (how often a look turns into a purchase)."""

    names = ["item behaviour 7d", "item behaviour 30d", "item targets 30d", "item targets ever", "item conversion"]

    def __init__(self, behaviour: ItemCounts, targets: ItemCounts):
        self.behaviour, self.targets = behaviour, targets

    def features(self, candidates: np.ndarray, now: float) -> np.ndarray:
        hour = int(now // HOUR)
        b7, b30 = self.behaviour.window(hour, WEEK)[candidates], self.behaviour.window(hour, MONTH)[candidates]
        t30, ever = self.targets.window(hour, MONTH)[candidates], self.targets.window(hour, FOREVER)[candidates]
        b_ever = self.behaviour.window(hour, FOREVER)[candidates]
        conversion = (ever + 0.1) / (b_ever + 1.0)
        return np.stack([np.log1p(b7), np.log1p(b30), np.log1p(t30), np.log1p(ever), conversion], axis=1)
