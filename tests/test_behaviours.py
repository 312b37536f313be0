"""Behaviour types are configuration (``behaviours:`` in persona.yaml), and the sequence holds every
behaviour: the config's merge and errors, the gate's verdict on undeclared types, the fold's hourly
slots (bounded bursts, views included, any arrival order), and online equal to offline after a
build and after pushes."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from core import config as config_mod
from core.config import DEFAULT_BEHAVIOURS, Behaviour
from core.contract import EVENT_TYPES
from eventlog.sources import Batch, normalise
from eventlog.store import EventLog
from feature_repo.pipeline import fold, materialize, registry
from feature_repo.pipeline.build import build
from feature_repo.pipeline.push import push_events
from ingestion.ingest import ingest
from training import dataset, encoding
from validation.gate import Gate, GateSettings

START = pd.Timestamp("2026-03-01", tz="UTC")
T0 = START.value // 1000
MINUTE, HOUR = 60_000_000, 3_600_000_000
CATALOGUE = {f"i{k}": ("c0", 1.0, f"title {k}") for k in range(40)}


def _config(tmp_path, text: str | None):
    if text is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / config_mod.CONFIG_FILE).write_text(text)
    return config_mod.load(tmp_path)


# --- the configuration ------------------------------------------------------------------------------------
def test_defaults_declare_the_built_in_types(tmp_path):
    cfg = _config(tmp_path, None)
    assert set(DEFAULT_BEHAVIOURS) == set(EVENT_TYPES) and cfg.event_types == tuple(DEFAULT_BEHAVIOURS)
    assert cfg.positives == {"click": 1.0, "favorite": 2.0, "add_to_cart": 2.0, "purchase": 4.0, "review": 3.0}
    assert cfg.sequence_types == ("view", "click", "favorite", "add_to_cart", "purchase", "review")
    assert cfg.exposure_types == ("impression",)
    with pytest.raises(AttributeError):
        cfg.positives = {"click": 1.0}  # read-only: the weights live in behaviours
    saved = yaml.safe_load((tmp_path / config_mod.CONFIG_FILE).read_text())
    assert "positives" not in saved and saved["behaviours"]["impression"] == {
        "weight": 0.0, "sequence": True, "exposure": True}


def test_overrides_merge_per_type_and_field_and_survive_a_save(tmp_path):
    cfg = _config(tmp_path, "behaviours:\n  view: {exposure: true}\n  share: {weight: 1.0}\n"
                            "  review: {weight: 0}\n  purchase:\n")
    assert cfg.behaviours["view"] == Behaviour(weight=0.0, sequence=True, exposure=True)
    assert cfg.behaviours["share"] == Behaviour(weight=1.0)
    assert cfg.behaviours["purchase"] == DEFAULT_BEHAVIOURS["purchase"]  # empty: the defaults
    assert "view" not in cfg.sequence_types and "share" in cfg.sequence_types  # an exposure never enters
    assert cfg.exposure_types == ("impression", "view")
    assert cfg.positives == {"click": 1.0, "favorite": 2.0, "add_to_cart": 2.0, "purchase": 4.0, "share": 1.0}
    cfg.save()
    assert config_mod.load(tmp_path).behaviours == cfg.behaviours


def test_an_old_positives_mapping_still_loads_as_the_weights(tmp_path):
    cfg = _config(tmp_path, "profile: local\npositives: {click: 1.0, purchase: 5.0, share: 0.5}\n")
    assert cfg.positives == {"click": 1.0, "purchase": 5.0, "share": 0.5}  # favorite, cart, review: 0
    assert cfg.behaviours["view"] == DEFAULT_BEHAVIOURS["view"] and "share" in cfg.event_types
    cfg.save()
    saved = yaml.safe_load((tmp_path / config_mod.CONFIG_FILE).read_text())
    assert "positives" not in saved and saved["behaviours"]["purchase"]["weight"] == 5.0


@pytest.mark.parametrize(("text", "message"), [
    ("behaviours: {view: {wieght: 1}}", r"behaviours\.view: unknown field\(s\) wieght"),
    ("behaviours: {share: {weight: -1}}", r"behaviours\.share: weight must be >= 0"),
    ("behaviours: {share: {weight: yes}}", r"behaviours\.share: weight must be a number"),
    ("behaviours: {share: {sequence: maybe}}", r"behaviours\.share: sequence must be true or false"),
    ("behaviours: {click: {exposure: true}}", r"behaviours\.click: an exposure .* cannot have a weight"),
    ("behaviours: {share: 1.0}", r"behaviours\.share: expected a mapping"),
    ("behaviours: [view]", r"`behaviours:` must map event types"),
    ("positives: {click: 1}\nbehaviours: {view: {exposure: true}}", r"both `positives:`"),
])
def test_a_bad_behaviour_setting_names_the_type(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, text)


# --- the gate ---------------------------------------------------------------------------------------------
def _tables(shop) -> dict[str, pd.DataFrame]:
    users, items = shop["users"].head(2), shop["items"].head(3)
    rows = [{"event_id": f"g{n}", "user_id": users["user_id"].iloc[n % 2], "item_id": items["item_id"].iloc[n % 3],
             "event_type": kind, "event_timestamp": START + pd.Timedelta(minutes=n)}
            for n, kind in enumerate(["impression", "view", "favorite", "share", "click", "view"])]
    return {"users": users, "items": items, "events": pd.DataFrame(rows)}


def _batch(tables: dict[str, pd.DataFrame]) -> Batch:
    return Batch("test", {name: normalise(name, frame, "test") for name, frame in tables.items()})


@pytest.mark.parametrize("engine", ["gx", "pandas"])
def test_an_undeclared_type_is_quarantined_naming_the_setting_and_the_rest_accepted(tmp_path, shop, engine):
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    gate = Gate(GateSettings(max_reject_share=1.0, engine=engine, event_types=_config(tmp_path, None).event_types))
    report, result = ingest(_batch(_tables(shop)), log, gate)
    violations = result.verdicts["events"].violations
    assert list(violations) == [3] and [v.rule for v in violations[3]] == ["event_type_allowed"]
    reason = violations[3][0].reason
    assert "'share'" in reason and "`behaviours:` in persona.yaml" in reason, reason
    assert report.tables["events"].accepted == 5 and log.counts()["events"] == 5
    log.dispose()


@pytest.mark.parametrize("engine", ["gx", "pandas"])
def test_a_declared_type_is_accepted_and_enters_the_sequence(tmp_path, shop, engine):
    cfg = _config(tmp_path / "ws", "behaviours: {share: {weight: 1.0}}\n")
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    gate = Gate(GateSettings(max_reject_share=1.0, engine=engine, event_types=cfg.event_types))
    report, _ = ingest(_batch(_tables(shop)), log, gate)
    assert report.tables["events"].quarantined == 0
    tables = build(log, "local", cfg.workspace, sequence_types=cfg.sequence_types)
    kinds = {t for row in tables["user_sequence"]["sequence_types"] for t in json.loads(row)}
    assert kinds == {"view", "favorite", "share", "click"}  # no impression: an exposure
    log.dispose()


# --- the fold: hourly slots -------------------------------------------------------------------------------
def _fold(stream: list[tuple], types=config_mod.DEFAULT_SEQUENCE_TYPES) -> fold.UserState:
    state = fold.UserState()
    for t, kind, item in stream:
        fold.add_event(state, t, kind, item, None, None, None, None, CATALOGUE, types)
    return state


def test_a_burst_of_views_takes_one_slot():
    """30 views of A in one hour, then one view each of B..Z: every item is kept, A once, counted 30 times."""
    stream = [(T0 + n * MINUTE, "view", "i0") for n in range(30)]
    stream += [(T0 + HOUR + n * MINUTE, "view", f"i{n + 1}") for n in range(25)]
    values = fold.sequence_values(_fold(stream))
    items, counts = json.loads(values["sequence_items"]), json.loads(values["sequence_counts"])
    assert items[0] == "i0" and sorted(items[1:]) == sorted(f"i{k}" for k in range(1, 26))  # by (hour, item)
    assert counts == [30] + [1] * 25
    assert json.loads(values["sequence_times"])[:2] == [T0 // 1_000_000, T0 // 1_000_000 + 3600]  # the hour's start
    # A longer burst still cannot wash out the rest: 500 views of one item, then 99 others, all kept.
    burst = [(T0 + n * 7_000_000, "view", "i0") for n in range(500)]
    others = [(T0 + HOUR + n * MINUTE, "view", f"x{n:02d}") for n in range(fold.SEQUENCE_LENGTH - 1)]
    state = _fold(burst + others)
    assert len(state.sequence) == fold.SEQUENCE_LENGTH and state.counts[state.sequence[0]] == 500


def test_views_enter_the_sequence_and_the_recent_titles_but_impressions_and_searches_do_not():
    stream = [(T0, "impression", "i1"), (T0 + MINUTE, "view", "i2"), (T0 + 2 * MINUTE, "purchase", "i3"),
              (T0 + 3 * MINUTE, "search", None), (T0 + 4 * MINUTE, "share", "i4")]  # share: undeclared here
    state = _fold(stream)
    assert [s[1:] for s in state.sequence] == [("i2", "view"), ("i3", "purchase")]
    titles = fold.text_values(state, {i: CATALOGUE[i][2] for i in state.items})["recent_titles"]
    assert titles == "title 3 | title 2"
    assert [s[2] for s in _fold(stream, (*config_mod.DEFAULT_SEQUENCE_TYPES, "share")).sequence][-1] == "share"


def test_a_row_stored_before_counts_reads_as_one_event_per_entry():
    hour = T0 // 1_000_000
    old = (json.dumps(["i1", "i1", "i2"]), json.dumps(["click", "click", "purchase"]),
           json.dumps([hour + 10, hour + 20, hour + 30]), None)  # times in seconds, no counts
    state = fold.from_stored(None, None, None, old)
    assert state.sequence == [(hour // 3600, "i1", "click"), (hour // 3600, "i2", "purchase")]
    assert [state.counts[s] for s in state.sequence] == [2, 1]


event = st.tuples(st.sampled_from(["impression", "view", "click", "favorite", "purchase", "search"]),
                  st.integers(0, 11), st.one_of(st.integers(0, 180), st.integers(0, 60 * 24 * 90)))


@settings(max_examples=150, deadline=None)
@given(stream=st.lists(event, min_size=1, max_size=60), length=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_slots_are_the_same_in_any_arrival_order_through_stored_round_trips(stream, length, seed):
    """A short sequence, bursts and late events: a key enters only on its first event, a pushed-out key
    never returns, so the slots and counts equal a fold of the time-sorted stream."""
    events = [(T0 + minutes * MINUTE, kind, None if kind == "search" else f"i{item}") for kind, item, minutes in stream]
    original = fold.SEQUENCE_LENGTH
    fold.SEQUENCE_LENGTH = length
    try:
        whole = _fold(sorted(events, key=lambda e: e[0]))
        arrived = events[:]
        random.Random(seed).shuffle(arrived)
        state = fold.UserState()
        for n, (t, kind, item) in enumerate(arrived):
            if n % 3 == 2 and state.sequence:  # a push reads back what the last one wrote
                stored = fold.sequence_values(state)
                state = fold.from_stored(*fold.activity_values(state).values(), None,
                                         tuple(stored[c] for c in fold.SEQUENCE_COLUMNS))
            fold.add_event(state, t, kind, item, None, None, None, None, CATALOGUE)
    finally:
        fold.SEQUENCE_LENGTH = original
    assert fold.sequence_values(state) == fold.sequence_values(whole)


# --- training ---------------------------------------------------------------------------------------------
def test_a_custom_type_takes_the_other_row_of_the_type_embedding():
    frame = pd.DataFrame({"sequence_items": [json.dumps(["a", "b", "c"])],
                          "sequence_types": [json.dumps(["share", "view", "favorite"])],
                          "sequence_times": [json.dumps([0, 3600, 7200])], "request_timestamp": [START]})
    _, types, _ = encoding.sequences(frame, 4)
    rows = {t: k + 1 for k, t in enumerate(encoding.SEQUENCE_TYPES)}
    assert types.tolist() == [[0, rows[encoding.OTHER_TYPE], rows["view"], rows["favorite"]]]
    assert encoding.SEQUENCE_TYPES[:6] == ("click", "add_to_cart", "purchase", "review", "view", "search")


def test_exposures_are_the_configured_types(shop):
    events = shop["events"]
    positives = {"purchase": 4.0}
    by_default = dataset.build_examples(events, shop["items"], positives, neg_per_pos=0)
    shown = by_default[by_default["kind"] == "exposure"]
    impressions = events[events["event_type"] == "impression"]
    assert len(shown) and set(zip(shown.user_id, shown.item_id, strict=True)) <= set(
        zip(impressions.user_id, impressions.item_id, strict=True))
    views_too = dataset.build_examples(events, shop["items"], positives, neg_per_pos=0, exposure_ratio=100,
                                       exposure_types=("impression", "view"))
    assert (views_too["kind"] == "exposure").sum() > (by_default["kind"] == "exposure").sum()


# --- online equals offline --------------------------------------------------------------------------------
def _online_sequences(store, users: list[str]) -> pd.DataFrame:
    refs = [f"user_sequence:{c}" for c in fold.SEQUENCE_COLUMNS]
    return pd.DataFrame(store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in users])
                        .to_dict()).set_index("user_id")


def _assert_online_equals(store, tables: dict[str, pd.DataFrame], users: list[str]) -> None:
    newest = tables["user_sequence"].sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    online = _online_sequences(store, users)
    for user in users:
        for col in fold.SEQUENCE_COLUMNS:
            assert online.loc[user, col] == newest.loc[user, col], f"{user}.{col}"


def test_online_equals_offline_after_a_build_and_after_pushes(tmp_path, shop):
    cfg = _config(tmp_path / "ws", "behaviours: {share: {weight: 1.0}}\n")
    log = EventLog(f"sqlite:///{tmp_path / 'log.db'}")
    gate = Gate(GateSettings(max_reject_share=1.0, on_schema_drift="accept", engine="pandas",
                             event_types=cfg.event_types))
    users, items = list(shop["users"]["user_id"].head(2)), list(shop["items"]["item_id"].head(6))
    rng = random.Random(3)
    kinds = ["impression", "view", "view", "view", "click", "favorite", "share", "purchase"]

    def rows(prefix: str, n: int, spread_minutes: int) -> pd.DataFrame:
        return pd.DataFrame([{"event_id": f"{prefix}{k}", "user_id": rng.choice(users), "item_id": rng.choice(items),
                              "event_type": rng.choice(kinds),
                              "event_timestamp": START + pd.Timedelta(minutes=rng.randint(0, spread_minutes))}
                             for k in range(n)])

    first = {"users": shop["users"].head(2), "items": shop["items"].head(6), "events": rows("b", 80, 600)}
    assert ingest(_batch(first), log, gate)[0].tables["events"].quarantined == 0
    store, _ = registry.apply(cfg.workspace, "local")
    tables = build(log, "local", cfg.workspace, sequence_types=cfg.sequence_types)
    materialize.materialize(cfg.workspace, full=True, store=store)
    _assert_online_equals(store, tables, users)
    for k, row in rows("p", 12, 900).iterrows():  # late ones too: the batch spanned 600 minutes
        tb = normalise("events", pd.DataFrame([row]), "request")
        report, _ = ingest(Batch("POST /events", {"events": tb}), log, gate)
        assert report.tables["events"].quarantined == 0, k
        assert push_events(store, log, tb.frame, sequence_types=cfg.sequence_types) == {row["user_id"]: "folded"}
    _assert_online_equals(store, build(log, "local", cfg.workspace, sequence_types=cfg.sequence_types), users)
    log.dispose()


# --- the other paths follow the workspace's types: the sync, the spark build, the Data Docs ----------------
def _share_events(users: list[str], items: list[str], prefix: str, start: pd.Timestamp) -> pd.DataFrame:
    """Each user views an item, shares it and clicks another."""
    rows = [(user, kind, items[(u + k) % len(items)]) for u, user in enumerate(users)
            for k, kind in enumerate(["view", "share", "click"])]
    return pd.DataFrame([{"event_id": f"{prefix}{n}", "user_id": user, "item_id": item, "event_type": kind,
                          "event_timestamp": start + pd.Timedelta(minutes=n)}
                         for n, (user, kind, item) in enumerate(rows)])


def test_a_declared_type_reaches_the_online_sequence_through_the_sync(tmp_path, shop, monkeypatch):
    """`persona features materialize` syncs what the log changed since the build with the workspace's
    types: share events ingested after the build are in the online sequence, as a rebuild puts them."""
    from persona import cli, sample_data

    cfg = _config(tmp_path / "ws", "behaviours: {share: {weight: 1.0}}\n")
    monkeypatch.setenv("BENTOML_HOME", str(cfg.workspace / "bentoml"))
    users, items = list(shop["users"]["user_id"].head(2)), list(shop["items"]["item_id"].head(6))
    first = shop["events"][shop["events"]["user_id"].isin(users)]
    sample_data.write({"users": shop["users"].head(2), "items": shop["items"].head(6),
                       "events": first[first["item_id"].isin(items) | first["item_id"].isna()]}, tmp_path / "b1")
    cli.ingest(source=str(tmp_path / "b1"), workspace=cfg.workspace, profile="local", strict=False, as_json=False)
    cli.features_apply(workspace=cfg.workspace, profile="local")
    cli.features_build(workspace=cfg.workspace, profile="local", check=False)
    cli.features_materialize(workspace=cfg.workspace, profile="local", full=True)
    later = shop["events"]["event_timestamp"].max() + pd.Timedelta(hours=1)
    sample_data.write({"events": _share_events(users, items, "s", later)}, tmp_path / "b2")
    cli.ingest(source=str(tmp_path / "b2"), workspace=cfg.workspace, profile="local", strict=False, as_json=False)
    cli.features_materialize(workspace=cfg.workspace, profile="local", full=False)  # the sync brings them
    store, _ = registry.apply(cfg.workspace, "local")
    online = _online_sequences(store, users)
    for user in users:
        assert "share" in json.loads(online.loc[user, "sequence_types"]), user
    log = EventLog(cfg.resolved_event_log_url())
    _assert_online_equals(store, build(log, "local", cfg.workspace, sequence_types=cfg.sequence_types), users)
    log.dispose()


def test_the_spark_build_folds_a_declared_type(tmp_path, shop, monkeypatch):
    pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
    from feature_repo.pipeline import feast_config
    from feature_repo.pipeline.build import read_offline_spark
    from feature_repo.pipeline.compute import compute_all
    from feature_repo.pipeline.spark_build import build_with_spark

    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    cfg = _config(tmp_path / "ws", "behaviours: {share: {weight: 1.0}}\n")
    users, items = list(shop["users"]["user_id"].head(3)), list(shop["items"]["item_id"].head(6))
    events = _share_events(users, items, "s", START).assign(query=None, value=None, device="app", channel="search")
    conf = feast_config.feature_store_config("spark", tmp_path)["offline_store"]["spark_conf"]
    build_with_spark(events, shop["items"], shop["users"].head(3), tmp_path, conf, partitions=2,
                     sequence_types=cfg.sequence_types)
    spark = read_offline_spark(tmp_path)["user_sequence"]
    local = compute_all(events, shop["items"], shop["users"].head(3), cfg.sequence_types)["user_sequence"]
    assert {t for row in spark["sequence_types"] for t in json.loads(row)} == {"view", "share", "click"}
    key = ["user_id", "event_timestamp"]
    a = local.sort_values(key).reset_index(drop=True)
    b = spark[list(local.columns)].sort_values(key).reset_index(drop=True)
    b["event_timestamp"] = pd.to_datetime(b["event_timestamp"], utc=True).astype(a["event_timestamp"].dtype)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_a_declared_type_is_not_failing_in_the_data_docs(tmp_path, shop):
    """`persona validate` builds the Data Docs with the workspace's types, as the gate checks them."""
    from persona import cli, sample_data

    cfg = _config(tmp_path / "ws", "behaviours: {share: {weight: 1.0}}\n")
    sample_data.write(_tables(shop), tmp_path / "batch")
    cli.validate(source=str(tmp_path / "batch"), workspace=cfg.workspace, profile="local", strict=True, docs=True)
    stored = cfg.workspace / "gx" / "uncommitted" / "validations"
    results = [json.loads(p.read_text()) for p in stored.rglob("*.json")]
    events = [r for r in results if r.get("suite_name") == "events"]
    assert events, "no Data Docs validation result for the events suite"
    rule = [e for r in events for e in r["results"]
            if e["expectation_config"].get("meta", {}).get("rule") == "event_type_allowed"]
    assert rule and all(e["success"] for e in rule), rule
    assert all("share" in e["expectation_config"]["kwargs"]["value_set"] for e in rule)
    assert all(r["success"] for r in events)


def test_text_model_is_a_setting(tmp_path):
    """`text_model:` names the encoder (train's default --bert; the feature checks' vocabulary); unset, the
    default encoder."""
    assert config_mod.load(tmp_path / "plain").text_model is None
    (tmp_path / "zh").mkdir()
    (tmp_path / "zh" / config_mod.CONFIG_FILE).write_text("text_model: /models/a-chinese-encoder\n")
    cfg = config_mod.load(tmp_path / "zh")
    assert cfg.text_model == "/models/a-chinese-encoder"
    cfg.save()
    assert config_mod.load(tmp_path / "zh").text_model == "/models/a-chinese-encoder"
