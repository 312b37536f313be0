"""The incremental push: fold a request's new events into each user's stored state and write it.

The online store holds each user's fold state (``user_activity``'s tiles, ``user_text``'s
``text_state``, ``user_sequence``'s lists; see ``fold.py``), so a fresh event costs a read of that
bounded state, a fold of the new events and a write, whatever the length of the user's history.
The event log stays the system of record: a user with no stored state (new, or an online store
that lost it) or one the caller marks stale (an earlier push failed) is recomputed from the log,
by the same fold the batch build runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import sqlalchemy as sa

from core.contract import is_null
from eventlog.store import EventLog, items
from feature_repo.pipeline import fold
from feature_repo.pipeline.stores import push_latest, skip_dedup

STATE_VIEWS = {"user_activity": fold.ACTIVITY_COLUMNS, "user_text": ("text_state",),
               "user_sequence": fold.SEQUENCE_COLUMNS}


def feature_view(store, name: str):
    """A view's definition from the registry's cache, kept while that cache is: Feast rebuilds the
    object from its proto on every lookup (about 3 ms, more than the push's own work)."""
    cache = store.__dict__.setdefault("_persona_views", {})
    key = (name, id(getattr(store.registry, "cached_registry_proto", None)))  # a refresh makes a new proto
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = store.get_feature_view(name, allow_registry_cache=True)
    return cache[key]


def stored_states(store, user_ids: list[str]) -> dict[str, fold.UserState]:
    """The users' fold states as the online store holds them; users without a stored
    ``user_activity`` row (no state) are left out."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    provider = store._get_provider()  # noqa: SLF001 - Feast's own read path, with the row's timestamp
    keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]) for u in user_ids]
    read: dict[str, list] = {}
    for view, columns in STATE_VIEWS.items():
        table = feature_view(store, view)
        read[view] = provider.online_read(config=store.config, table=table, entity_keys=keys,
                                          requested_features=list(columns))
    states = {}
    for n, user in enumerate(user_ids):
        _, activity = read["user_activity"][n]
        if not activity or activity.get("activity_tiles") is None:
            continue
        values = {view: {k: feast_value_type_to_python_type(v) for k, v in (read[view][n][1] or {}).items()}
                  for view in STATE_VIEWS}
        sequence = tuple(values["user_sequence"].get(c) for c in fold.SEQUENCE_COLUMNS)
        states[user] = fold.from_stored(values["user_activity"]["activity_tiles"],
                                        values["user_activity"].get("activity_last"),
                                        values["user_text"].get("text_state"),
                                        sequence if all(sequence) else None)
    return states


def catalogue(log: EventLog, item_ids: Iterable[str]) -> dict:
    """item_id -> (category, price, title) for these items, read from the log (a keyed lookup)."""
    wanted = sorted({i for i in item_ids if i is not None})
    if not wanted:
        return {}
    with log.engine.connect() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.category, items.c.price, items.c.title)
                            .where(items.c.item_id.in_(wanted))).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def push_events(store, log: EventLog, new_events: pd.DataFrame, stale: Iterable[str] = ()) -> dict[str, str]:
    """Write online the state of every user in ``new_events`` (events just appended to the log).

    Returns how each user was brought up to date: ``"folded"`` (stored state + these events) or
    ``"recomputed"`` (from the log, with their personal row: no stored state, or listed in ``stale``)."""
    from feature_repo.pipeline.build import recent_user_events
    from feature_repo.pipeline.online import personal_rows

    users = sorted(set(new_events["user_id"].dropna().astype(str)))
    if not users:
        return {}
    stale = set(stale)
    states = stored_states(store, [u for u in users if u not in stale])
    missing = [u for u in users if u not in states]
    folded = new_events[new_events["user_id"].isin(states)]
    history = recent_user_events(log, missing) if missing else folded.iloc[:0]
    frames = pd.concat([folded, history], ignore_index=True) if len(folded) and len(history) else (
        folded if len(folded) else history)
    known = catalogue(log, [*frames["item_id"].dropna(), *fold.item_ids(states.values())])
    write_rows(store, fold.fold_rows(frames, known, states=states, every=False))
    if missing:  # a user without stored state may lack the rest too: an online store that came back empty
        push_latest(store, {"user_personal": personal_rows(log, missing)})
    return {u: "recomputed" if u in missing else "folded" for u in users}


def write_rows(store, rows: dict[str, list[tuple]]) -> None:
    """Each view's rows ``(user_id, µs, values)`` straight into the online store as Feast's protos.

    What ``write_to_online_store`` does after turning a DataFrame into Arrow and then protos; for the
    handful of rows a push writes, those conversions cost more than the write. Like every push
    write, it does not depend on the stored stamp being older (see ``stores.push_latest``)."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import python_values_to_proto_values

    skip_dedup(store, True)
    provider = store._get_provider()  # noqa: SLF001 - Feast's own write path, minus the DataFrame
    for view, listed in rows.items():
        if not listed:
            continue
        table = feature_view(store, view)
        types = {f.name: f.dtype.to_value_type() for f in table.features}
        data = []
        for user, t_us, values in listed:
            key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user)])
            protos = {name: python_values_to_proto_values([_plain(values.get(name))], kind)[0]
                      for name, kind in types.items()}
            data.append((key, protos, (pd.Timestamp(t_us, unit="us", tz="UTC") + fold.STAMP).to_pydatetime(), None))
        provider.online_write_batch(store.config, table, data, progress=None)


def _plain(value):
    """A Python value Feast's proto conversion takes: no NaN, NA, NaT or numpy scalars."""
    if is_null(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value.item() if hasattr(value, "item") else value
