"""The feature-level suite, run after each feature build: null rates, value ranges, and drift.

Structural expectations (keys present, counts never null or negative, shares within 0–1) fail the
build. Drift compares the mean of key features with the previous accepted build, through GX's
``ExpectColumnMeanToBeBetween``; it warns or fails as ``validation.feature_drift`` says.

Text the encoder cannot read is a finding too: for each text column the model reads, the share of its
tokens the configured encoder's vocabulary maps to unknown (``[UNK]``), through the same GX
expectation on a per-text share. Above ``UNKNOWN_TOKENS_WARN`` it warns (the text still trains, but
the model sees little of it) and names the setting that fixes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd

DRIFT_TOLERANCE = 0.5  # a key feature's mean may move by half before it counts as drift
KEYS = {"user_personal": "user_id", "user_behaviour": "user_id", "user_text": "user_id", "user_sequence": "user_id",
        "user_activity": "user_id", "item_features": "item_id"}
DRIFT_FEATURES = {
    "user_behaviour": ["view_count_30d", "click_count_30d", "purchase_count_30d", "spend_30d", "ctr_30d"],
    "item_features": ["views_30d", "ctr_30d", "price"],
}


# The text columns the profile model reads (item text, and the user's searches).
TEXT_COLUMNS = {"item_features": ["title", "description", "category"],
                "user_text": ["recent_queries", "last_search_query"]}
UNKNOWN_TOKENS_WARN = 0.05  # mean share of a text's tokens unknown to the encoder above which it warns
TEXT_SAMPLE = 5_000  # texts measured per column (a seeded sample of larger tables)
UNKNOWN_FIX = ("set `text_model:` in persona.yaml (or `persona train --bert`) to a local encoder whose "
               "vocabulary covers this language")


@dataclass(frozen=True)
class TextEncoderVocabulary:
    """The configured encoder's name and a function: texts -> share of each text's tokens it maps to
    unknown (the caller loads the tokenizer: validation does not import the model)."""

    name: str
    unknown_share: Callable[[list[str]], list[float]]


@dataclass
class FeatureCheckReport:
    lines: list[str] = field(default_factory=list)
    failed: bool = False
    path: Path | None = None


def _range_rules(table: str, frame: pd.DataFrame) -> list:
    rules = [gxe.ExpectColumnValuesToNotBeNull(column=KEYS[table], meta={"rule": "key_not_null"}),
             gxe.ExpectColumnValuesToNotBeNull(column="event_timestamp", meta={"rule": "timestamp_not_null"})]
    for col in frame.columns:
        if "_count_" in col or col.startswith(("views_", "clicks_", "purchases_", "distinct_")):
            rules.append(gxe.ExpectColumnValuesToNotBeNull(column=col, meta={"rule": "count_not_null"}))
            rules.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0, meta={"rule": "count_range"}))
        elif "share" in col:
            rules.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0, max_value=1,
                                                           meta={"rule": "share_range"}))
        elif col.startswith(("ctr_", "hours_since_", "spend_", "avg_price", "price")) or col.endswith("_rate_30d"):
            rules.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0, meta={"rule": "non_negative"}))
    return rules


def _drift_rules(table: str, frame: pd.DataFrame, baseline: dict) -> list:
    rules = []
    for col in DRIFT_FEATURES.get(table, []):
        previous = baseline.get(table, {}).get(col)
        if previous is None or col not in frame or pd.isna(previous):
            continue
        lo, hi = previous * (1 - DRIFT_TOLERANCE), previous * (1 + DRIFT_TOLERANCE)
        rules.append(gxe.ExpectColumnMeanToBeBetween(column=col, min_value=min(lo, hi), max_value=max(lo, hi),
                                                     meta={"rule": "drift", "previous_mean": previous}))
    return rules


def _text_shares(table: str, frame: pd.DataFrame, vocabulary: TextEncoderVocabulary) -> pd.DataFrame | None:
    """One column per text column: each (sampled, non-empty) text's share of unknown tokens."""
    shares = {}
    for col in TEXT_COLUMNS.get(table, []):
        if col not in frame:
            continue
        texts = frame[col].dropna().astype(str)
        texts = texts[texts.str.strip() != ""]
        if len(texts) > TEXT_SAMPLE:
            texts = texts.sample(TEXT_SAMPLE, random_state=0)
        if len(texts):
            shares[col] = pd.Series(vocabulary.unknown_share(texts.tolist()), dtype="float64")
    return pd.DataFrame(shares) if shares else None


def _text_rules(shares: pd.DataFrame) -> list:
    return [gxe.ExpectColumnMeanToBeBetween(column=col, min_value=0.0, max_value=UNKNOWN_TOKENS_WARN,
                                            meta={"rule": "unknown_tokens"}) for col in shares.columns]


def check_text(tables: dict[str, pd.DataFrame], vocabulary: TextEncoderVocabulary,
               source) -> list[tuple[str, str, bool]]:
    """(table.column, detail, ok) per text column: the mean unknown-token share through GX."""
    out = []
    for table, frame in tables.items():
        shares = _text_shares(table, frame, vocabulary)
        if shares is None:
            continue
        batch = source.add_dataframe_asset(f"{table}_text").add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": shares})
        result = batch.validate(gx.ExpectationSuite(name=f"text_{table}", expectations=_text_rules(shares)),
                                result_format="SUMMARY")
        for res in result.results:
            column = res.expectation_config.kwargs["column"]
            detail = (f"{res.result['observed_value']:.1%} of tokens unknown to {vocabulary.name} "
                      f"(mean over {shares[column].notna().sum():,} texts)")
            out.append((f"{table}.{column}", detail, bool(res.success)))
    return out


def check_features(tables: dict[str, pd.DataFrame], folder: Path, on_drift: str = "warn",
                   vocabulary: TextEncoderVocabulary | None = None) -> FeatureCheckReport:
    folder.mkdir(parents=True, exist_ok=True)
    baseline_path = folder / "baseline.json"
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() else {}
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("features")
    report = FeatureCheckReport()
    md = [f"# Feature checks {datetime.now(UTC):%Y-%m-%d %H:%M UTC}", "",
          "| table | rule | column | result | detail |", "|---|---|---|---|---|"]
    for table, frame in tables.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name=f"features_{table}",
                                    expectations=_range_rules(table, frame) + _drift_rules(table, frame, baseline))
        result = batch.validate(suite, result_format="SUMMARY")
        for res in result.results:
            rule = res.expectation_config.meta.get("rule")
            column = res.expectation_config.kwargs.get("column")
            if res.success:
                continue
            if rule == "drift":
                detail = (f"mean {res.result.get('observed_value'):.4g} vs previous "
                          f"{res.expectation_config.meta['previous_mean']:.4g}")
                fatal = on_drift == "fail"
            else:
                detail = f"{res.result.get('unexpected_count')} of {len(frame)} rows"
                fatal = True
            report.failed |= fatal
            report.lines.append(f"{'FAIL' if fatal else 'warn'}: {table}.{column} {rule}: {detail}")
            md.append(f"| {table} | {rule} | {column} | {'FAIL' if fatal else 'warn'} | {detail} |")
    if vocabulary is not None:
        for where, detail, ok in check_text(tables, vocabulary, source):
            table, column = where.split(".", 1)
            md.append(f"| {table} | unknown_tokens | {column} | {'ok' if ok else 'warn'} | {detail} |")
            if not ok:
                report.lines.append(f"warn: {where} unknown_tokens: {detail}: the model cannot read most of "
                                    f"this text; {UNKNOWN_FIX}")
    if not any(line.startswith(("FAIL", "warn")) for line in report.lines):
        report.lines.insert(0, f"feature checks passed ({sum(len(t) for t in tables.values()):,} rows)")
    report.path = folder / "summary.md"
    report.path.write_text("\n".join(md) + "\n")
    if not report.failed:  # the accepted build becomes the next drift baseline
        stats = {t: {c: float(tables[t][c].mean()) for c in cols if c in tables[t]}
                 for t, cols in DRIFT_FEATURES.items() if t in tables}
        baseline_path.write_text(json.dumps(stats, indent=2))
    return report
