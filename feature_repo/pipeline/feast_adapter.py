"""The one module that reaches past Feast's public API.

The push reads and writes a few online rows per request, with their timestamps: Feast's public
reads drop the timestamp and its public write turns rows into a DataFrame, Arrow and then protos,
which costs more than the write itself. Erasure deletes Redis keys, for which Feast has no public
call. Each use below names the Feast version it was checked against; ``tests/test_feast_adapter.py``
fails, naming what changed, when the installed Feast lacks one of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd

from core.contract import is_null

CHECKED_AGAINST = "0.67"  # the Feast version every private use here was checked against
JOIN_KEY = "user_id"
_VIEW_CACHE = "_persona_views"  # our attribute on a FeatureStore: views by (name, registry proto)


def entity_keys(user_ids: Iterable[str], join_key: str = JOIN_KEY) -> list:
    """Feast's entity-key protos for these ids (one string join key)."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=u)]) for u in user_ids]


def cached_view(store, name: str):
    """A view's definition from the registry's cache, kept while that cache is: Feast rebuilds the
    object from its proto on every lookup (about 3 ms, more than the push's own work)."""
    # feast 0.67.x: kept in the FeatureStore's own __dict__ (it lives and dies with the store), and
    # keyed by the registry's ``cached_registry_proto`` (an undocumented attribute of the caching
    # registries), which a registry refresh replaces.
    cache = store.__dict__.setdefault(_VIEW_CACHE, {})
    key = (name, id(getattr(store.registry, "cached_registry_proto", None)))
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = store.get_feature_view(name, allow_registry_cache=True)
    return cache[key]


def read_rows(store, view: str, user_ids: list[str], columns: list[str]) -> list[tuple[datetime | None, dict | None]]:
    """Per user, in order: the row's timestamp and its values as Python values (``(None, None)`` when the
    view has no row for them). A column the row lacks is left out; the SQLite store gives every column."""
    from feast.type_map import feast_value_type_to_python_type

    # feast 0.67.x: Provider.online_read(config, table, entity_keys, requested_features) -> [(ts, {name:
    # ValueProto})]: Feast's own read path, which keeps the row's timestamp.
    read = store.provider.online_read(config=store.config, table=cached_view(store, view),
                                      entity_keys=entity_keys(user_ids), requested_features=list(columns))
    return [(ts, {k: feast_value_type_to_python_type(v) for k, v in values.items()} if values else values)
            for ts, values in read]


def write_rows(store, view: str, rows: Iterable[tuple[str, datetime, dict[str, Any]]]) -> None:
    """Write ``(user_id, timestamp, values)`` rows of one view straight into the online store.

    What ``store.write_to_online_store`` does after turning a DataFrame into Arrow and then protos."""
    from feast.type_map import python_values_to_proto_values

    rows = list(rows)
    if not rows:
        return
    table = cached_view(store, view)
    types = {f.name: f.dtype.to_value_type() for f in table.features}
    data = []
    for key, (_, ts, values) in zip(entity_keys([row[0] for row in rows]), rows, strict=True):
        protos = {name: python_values_to_proto_values([proto_ready(values.get(name))], kind)[0]
                  for name, kind in types.items()}
        data.append((key, protos, ts, None))
    # feast 0.67.x: Provider.online_write_batch(config, table, data, progress), data being
    # [(EntityKeyProto, {name: ValueProto}, event_ts, created_ts)]: Feast's own write path.
    store.provider.online_write_batch(store.config, table, data, progress=None)


def proto_ready(value):
    """A value Feast's proto conversion takes: no NaN, NA, NaT or numpy scalars (a Timestamp becomes
    a datetime, which stays one)."""
    if is_null(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value.item() if hasattr(value, "item") else value


def skip_dedup(store, skip: bool) -> None:
    """Redis only: whether a write may replace a stored row that is not older."""
    # feast 0.67.x: RedisOnlineStoreConfig.skip_dedup, read by the Redis writer on each write; other
    # online stores have no such field (SQLite never compares stamps).
    online = store.config.online_store
    if hasattr(online, "skip_dedup"):
        online.skip_dedup = skip


def redis_client(store):
    """The Redis client of a store whose online store is Redis (Feast has no public delete-by-key)."""
    # feast 0.67.x: RedisOnlineStore._get_client(online_store_config) makes (once) and returns the client.
    return store.provider.online_store._get_client(store.config.online_store)  # noqa: SLF001


def redis_keys(store, user_ids: list[str]) -> list[bytes]:
    """The Redis keys of these users: one hash per entity holds every view's features."""
    from feast.infra.online_stores.helpers import _redis_key

    config = store.config
    # feast 0.67.x: helpers._redis_key(project, entity_key, entity_key_serialization_version) -> bytes.
    return [_redis_key(config.project, k, entity_key_serialization_version=config.entity_key_serialization_version)
            for k in entity_keys(user_ids)]


def connection_per_thread(store) -> None:
    """SQLite online store: each thread gets its own connection.

    Feast keeps one connection per store (``check_same_thread=False``) and every read and write goes
    through it, so one request's commit or rollback landed in another's half-written rows: under 16
    concurrent threads, ``sqlite3.DatabaseError`` in the write and rows whose lists had different
    lengths. With a connection each, SQLite's own locking keeps every write whole."""
    online = store.provider.online_store
    # feast 0.67.x: SqliteOnlineStore._get_conn(config) returns the one cached ``self._conn``.
    if type(online).__name__ != "SqliteOnlineStore" or getattr(online, "_persona_per_thread", False):
        return
    local, opening = threading.local(), threading.Lock()
    shared = online._get_conn  # noqa: SLF001 - makes a connection as Feast configures it (the first time)

    def per_thread(config):
        conn = getattr(local, "conn", None)
        if conn is None:
            with opening:  # Feast caches the connection it makes: clear it before and after, one at a time
                online._conn = None  # noqa: SLF001
                conn = local.conn = shared(config)
                online._conn = None  # noqa: SLF001
            conn.execute("PRAGMA busy_timeout = 30000")  # wait for another thread's write, never fail
        return conn

    online._get_conn = per_thread  # noqa: SLF001
    online._persona_per_thread = True


def provider(store):
    """The store's provider: its offline store and the point-in-time join that takes views with a
    look-back as their TTL (training/point_in_time.py). Feast keeps the accessor private."""
    return store._get_provider()


def service_views(store, service) -> tuple[list[str], list]:
    """What ``FeatureStore.get_historical_features`` resolves for a FeatureService: its feature
    references and its stored views (on-demand ones left out), each with the features read from it.
    The point-in-time join (training/point_in_time.py) hands these views to the provider itself."""
    from feast import utils as feast_utils

    # feast 0.67.x: utils._get_features, _get_feature_views_to_use and _group_feature_refs, as
    # FeatureStore.get_historical_features calls them.
    refs = feast_utils._get_features(store.registry, store.project, service, allow_cache=True)  # noqa: SLF001
    views, odfvs = feast_utils._get_feature_views_to_use(store.registry, store.project, service,  # noqa: SLF001
                                                         allow_cache=True)
    grouped, _ = feast_utils._group_feature_refs(refs, views, odfvs)  # noqa: SLF001
    return list(refs), grouped


class OnDemandApplier:
    """Feast's on-demand views of a retrieval job applied to some of its rows, where they are.

    ``RetrievalJob.to_df`` applies them only to a result it collects; on Spark the joined rows stay in
    the executors (``to_spark_df``), so each task hands its rows to this, which runs the same
    ``to_df`` over them. Picklable: a task gets the views, not the store."""

    def __init__(self, job) -> None:
        # feast 0.67.x: RetrievalJob's on_demand_feature_views, full_feature_names and metadata
        # (metadata names the features each on-demand view must return).
        self.views = list(job.on_demand_feature_views)
        self.full_feature_names = bool(job.full_feature_names)
        try:
            self.metadata = job.metadata
        except NotImplementedError:
            self.metadata = None

    def __getstate__(self) -> dict:
        """The views as their registry protos: their functions were rebuilt from the registry into a
        module no other process has, so they travel as Feast stores them."""
        return {**self.__dict__, "views": [view.to_proto().SerializeToString() for view in self.views]}

    def __setstate__(self, state: dict) -> None:
        from feast.on_demand_feature_view import OnDemandFeatureView
        from feast.protos.feast.core.OnDemandFeatureView_pb2 import OnDemandFeatureView as ViewProto

        self.__dict__.update(state)
        self.views = [OnDemandFeatureView.from_proto(ViewProto.FromString(data)) for data in state["views"]]

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        import pyarrow as pa

        return _Rows(pa.Table.from_pandas(frame, preserve_index=False), self).to_df()


def _rows_job():
    from feast.infra.offline_stores.offline_store import RetrievalJob

    class Rows(RetrievalJob):
        """Rows already joined, as a RetrievalJob, so that Feast's own ``to_df`` applies the views."""

        def __init__(self, table, applier: OnDemandApplier) -> None:
            self._table, self._applier = table, applier

        def _to_arrow_internal(self, timeout=None):
            return self._table

        def _to_df_internal(self, timeout=None):
            return self._table.to_pandas()

        @property
        def full_feature_names(self) -> bool:
            return self._applier.full_feature_names

        @property
        def on_demand_feature_views(self):
            return self._applier.views

        @property
        def metadata(self):
            return self._applier.metadata

        def persist(self, storage, allow_overwrite=False, timeout=None):
            raise NotImplementedError("rows handed over in a task are not persisted")

    return Rows


def _Rows(table, applier: OnDemandApplier):  # noqa: N802 - builds the RetrievalJob subclass on first use
    return _rows_job()(table, applier)
