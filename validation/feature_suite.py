"""The feature-level suite, run after each feature build: null rates, value ranges, and drift.

Structural expectations (keys present, counts never null or negative, shares within 0–1) fail the
build. Drift compares the mean of key features with the previous accepted build, through GX's
``ExpectColumnMeanToBeBetween``; it warns or fails as ``validation.feature_drift`` says.
"""

from __future__ import annotations

import json
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


def check_features(tables: dict[str, pd.DataFrame], folder: Path, on_drift: str = "warn") -> FeatureCheckReport:
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
    if not report.lines:
        report.lines.append(f"feature checks passed ({sum(len(t) for t in tables.values()):,} rows)")
    report.path = folder / "summary.md"
    report.path.write_text("\n".join(md) + "\n")
    if not report.failed:  # the accepted build becomes the next drift baseline
        stats = {t: {c: float(tables[t][c].mean()) for c in cols if c in tables[t]}
                 for t, cols in DRIFT_FEATURES.items() if t in tables}
        baseline_path.write_text(json.dumps(stats, indent=2))
    return report
