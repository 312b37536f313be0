"""The user-state fold (``feature_repo/pipeline/fold.py``): known answers for its text and sequence
parts, and the push's round trip (state -> stored columns -> state -> one more event) agreeing with a
fold of the whole stream, in any arrival order."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from feature_repo.pipeline import fold

START = pd.Timestamp("2026-03-01", tz="UTC").value // 1000
MINUTE, DAY = 60_000_000, 86_400_000_000
CATALOGUE = {f"i{k}": (f"c{k % 3}", 10.0 + k, f"title {k}") for k in range(8)} | {"untitled": ("c0", 1.0, None)}


def _event(t: int, kind: str, item: str | None = None, query: str | None = None) -> tuple:
    return t, {"event_type": kind, "item_id": item, "query": query, "value": None, "device": None, "channel": None}


def _fold(stream: list[tuple]) -> fold.UserState:
    state = fold.UserState()
    for t, e in stream:
        fold.add_event(state, t, *(e[k] for k in fold.EVENT_FIELDS), CATALOGUE)
    return state


def _titles(state: fold.UserState) -> dict:
    return {i: CATALOGUE[i][2] for i in state.items}


def test_text_keeps_the_newest_five_distinct_within_30_days_of_the_newest():
    stream = [_event(START + n * MINUTE, "search", query=f"q{n}") for n in range(7)]
    stream += [_event(START + 10 * MINUTE, "search", query="q0")]  # q0 again: its newest time counts
    stream += [_event(START - 31 * DAY, "search", query="too old")]  # late, and outside the window
    values = fold.text_values(_fold(stream), {})
    assert values["recent_queries"] == "q0 | q6 | q5 | q4 | q3"
    assert values["last_search_query"] == "q0"
    assert values["last_search_at"] == pd.Timestamp(START + 10 * MINUTE, unit="us", tz="UTC")


def test_text_titles_come_from_titled_items_of_the_sequence_types_only():
    stream = [_event(START, "click", "i1"), _event(START + MINUTE, "view", "i2"),
              _event(START + 2 * MINUTE, "purchase", "untitled"), _event(START + 3 * MINUTE, "add_to_cart", "i3"),
              _event(START + 4 * MINUTE, "impression", "i4")]  # shown, not opened: not in the text
    state = _fold(stream)
    assert fold.text_values(state, _titles(state))["recent_titles"] == "title 3 | title 2 | title 1"


HOUR = 60 * MINUTE


def test_the_sequence_keeps_the_newest_slots_in_time_order_whatever_the_arrival_order():
    stream = [_event(START + n * HOUR, "click", f"i{n % 8}") for n in range(fold.SEQUENCE_LENGTH + 10)]
    shuffled = stream[:]
    random.Random(0).shuffle(shuffled)
    values = fold.sequence_values(_fold(shuffled))
    assert values == fold.sequence_values(_fold(stream))
    times = json.loads(values["sequence_times"])
    assert len(times) == fold.SEQUENCE_LENGTH and times == sorted(times)
    assert times[0] == (START + 10 * HOUR) // 1_000_000  # the 10 oldest fell out
    assert json.loads(values["sequence_counts"]) == [1] * fold.SEQUENCE_LENGTH


def _stored(state: fold.UserState) -> tuple:
    activity = fold.activity_values(state)
    sequence = fold.sequence_values(state) if state.sequence else {}
    return (activity["activity_tiles"], activity["activity_last"],
            fold.text_state(state) if state.text_newest is not None else None,
            tuple(sequence[c] for c in fold.SEQUENCE_COLUMNS) if sequence else None)


@pytest.mark.parametrize("seed", range(200))
def test_folding_into_a_stored_state_equals_folding_the_whole_stream(seed):
    rng = random.Random(seed)
    stream = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.choice(["impression", "view", "click", "favorite", "add_to_cart", "purchase", "search", "review"])
        t = START + rng.randint(0, 90 * 24 * 60) * MINUTE
        stream.append(_event(t, kind, None if kind == "search" else rng.choice(list(CATALOGUE)),
                             f"q{rng.randint(0, 7)}" if kind == "search" else None))
    state = None
    for t, e in stream:  # arrival order is random: late events abound
        state = fold.from_stored(*_stored(state)) if state is not None else fold.UserState()
        fold.add_event(state, t, *(e[k] for k in fold.EVENT_FIELDS), CATALOGUE)
    whole = _fold(sorted(stream, key=lambda x: x[0]))
    assert state.newest == whole.newest
    assert _stored(state) == _stored(whole)
    got, want = fold.behaviour_values(state), fold.behaviour_values(whole)
    for name, value in want.items():
        assert got[name] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), name
    assert fold.text_values(state, _titles(state)) == fold.text_values(whole, _titles(whole))


def _windows_event(rng: random.Random, t: float) -> tuple:
    """An event for ``windows.add_event``: items named like categories, so that the stored text's
    search for an item meets false hits."""
    kind = rng.choice(["view", "click", "add_to_cart", "purchase", "search", "review"])
    item = None if kind == "search" else rng.choice(["i1", "i2", "i3", "c0", "c1", "i\"q"])
    return (t, kind, item, rng.choice(["c0", "c1", "i1", None]), rng.choice([9.99, 0.1, None]),
            rng.choice([None, 19.99, float("nan")]), rng.choice(["app", "web", None]), rng.choice(["ads", None]))


@pytest.mark.parametrize("seed", range(150))
def test_running_sums_equal_a_walk_of_the_tiles_at_any_request_time(seed):
    """The windows' running sums (and each tile's count of items it is the newest holder of) equal
    a walk of every tile, after any arrival order, idle gaps, and store round trips; so do the
    features at request times from the newest event to well past the longest window."""
    from feature_repo.pipeline import windows

    rng = random.Random(seed)
    base = 3600.0 * 490_000
    spread = rng.choice([6, 48, 24 * 40, 24 * 90])  # hours the stream spans
    stream = [_windows_event(rng, base + rng.uniform(0, spread * 3600)) for _ in range(rng.randint(1, 60))]
    state = windows.new_state()
    for n, event in enumerate(stream):  # arrival order is random: late events abound
        if rng.random() < 0.3:
            state = windows.decode(*windows.encode(state))  # a push reads back what the last one wrote
        windows.add_event(state, *event)
        newest = state["hours"][-1]
        assert state["sums"] == windows.walked_sums(state, newest), n
        assert {h: windows._tile(state, h)["u"] for h in state["hours"]} == {
            h: t["u"] for h, t in windows._migrated(json.loads(windows.encode(state)[0]), {})["tiles"].items()}
    whole = windows.new_state()
    for event in sorted(stream):
        windows.add_event(whole, *event)
    assert windows.encode(state) == windows.encode(whole)
    newest_ts = max(e[0] for e in stream)
    for later in (0, 0.5, 23, 24, 167, 168, 500, 719, 720, 5000):
        ts = newest_ts + later * 3600
        walked = windows._features(windows.walked_sums(state, int(ts // 3600)), state["last"], ts)
        assert windows.behaviour_of(state, ts) == walked, later
        stored = windows.behaviour_at(*windows.encode(whole), ts)
        assert stored == walked, later


def test_a_push_parses_only_the_tiles_it_changes_or_that_leave_a_window():
    """A busy month's state: one more event reads a handful of its 720 tiles, not all of them, and
    writes what a state folded in memory writes."""
    from feature_repo.pipeline import windows

    built = windows.new_state()
    for k in range(720 * 4):
        windows.add_event(built, 900.0 * k + 7, "click", f"i{k % 500}", "pens", 2.5, None, "app", "direct")
    tiles, last = windows.encode(built)
    decoded = windows.decode(tiles, last)
    assert decoded["tiles"] == {} and windows.encode(decoded) == (tiles, last)
    newest = 900.0 * (720 * 4 - 1)
    for event in [(newest + 60, "click", "new item", "pens", 2.5, None, "app", "direct"),
                  (newest + 70, "purchase", "i3", "pens", 2.5, 4.0, "web", "ads"),
                  (newest + 3600, "view", "i7", "pens", None, None, "web", None)]:  # the next hour
        for state in (built, decoded):
            windows.add_event(state, *event)
    assert len(decoded["tiles"]) <= 8, sorted(decoded["tiles"])
    assert windows.encode(decoded) == windows.encode(built)
    assert windows.behaviour_of(decoded, newest + 7200) == windows.behaviour_of(built, newest + 7200)


def test_a_state_stored_in_the_older_layout_is_read_and_rewritten():
    """States written before the running sums (money as floats, no sums) decode to the state a fold
    of the same events gives, so a workspace built by an older Persona keeps working."""
    from feature_repo.pipeline import windows

    old_tiles = (
        '[[491000,{"cat":{"c1":1,"c2":1},"ch":{"ads":1,"direct":1},"dev":{"app":1,"web":1},"items":["i1","i2"],'
        '"n":{"click":1,"purchase":1},"pn":2,"ps":23.0,"spend":12.345679}],[491005,{"cat":{"c1":1},'
        '"ch":{"direct":2},"dev":{"app":2},"items":["i1"],"n":{"search":1,"view":1},"pn":0,"ps":0.0,"spend":0.0}]]')
    old_last = '{"any":1767618002,"click":1767600020,"purchase":1767600010,"search":1767618002,"view":1767618001}'
    folded = windows.new_state()
    hour = 3600 * 491_000
    for event in [(hour + 10, "purchase", "i1", "c1", 11.0, 12.345678912, "app", "ads"),
                  (hour + 20, "click", "i2", "c2", 12.0, None, "web", "direct"),
                  (hour + 3600 * 5 + 1, "view", "i1", "c1", 11.0, None, "app", "direct"),
                  (hour + 3600 * 5 + 2, "search", None, None, None, None, "app", "direct")]:
        windows.add_event(folded, *event)
    migrated = windows.decode(old_tiles, old_last)
    assert windows.encode(migrated) == windows.encode(folded)
    assert windows.behaviour_at(old_tiles, old_last, hour + 7 * 3600) == windows.behaviour_of(folded, hour + 7 * 3600)
    assert windows.behaviour_of(folded, hour + 7 * 3600)["spend_30d"] == 12.345679
    assert windows.behaviour_of(folded, hour + 7 * 3600)["distinct_items_30d"] == 2
