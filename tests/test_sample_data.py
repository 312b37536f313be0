"""The generator: deterministic, shaped like a shop, with signal beyond popularity."""

from __future__ import annotations

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
