"""A user's behaviour as of a request, as the feature store keeps it (``user_sequence``).

The fold (``feature_repo/pipeline/fold.py``) stores the newest slots of (hour, item, type), each with
the number of events in it. The ranker reads that state and nothing else: offline from the
point-in-time row, online from the online store, so both paths see the same values.
``from_events`` rebuilds the same slots from raw events, for evaluation without a feature store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.contract import is_null

HOUR = 3600
SLOTS = 100  # the fold's sequence length


@dataclass(frozen=True)
class Recent:
    """Slots oldest first: catalogue positions (-1: not in the catalogue), type codes, start of the
    slot's hour (epoch seconds) and its event count."""

    items: np.ndarray
    types: np.ndarray
    times: np.ndarray
    counts: np.ndarray

    @staticmethod
    def empty() -> Recent:
        return Recent(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.float64))


class TypeCodes:
    """Behaviour type names -> small integers; a type not declared maps to the last code ("other")."""

    def __init__(self, types: Sequence[str]):
        self.names = [*types, "other"]
        self.code = {t: k for k, t in enumerate(types)}

    def __call__(self, name: str) -> int:
        return self.code.get(name, len(self.names) - 1)

    def __len__(self) -> int:
        return len(self.names)


def _loads(value) -> list:
    if is_null(value) or value == "":
        return []
    return json.loads(value) if isinstance(value, str) else list(value)


def from_columns(items, types, times, counts, index: dict[str, int], codes: TypeCodes) -> Recent:
    """One row of ``user_sequence`` (JSON lists, as stored) -> ``Recent``. Rows written before counts
    were kept count every slot once."""
    items, types, times = _loads(items), _loads(types), _loads(times)
    counts = _loads(counts) or [1] * len(items)
    if not items:
        return Recent.empty()
    return Recent(np.array([index.get(i, -1) for i in items], dtype=np.int64),
                  np.array([codes(t) for t in types], dtype=np.int64),
                  np.asarray(times, dtype=np.float64), np.asarray(counts, dtype=np.float64))


def from_frame(frame: pd.DataFrame, index: dict[str, int], codes: TypeCodes) -> list[Recent]:
    """Every row's ``Recent`` from a frame with the ``user_sequence`` columns (point-in-time or online)."""
    cols = [frame[c].tolist() if c in frame else [None] * len(frame)
            for c in ("sequence_items", "sequence_types", "sequence_times", "sequence_counts")]
    return [from_columns(*row, index, codes) for row in zip(*cols, strict=True)]


class EventHistories:
    """Each user's events (catalogue items, declared sequence types) for rebuilding slots at any time."""

    def __init__(self, events: pd.DataFrame, index: dict[str, int], codes: TypeCodes, types: Iterable[str]):
        ev = events[events["event_type"].isin(list(types)) & events["item_id"].isin(index)]
        t = pd.to_datetime(ev["event_timestamp"], utc=True)
        seconds = ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)).to_numpy(np.int64) // 1_000_000
        # the fold orders slots by (hour, item id, type name): rank ids and names the same way
        item_rank = {i: r for r, i in enumerate(sorted(index))}
        type_rank = {c: r for r, c in enumerate(sorted(range(len(codes)), key=lambda c: codes.names[c]))}
        frame = pd.DataFrame({"user": ev["user_id"].to_numpy(), "s": seconds,
                              "item": ev["item_id"].map(index).to_numpy(np.int64),
                              "irank": ev["item_id"].map(item_rank).to_numpy(np.int64),
                              "type": ev["event_type"].map(codes).to_numpy(np.int64)})
        frame["trank"] = frame["type"].map(type_rank)
        frame = frame.sort_values(["user", "s"], kind="stable")
        self.n_items, self.n_types = len(index), len(codes)
        self._by_user = {u: g.drop(columns="user").to_numpy(np.int64) for u, g in frame.groupby("user", sort=False)}

    def at(self, user: str, ts: pd.Timestamp, slots: int = SLOTS) -> Recent:
        """The slots of the user's events strictly before ``ts``: what the fold holds at that time."""
        rows = self._by_user.get(user)
        if rows is None:
            return Recent.empty()
        cut = np.searchsorted(rows[:, 0], pd.Timestamp(ts).value / 1e9, side="left")
        rows = rows[:cut]
        if not len(rows):
            return Recent.empty()
        hours = rows[:, 0] // HOUR
        key = (hours * self.n_items + rows[:, 2]) * self.n_types + rows[:, 4]
        uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
        uniq, first, counts = uniq[-slots:], first[-slots:], counts[-slots:]
        picked = rows[first]
        return Recent(picked[:, 1], picked[:, 3], (picked[:, 0] // HOUR * HOUR).astype(np.float64),
                      counts.astype(np.float64))

    def for_requests(self, requests: pd.DataFrame, slots: int = SLOTS) -> list[Recent]:
        return [self.at(u, t, slots) for u, t in zip(requests["user_id"], requests["event_timestamp"], strict=True)]
