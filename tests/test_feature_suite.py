"""The feature-level GX suite: ranges fail the build, drift warns or fails as configured."""

from __future__ import annotations

import pytest

from feature_repo.pipeline.compute import compute_all
from validation.feature_suite import check_features


@pytest.fixture(scope="module")
def tables(shop):
    return compute_all(shop["events"], shop["items"], shop["users"])


def test_clean_build_passes_and_becomes_the_baseline(tables, tmp_path):
    report = check_features(tables, tmp_path)
    assert not report.failed and "passed" in report.lines[0]
    assert (tmp_path / "baseline.json").exists()


def test_negative_count_fails(tables, tmp_path):
    broken = {**tables, "user_behaviour": tables["user_behaviour"].copy()}
    broken["user_behaviour"].loc[broken["user_behaviour"].index[:3], "click_count_7d"] = -1
    report = check_features(broken, tmp_path)
    assert report.failed
    assert any("user_behaviour.click_count_7d count_range: 3 of" in line for line in report.lines)
    assert not (tmp_path / "baseline.json").exists()  # a failed build is no baseline


def test_drift_warns_or_fails(tables, tmp_path):
    check_features(tables, tmp_path)
    drifted = {**tables, "user_behaviour": tables["user_behaviour"].copy()}
    drifted["user_behaviour"]["spend_30d"] *= 3
    warned = check_features(drifted, tmp_path, on_drift="warn")
    assert not warned.failed and any(line.startswith("warn: user_behaviour.spend_30d drift") for line in warned.lines)
    failed = check_features(drifted, tmp_path / "strict", on_drift="warn")
    assert not failed.failed  # no baseline there yet: nothing to drift from
    strict = tmp_path / "strict2"
    check_features(tables, strict)
    assert check_features(drifted, strict, on_drift="fail").failed
