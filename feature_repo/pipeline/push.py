"""The incremental push: fold a request's new events into each user's stored state and write it.

The online store holds each user's fold state (``user_activity``'s tiles, ``user_text``'s
``text_state``, ``user_sequence``'s lists; see ``fold.py``), so a fresh event costs a read of that
bounded state, a fold of the new events and a write, whatever the length of the user's history.
The event log stays the system of record: a user with no stored state (new, or an online store
that lost it) or one the caller marks stale (an earlier push failed) is recomputed from the log,
by the same fold the batch build runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import pandas as pd

from core.config import DEFAULT_SEQUENCE_TYPES
from eventlog.store import EventLog
from feature_repo.pipeline import fold
from feature_repo.pipeline.compute import latest_user_state
from feature_repo.pipeline.feast_adapter import read_rows, skip_dedup
from feature_repo.pipeline.feast_adapter import write_rows as write_view_rows
from feature_repo.pipeline.history import catalogue, personal_rows, recent_user_events
from feature_repo.pipeline.offline import microseconds

STATE_VIEWS = {"user_activity": fold.ACTIVITY_COLUMNS, "user_text": ("text_state",),
               "user_sequence": fold.SEQUENCE_COLUMNS}


def stored_states(store, user_ids: list[str]) -> dict[str, fold.UserState]:
    """The users' fold states as the online store holds them; users without a stored
    ``user_activity`` row (no state) are left out."""
    read = {view: read_rows(store, view, user_ids, list(columns)) for view, columns in STATE_VIEWS.items()}
    states = {}
    for n, user in enumerate(user_ids):
        _, activity = read["user_activity"][n]
        # Feast's Redis store answers a user it lacks with empty values, not (None, None): no tiles, no state.
        if not activity or activity.get("activity_tiles") is None:
            continue
        values = {view: read[view][n][1] or {} for view in STATE_VIEWS}
        sequence = tuple(values["user_sequence"].get(c) for c in fold.SEQUENCE_COLUMNS)
        states[user] = fold.from_stored(values["user_activity"]["activity_tiles"],
                                        values["user_activity"].get("activity_last"),
                                        values["user_text"].get("text_state"),
                                        sequence if all(sequence[:3]) else None)  # no counts: a row from before them
    return states


def push_events(store, log: EventLog, new_events: pd.DataFrame, stale: Iterable[str] = (),
                sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict[str, str]:
    """Write online the state of every user in ``new_events`` (events just appended to the log).

    Returns how each user was brought up to date: ``"folded"`` (stored state + these events) or
    ``"recomputed"`` (from the log, with their personal row: no stored state, or listed in ``stale``).
    ``sequence_types``: the workspace's ``Config.sequence_types``, as the build used them."""
    users = sorted(set(new_events["user_id"].dropna().astype(str)))
    if not users:
        return {}
    stale = set(stale)
    states = stored_states(store, [u for u in users if u not in stale])
    missing = [u for u in users if u not in states]
    folded = new_events[new_events["user_id"].isin(states)]
    history = recent_user_events(log, missing, sequence_types) if missing else folded.iloc[:0]
    frames = pd.concat([folded, history], ignore_index=True) if len(folded) and len(history) else (
        folded if len(folded) else history)
    known = catalogue(log, [*frames["item_id"].dropna(), *fold.item_ids(states.values())])
    write_rows(store, fold.fold_rows(frames, known, states=states, every=False, sequence_types=sequence_types))
    if missing:  # a user without stored state may lack the rest too: an online store that came back empty
        push_latest(store, {"user_personal": personal_rows(log, missing)})
    return {u: "recomputed" if u in missing else "folded" for u in users}


def push_users(store, log: EventLog, user_ids: list[str], items: pd.DataFrame | None = None,
               sequence_types: Collection[str] = DEFAULT_SEQUENCE_TYPES) -> dict:
    """Recompute the users' fresh behaviour and text state from the log and push it to the online store."""
    if not user_ids:
        return {}
    items = items if items is not None else log.read_table("items")
    states = latest_user_state(recent_user_events(log, list(user_ids), sequence_types), items, sequence_types)
    push_latest(store, states)
    return states


def write_rows(store, rows: dict[str, list[tuple]]) -> None:
    """Each view's rows ``(user_id, µs, values)`` straight into the online store as Feast's protos.

    For the handful of rows a push writes, the DataFrame and Arrow conversions of
    ``write_to_online_store`` cost more than the write. Like every push write, it does not depend on
    the stored stamp being older (see ``push_latest``)."""
    skip_dedup(store, True)
    for view, listed in rows.items():
        if listed:
            write_view_rows(store, view, [
                (user, (pd.Timestamp(t_us, unit="us", tz="UTC") + fold.STAMP).to_pydatetime(), values)
                for user, t_us, values in listed])


def push_latest(store, states: dict[str, pd.DataFrame]) -> None:
    """Write users' fresh state straight to the online store (the event log holds the events).

    This is what ``store.push`` does through the view's PushSource, minus its re-listing of every
    FeatureService from the registry on each call (about 10 ms per push on the SQL registry).

    The state comes from the event log, so it is written even when its stamp is not newer than the
    stored one (a late event, an edit): Feast's Redis writer would skip that row, so its timestamp
    check is turned off for these writes (``skip_dedup``). Materialization keeps it.
    """
    skip_dedup(store, True)
    for name, frame in states.items():
        if len(frame):
            store.write_to_online_store(name, microseconds(frame), allow_registry_cache=True)
