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


ZH_TITLES = ["海飞丝去屑洗发水男士专用控油清爽500ml官方正品", "Sansui/山水 U3无线蓝牙耳机降噪运动2024新款",
             "加厚遮光落地窗帘卧室客厅简约现代", "纯棉男士短袖T恤夏季宽松圆领"]


@pytest.fixture(scope="module")
def minilm():
    from persona.cli.features import encoder_vocabulary

    return encoder_vocabulary(None)  # the default encoder's real tokenizer


def test_text_the_encoder_reads_passes_with_its_share_reported(tables, tmp_path, minilm):
    report = check_features(tables, tmp_path, vocabulary=minilm)
    assert not report.failed and not any("unknown_tokens" in line for line in report.lines)
    summary = report.path.read_text()
    assert "| item_features | unknown_tokens | title | ok | 0.0% of tokens unknown to all-MiniLM-L6-v2" in summary


def test_chinese_text_warns_and_names_the_setting(tables, tmp_path, minilm):
    """The default English encoder maps most Chinese characters to [UNK]: the build still passes (the text
    trains, the lexical source reads it), but the report says so and how to fix it."""
    items = tables["item_features"].copy()
    items["title"] = [ZH_TITLES[k % len(ZH_TITLES)] for k in range(len(items))]
    report = check_features({**tables, "item_features": items}, tmp_path, vocabulary=minilm)
    assert not report.failed
    warning = [line for line in report.lines if line.startswith("warn: item_features.title unknown_tokens")]
    assert len(warning) == 1 and "text_model:" in warning[0], report.lines
    share = float(warning[0].split(": ")[2].split("%")[0]) / 100
    assert share > 0.3, warning  # most CJK characters are outside MiniLM's vocabulary
    assert "| item_features | unknown_tokens | title | warn |" in report.path.read_text()
    assert not any("description" in line for line in report.lines)  # the English columns stay quiet


def test_unknown_share_known_answer(minilm):
    """[UNK] count over token count, per text: known answers."""
    shares = minilm.unknown_share(["hello world", "", "𓀀 hello"])
    assert shares[0] == 0.0 and shares[1] == 0.0 and shares[2] == 0.5
