"""The private Feast internals behind ``feature_repo/pipeline/feast_adapter.py`` are still there, and a
round trip through the adapter works on real SQLite and Redis online stores.

A Feast upgrade that renames or reshapes one of them fails here, naming what changed, instead of
in a push on a live service.
"""

from __future__ import annotations

import inspect
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import feast
import numpy as np
import pandas as pd
import pytest
import yaml

from feature_repo.pipeline import feast_adapter, feast_config, push, registry


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _is_property(cls, name: str) -> bool:
    return isinstance(inspect.getattr_static(cls, name, None), property)


def _local_provider():
    from feast.infra.provider import PROVIDERS_CLASS_FOR_TYPE

    return PROVIDERS_CLASS_FOR_TYPE.get("local")


def _redis_store():
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore


def _sqlite_store():
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    return SqliteOnlineStore


def _passthrough():
    from feast.infra.passthrough_provider import PassthroughProvider

    return PassthroughProvider


def _helpers():
    from feast.infra.online_stores import helpers

    return helpers


def _redis_config():
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig

    return RedisOnlineStoreConfig


def _type_map():
    from feast import type_map

    return type_map


# (what the adapter relies on, a check that it still holds)
RELIED_ON = [
    ("FeatureStore.provider is a property (the adapter's way to the provider)",
     lambda: _is_property(feast.FeatureStore, "provider")),
    ("the 'local' provider is feast.infra.passthrough_provider.PassthroughProvider",
     lambda: _local_provider() == "feast.infra.passthrough_provider.PassthroughProvider"),
    ("PassthroughProvider.online_store is a property",
     lambda: _is_property(_passthrough(), "online_store")),
    *[(f"{name}.online_read(config, table, entity_keys, requested_features)",
       lambda get=get: _params(get().online_read)[:4] == ["config", "table", "entity_keys", "requested_features"])
      for name, get in (("PassthroughProvider", _passthrough), ("SqliteOnlineStore", _sqlite_store),
                        ("RedisOnlineStore", _redis_store))],
    *[(f"{name}.online_write_batch(config, table, data, progress)",
       lambda get=get: _params(get().online_write_batch)[:4] == ["config", "table", "data", "progress"])
      for name, get in (("PassthroughProvider", _passthrough), ("SqliteOnlineStore", _sqlite_store),
                        ("RedisOnlineStore", _redis_store))],
    ("RedisOnlineStore._get_client(online_store_config)",
     lambda: _params(getattr(_redis_store(), "_get_client", lambda self, x=None: None)) == ["online_store_config"]),
    ("feast.infra.online_stores.helpers._redis_key(project, entity_key, entity_key_serialization_version)",
     lambda: _params(getattr(_helpers(), "_redis_key", lambda: None))
     == ["project", "entity_key", "entity_key_serialization_version"]),
    ("SqliteOnlineStore._get_conn(config) returns the connection it caches in self._conn",
     lambda: _params(_sqlite_store()._get_conn) == ["config"] and "_conn" in vars(_sqlite_store())),
    ("RedisOnlineStoreConfig has the field skip_dedup",
     lambda: "skip_dedup" in _redis_config().model_fields),
    ("feast.type_map.python_values_to_proto_values and feast_value_type_to_python_type",
     lambda: all(hasattr(_type_map(), n)
                 for n in ("python_values_to_proto_values", "feast_value_type_to_python_type"))),
]


@pytest.mark.parametrize(("what", "holds"), RELIED_ON, ids=[w for w, _ in RELIED_ON])
def test_feast_still_has_what_the_adapter_uses(what, holds):
    try:
        ok = holds()
    except Exception as exc:  # noqa: BLE001 - a missing module or class is the news here
        ok, what = False, f"{what} ({type(exc).__name__}: {exc})"
    assert ok, (f"feast {feast.__version__} no longer has: {what}. feature_repo/pipeline/feast_adapter.py was "
                f"checked against feast {feast_adapter.CHECKED_AGAINST}.x: update the adapter, then this test")


def test_proto_ready_values():
    stamp = pd.Timestamp("2026-01-02 03:04:05", tz="UTC")
    assert [feast_adapter.proto_ready(v) for v in (None, float("nan"), np.float64("nan"), pd.NA, pd.NaT)] == [None] * 5
    assert type(feast_adapter.proto_ready(stamp)) is datetime and feast_adapter.proto_ready(stamp) == stamp
    moment = datetime(2026, 1, 2, tzinfo=UTC)
    assert feast_adapter.proto_ready(moment) is moment  # a datetime stays one: this is not a JSON converter
    assert type(feast_adapter.proto_ready(np.int64(3))) is int and feast_adapter.proto_ready("x") == "x"


@pytest.fixture
def local_store(tmp_path):
    store, _ = registry.apply(tmp_path / "ws", "local")
    return store


def _rows(users: list[str], stamp: datetime) -> list[tuple]:
    return [(u, stamp, {"age": np.int64(41), "gender": "f", "region": np.nan, "occupation": None,
                        "membership": "gold", "age_band": "35-49", "signup_timestamp": pd.Timestamp(stamp)})
            for u in users]


def test_round_trip_on_sqlite(local_store):
    store = local_store
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # the SQLite store keeps whole seconds
    feast_adapter.write_rows(store, "user_personal", _rows(["u1", "u2"], stamp))
    got = feast_adapter.read_rows(store, "user_personal", ["u2", "nobody", "u1"], ["age", "region", "signup_timestamp"])
    assert got[1] == (None, None)
    for ts, values in (got[0], got[2]):
        assert pd.Timestamp(ts).tz_localize(None) == pd.Timestamp(stamp).tz_localize(None)
        assert values["age"] == 41 and values["region"] is None
        assert pd.Timestamp(values["signup_timestamp"]) == pd.Timestamp(stamp)
        assert {"age", "region", "signup_timestamp"} <= set(values)  # SQLite gives every column
    public = store.get_online_features(features=["user_personal:age", "user_personal:membership"],
                                       entity_rows=[{"user_id": "u1"}, {"user_id": "nobody"}]).to_dict()
    assert public["age"] == [41, None] and public["membership"] == ["gold", None]  # Feast reads what we wrote
    feast_adapter.skip_dedup(store, True)  # SQLite has no such setting: nothing to change
    assert not hasattr(store.config.online_store, "skip_dedup")


def test_cached_view_follows_the_registry_cache(local_store):
    store = local_store
    view = feast_adapter.cached_view(store, "user_text")
    assert view.name == "user_text" and feast_adapter.cached_view(store, "user_text") is view
    before = store.registry.cached_registry_proto  # the adapter's key: a refresh must replace it
    store.refresh_registry()
    assert store.registry.cached_registry_proto is not before
    assert feast_adapter.cached_view(store, "user_text") is not view


def test_skip_dedup_sets_the_redis_setting():
    config = _redis_config()()
    store = SimpleNamespace(config=SimpleNamespace(online_store=config))
    feast_adapter.skip_dedup(store, True)
    assert config.skip_dedup is True
    feast_adapter.skip_dedup(store, False)
    assert config.skip_dedup is False


def test_round_trip_on_redis(tmp_path):
    """Written through the adapter, found by its Redis keys, gone when they are deleted (erasure's path)."""
    ws = tmp_path / "ws"
    registry.apply(ws, "local")
    path = feast_config.yaml_path(ws)
    cfg = yaml.safe_load(path.read_text())
    cfg["online_store"] = {"type": "redis", "connection_string": "127.0.0.1:6379,db=14"}
    path.write_text(yaml.safe_dump(cfg))
    store = registry.feature_store(ws)
    users = [f"adapter-{uuid.uuid4().hex}" for _ in range(2)]
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    client = feast_adapter.redis_client(store)
    keys = feast_adapter.redis_keys(store, users)
    try:
        feast_adapter.skip_dedup(store, True)
        feast_adapter.write_rows(store, "user_personal", _rows(users, stamp))
        assert client.exists(*keys) == 2
        (ts, values), = feast_adapter.read_rows(store, "user_personal", users[:1], ["age"])
        assert values["age"] == 41 and pd.Timestamp(ts).tz_localize(None) == pd.Timestamp(stamp).tz_localize(None)
        assert client.delete(keys[0]) == 1
        (_, gone), (_, kept) = feast_adapter.read_rows(store, "user_personal", users, ["age"])
        assert gone["age"] is None and kept["age"] == 41  # Redis answers a missing key with empty values
        # So a user Redis lacks (new, or a store that came back empty) has no stored state: the push
        # recomputes them from the log instead of folding their events into an empty state.
        assert push.stored_states(store, [users[0], f"never-{uuid.uuid4().hex}"]) == {}
    finally:
        client.delete(*keys)


def test_threads_write_and_read_the_sqlite_store_whole(local_store):
    """Eight threads write and read one store at once (the service runs requests side by side): every
    call succeeds and every row read back is one thread's whole write (Feast's one shared connection
    let one thread's commit or rollback land in another's half-written rows)."""
    import threading

    store = local_store
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    errors: list[str] = []
    torn: list[tuple] = []

    def work(n: int) -> None:
        for i in range(150):
            mark = n * 1000 + i
            rows = [(f"u{(n + j) % 4}", stamp, {"age": np.int64(mark), "gender": "f", "region": f"r{mark}",
                                                 "occupation": None, "membership": f"m{mark}", "age_band": "35-49",
                                                 "signup_timestamp": pd.Timestamp(stamp)}) for j in range(3)]
            try:
                feast_adapter.write_rows(store, "user_personal", rows)
                got = store.get_online_features(features=["user_personal:age", "user_personal:region",
                                                          "user_personal:membership"],
                                                entity_rows=[{"user_id": f"u{k}"} for k in range(4)]).to_dict()
            except Exception as exc:  # noqa: BLE001 - what a request would have answered 500 with
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            for age, region, membership in zip(got["age"], got["region"], got["membership"], strict=True):
                if age is not None and (region != f"r{age}" or membership != f"m{age}"):
                    torn.append((age, region, membership))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not torn, torn[:3]
