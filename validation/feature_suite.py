"""The feature-level suite, run after each feature build: null rates, value ranges, and drift.

Structural expectations (keys present, counts never null or negative, shares within 0–1) fail the
build. Drift compares the mean of key features with the previous accepted build, through GX's
``ExpectColumnMeanToBeBetween``; it warns or fails as ``validation.feature_drift`` says.

Text the encoder cannot read is a finding too: for each text column the model reads, the share of its
tokens the configured encoder's vocabulary maps to unknown (``[UNK]``), through the same GX
expectation on a per-text share. Above ``UNKNOWN_TOKENS_WARN`` it warns (the text still trains, but
the model sees little of it) and names the setting that fixes it.

The tables come as frames, or from the spark build as Parquet tables this process must not hold:
then the same suites run through GX's Spark engine (the statistics are computed by Spark), and only
the sampled texts come here.
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


def _is_spark(frame) -> bool:
    return hasattr(frame, "sparkSession")


def _rows(frame) -> int:
    return frame.count() if _is_spark(frame) else len(frame)


def _frames(tables) -> dict:
    """Each table as a frame, or as a Spark DataFrame where the mapping offers one (``spark(name)``)."""
    return {name: tables.spark(name) if hasattr(tables, "spark") else tables[name] for name in tables}


def _texts(frame, col: str) -> pd.Series:
    """Non-empty texts of a column, a seeded sample of ``TEXT_SAMPLE`` at most."""
    if _is_spark(frame):
        from pyspark.sql import functions as F

        present = frame.select(col).where(F.col(col).isNotNull() & (F.trim(F.col(col)) != ""))
        n = present.count()
        if n > TEXT_SAMPLE:
            present = present.sample(fraction=min(1.0, 2.0 * TEXT_SAMPLE / n), seed=0).limit(TEXT_SAMPLE)
        return present.toPandas()[col].astype(str)
    texts = frame[col].dropna().astype(str)
    texts = texts[texts.str.strip() != ""]
    return texts.sample(TEXT_SAMPLE, random_state=0) if len(texts) > TEXT_SAMPLE else texts


def _means(frame, cols: list[str]) -> dict[str, float]:
    if not cols:
        return {}
    if _is_spark(frame):
        from pyspark.sql import functions as F

        row = frame.agg(*[F.mean(c).alias(c) for c in cols]).first()
        return {c: float("nan") if row[c] is None else float(row[c]) for c in cols}
    return {c: float(frame[c].mean()) for c in cols}


def _range_rules(table: str, frame) -> list:
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


def _drift_rules(table: str, frame, baseline: dict) -> list:
    rules = []
    for col in DRIFT_FEATURES.get(table, []):
        previous = baseline.get(table, {}).get(col)
        if previous is None or col not in frame.columns or pd.isna(previous):
            continue
        lo, hi = previous * (1 - DRIFT_TOLERANCE), previous * (1 + DRIFT_TOLERANCE)
        rules.append(gxe.ExpectColumnMeanToBeBetween(column=col, min_value=min(lo, hi), max_value=max(lo, hi),
                                                     meta={"rule": "drift", "previous_mean": previous}))
    return rules


def _text_shares(table: str, frame, vocabulary: TextEncoderVocabulary) -> pd.DataFrame | None:
    """One column per text column: each (sampled, non-empty) text's share of unknown tokens."""
    shares = {}
    for col in TEXT_COLUMNS.get(table, []):
        if col not in frame.columns:
            continue
        texts = _texts(frame, col)
        if len(texts):
            shares[col] = pd.Series(vocabulary.unknown_share(texts.tolist()), dtype="float64")
    return pd.DataFrame(shares) if shares else None


def _text_rules(shares: pd.DataFrame) -> list:
    return [gxe.ExpectColumnMeanToBeBetween(column=col, min_value=0.0, max_value=UNKNOWN_TOKENS_WARN,
                                            meta={"rule": "unknown_tokens"}) for col in shares.columns]


def check_text(tables: dict, vocabulary: TextEncoderVocabulary,
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


def check_features(tables, folder: Path, on_drift: str = "warn",
                   vocabulary: TextEncoderVocabulary | None = None) -> FeatureCheckReport:
    """The suites over each table (frames, or a mapping with ``spark(name)``: see the module's note)."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = _frames(tables)
    baseline_path = folder / "baseline.json"
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() else {}
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("features")
    on_spark = None  # GX's Spark source, made when a table is a Spark DataFrame (it reuses the session)
    report = FeatureCheckReport()
    md = [f"# Feature checks {datetime.now(UTC):%Y-%m-%d %H:%M UTC}", "",
          "| table | rule | column | result | detail |", "|---|---|---|---|---|"]
    for table, frame in tables.items():
        if _is_spark(frame) and on_spark is None:
            on_spark = context.data_sources.add_spark("features_spark", persist=False)
        batch = (on_spark if _is_spark(frame) else source).add_dataframe_asset(table) \
            .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
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
                detail = f"{res.result.get('unexpected_count')} of {_rows(frame)} rows"
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
        report.lines.insert(0, f"feature checks passed ({sum(_rows(t) for t in tables.values()):,} rows)")
    report.path = folder / "summary.md"
    report.path.write_text("\n".join(md) + "\n")
    if not report.failed:  # the accepted build becomes the next drift baseline
        stats = {t: _means(tables[t], [c for c in cols if c in tables[t].columns])
                 for t, cols in DRIFT_FEATURES.items() if t in tables}
        baseline_path.write_text(json.dumps(stats, indent=2))
    return report
