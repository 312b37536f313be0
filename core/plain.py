"""Plain JSON values: what every answer, export and stored ``extra`` column is made of.

Values arrive as NumPy scalars and arrays (Parquet lists), pandas' NA, NaT and Timestamps, or floats
that are not finite; JSON has none of these, so they are turned into Python's own types once, here.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd


def iso(value) -> str | None:
    """UTC ISO text for a time (a naive one is UTC, as the event log stores it); None for a null."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat().replace("+00:00", "Z")


def plain(value) -> Any:
    """A JSON-safe value: numpy scalars to Python, NaN and NA to None, times to ISO text, nested
    dicts and lists (or arrays) converted all the way down."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date | pd.Timestamp):
        return iso(value)
    if value is not None and not isinstance(value, str | int | float | bool) and pd.isna(value):
        return None
    return value
