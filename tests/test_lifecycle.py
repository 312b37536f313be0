"""A shop's second day, through the CLI's own commands, on the local and prod profiles: every change
reaches the online store, and after each step every online feature of every touched user and item
equals what an offline rebuild of the same log gives at the same time (Feast's point-in-time join)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pandas as pd
import pytest
import redis

from core import config as config_mod
from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import registry
from ingestion.ingest import ingest, replay
from persona import cli, sample_data
from validation.gate import Gate, GateSettings

USER_VIEWS = ("user_personal", "user_behaviour", "user_activity", "user_text", "user_sequence")


@pytest.fixture(params=["local", "prod"])
def shop_workspace(request, tmp_path, shop, monkeypatch):
    profile = request.param
    if profile == "prod":
        db = 5 + (uuid.uuid4().int % 8)
        monkeypatch.setenv("PERSONA_POSTGRES_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("PERSONA_REDIS_URL", f"redis://127.0.0.1:6379/{db}")
        redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    ws = tmp_path / "ws"
    cfg = config_mod.load(ws, profile)
    log = EventLog(cfg.resolved_event_log_url())
    yield cfg, log, tmp_path
    log.dispose()


def _ingest(log: EventLog, tables: dict[str, pd.DataFrame], folder) -> None:
    sample_data.write(tables, folder)
    report, _ = ingest(load_batch(folder), log, Gate(GateSettings(on_schema_drift="accept")))
    assert not report.held


def _build_and_materialize(cfg) -> None:
    cli.features_build(workspace=cfg.workspace, profile=cfg.profile, check=False)
    cli.features_materialize(workspace=cfg.workspace, profile=cfg.profile, full=False)


def _feature_refs(store, views) -> list[str]:
    return [f"{view}:{f.name}" for view in views for f in store.get_feature_view(view).features]


def _normalise(value):
    if value is pd.NaT:
        return None
    if isinstance(value, datetime | pd.Timestamp):
        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        return ts.floor("s")  # Feast keeps a UnixTimestamp online in whole seconds
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else value


def assert_online_equals_offline(store, users: list[str], items: list[str]) -> None:
    """Every feature of every view, for these keys: online == Feast's offline answer as of now."""
    now = pd.Timestamp(datetime.now(UTC))
    for key, keys, views in (("user_id", users, USER_VIEWS), ("item_id", items, ("item_features",))):
        if not keys:
            continue
        refs = _feature_refs(store, views)
        offline = store.get_historical_features(
            entity_df=pd.DataFrame({key: keys, "event_timestamp": now}), features=refs).to_df().set_index(key)
        online = pd.DataFrame(store.get_online_features(features=refs, entity_rows=[{key: k} for k in keys])
                              .to_dict()).set_index(key)
        for k in keys:
            for ref in refs:
                col = ref.split(":")[1]
                a, b = _normalise(online.loc[k, col]), _normalise(offline.loc[k, col])
                if isinstance(a, float) and isinstance(b, float):
                    assert a == pytest.approx(b, rel=1e-9), f"{k}.{col}: online {a!r} offline {b!r}"
                else:
                    assert a == b, f"{k}.{col}: online {a!r} offline {b!r}"


def test_a_shops_second_day_reaches_the_online_store(shop_workspace, shop):
    cfg, log, tmp = shop_workspace
    # Day 1: the shop as it was.
    _ingest(log, shop, tmp / "day1")
    cli.features_apply(workspace=cfg.workspace, profile=cfg.profile)
    _build_and_materialize(cfg)
    store = registry.feature_store(cfg.workspace)
    events = shop["events"]
    some_users = list(shop["users"]["user_id"].head(5))
    some_items = list(shop["items"]["item_id"].head(5))
    assert_online_equals_offline(store, some_users, some_items)

    # Day 2: a new user buys a new item; a price is edited; a late event; a quarantined row replayed.
    end = events["event_timestamp"].max()
    new_user = shop["users"].head(1).assign(user_id="u_day2", age=41, gender="f", region="north")
    new_item = shop["items"].head(1).assign(item_id="i_day2", title="Stovetop espresso kettle, steel",
                                            price=33.0)
    edited_id = shop["items"]["item_id"].iloc[7]
    edited = shop["items"].iloc[[7]].assign(price=float(shop["items"]["price"].iloc[7]) + 100.0)
    late_user = events.loc[events["event_type"] == "purchase", "user_id"].iloc[0]
    late_at = events.loc[events["user_id"] == late_user, "event_timestamp"].max() - pd.Timedelta(hours=3)
    day2_events = pd.DataFrame([
        {"event_id": "d2-1", "user_id": "u_day2", "item_id": "i_day2", "event_type": "view",
         "event_timestamp": end + pd.Timedelta(hours=1)},
        {"event_id": "d2-2", "user_id": "u_day2", "item_id": "i_day2", "event_type": "purchase", "value": 33.0,
         "event_timestamp": end + pd.Timedelta(hours=1, minutes=5)},
        {"event_id": "d2-late", "user_id": late_user, "item_id": edited_id, "event_type": "purchase",
         "value": 5.0, "event_timestamp": late_at},
    ])
    _ingest(log, {"users": new_user, "items": pd.concat([new_item, edited]), "events": day2_events}, tmp / "day2")
    # An event for a user the log does not know yet is quarantined, then replayed once the user arrives.
    orphan = pd.DataFrame([{"event_id": "d2-orphan", "user_id": "u_later", "item_id": edited_id,
                            "event_type": "click", "event_timestamp": end + pd.Timedelta(hours=2)}])
    views = pd.DataFrame([{"event_id": f"d2-view{n}", "user_id": user, "item_id": edited_id, "event_type": "view",
                           "event_timestamp": end + pd.Timedelta(hours=2, minutes=n)}
                          for n, user in enumerate(some_users * 3)])  # 1 bad row in 16: not held
    sample_data.write({"events": pd.concat([views, orphan])}, tmp / "orphan")
    report, _ = ingest(load_batch(tmp / "orphan"), log, Gate(GateSettings(on_schema_drift="accept")))
    assert report.quarantined == 1
    _ingest(log, {"users": shop["users"].head(1).assign(user_id="u_later", age=23)}, tmp / "later")
    replayed, _ = replay(log, Gate(GateSettings(on_schema_drift="accept")))
    assert replayed.tables["events"].written == 1

    _build_and_materialize(cfg)
    touched_users = ["u_day2", "u_later", late_user, *some_users]
    touched_items = ["i_day2", edited_id, *some_items]
    online = store.get_online_features(
        features=["user_personal:age", "user_behaviour:purchase_count_30d", "item_features:title",
                  "item_features:price"],
        entity_rows=[{"user_id": "u_day2", "item_id": "i_day2"}, {"user_id": "u_later", "item_id": edited_id}],
    ).to_dict()
    assert online["age"] == [41, 23]  # new users' personal rows are online
    assert online["title"][0] == "Stovetop espresso kettle, steel"  # so is the new item
    assert online["price"][1] == pytest.approx(float(edited["price"].iloc[0]))  # and the edit
    assert online["purchase_count_30d"][0] == 1
    assert_online_equals_offline(store, touched_users, touched_items)

    # Day 3: nothing new. Another build and materialize change nothing online.
    _build_and_materialize(cfg)
    assert_online_equals_offline(store, touched_users, touched_items)


def test_a_failing_feature_check_keeps_the_previous_tables(tmp_path, shop, monkeypatch):
    """`features build` checks the new tables before they replace the old ones."""
    import typer

    from validation import feature_suite

    cfg = config_mod.load(tmp_path / "ws", "local")
    log = EventLog(cfg.resolved_event_log_url())
    _ingest(log, shop, tmp_path / "day1")
    cli.features_apply(workspace=cfg.workspace, profile="local")
    cli.features_build(workspace=cfg.workspace, profile="local", check=True)
    before = pd.read_parquet(cfg.workspace / "offline" / "user_behaviour.parquet")
    more = shop["events"].head(50).assign(event_id=lambda f: "more-" + f["event_id"].astype(str),
                                          event_timestamp=lambda f: f["event_timestamp"] + pd.Timedelta(days=1))
    _ingest(log, {"events": more}, tmp_path / "day2")
    real = feature_suite._range_rules

    def broken(table, frame):  # a rule every row breaks: this build must not land
        import great_expectations.expectations as gxe

        return [*real(table, frame), gxe.ExpectColumnValuesToBeNull(column=feature_suite.KEYS[table],
                                                                     meta={"rule": "always_fails"})]

    monkeypatch.setattr(feature_suite, "_range_rules", broken)
    with pytest.raises(typer.Exit) as exit_info:
        cli.features_build(workspace=cfg.workspace, profile="local", check=True)
    assert exit_info.value.exit_code == 1
    after = pd.read_parquet(cfg.workspace / "offline" / "user_behaviour.parquet")
    pd.testing.assert_frame_equal(before, after)
    log.dispose()


CLIENTS, EVENTS_PER_CLIENT, PER_REQUEST = 8, 200, 10
BUSY_USERS = 3


def _client_events(client: int, users: list[str], items: list[str], end: pd.Timestamp, seed: int) -> list[dict]:
    """One client's events for the same few users, at random times (late ones included)."""
    import random

    rng = random.Random(seed * 100 + client)
    events = []
    for n in range(EVENTS_PER_CLIENT):
        kind = rng.choice(["view", "view", "click", "add_to_cart", "purchase", "search"])
        event = {"event_id": f"c{seed}-{client}-{n}", "user_id": rng.choice(users), "event_type": kind,
                 "event_timestamp": (end - pd.Timedelta(minutes=rng.randint(0, 40 * 24 * 60))).isoformat()}
        if kind == "search":
            event["query"] = f"query {rng.randint(0, 9)}"
        else:
            event["item_id"] = rng.choice(items)
        events.append(event)
    return events


def _post_concurrently(intake, users: list[str], items: list[str], end: pd.Timestamp, seed: int) -> list[str]:
    """8 clients, each posting its 200 events in requests of 10, all at once; the online updates."""
    from concurrent.futures import ThreadPoolExecutor

    def client(n: int) -> list[str]:
        events = _client_events(n, users, items, end, seed)
        answers = []
        for start in range(0, len(events), PER_REQUEST):
            status, body = intake.post(events[start:start + PER_REQUEST])
            assert status in (200, 202), body
            answers.append(body["online_update"])
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [a for answers in pool.map(client, range(CLIENTS)) for a in answers]


def _redis_server(port: int):
    import shutil
    import subprocess
    import time

    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            if redis.Redis(port=port).ping():
                return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@pytest.mark.parametrize("profile", ["local", "prod"])
def test_concurrent_clients_a_restart_and_an_outage(profile, tmp_path, shop, monkeypatch, request):
    """/events from 8 concurrent clients for the same users, then a restart, then the online store
    going away and coming back (prod: a Redis of its own, stopped and started empty). After each
    step the online state equals an offline rebuild of the log, at the same time."""
    import socket

    from bentos.intake import Intake

    server = None
    if profile == "prod":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = _redis_server(port)
        monkeypatch.setenv("PERSONA_POSTGRES_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("PERSONA_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    cfg = config_mod.load(tmp_path / "ws", profile)
    log = EventLog(cfg.resolved_event_log_url())
    try:
        _ingest(log, shop, tmp_path / "day1")
        cli.features_apply(workspace=cfg.workspace, profile=profile)
        _build_and_materialize(cfg)
        users = list(shop["users"]["user_id"].head(BUSY_USERS))
        items = list(shop["items"]["item_id"].head(20))
        end = min(shop["events"]["event_timestamp"].max(), pd.Timestamp(datetime.now(UTC)))

        store = registry.feature_store(cfg.workspace)
        answers = _post_concurrently(Intake(cfg, log, store), users, items, end, seed=1)
        assert set(answers) == {"updated"}
        assert log.counts()["events"] == len(shop["events"]) + CLIENTS * EVENTS_PER_CLIENT  # none lost
        cli.features_build(workspace=cfg.workspace, profile=profile, check=False)  # offline: a rebuild
        assert_online_equals_offline(store, users, [])

        # A restart: a new store object and a new intake, with nothing in memory.
        store = registry.feature_store(cfg.workspace)
        assert set(_post_concurrently(Intake(cfg, log, store), users, items, end, seed=2)) == {"updated"}
        cli.features_build(workspace=cfg.workspace, profile=profile, check=False)
        assert_online_equals_offline(store, users, [])

        if server is not None:  # the online store goes away: the events are kept, the update deferred
            intake = Intake(cfg, log, store)
            server.terminate()
            server.wait()
            status, body = intake.post(_client_events(0, users, items, end, seed=3)[:5])
            assert status == 202 and body["online_update"].startswith("deferred"), body
            server = _redis_server(port)  # back, and empty
            assert set(_post_concurrently(intake, users, items, end, seed=4)) == {"updated"}
            cli.features_build(workspace=cfg.workspace, profile=profile, check=False)
            assert_online_equals_offline(store, users, [])
            cli.features_materialize(workspace=cfg.workspace, profile=profile, full=True)  # everyone else
            others = list(shop["users"]["user_id"].iloc[BUSY_USERS:BUSY_USERS + 5])
            assert_online_equals_offline(store, users + others, items[:3])
    finally:
        log.dispose()
        if server is not None:
            server.terminate()
            server.wait()
