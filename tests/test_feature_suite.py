"""The feature-level GX suite: ranges fail the build, drift warns or fails as configured."""

from __future__ import annotations

import json

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


def test_chinese_shop_warns_and_names_the_setting(tmp_path, minilm):
    """On the Chinese sample shop the default English encoder maps most tokens to [UNK]: the build still
    passes (the text trains, the lexical source reads it), but every text column warns and says how to
    fix it; English text in the same columns stays quiet."""
    from persona import sample_data

    zh = sample_data.generate(n_users=80, n_items=60, days=7, seed=2, locale="zh")
    report = check_features(compute_all(zh["events"], zh["items"], zh["users"]), tmp_path, vocabulary=minilm)
    assert not report.failed
    warned = {line.split(" unknown_tokens")[0].removeprefix("warn: ") for line in report.lines
              if " unknown_tokens: " in line}
    assert {"item_features.title", "item_features.description", "user_text.last_search_query"} <= warned
    title = next(line for line in report.lines if line.startswith("warn: item_features.title unknown_tokens"))
    assert "text_model:" in title and float(title.split(": ")[2].split("%")[0]) > 30, title
    assert "| item_features | unknown_tokens | title | warn |" in report.path.read_text(encoding="utf-8")


def test_mixed_columns_warn_alone(tables, tmp_path, minilm):
    items = tables["item_features"].copy()
    items["title"] = [ZH_TITLES[k % len(ZH_TITLES)] for k in range(len(items))]
    report = check_features({**tables, "item_features": items}, tmp_path, vocabulary=minilm)
    warned = [line for line in report.lines if " unknown_tokens: " in line]
    assert len(warned) == 1 and warned[0].startswith("warn: item_features.title"), warned


def test_unknown_share_known_answer(minilm):
    """[UNK] count over token count, per text: known answers."""
    shares = minilm.unknown_share(["hello world", "", "𓀀 hello"])
    assert shares[0] == 0.0 and shares[1] == 0.0 and shares[2] == 0.5


# --- on the spark profile: the same suites through GX's Spark engine, the tables never in this process --


@pytest.fixture(scope="module")
def as_parquet(tables, tmp_path_factory):
    """Write tables as the spark build does (a Parquet folder each) and open them as its build returns
    them: a mapping whose checks read through Spark."""
    pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
    import os

    from feature_repo.pipeline import feast_config
    from feature_repo.pipeline.build import SparkTables
    from feature_repo.pipeline.spark_build import spark_session

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    root = tmp_path_factory.mktemp("spark_tables")
    spark_session(feast_config.feature_store_config("spark", root)["offline_store"]["spark_conf"])

    def write(frames: dict, name: str) -> SparkTables:
        folder = root / name
        for table, frame in frames.items():
            (folder / table).mkdir(parents=True)
            frame.to_parquet(folder / table / "part-0.parquet", index=False)
        return SparkTables(folder, {t: len(f) for t, f in frames.items()})
    return write


def test_on_spark_the_suites_give_the_same_report(tables, as_parquet, tmp_path, minilm):
    on_frames = check_features(tables, tmp_path / "frames", vocabulary=minilm)
    on_spark = check_features(as_parquet(tables, "clean"), tmp_path / "spark", vocabulary=minilm)
    assert not on_spark.failed and on_spark.lines == on_frames.lines
    assert on_spark.path.read_text().splitlines()[1:] == on_frames.path.read_text().splitlines()[1:]
    a, b = (json.loads((tmp_path / d / "baseline.json").read_text()) for d in ("frames", "spark"))
    assert a.keys() == b.keys() and all(b[t] == pytest.approx(a[t], rel=1e-9) for t in a)


def test_on_spark_a_negative_count_fails(tables, as_parquet, tmp_path):
    broken = {**tables, "user_behaviour": tables["user_behaviour"].copy()}
    broken["user_behaviour"].loc[broken["user_behaviour"].index[:3], "click_count_7d"] = -1
    report = check_features(as_parquet(broken, "broken"), tmp_path)
    assert report.failed
    assert any(f"user_behaviour.click_count_7d count_range: 3 of {len(broken['user_behaviour'])} rows" in line
               for line in report.lines), report.lines
    assert not (tmp_path / "baseline.json").exists()
