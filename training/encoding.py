"""Feature frames to the towers' input tensors, the same way in training and in serving.

Training converts whole frames column by column; a request is a one-row frame of Python objects,
which is converted value by value (``SMALL_FRAME``): both give the same values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from core.contract import EVENT_TYPES, is_null
from training.text_cache import Text, TextStates

MISSING = "<missing>"
SMALL_FRAME = 64  # rows up to which a column is converted value by value (serving's one-row frames)

# The event types of the user's sequence, in the order of the event-type embedding's rows (row k + 1;
# row 0 = padding): new built-in types are appended, never inserted, so a row keeps its meaning. The
# last row, ``OTHER_TYPE``, stands for every type a shop declares itself (``behaviours:`` in persona.yaml).
OTHER_TYPE = "<other>"
SEQUENCE_TYPES = ("click", "add_to_cart", "purchase", "review", "view", "search", "favorite", "impression",
                  OTHER_TYPE)
if set(SEQUENCE_TYPES) - {OTHER_TYPE} != set(EVENT_TYPES):
    raise AssertionError(f"SEQUENCE_TYPES {SEQUENCE_TYPES} must hold every type of core.contract.EVENT_TYPES")
GAP_BUCKETS = 24  # log2(hours since the step + 1) buckets


@dataclass
class FeatureSpec:
    """Which columns feed each tower, with the statistics and vocabularies learned from training rows."""

    user_numeric: list[str]
    user_categorical: list[str]
    item_numeric: list[str]
    item_categorical: list[str]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std) of log1p
    vocab: dict[str, list[str]] = field(default_factory=dict)  # column -> known values
    item_ids: list[str] = field(default_factory=list)  # items with an id embedding (seen in training)

    @classmethod
    def fit(cls, users: pd.DataFrame, items: pd.DataFrame, user_num: list[str], user_cat: list[str],
            item_num: list[str], item_cat: list[str], max_vocab: int = 200,
            item_ids: Sequence[str] = ()) -> FeatureSpec:
        spec = cls(user_num, user_cat, item_num, item_cat, item_ids=sorted(set(item_ids)))
        for frame, cols in ((users, user_num), (items, item_num)):
            for col in cols:
                values = _signed_log(frame[col].astype(float).to_numpy())
                mean = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
                std = float(np.nanstd(values)) if np.isfinite(values).any() else 1.0
                spec.stats[col] = (mean, std if std > 1e-6 else 1.0)
        for frame, cols in ((users, user_cat), (items, item_cat)):
            for col in cols:
                counts = frame[col].astype("string").fillna(MISSING).value_counts()
                spec.vocab[col] = list(counts.index[:max_vocab])
        return spec

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        """The spec as ``to_dict`` wrote it into model.json (JSON has no tuples)."""
        return cls(**{**data, "stats": {k: tuple(v) for k, v in data["stats"].items()}})

    def numeric(self, frame: pd.DataFrame, cols: list[str]) -> torch.Tensor:
        """Normalised signed-log values; missing columns and values become 0 (the training mean)."""
        if not cols:
            return torch.zeros((len(frame), 0), dtype=torch.float32)
        block = _floats(frame.reindex(columns=cols))
        mean, std = (np.array([self.stats[c][i] for c in cols]) for i in (0, 1))
        with np.errstate(invalid="ignore"):
            out = (_signed_log(block) - mean) / std
        return torch.from_numpy(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))

    def categorical(self, frame: pd.DataFrame, cols: list[str]) -> torch.Tensor:
        out = np.zeros((len(frame), len(cols)), dtype=np.int64)
        for j, col in enumerate(cols):
            index = self._index(col)  # 0 = unknown
            out[:, j] = [index.get(v, 0) for v in _as_text(frame.get(col), len(frame))]
        return torch.from_numpy(out)

    def item_id_index(self, ids) -> torch.Tensor:
        """1-based embedding rows; 0 for an item never seen in training."""
        if "_ids" not in self.__dict__:
            self.__dict__["_ids"] = {i: k + 1 for k, i in enumerate(self.item_ids)}
        cache = self.__dict__["_ids"]
        return torch.tensor([cache.get(i, 0) for i in ids], dtype=torch.long)

    def _index(self, col: str) -> dict[str, int]:
        cache = self.__dict__.setdefault("_indexes", {})
        if col not in cache:
            cache[col] = {v: i + 1 for i, v in enumerate(self.vocab[col])}
        return cache[col]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class ItemInputs:
    """An item frame as tensors (built once per catalogue, reused every training step)."""

    ids: torch.Tensor
    numeric: torch.Tensor
    categorical: torch.Tensor
    text: Text | None

    def to(self, device) -> ItemInputs:
        return ItemInputs(*(t.to(device) if t is not None else None for t in
                            (self.ids, self.numeric, self.categorical, self.text)))


@dataclass
class UserInputs:
    """A user frame as tensors; ``history`` holds item ids, resolved against a catalogue when scoring."""

    numeric: torch.Tensor
    categorical: torch.Tensor
    query: Text | None  # [n, H] BERT vectors (zeros when there is no text), or their token states
    recent: Text | None
    has_text: torch.Tensor  # [n, 2] 1 where the query / recent queries exist
    history: list[list[str]]
    types: torch.Tensor  # [n, seq_len] event-type indexes, left-padded with 0
    gaps: torch.Tensor  # [n, seq_len] log-hour buckets
    history_rows: torch.Tensor | None = None  # ``history`` resolved to catalogue rows once (training)

    TENSORS = ("numeric", "categorical", "query", "recent", "has_text", "types", "gaps", "history_rows")

    def _map(self, fn, history: list[list[str]]) -> UserInputs:
        moved = {k: fn(getattr(self, k)) if getattr(self, k) is not None else None for k in self.TENSORS}
        return UserInputs(history=history, **moved)

    def select(self, idx: torch.Tensor) -> UserInputs:
        return self._map(lambda t: t[idx], [self.history[i] for i in idx.tolist()])

    def to(self, device) -> UserInputs:
        return self._map(lambda t: t.to(device), self.history)


def item_inputs(spec: FeatureSpec, frame: pd.DataFrame, text: Text | None) -> ItemInputs:
    """``text``: the rows' ``item_text`` as the model's text cache encoded it (None without text)."""
    return ItemInputs(spec.item_id_index(frame["item_id"].astype(str)), spec.numeric(frame, spec.item_numeric),
                      spec.categorical(frame, spec.item_categorical), text)


def user_inputs(spec: FeatureSpec, frame: pd.DataFrame, texts: list[str], text: Text | None,
                seq_len: int) -> UserInputs:
    """``texts``: the rows' ``user_text``; ``text``: the same encoded (two per row, None without text)."""
    has = torch.tensor([[bool(texts[2 * r]), bool(texts[2 * r + 1])] for r in range(len(frame))],
                       dtype=torch.float32).reshape(len(frame), 2)
    query = recent = None
    if isinstance(text, TextStates):
        query, recent = text[0::2], text[1::2]
    elif text is not None:
        text = text.float().cpu().reshape(len(frame), 2, -1)
        query, recent = text[:, 0], text[:, 1]
    history, types, gaps = sequences(frame, seq_len)
    return UserInputs(spec.numeric(frame, spec.user_numeric), spec.categorical(frame, spec.user_categorical),
                      query, recent, has, history, types, gaps)


def sequences(frame: pd.DataFrame, length: int) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
    """History ids, event types and log-hour gaps to the request time, left-padded to ``length``."""
    n = len(frame)
    types = np.zeros((n, length), dtype=np.int64)
    gaps = np.zeros((n, length), dtype=np.int64)
    history: list[list[str]] = []
    type_index = {t: k + 1 for k, t in enumerate(SEQUENCE_TYPES)}
    other = type_index[OTHER_TYPE]
    now = _epoch_seconds(frame)
    for r, (items, kinds, times) in enumerate(zip(_col(frame, "sequence_items"), _col(frame, "sequence_types"),
                                                  _col(frame, "sequence_times"), strict=True)):
        items = json.loads(items)[-length:] if items else []
        history.append(items)
        if not items:
            continue
        kinds = json.loads(kinds)[-length:]
        times = np.array(json.loads(times)[-length:], dtype=np.float64)
        ref = now[r] if np.isfinite(now[r]) else times.max()
        hours = np.clip((ref - times) / 3600.0, 0, None)
        types[r, length - len(items):] = [type_index.get(k, other) for k in kinds]
        gaps[r, length - len(items):] = np.minimum(np.log2(hours + 1).astype(np.int64) + 1, GAP_BUCKETS)
    return history, torch.from_numpy(types), torch.from_numpy(gaps)


def user_text(frame: pd.DataFrame) -> list[str]:
    """The user's two texts for BERT, per row: the live query, then the recent queries ("" if none)."""
    out = []
    for query, queries in zip(_col(frame, "query"), _col(frame, "recent_queries"), strict=True):
        out += [query or "", queries or ""]
    return out


def item_text(frame: pd.DataFrame) -> list[str]:
    """Title, brand, category path and the start of the description (item columns carry ``item_``)."""
    return [" . ".join(str(v) for v in row if isinstance(v, str) and v)
            for row in zip(_col(frame, "item_title"), _col(frame, "item_brand"), _col(frame, "item_category"),
                           _col(frame, "item_description"), strict=True)]


def _as_text(column: pd.Series | None, n: int) -> list[str]:
    """A categorical column as the vocabulary's text (``MISSING`` for a null), as pandas' ``string``
    dtype writes it; value by value for a few rows (cheaper for a request, see BENCHMARKS.md)."""
    if column is None:
        return [MISSING] * n
    if n > SMALL_FRAME:
        return column.astype("string").fillna(MISSING).tolist()
    return [MISSING if is_null(v) else v if isinstance(v, str) else str(pd.array([v], dtype="string")[0])
            for v in column.tolist()]


def _floats(frame: pd.DataFrame) -> np.ndarray:
    """The frame's values as float64, NaN for a null; value by value for a few rows (a request's
    one-row frame of Python objects), where pandas' per-column conversion costs more."""
    if len(frame) > SMALL_FRAME:
        return frame.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.array([[np.nan if is_null(v) else float(v) for v in row] for row in frame.to_numpy(dtype=object)],
                    dtype=np.float64).reshape(frame.shape)


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _col(frame: pd.DataFrame, name: str) -> list:
    """A column as a list with None for nulls (Nones when the frame lacks it)."""
    if name not in frame:
        return [None] * len(frame)
    return [None if is_null(v) else v for v in frame[name].tolist()]


def _epoch_seconds(frame: pd.DataFrame) -> np.ndarray:
    """The request time of each row in epoch seconds (NaN when unknown); a naive time is UTC."""
    for col in ("request_timestamp", "event_timestamp"):
        if col in frame:
            if len(frame) <= SMALL_FRAME:  # a request: value by value is cheaper than pandas' conversion
                return np.array([_epoch_second(v) for v in frame[col].tolist()], dtype=np.float64)
            ts = pd.to_datetime(frame[col], utc=True, errors="coerce")
            return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64,
                                                                                       na_value=np.nan)
    return np.full(len(frame), np.nan)


def _epoch_second(value) -> float:
    """One time in epoch seconds, as ``_epoch_seconds`` reads a column: NaN for a null or not a time."""
    if is_null(value):
        return math.nan
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError):
        return math.nan
    return math.nan if ts is pd.NaT else ts.value / 1e9  # nanoseconds since the epoch, in UTC if aware
