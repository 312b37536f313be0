"""The input data contract of ``../shared/DESIGN.md``, as data.

One place declares every table, column, type and requirement, so that the loader, the validation
suites, the sample-data generator and the docs cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

ColumnType = Literal["string", "int", "float", "timestamp"]
TABLES: tuple[str, ...] = ("users", "items", "events")
# The built-in behaviour types. A shop declares more (and sets what each means for training and the
# sequence) under ``behaviours:`` in persona.yaml (``core.config.Behaviour``).
EVENT_TYPES: tuple[str, ...] = ("impression", "view", "click", "favorite", "add_to_cart", "purchase", "search",
                                "review")
# What a byte that is not UTF-8 reads as. Not U+FFFD: real text may hold that character literally
# (scraped catalogues often do), and a valid file must not be quarantined for it. U+FFFE is a
# noncharacter that no valid text contains.
INVALID_UTF8 = "\ufffe"


def is_null(value) -> bool:
    """A missing value, however it arrives: None, pandas' NA or NaT, or a float NaN."""
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value)


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    required: bool = False
    max_length: int | None = None  # bounded text lengths keep a 1 MB field out of the log
    meaning: str = ""


SHORT_TEXT = 256
LONG_TEXT = 10_000

CONTRACT: dict[str, tuple[Column, ...]] = {
    "users": (
        Column("user_id", "string", True, SHORT_TEXT, "unique"),
        Column("age", "int", meaning="personal"),
        Column("gender", "string", max_length=SHORT_TEXT, meaning="personal"),
        Column("region", "string", max_length=SHORT_TEXT, meaning="city, province or postcode prefix"),
        Column("occupation", "string", max_length=SHORT_TEXT, meaning="personal"),
        Column("membership", "string", max_length=SHORT_TEXT, meaning="loyalty tier"),
        Column("signup_timestamp", "timestamp", meaning="tenure"),
    ),
    "items": (
        Column("item_id", "string", True, SHORT_TEXT, "unique"),
        Column("title", "string", True, 1_000, "item text for the item tower"),
        Column("category", "string", True, 1_000, "a>b>c path, or a|b for several"),
        Column("brand", "string", max_length=SHORT_TEXT, meaning="more item text"),
        Column("description", "string", max_length=LONG_TEXT, meaning="more item text"),
        Column("price", "float", meaning=">= 0"),
    ),
    "events": (
        Column("event_id", "string", max_length=SHORT_TEXT, meaning="unique; a stable row hash if absent"),
        Column("user_id", "string", True, SHORT_TEXT, "must exist in users"),
        Column("event_timestamp", "timestamp", True, meaning="when it happened (UTC)"),
        Column("event_type", "string", True, SHORT_TEXT,
               "|".join(EVENT_TYPES) + ", or a type declared under `behaviours:` in persona.yaml"),
        Column("item_id", "string", max_length=SHORT_TEXT, meaning="required except for search"),
        Column("query", "string", max_length=1_000, meaning="required for search"),
        Column("text", "string", max_length=LONG_TEXT, meaning="review text"),
        Column("rating", "float", meaning="1-5"),
        Column("value", "float", meaning="amount paid, >= 0"),
        Column("device", "string", max_length=SHORT_TEXT, meaning="context"),
        Column("channel", "string", max_length=SHORT_TEXT, meaning="context"),
        Column("session_id", "string", max_length=SHORT_TEXT, meaning="context"),
    ),
}

KEY_COLUMN: dict[str, str] = {"users": "user_id", "items": "item_id", "events": "event_id"}


def columns(table: str) -> dict[str, Column]:
    return {c.name: c for c in CONTRACT[table]}


def required_columns(table: str) -> list[str]:
    return [c.name for c in CONTRACT[table] if c.required]
