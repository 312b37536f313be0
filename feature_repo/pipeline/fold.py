"""A user's feature state, folded one event at a time: the one definition behind the batch build
and the incremental ``/events`` push.

A user's state has three parts, each a fold whose result does not depend on the order the events
arrive in (so a late event lands where a rebuild would put it):

- activity: hourly tiles for the 30 days before the newest event, with the running sums of each
  window (``windows.py``). The request-time windows (``user_behaviour_now``) and the legacy
  ``user_behaviour`` view (windows ending at the newest event) are both read from it;
- text: the newest distinct queries and titled items of the sequence types, within 30 days of the
  newest such event, at most ``TEXT_ITEMS`` of each. An entry pushed out of the top can never come
  back: only a newer entry pushes it out, and the window drops the oldest first;
- sequence: the newest ``SEQUENCE_LENGTH`` slots of the sequence types (``behaviours:`` in
  persona.yaml; by default every behaviour but impressions and searches, views included), in
  (hour, item, type) order. Repeated events of one item and type within one UTC hour share a slot
  whose count grows, so a burst of 30 views of one item takes one slot, not 30. A slot's key never
  changes after its first event, so a key enters the top only on its first event, and a key pushed
  out (by ``SEQUENCE_LENGTH`` newer keys) never returns: the kept slots and their counts are the
  same in any arrival order.

The build folds every event of the log, user by user, and writes a row per view whenever the
view's value changes. The push reads the stored state from the online store, folds the request's
new events into it and writes the new rows: its cost depends on the state's size, which is
bounded, not on how long the user's history is.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.config import DEFAULT_SEQUENCE_TYPES
from feature_repo.pipeline import windows

TEXT_ITEMS = 5  # recent queries / titles kept per user
# (hour, item, type) slots kept in a user's sequence; the user tower reads the newest ``seq_len`` (50) of them.
SEQUENCE_LENGTH = 100
HOUR_US = 3_600_000_000
TEXT_WINDOW_US = 30 * 86_400_000_000
STAMP = pd.Timedelta(microseconds=1)  # a state is visible 1µs after its newest event (strictly before)
TEXT_COLUMNS = ("recent_queries", "recent_titles", "last_search_query", "last_search_at", "text_state")
SEQUENCE_COLUMNS = ("sequence_items", "sequence_types", "sequence_times", "sequence_counts")
ACTIVITY_COLUMNS = ("activity_tiles", "activity_last")
EVENT_FIELDS = ("event_type", "item_id", "query", "value", "device", "channel")


@dataclass
class UserState:
    activity: dict = field(default_factory=windows.new_state)
    queries: dict = field(default_factory=dict)  # query -> newest µs
    items: dict = field(default_factory=dict)  # titled item of a sequence type -> newest µs
    text_newest: int | None = None  # µs of the newest text event: the text window ends there
    sequence: list = field(default_factory=list)  # sorted slots (hour, item_id, event_type)
    counts: dict = field(default_factory=dict)  # slot -> its events
    newest: int | None = None  # µs of the newest event
    sequence_changes: int = 0  # bumped when a slot is added or counted: the build's cue to write a row


Catalogue = Mapping[str, tuple]  # item_id -> (category, price, title)


def add_event(state: UserState, t_us: int, event_type: str, item_id, query, value, device, channel,
              catalogue: Catalogue, sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> None:
    """Fold one event into ``state`` (``t_us``: epoch microseconds). ``sequence_types``: the
    configured types that enter the sequence and the recent titles (``Config.sequence_types``)."""
    category, price, title = catalogue.get(item_id, (None, None, None)) if item_id is not None else (None,) * 3
    windows.add_event(state.activity, t_us / 1e6, event_type, item_id, category, price, value, device, channel)
    state.newest = t_us if state.newest is None else max(state.newest, t_us)
    if event_type == "search" and query is not None:
        _add_text(state, state.queries, query, t_us)
    elif event_type in sequence_types and item_id is not None and title is not None:
        _add_text(state, state.items, item_id, t_us)
    if event_type in sequence_types and item_id is not None:
        _add_slot(state, (t_us // HOUR_US, item_id, event_type))


def _add_slot(state: UserState, key: tuple) -> None:
    """Count an event in its (hour, item, type) slot; a new slot enters only if it is among the newest
    ``SEQUENCE_LENGTH`` keys seen (a key older than every kept one of a full sequence was pushed out, or
    would have been: a rebuild drops it too)."""
    if key in state.counts:
        state.counts[key] += 1
    elif len(state.sequence) < SEQUENCE_LENGTH or key > state.sequence[0]:
        bisect.insort(state.sequence, key)
        state.counts[key] = 1
        for gone in state.sequence[:-SEQUENCE_LENGTH]:
            del state.counts[gone]
        del state.sequence[:-SEQUENCE_LENGTH]
    else:
        return
    state.sequence_changes += 1


def _add_text(state: UserState, entries: dict, key: str, t_us: int) -> None:
    entries[key] = max(entries.get(key, t_us), t_us)
    state.text_newest = t_us if state.text_newest is None else max(state.text_newest, t_us)
    for group in (state.queries, state.items):
        kept = _newest(group)[:TEXT_ITEMS]
        kept = [k for k in kept if group[k] > state.text_newest - TEXT_WINDOW_US]
        for k in set(group) - set(kept):
            del group[k]


def _newest(entries: dict) -> list:
    """Keys newest first; equal times by key, so every path orders ties alike."""
    return sorted(entries, key=lambda k: (-entries[k], k))


# --- the views' values ------------------------------------------------------------------------------------
def activity_values(state: UserState) -> dict:
    tiles, last = windows.encode(state.activity)
    return {"activity_tiles": tiles, "activity_last": last}


def behaviour_values(state: UserState) -> dict:
    """The legacy ``user_behaviour`` row: every window ends at the user's newest event."""
    return windows.behaviour_of(state.activity, state.newest / 1e6)


def text_values(state: UserState, titles: Mapping[str, str | None]) -> dict:
    queries = _newest(state.queries)
    seen = dict.fromkeys(t for t in (titles.get(i) for i in _newest(state.items)) if t is not None)
    return {"recent_queries": " | ".join(queries), "recent_titles": " | ".join(seen),
            "last_search_query": queries[0] if queries else None,
            "last_search_at": pd.Timestamp(state.queries[queries[0]], unit="us", tz="UTC") if queries else pd.NaT,
            "text_state": text_state(state)}


def text_state(state: UserState) -> str:
    return json.dumps({"n": state.text_newest, "q": sorted([t, q] for q, t in state.queries.items()),
                       "i": sorted([t, i] for i, t in state.items.items())}, separators=(",", ":"))


def sequence_values(state: UserState) -> dict:
    """The slots oldest first; a slot's time is the start of its hour (epoch seconds)."""
    return {"sequence_items": json.dumps([s[1] for s in state.sequence]),
            "sequence_types": json.dumps([s[2] for s in state.sequence]),
            "sequence_times": json.dumps([s[0] * 3600 for s in state.sequence]),
            "sequence_counts": json.dumps([state.counts[s] for s in state.sequence])}


def from_stored(activity_tiles, activity_last, text: str | None, sequence: tuple | None) -> UserState:
    """The state back from its stored columns (the online store's row of each view)."""
    activity = windows.decode(activity_tiles, activity_last)
    newest = activity["last"].get("any")
    state = UserState(activity=activity, newest=None if newest is None else round(newest * 1e6))
    if text:
        parsed = json.loads(text)
        state.text_newest = parsed["n"]
        state.queries = {q: t for t, q in parsed["q"]}
        state.items = {i: t for t, i in parsed["i"]}
    if sequence and sequence[0]:
        _slots_from_stored(state, *sequence)
    return state


def _slots_from_stored(state: UserState, items: str, types: str, times: str, counts: str | None = None) -> None:
    """The slots back from their JSON lists. A row written before slots had counts (times in seconds,
    no ``sequence_counts``) reads as one event per entry, merged into its hour."""
    listed = zip((t // 3600 for t in json.loads(times)), json.loads(items), json.loads(types), strict=True)
    for key, n in zip(listed, json.loads(counts) if counts else itertools.repeat(1), strict=False):
        state.counts[key] = state.counts.get(key, 0) + n
    state.sequence = sorted(state.counts)[-SEQUENCE_LENGTH:]
    state.counts = {k: state.counts[k] for k in state.sequence}


# --- the build: every user's rows ------------------------------------------------------------------------
def catalogue_of(items: pd.DataFrame) -> dict:
    """item_id -> (category, price, title) for the fold (missing values as None)."""
    cols = [items[c].astype(object).where(items[c].notna(), None) if c in items else [None] * len(items)
            for c in ("category", "price", "title")]
    return dict(zip(items["item_id"].astype(str), zip(*cols, strict=True), strict=True))


def fold_rows(events: pd.DataFrame, catalogue: Catalogue, states: dict[str, UserState] | None = None,
              every: bool = True, sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict[str, list[tuple]]:
    """Fold ``events`` user by user and list each view's rows ``(user_id, µs, values)``.

    ``states`` gives users a starting state (the push); they end folded. With ``every``, a row is
    listed at each distinct event time where the view's value changed (the build); without it,
    one row per user and view, after their newest event (the push). ``sequence_types``: the
    configured types of the sequence (``Config.sequence_types``).
    """
    states = {} if states is None else states
    types = frozenset(sequence_types)
    out: dict[str, list[tuple]] = {"user_activity": [], "user_behaviour": [], "user_text": [], "user_sequence": []}
    cols = _sorted_events(events)
    n, current, previous = len(cols[0]), None, {}
    for i in range(n):
        user, t = cols[0][i], int(cols[1][i])
        if user != current:
            current, previous = user, {}
        state = states.get(user)
        if state is None:
            state = states[user] = UserState()
        add_event(state, t, *(c[i] for c in cols[2:]), catalogue, types)
        last_of_user = i + 1 == n or cols[0][i + 1] != user
        if last_of_user or (every and int(cols[1][i + 1]) != t):
            _emit(out, user, state, catalogue, previous)
    return out


def _emit(out: dict, user: str, state: UserState, catalogue: Catalogue, previous: dict) -> None:
    """Rows of this user's state at its newest event; text and sequence rows only where they changed."""
    t = state.newest
    out["user_activity"].append((user, t, activity_values(state)))
    out["user_behaviour"].append((user, t, behaviour_values(state)))
    text_key = (state.text_newest, frozenset(state.queries.items()), frozenset(state.items.items()))
    if state.text_newest is not None and previous.get("text") != text_key:
        titles = {i: catalogue.get(i, (None, None, None))[2] for i in state.items}
        out["user_text"].append((user, t, text_values(state, titles)))
        previous["text"] = text_key
    if state.sequence and previous.get("sequence") != state.sequence_changes:
        out["user_sequence"].append((user, t, sequence_values(state)))
        previous["sequence"] = state.sequence_changes


def _sorted_events(events: pd.DataFrame) -> list[np.ndarray]:
    """Columns ``user_id, t (µs), *EVENT_FIELDS`` by user, then time (stable), nulls as None.

    Plain arrays, not a frame: a push folds one or two events, where pandas' per-column overhead
    was most of the fold's time."""
    users = events["user_id"].astype(str).to_numpy(dtype=str)
    t = pd.to_datetime(events["event_timestamp"], utc=True).astype("datetime64[us, UTC]").astype("int64").to_numpy()
    order = np.lexsort((t, users))  # stable: ties keep the log's order
    fields = [events[c].to_numpy(dtype=object, na_value=None)[order] if c in events
              else np.full(len(events), None, dtype=object) for c in EVENT_FIELDS]
    return [users[order].astype(object), t[order], *fields]


def frames(rows: dict[str, list[tuple]]) -> dict[str, pd.DataFrame]:
    """The listed rows as feature tables, stamped 1µs after their events."""
    return {name: _frame(name, listed) for name, listed in rows.items()}


_COLUMNS = {"user_activity": ACTIVITY_COLUMNS, "user_text": TEXT_COLUMNS, "user_sequence": SEQUENCE_COLUMNS,
            "user_behaviour": windows.BEHAVIOUR_FEATURES}


def _frame(name: str, listed: list[tuple]) -> pd.DataFrame:
    columns = _COLUMNS[name]
    frame = pd.DataFrame.from_records([r[2] for r in listed], columns=list(columns))
    frame.insert(0, "user_id", [r[0] for r in listed])
    stamps = pd.to_datetime(pd.Series([r[1] for r in listed], dtype="int64"), unit="us", utc=True)
    frame.insert(1, "event_timestamp", (stamps + STAMP).astype("datetime64[us, UTC]"))
    return _typed(name, frame)


def _typed(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    if name == "user_behaviour":
        for col in frame.columns[2:]:
            kind = windows.FEATURE_TYPES[col]
            frame[col] = frame[col].astype(kind) if kind is not object else frame[col].astype(object)
    elif name == "user_text":
        frame["last_search_at"] = pd.to_datetime(frame["last_search_at"], utc=True).astype("datetime64[us, UTC]")
        for col in ("recent_queries", "recent_titles", "last_search_query", "text_state"):
            frame[col] = frame[col].astype(object)
    else:
        for col in frame.columns[2:]:
            frame[col] = frame[col].astype(object)
    return frame


def user_tables(events: pd.DataFrame, items: pd.DataFrame,
                sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict[str, pd.DataFrame]:
    """``user_activity``, ``user_behaviour``, ``user_text`` and ``user_sequence`` for the users of
    ``events``: a row at each distinct event time where the view's value changed."""
    return frames(fold_rows(events, catalogue_of(items), sequence_types=sequence_types))


def item_ids(states: Iterable[UserState]) -> set[str]:
    """The items a set of states names in its text part (their titles are looked up at write time)."""
    return {i for s in states for i in s.items}
