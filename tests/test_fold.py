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


def test_text_titles_come_from_engaged_titled_items_only():
    stream = [_event(START, "click", "i1"), _event(START + MINUTE, "view", "i2"),
              _event(START + 2 * MINUTE, "purchase", "untitled"), _event(START + 3 * MINUTE, "add_to_cart", "i3")]
    state = _fold(stream)
    assert fold.text_values(state, _titles(state))["recent_titles"] == "title 3 | title 1"


def test_the_sequence_keeps_the_last_50_in_time_order_whatever_the_arrival_order():
    stream = [_event(START + n * MINUTE, "click", f"i{n % 8}") for n in range(60)]
    shuffled = stream[:]
    random.Random(0).shuffle(shuffled)
    values = fold.sequence_values(_fold(shuffled))
    assert values == fold.sequence_values(_fold(stream))
    times = json.loads(values["sequence_times"])
    assert len(times) == fold.SEQUENCE_LENGTH and times == sorted(times)
    assert times[0] == (START + 10 * MINUTE) // 1_000_000  # the 10 oldest fell out


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
        kind = rng.choice(["view", "click", "add_to_cart", "purchase", "search", "review"])
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


def test_decoded_state_reuses_each_unchanged_tiles_text():
    """A push decodes a busy user's 720 tiles and re-encodes them: only a changed tile is written
    afresh, and the result is the text a state built in memory gives."""
    from feature_repo.pipeline import windows

    built = windows.new_state()
    for k in range(50):
        windows.add_event(built, 3600 * k + 7, "click", f"i{k % 7}", "pens", 2.5, None, "app", "direct")
    tiles, last = windows.encode(built)
    decoded = windows.decode(tiles, last)
    assert set(decoded["text"]) == set(decoded["tiles"]) and windows.encode(decoded) == (tiles, last)
    for state in (built, decoded):
        windows.add_event(state, 3600 * 49 + 9, "purchase", "i3", "pens", 2.5, 4.0, "web", "ads")
    assert len(decoded["text"]) == 49  # the changed tile's text was dropped
    assert windows.encode(decoded) == windows.encode(built)
    spaced = tiles.replace(",", ", ")  # not encode's layout: parsed whole, encoded afresh
    assert windows.decode(spaced, last)["text"] == {}
    assert windows.encode(windows.decode(spaced, last)) == (tiles, last)
