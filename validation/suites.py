"""The expectation suites: every row rule of the input contract, one suite per table.

Code builds the suites from ``core.contract`` and ``persona suites write`` saves them as JSON
under ``validation/gx/expectations/``; a test keeps the checked-in JSON equal to the code, so a
rule change shows up in review as a JSON diff. Each expectation carries ``meta.rule`` (a short
name used in quarantine reports) and ``meta.description`` (the readable reason).
"""

from __future__ import annotations

import json
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.expectations.row_conditions import Column as Col

from core.contract import CONTRACT, EVENT_TYPES, INVALID_UTF8, KEY_COLUMN

GX_DIR = Path(__file__).parent / "gx"
SUITE_DIR = GX_DIR / "expectations"
NOT_FUTURE_PARAM = "latest_allowed_timestamp"  # now + clock skew, supplied at validation time
# The event_type rule checks the built-in types; a workspace that declares its own under `behaviours:`
# (persona.yaml) runs it with its declared set instead (``load_suite(..., event_types=...)``).
EVENT_TYPE_RULE = "event_type_allowed"


ID_COLUMNS = ("user_id", "item_id", "event_id")


def _meta(rule: str, description: str) -> dict:
    return {"rule": rule, "description": description}


def build_suite(table: str) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=table)
    add = suite.add_expectation
    key = KEY_COLUMN[table]
    for col in CONTRACT[table]:
        if col.required:
            add(gxe.ExpectColumnValuesToNotBeNull(
                column=col.name, meta=_meta("not_null", f"{col.name} is required")))
        if col.type == "string":
            add(gxe.ExpectColumnValueLengthsToBeBetween(
                column=col.name, max_value=col.max_length,
                meta=_meta("max_length", f"{col.name} is longer than {col.max_length} characters")))
            add(gxe.ExpectColumnValuesToNotMatchRegex(
                column=col.name, regex=INVALID_UTF8,
                meta=_meta("valid_utf8", f"{col.name} holds bytes that are not valid UTF-8")))
        if col.name in ID_COLUMNS:  # an id no command line can type could never be erased or exported
            add(gxe.ExpectColumnValuesToNotMatchRegex(
                column=col.name, regex=r"\x00",
                meta=_meta("id_characters", f"{col.name} holds a NUL character")))
        if col.type == "timestamp":
            # No lower bound on dates: real logs go back decades.
            add(gxe.ExpectColumnValuesToBeBetween(
                column=col.name, max_value={"$PARAMETER": NOT_FUTURE_PARAM},
                meta=_meta("not_future", f"{col.name} is in the future beyond the allowed clock skew")))
    add(gxe.ExpectColumnValuesToBeUnique(
        column=key, meta=_meta("unique_id", f"{key} appears more than once with different content")))
    if table == "users":
        add(gxe.ExpectColumnValuesToBeBetween(
            column="age", min_value=0, max_value=130, meta=_meta("age_range", "age must be 0-130")))
    if table == "items":
        add(gxe.ExpectColumnValuesToBeBetween(
            column="price", min_value=0, meta=_meta("non_negative", "price must be >= 0")))
    if table == "events":
        add(gxe.ExpectColumnValuesToBeInSet(
            column="event_type", value_set=list(EVENT_TYPES),
            meta=_meta(EVENT_TYPE_RULE, "event_type is not declared: add it under `behaviours:` in persona.yaml")))
        add(gxe.ExpectColumnValuesToNotBeNull(
            column="item_id", row_condition=Col("event_type") != "search",
            meta=_meta("item_required", "item_id is required for every event type but search")))
        add(gxe.ExpectColumnValuesToNotBeNull(
            column="query", row_condition=Col("event_type") == "search",
            meta=_meta("query_required", "a search event needs its query text")))
        add(gxe.ExpectColumnValuesToBeBetween(
            column="rating", min_value=1, max_value=5, meta=_meta("rating_range", "rating must be 1-5")))
        add(gxe.ExpectColumnValuesToBeBetween(
            column="value", min_value=0, meta=_meta("non_negative", "value must be >= 0")))
    return suite


def suite_json(table: str) -> dict:
    """The suite as stable JSON (GX's random ids removed, so the file diffs cleanly)."""
    data = build_suite(table).to_json_dict()
    data.pop("id", None)
    for exp in data["expectations"]:
        exp.pop("id", None)
    return data


def write_suites(folder: Path = SUITE_DIR) -> list[Path]:
    gx.get_context(mode="ephemeral")  # GX 1.x builds suites only inside an active context
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in CONTRACT:
        path = folder / f"{table}.json"
        path.write_text(json.dumps(suite_json(table), indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


def load_suite(table: str, folder: Path = SUITE_DIR, event_types: tuple[str, ...] | None = None
               ) -> gx.ExpectationSuite:
    """The checked-in suite: what the gate enforces is what reviewers read. ``event_types``: the
    workspace's declared behaviour types, checked instead of the built-in ones."""
    data = json.loads((folder / f"{table}.json").read_text())
    if event_types is not None:
        for exp in data["expectations"]:
            if exp.get("meta", {}).get("rule") == EVENT_TYPE_RULE:
                exp["kwargs"]["value_set"] = list(event_types)
    return gx.ExpectationSuite(**data)
