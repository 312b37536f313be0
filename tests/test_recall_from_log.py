"""Serving's recall state read from the event log in chunks equals the one computed from the whole log as
a frame, on SQLite and Postgres, through a shop's life: a second batch, a late event, an erased user, a
request in the past."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from eventlog.erase import erase_users
from eventlog.store import EventLog
from persona import sample_data
from training.recall.cooccurrence import item_similarity
from training.recall.fit import Behaviours
from training.recall.history import HOUR
from training.recall.popular import FOREVER, MONTH, WEEK, WINDOWS, ItemCounts
from training.recall.shop import REACH, counts_from_log

BEHAVIOURS = Behaviours(["view", "click", "favorite", "add_to_cart", "purchase"], ["purchase"],
                        {"purchase": 1.0, "add_to_cart": 0.5})


def _append(log: EventLog, frame: pd.DataFrame, batch: str) -> None:
    with log.engine.begin() as conn:
        log.write(conn, "events", frame, frame.columns, batch)


def _hour(ts) -> int:
    return int(pd.Timestamp(ts).value // 10**9 // HOUR)


def _assert_same(log: EventLog, item_ids: list[str], now: datetime, hours: list[int]) -> None:
    """The log-read state against the frame-read one: the similarity bit for bit, every window's counts."""
    events = log.read_table("events")
    index = {i: k for k, i in enumerate(item_ids)}
    got = counts_from_log(log, item_ids, BEHAVIOURS, now)
    want = item_similarity(events, index, BEHAVIOURS.sequence)
    assert got.similarity.nnz == want.nnz
    assert abs(got.similarity - want).max() == 0 if want.nnz else got.similarity.nnz == 0
    for held, types in ((got.behaviour, BEHAVIOURS.sequence), (got.targets, list(BEHAVIOURS.targets))):
        local = ItemCounts(events, index, types)
        for hour in hours:
            for w in WINDOWS:
                np.testing.assert_array_equal(held.window(hour, w), local.window(hour, w), err_msg=f"{hour} {w}")


@pytest.fixture(params=["sqlite", "postgres"])
def log(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    log = EventLog(url)
    yield log
    log.dispose()


def test_the_recall_state_from_the_log_in_chunks_is_the_frames_through_a_shops_life(log):
    shop = sample_data.generate(n_users=120, n_items=80, days=60, seed=5)
    events = shop["events"].sort_values("event_timestamp")
    cut = events["event_timestamp"].quantile(0.7)
    item_ids = shop["items"]["item_id"].astype(str).tolist()[:-5]  # a few logged items are not served
    _append(log, events[events["event_timestamp"] < cut], "day-one")
    end = pd.Timestamp(events["event_timestamp"].max())
    now = (end + pd.Timedelta(hours=3)).to_pydatetime()
    since_hour = _hour(now) - REACH // HOUR
    # requests now, later, and in the past: before the held month (counted by the database), at its edge
    hours = [_hour(now), _hour(now) + 30, _hour(cut), since_hour, since_hour + MONTH // HOUR, since_hour - 1]
    _assert_same(log, item_ids, now, hours)

    _append(log, events[events["event_timestamp"] >= cut], "day-two")  # a second batch: new pairs
    late = events.head(40).assign(event_id=lambda f: "late-" + f["event_id"].astype(str),
                                  event_timestamp=end - pd.Timedelta(days=2), event_type="purchase")
    _append(log, late, "late")  # late events, stamped inside the held month
    _assert_same(log, item_ids, now, hours)

    erased = events["user_id"].value_counts().index[:3].tolist()  # the busiest users leave
    erase_users(log, erased)
    _assert_same(log, item_ids, now, hours)


def test_held_windows_do_not_read_the_database_and_past_ones_do(log):
    """Requests from the build on are answered from what it holds; one whose window reaches before it asks
    the database (once per hour and window), so its counts stay point in time."""
    shop = sample_data.generate(n_users=40, n_items=30, days=50, seed=9)
    _append(log, shop["events"], "one")
    now = pd.Timestamp(shop["events"]["event_timestamp"].max()).to_pydatetime()
    counts = counts_from_log(log, shop["items"]["item_id"].astype(str).tolist(), BEHAVIOURS, now)
    asked = []
    original = counts.behaviour.count
    counts.behaviour.count = lambda start, end: asked.append((start, end)) or original(start, end)
    for w in (WEEK, MONTH, FOREVER):
        counts.behaviour.window(_hour(now), w)
        counts.behaviour.window(_hour(now) + 24 * 40, w)  # a quiet shop, asked 40 days later
    assert asked == []
    old = _hour(now - pd.Timedelta(days=45))
    counts.behaviour.window(old, WEEK)
    counts.behaviour.window(old, WEEK)
    assert len(asked) == 1 and asked[0][1] == old * HOUR


def test_an_empty_log_gives_an_empty_state(log):
    counts = counts_from_log(log, ["a", "b"], BEHAVIOURS, datetime.now(UTC))
    assert counts.similarity.shape == (2, 2) and counts.similarity.nnz == 0
    assert counts.behaviour.window(_hour(datetime.now(UTC)), FOREVER).tolist() == [0, 0]


def test_the_similarity_taken_a_block_of_rows_at_a_time_is_the_one_taken_at_once(monkeypatch):
    """The blocks bound the memory; the neighbours kept, ties included, are the same bit for bit."""
    from training.recall import cooccurrence

    shop = sample_data.generate(n_users=200, n_items=150, days=20, seed=4)
    index = {i: k for k, i in enumerate(shop["items"]["item_id"].astype(str))}
    whole = cooccurrence.item_similarity(shop["events"], index, BEHAVIOURS.sequence, neighbours=7)
    for entries in (1, 500):  # a block a row, and blocks of several rows
        monkeypatch.setattr(cooccurrence, "BLOCK_ENTRIES", entries)
        blocked = cooccurrence.item_similarity(shop["events"], index, BEHAVIOURS.sequence, neighbours=7)
        assert blocked.nnz == whole.nnz and (blocked.indptr == whole.indptr).all()
        assert (blocked.indices == whole.indices).all() and (blocked.data == whole.data).all()
    assert whole.getnnz(axis=1).max() == 7


def test_a_stage_refreshed_with_new_counts_ranks_as_one_built_afresh(log):
    """Serving's refresh after new events swaps the counts and keeps the catalogue's parts (texts, groups,
    the lexical index): its rankings, scores and reasons are those of a stage built from scratch."""
    from training.recall.fit import make_recall
    from training.recall.history import EventHistories
    from training.recall.lexical import item_texts
    from training.recall.package import TwoStage, TwoStageSpec
    from training.recall.ranker import Ranker, RankerConfig

    shop = sample_data.generate(n_users=80, n_items=60, days=20, seed=6)
    events, items = shop["events"].sort_values("event_timestamp"), shop["items"]
    cut = events["event_timestamp"].quantile(0.6)
    _append(log, events[events["event_timestamp"] < cut], "one")
    ids = items["item_id"].astype(str).tolist()
    names = make_recall(events, items, BEHAVIOURS, True, item_texts(items)).feature_names()
    ranker = Ranker(len(names), RankerConfig(), np.zeros(len(names)), np.ones(len(names))).eval()
    spec = TwoStageSpec(names, BEHAVIOURS, True, True)
    now = (pd.Timestamp(events["event_timestamp"].max()) + pd.Timedelta(hours=2)).to_pydatetime()
    old = TwoStage(ranker, spec, None, items, ids, counts=counts_from_log(log, ids, BEHAVIOURS, now))
    _append(log, events[events["event_timestamp"] >= cut], "two")
    counts = counts_from_log(log, ids, BEHAVIOURS, now)
    fresh, refreshed = TwoStage(ranker, spec, None, items, ids, counts=counts), old.with_counts(counts)
    assert refreshed.recall.sources[-2] is old.recall.sources[-2]  # the lexical index, kept
    hist = EventHistories(log.read_table("events"), fresh.index, fresh.codes, BEHAVIOURS.sequence)
    rng = np.random.default_rng(0)
    for user in events["user_id"].unique()[:30]:
        recent, tower = hist.at(user, pd.Timestamp(now)), rng.normal(size=len(ids)).astype(np.float32)
        for query in (None, "shoes"):
            a = fresh.top(recent, now.timestamp(), query, np.array([0]), tower, 10)
            b = refreshed.top(recent, now.timestamp(), query, np.array([0]), tower, 10)
            assert (a.items, a.scores, a.reasons) == (b.items, b.scores, b.reasons)
    moved = old.top(hist.at(events["user_id"].iloc[-1], pd.Timestamp(now)), now.timestamp(), None, np.array([0]),
                    np.zeros(len(ids), np.float32), 10)
    assert moved.items  # the old stage still ranks (with its older counts)


def test_two_writers_during_refreshes_never_double_count_and_the_next_refresh_catches_up(log, monkeypatch):
    """Serving refreshes its recall state while two ingests append events. Each refresh reads the log in
    chunks (here 50 rows, so every read spans many writes): no read fails, no refresh counts an event
    twice or loses one it had (every count lies between the state before the writes and after), and the
    refresh after the writers stop equals the state computed from the whole log."""
    import functools
    import threading

    shop = sample_data.generate(n_users=120, n_items=80, days=60, seed=7)
    events = shop["events"].sort_values("event_timestamp").reset_index(drop=True)
    item_ids = shop["items"]["item_id"].astype(str).tolist()
    first, rest = events.iloc[: len(events) // 2], events.iloc[len(events) // 2:]
    _append(log, first, "day-one")
    now = (pd.Timestamp(events["event_timestamp"].max()) + pd.Timedelta(hours=1)).to_pydatetime()
    hour = _hour(now)
    monkeypatch.setattr(EventLog, "event_chunks", functools.partialmethod(EventLog.event_chunks, rows=50))

    def totals(state) -> list[np.ndarray]:
        return [held.window(hour, w) for held in (state.behaviour, state.targets) for w in WINDOWS]

    before = totals(counts_from_log(log, item_ids, BEHAVIOURS, now))
    errors: list[BaseException] = []

    def writer(part: pd.DataFrame, name: str) -> None:
        try:
            for k, start in enumerate(range(0, len(part), 40)):
                _append(log, part.iloc[start:start + 40], f"{name}-{k}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(rest.iloc[k::2], f"w{k}")) for k in range(2)]
    for thread in writers:
        thread.start()
    during = []
    while any(thread.is_alive() for thread in writers):
        during.append(totals(counts_from_log(log, item_ids, BEHAVIOURS, now)))
    for thread in writers:
        thread.join()
    assert not errors, errors
    after = totals(counts_from_log(log, item_ids, BEHAVIOURS, now))
    assert during, "the writers finished before a refresh ran"
    for seen in during:
        for low, got, high in zip(before, seen, after, strict=True):
            assert (low <= got).all() and (got <= high).all()
    assert sum(a.sum() for a in after) > sum(b.sum() for b in before)
    _assert_same(log, item_ids, now, [hour, hour - 24 * 10])
