"""Property: whatever order events arrive in (late ones included), pushing them one by one leaves the
online store equal to a batch build of the same log. After the first, every push folds the event into
the stored state (it never reads the user's history from the log). The sequence is cut to a few slots
here, so that slots are pushed out (and late events of pushed-out slots arrive) within a short stream,
and many events fall into one hour's slot."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventlog.sources import Batch, load_batch, normalise
from eventlog.store import EventLog
from feature_repo.pipeline import fold, history, registry
from feature_repo.pipeline.build import build
from feature_repo.pipeline.push import push_events, push_users
from ingestion.ingest import ingest
from persona import sample_data
from validation.gate import Gate, GateSettings

USERS = ("u1", "u2", "u3")
TYPES = ("impression", "view", "click", "favorite", "add_to_cart", "purchase", "search")
SHORT_SEQUENCE = 4  # slots kept in this test: a 25-event stream pushes some out
START = pd.Timestamp("2026-03-01", tz="UTC")
VIEWS = ("user_behaviour", "user_activity", "user_text", "user_sequence")

event = st.fixed_dictionaries({
    "user_id": st.sampled_from(USERS), "event_type": st.sampled_from(TYPES), "item": st.integers(0, 5),
    # 90 days: many events fall out of the 30-day windows; the first 3 hours: bursts share a slot
    "minutes": st.one_of(st.integers(0, 90 * 24 * 60), st.integers(0, 180)),
    "value": st.one_of(st.none(), st.floats(0, 500, allow_nan=False)),
})


@pytest.fixture(scope="module")
def catalogue(shop):
    return {"users": shop["users"].head(3).assign(user_id=list(USERS)), "items": shop["items"].head(6)}


def _push_one(log: EventLog, store, row: dict, seen: set) -> None:
    tb = normalise("events", pd.DataFrame([row]), "request")
    gate = Gate(GateSettings(max_reject_share=1.0, on_schema_drift="accept", engine="pandas"))
    report, _ = ingest(Batch("POST /events", {"events": tb}), log, gate)
    assert report.quarantined == 0, report.to_dict()
    how = push_events(store, log, tb.frame)
    assert how == {row["user_id"]: "folded" if row["user_id"] in seen else "recomputed"}
    seen.add(row["user_id"])


def _online(store, view: str) -> pd.DataFrame:
    refs = [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
    return pd.DataFrame(store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in USERS])
                        .to_dict()).set_index("user_id")


EXAMPLES = int(os.environ.get("PERSONA_PROPERTY_EXAMPLES", "10"))  # more for a deeper search


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(event, min_size=1, max_size=25))
def test_pushed_one_by_one_equals_the_batch_build(stream, catalogue, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(fold, "SEQUENCE_LENGTH", SHORT_SEQUENCE)  # the fold's and the log fetch's bound
    monkeypatch.setattr(history, "SEQUENCE_LENGTH", SHORT_SEQUENCE)
    folder = tmp_path_factory.mktemp("push_property")
    ws = folder / "ws"
    log = EventLog(f"sqlite:///{folder / 'eventlog.db'}")
    sample_data.write(catalogue, folder / "catalogue")
    ingest(load_batch(folder / "catalogue"), log, Gate())
    store, _ = registry.apply(ws, "local")
    items = list(catalogue["items"]["item_id"])
    seen: set = set()
    for n, e in enumerate(stream):  # arrival order is the list's, event time is random: late events abound
        row = {"event_id": f"e{n}", "user_id": e["user_id"], "event_type": e["event_type"],
               "event_timestamp": (START + pd.Timedelta(minutes=e["minutes"])).isoformat()}
        if e["event_type"] == "search":
            row["query"] = f"query {e['item']}"  # repeats: distinct queries are kept by their newest time
        else:
            row["item_id"] = items[e["item"]]
        if e["event_type"] == "purchase" and e["value"] is not None:
            row["value"] = e["value"]
        _push_one(log, store, row, seen)
    tables = build(log, "local", ws)
    _assert_online_equals_build(store, tables)
    push_users(store, log, sorted(seen))  # the sync's recompute from the log gives the same state
    _assert_online_equals_build(store, tables)
    log.dispose()


def _assert_online_equals_build(store, tables: dict[str, pd.DataFrame]) -> None:
    for view in VIEWS:
        online = _online(store, view)
        newest = tables[view].sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
        for user in USERS:
            for col in online.columns:
                got = online.loc[user, col]
                want = newest.loc[user, col] if user in newest.index else None
                if pd.isna(want) if not isinstance(want, str) else False:
                    assert got is None or pd.isna(got), f"{view}.{col} for {user}: {got!r}"
                elif isinstance(want, float):
                    assert got == pytest.approx(want, rel=1e-9), f"{view}.{col} for {user}"
                elif isinstance(want, pd.Timestamp):
                    assert pd.Timestamp(got).floor("s") == want.floor("s"), f"{view}.{col} for {user}"
                else:
                    assert got == want, f"{view}.{col} for {user}: online {got!r} build {want!r}"
