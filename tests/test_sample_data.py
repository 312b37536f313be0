"""The generator: deterministic, shaped like a shop, with signal beyond popularity."""

from __future__ import annotations

import hashlib
import re
import typing

import numpy as np
import pandas as pd
import pytest

from core.contract import CONTRACT, EVENT_TYPES
from persona import sample_data


@pytest.fixture(scope="module")
def big():
    return sample_data.generate(n_users=2000, n_items=600, days=30, seed=5)


def test_deterministic_for_a_seed():
    a = sample_data.generate(100, 50, 7, seed=3)
    b = sample_data.generate(100, 50, 7, seed=3)
    c = sample_data.generate(100, 50, 7, seed=4)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert not a["events"].equals(c["events"])


def test_follows_the_contract(shop):
    for table, cols in CONTRACT.items():
        assert [c.name for c in cols if c.name in shop[table].columns] == list(shop[table].columns)
    events = shop["events"]
    assert set(events["event_type"]) == set(EVENT_TYPES)
    assert events["event_id"].is_unique
    assert events.loc[events.event_type == "search", "query"].notna().all()
    assert events.loc[events.event_type != "search", "item_id"].notna().all()
    assert events["event_timestamp"].max() < sample_data.DEFAULT_END
    assert shop["items"]["category"].nunique() >= 8


def test_funnel_ratios_in_documented_ranges(big):
    counts = big["events"]["event_type"].value_counts()
    assert counts["impression"] > 0.8 * counts["view"]  # shown first: most views start from an impression
    assert 0.10 <= counts["click"] / counts["view"] <= 0.30
    assert 0.04 <= counts["favorite"] / counts["view"] <= 0.15
    assert 0.25 <= counts["add_to_cart"] / counts["click"] <= 0.55
    assert 0.35 <= counts["purchase"] / counts["add_to_cart"] <= 0.75
    assert 0.03 <= counts["search"] / (counts.sum() - counts["impression"]) <= 0.10
    assert 0.15 <= counts["review"] / counts["purchase"] <= 0.45


def test_people_buy_what_they_viewed(big):
    """Most purchases follow a view of the item by the same user, some on a later visit."""
    events = big["events"]
    views = events[events.event_type == "view"].groupby(["user_id", "item_id"])["event_timestamp"].min()
    buys = events[events.event_type == "purchase"].join(views.rename("first_view"), on=["user_id", "item_id"])
    assert (buys["first_view"] < buys["event_timestamp"]).mean() > 0.9
    later = buys["session_id"].str.endswith("-later")
    assert 0.1 < later.mean() < 0.5 and (buys.loc[later, "event_timestamp"] - buys.loc[later, "first_view"]
                                          > pd.Timedelta(hours=6)).all()
    # Items shown but not opened are less on target than the opened ones: impressions outnumber views.
    shown = events[events.event_type == "impression"]
    assert shown["item_id"].notna().all() and len(shown) > len(events[events.event_type == "view"])


def test_demographics_predict_interest(big):
    events = big["events"].merge(big["users"], on="user_id").merge(big["items"], on="item_id")
    clicks = events[events.event_type == "click"]
    dresses = clicks["category"].str.contains("Dresses")
    share = dresses.groupby(clicks["gender"]).mean()
    assert share["female"] > 3 * share["male"]
    # Older users read more fiction than younger users.
    books = clicks["category"].str.startswith("Books")
    assert books[clicks["age"] >= 55].mean() > 1.5 * books[clicks["age"] < 30].mean()


def test_query_text_predicts_the_clicked_item(big):
    events = big["events"]
    items = big["items"].set_index("item_id")
    searches = events[events.event_type == "search"].set_index("session_id")["query"]
    clicks = events[(events.event_type == "click") & events.session_id.isin(searches.index)]
    query = searches.loc[clicks["session_id"]].str.lower().to_numpy()
    title = items.loc[clicks["item_id"], "title"].str.lower().to_numpy()
    category = items.loc[clicks["item_id"], "category"].to_numpy()

    def overlap(q, t):
        return len(set(q.replace(",", " ").split()) & set(t.replace(",", " ").split())) > 0

    matched = np.mean([overlap(q, t) for q, t in zip(query, title, strict=True)])
    shuffled = np.random.default_rng(0).permutation(title)
    baseline = np.mean([overlap(q, t) for q, t in zip(query, shuffled, strict=True)])
    assert matched > baseline + 0.2
    assert pd.Series(category).nunique() >= 8


def test_context_shifts_categories(big):
    events = big["events"].merge(big["items"], on="item_id")
    clicks = events[events.event_type == "click"]
    hours = clicks["event_timestamp"].dt.hour
    coffee = clicks["category"].str.contains("Coffee")
    assert coffee[(hours >= 6) & (hours < 10)].mean() > coffee[hours >= 18].mean()
    laptops = clicks["category"].str.contains("Laptops")
    assert laptops[clicks.device == "desktop"].mean() > 1.5 * laptops[clicks.device == "app"].mean()


def test_interests_drift(big):
    events = big["events"].merge(big["items"], on="item_id")
    clicks = events[events.event_type == "click"]
    mid = clicks["event_timestamp"].min() + (clicks["event_timestamp"].max() - clicks["event_timestamp"].min()) / 2
    early = clicks[clicks.event_timestamp < mid].groupby("user_id")["category"].agg(lambda s: s.mode()[0])
    late = clicks[clicks.event_timestamp >= mid].groupby("user_id")["category"].agg(lambda s: s.mode()[0])
    both = early.index.intersection(late.index)
    changed = (early[both] != late[both]).mean()
    assert 0.2 < changed < 0.95


def test_reviews_and_prices(big):
    events = big["events"]
    reviews = events[events.event_type == "review"]
    assert reviews["rating"].between(1, 5).all() and reviews["text"].notna().all()
    high = reviews[reviews.rating >= 4]["text"].str.contains("good|excellent|love|nice", case=False).mean()
    assert high > 0.9
    items = big["items"]
    by_cat = items.groupby("category")["price"].median()
    assert by_cat["Electronics>Computers>Laptops"] > 10 * by_cat["Books>Fiction"]
    buys = events[events.event_type == "purchase"]
    assert (buys["value"] > 0).all()


# --- the Chinese shop (locale="zh") -----------------------------------------------------------------

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# The English output for generate(100, 50, 7, seed=3), hashed before the locales existed: adding
# them must not change a single byte of it.
ENGLISH_SHA256 = "34d9c0caf41bf7714a383159541f938f62efdc8cb5d2a0b9649ecb9471996fac"


@pytest.fixture(scope="module")
def big_zh():
    return sample_data.generate(n_users=2000, n_items=600, days=30, seed=5, locale="zh")


def _typed_length(query: str) -> int:
    """Characters as typed: each CJK character one, each Latin word or number one (brand, model)."""
    return len(CJK.findall(query)) + len(re.findall(r"[A-Za-z0-9][A-Za-z0-9.&'+-]*", query))


def _funnel(events: pd.DataFrame) -> dict[str, float]:
    counts = events["event_type"].value_counts()
    views = events[events.event_type == "view"].groupby(["user_id", "item_id"])["event_timestamp"].min()
    buys = events[events.event_type == "purchase"].join(views.rename("first_view"), on=["user_id", "item_id"])
    return {"click/view": counts["click"] / counts["view"], "cart/click": counts["add_to_cart"] / counts["click"],
            "purchase/cart": counts["purchase"] / counts["add_to_cart"],
            "favorite/view": counts["favorite"] / counts["view"],
            "review/purchase": counts["review"] / counts["purchase"],
            "viewed first": (buys["first_view"] < buys["event_timestamp"]).mean()}


def test_english_output_is_unchanged_by_the_locales():
    tables = sample_data.generate(100, 50, 7, seed=3)
    digest = hashlib.sha256()
    for name in ("users", "items", "events"):
        digest.update(name.encode())
        digest.update(tables[name].to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ").encode())
    assert digest.hexdigest() == ENGLISH_SHA256
    explicit = sample_data.generate(100, 50, 7, seed=3, locale="en")
    for name in tables:
        pd.testing.assert_frame_equal(tables[name], explicit[name])


def test_zh_deterministic_for_a_seed():
    a = sample_data.generate(100, 50, 7, seed=3, locale="zh")
    b = sample_data.generate(100, 50, 7, seed=3, locale="zh")
    c = sample_data.generate(100, 50, 7, seed=4, locale="zh")
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert not a["events"].equals(c["events"])
    assert not a["items"]["title"].equals(sample_data.generate(100, 50, 7, seed=3)["items"]["title"])


def test_unknown_locale_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'fr'.*en, zh"):
        sample_data.generate(10, 10, 1, locale="fr")


def test_locales_fit_the_simulation():
    """Every locale fills the simulation's slots, and the CLI offers exactly these locales."""
    from persona.cli.data import SampleLocale

    assert typing.get_args(typing.get_args(SampleLocale)[0]) == tuple(sample_data.LOCALES)
    with pytest.raises(ValueError, match="devices"):
        sample_data.Locale(**{**sample_data.ZH.__dict__, "devices": ("App",)})
    for c in sample_data.ZH.categories:  # every Chinese noun and synonym is itself a query of 2-8 characters
        assert all(2 <= _typed_length(n) <= 8 for nouns in c.nouns for n in nouns), c.path


def test_zh_follows_the_contract_in_chinese(big_zh):
    for table, cols in CONTRACT.items():
        assert [c.name for c in cols if c.name in big_zh[table].columns] == list(big_zh[table].columns)
    events, items, users = big_zh["events"], big_zh["items"], big_zh["users"]
    assert set(events["event_type"]) == set(EVENT_TYPES) and events["event_id"].is_unique
    assert events.loc[events.event_type == "search", "query"].notna().all()
    assert items["category"].nunique() >= 10
    for column in ("category", "description"):
        assert items[column].str.contains(CJK).all()
    assert not items["category"].str.contains("[A-Za-z]").any()  # 类目 paths such as 美妆洗护>洗发水
    for column in ("gender", "region", "occupation", "membership"):
        assert users[column].str.contains(CJK).all(), column
    assert events["channel"].str.contains(CJK).all() and "搜索" in set(events["channel"])
    assert items["description"].str.match(r"品牌：[^；]+(；[^：；]+：[^；]+)*$").all()


def test_zh_titles_are_chinese_listings(big_zh):
    titles = big_zh["items"]["title"]
    assert titles.str.contains(CJK).all()
    english = {w for c in sample_data.CATEGORIES for text in (c.path, *(n for ns in c.nouns for n in ns))
               for w in re.split(r"[^a-z]+", text.lower()) if len(w) >= 3}
    latin = {w for t in titles for w in re.findall(r"[a-z]+", t.lower())}  # brands, models, units
    assert not latin & english, latin & english
    # No spaces between Chinese words: a space only after a "Latin/中文" brand or between two Latin words.
    items = big_zh["items"]
    rest = [t.removeprefix(b + " ") if "/" in b else t for t, b in zip(titles, items["brand"], strict=True)]
    assert not any(re.search(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])", t) for t in rest)
    assert titles.str.contains(r"\d+(?:ml|g|粒)|\d{4}新款|官方正品").mean() > 0.5  # units, years, stuffing


def test_zh_queries_are_short_like_typed_ones(big_zh):
    queries = big_zh["events"].query("event_type == 'search'")["query"]
    lengths = queries.map(_typed_length)
    assert lengths.between(2, 8).all(), queries[~lengths.between(2, 8)].head().tolist()
    assert (queries.map(sample_data.query_length) == lengths).all()
    assert queries.str.contains(CJK).all() and not queries.str.contains(" ").any()
    assert queries.nunique() > 200
    assert queries.str.contains("|".join(sample_data.ZH_PRICE_PHRASES)).mean() > 0.05


def test_zh_query_text_predicts_the_clicked_item(big_zh):
    """Chinese has no spaces: overlap is counted in character pairs, as a Chinese search engine would."""
    events, items = big_zh["events"], big_zh["items"].set_index("item_id")
    searches = events[events.event_type == "search"].set_index("session_id")["query"]
    clicks = events[(events.event_type == "click") & events.session_id.isin(searches.index)]
    query = searches.loc[clicks["session_id"]].to_numpy()
    title = items.loc[clicks["item_id"], "title"].to_numpy()

    def overlap(q: str, t: str) -> bool:
        return any(q[i:i + 2] in t for i in range(len(q) - 1))

    matched = np.mean([overlap(q, t) for q, t in zip(query, title, strict=True)])
    shuffled = np.random.default_rng(0).permutation(title)
    assert matched > np.mean([overlap(q, t) for q, t in zip(query, shuffled, strict=True)]) + 0.2


def test_zh_has_the_english_funnel_shape(big, big_zh):
    for tables in (big, big_zh):
        counts = tables["events"]["event_type"].value_counts()
        assert counts["impression"] > counts["view"] > counts["add_to_cart"] > counts["purchase"]
    en, zh = _funnel(big["events"]), _funnel(big_zh["events"])
    assert zh["viewed first"] > 0.9
    for ratio in en:
        assert zh[ratio] == pytest.approx(en[ratio], abs=0.05), ratio


def test_zh_demographics_and_reviews(big_zh):
    events = big_zh["events"].merge(big_zh["users"], on="user_id").merge(big_zh["items"], on="item_id")
    clicks = events[events.event_type == "click"]
    share = clicks["category"].str.contains("连衣裙").groupby(clicks["gender"]).mean()
    assert share["女"] > 3 * share["男"]
    tea, hours = clicks["category"].str.contains("茶叶"), clicks["event_timestamp"].dt.hour
    assert tea[(hours >= 6) & (hours < 10)].mean() > tea[hours >= 18].mean()
    reviews = big_zh["events"].query("event_type == 'review'")
    assert reviews["text"].str.contains(CJK).all()
    assert reviews.loc[reviews.rating >= 4, "text"].str.contains("好|不错|满意|推荐").all()
    assert not reviews.loc[reviews.rating <= 2, "text"].str.contains("好评|推荐").any()


def test_zh_shop_passes_the_real_gate(tmp_path, sqlite_log):
    """Written as CSV with a BOM (for spreadsheet software), read back with its column names intact,
    and ingested through the real GX gate into a SQLite event log: no row quarantined."""
    from eventlog.sources import load_batch
    from ingestion.ingest import ingest
    from validation.gate import Gate

    tables = sample_data.generate(n_users=150, n_items=120, days=14, seed=11, locale="zh")
    paths = sample_data.write(tables, tmp_path / "shop", "csv", encoding="utf-8-sig")
    assert all(p.read_bytes().startswith(b"\xef\xbb\xbf") for p in paths)
    batch = load_batch(tmp_path / "shop")
    assert {name: t.present for name, t in batch.tables.items()} == {n: list(f.columns) for n, f in tables.items()}
    report, _ = ingest(batch, sqlite_log, Gate())
    assert not report.held and report.quarantined == 0, report.to_dict()
    assert sqlite_log.counts() == {"users": 150, "items": 120, "events": len(tables["events"]), "quarantined": 0}
    stored = sqlite_log.read_table("items").set_index("item_id").loc[tables["items"]["item_id"], "title"]
    assert stored.tolist() == tables["items"]["title"].tolist()


def test_generate_command_writes_a_chinese_shop(tmp_path):
    from typer.testing import CliRunner

    from persona.cli import app

    runner = CliRunner()
    out = tmp_path / "zh"
    result = runner.invoke(app, ["generate", "--out", str(out), "--users", "30", "--items", "20", "--days", "3",
                                 "--locale", "zh"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "items.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert pd.read_csv(out / "items.csv", encoding="utf-8-sig")["title"].str.contains(CJK).all()
    english = tmp_path / "en"
    assert runner.invoke(app, ["generate", "--out", str(english), "--users", "30", "--items", "20",
                               "--days", "3"]).exit_code == 0
    assert (english / "items.csv").read_bytes().startswith(b"item_id,")  # no BOM: English files as before
    assert runner.invoke(app, ["generate", "--out", str(tmp_path / "fr"), "--locale", "fr"]).exit_code == 2
    assert "--locale" in runner.invoke(app, ["quickstart", "--help"]).output
