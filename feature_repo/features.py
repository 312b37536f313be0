"""Persona's Feast feature definitions: what a profile model may read, declared once.

Every view is computed by ``persona features build`` from the event log (see ``pipeline/``) and
stamped so that a value at time T uses only events strictly before T. ``.feastignore`` keeps Feast
from scanning ``pipeline/`` for definitions, but this module imports ``pipeline/windows.py``: the
request-time windows of ``user_behaviour_now`` are computed there. Which store holds the data
depends on the workspace's profile (local, prod or spark); the workspace is ``$PERSONA_WORKSPACE``,
else the folder of the ``-f`` yaml given to the Feast CLI, else ``./workspace``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, RequestSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String, UnixTimestamp

from core.config import read_profile
from core.contract import EVENT_TYPES
from feature_repo.pipeline.windows import RECENCY_TYPES, WINDOW_HOURS

WINDOWS = tuple(WINDOW_HOURS)  # 1d, 7d, 30d


def _workspace() -> Path:
    if ws := os.environ.get("PERSONA_WORKSPACE"):
        return Path(ws).resolve()
    try:  # running under `feast -f WORKSPACE/feature_store.yaml ...`
        import click

        ctx = click.get_current_context(silent=True)
        yaml_file = ctx.find_root().obj.get("FS_YAML_FILE") if ctx and ctx.find_root().obj else None
        if yaml_file and Path(yaml_file).exists():
            return Path(yaml_file).resolve().parent
    except Exception:  # noqa: BLE001 - outside the Feast CLI there is no click context
        pass
    if yaml_env := os.environ.get("FEAST_FS_YAML_FILE_PATH"):
        return Path(yaml_env).resolve().parent
    return Path("workspace").resolve()


WORKSPACE = _workspace()
PROFILE = read_profile(WORKSPACE)  # $PERSONA_PROFILE, else the workspace's persona.yaml, else local


def offline_source(name: str):
    """The batch source of one feature table, in the store of the workspace's profile."""
    if PROFILE == "prod":
        from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

        return PostgreSQLSource(name=name, table=f"persona_{name}", timestamp_field="event_timestamp")
    if PROFILE == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(name=name, path=str(WORKSPACE / "offline" / name), file_format="parquet",
                           timestamp_field="event_timestamp")
    return FileSource(name=name, path=str(WORKSPACE / "offline" / f"{name}.parquet"),
                      timestamp_field="event_timestamp")


# The shopper: every behaviour, personal and text feature is keyed by them.
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="A shopper, by the user_id of the input contract.")

# A catalogue item: the item tower and item statistics are keyed by it.
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
              description="A catalogue item, by the item_id of the input contract.")

# Who the user is: slow-changing attributes from the users table (static, stamped at signup).
user_personal = FeatureView(
    name="user_personal",
    entities=[user],
    ttl=timedelta(days=36500),
    schema=[
        Field(name="age", dtype=Int64), Field(name="age_band", dtype=String),
        Field(name="gender", dtype=String), Field(name="region", dtype=String),
        Field(name="occupation", dtype=String), Field(name="membership", dtype=String),
        Field(name="signup_timestamp", dtype=UnixTimestamp),
    ],
    source=offline_source("user_personal"),
    online=True,
    tags={"family": "personal"},
)

# Counts per built-in event type; a shop's own declared types get none (a Feast schema is static per
# build): they reach the models through the sequence.
_behaviour_fields = (
    [Field(name=f"{e}_count_{w}", dtype=Int64) for e in EVENT_TYPES for w in WINDOWS]
    + [Field(name=f"hours_since_last_{e}", dtype=Float64) for e in RECENCY_TYPES]
    + [Field(name=n, dtype=Float64) for n in (
        "spend_30d", "avg_price_engaged_30d", "ctr_30d", "cart_rate_30d", "purchase_rate_30d",
        "top_category_1_share_30d", "top_category_2_share_30d", "top_category_3_share_30d")]
    + [Field(name=n, dtype=Int64) for n in ("distinct_items_30d", "distinct_categories_30d")]
    + [Field(name=n, dtype=String) for n in (
        "top_category_1_30d", "top_category_2_30d", "top_category_3_30d", "top_device_30d", "top_channel_30d")]
)

# Fresh events reach the online store through this push source, between batch builds.
user_behaviour_push = PushSource(name="user_behaviour_push", batch_source=offline_source("user_behaviour"))

# What the user did: windowed counts, recency, spend, conversion, category affinity, device mix.
# A row stamped T holds the state after the user's events before T, windows ending at their newest
# event. Kept for applications that read it; models read ``user_behaviour_now`` (request time).
user_behaviour = FeatureView(
    name="user_behaviour",
    entities=[user],
    ttl=timedelta(days=3650),
    schema=_behaviour_fields,
    source=user_behaviour_push,
    online=True,
    tags={"family": "behaviour"},
)

# Fresh activity tiles reach the online store through this push source.
user_activity_push = PushSource(name="user_activity_push", batch_source=offline_source("user_activity"))

# What the user did, hour by hour: tiles for the 30 days before their newest event and the newest
# time of each event type (JSON), from which the request-time windows below are summed.
user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=timedelta(days=36500),  # an idle user's tiles stay; the windows, not the TTL, empty them out
    schema=[Field(name="activity_tiles", dtype=String), Field(name="activity_last", dtype=String)],
    source=user_activity_push,
    online=True,
    tags={"family": "behaviour"},
)

# Fresh queries and recent titles reach the online store through this push source.
user_text_push = PushSource(name="user_text_push", batch_source=offline_source("user_text"))

# What the user said and looked at: recent queries and the titles of their recent sequence items
# (views included), newest first, for BERT;
# the last search and its time tell the service whether a search intent is still in session.
# ``text_state`` keeps their times, so a push can fold new events in; models do not read it.
user_text = FeatureView(
    name="user_text",
    entities=[user],
    ttl=timedelta(days=3650),
    schema=[Field(name="recent_queries", dtype=String), Field(name="recent_titles", dtype=String),
            Field(name="last_search_query", dtype=String), Field(name="last_search_at", dtype=UnixTimestamp),
            Field(name="text_state", dtype=String)],  # the fold's state (JSON), read back by the push
    source=user_text_push,
    online=True,
    tags={"family": "text"},
)

# Fresh sequence slots reach the online store through this push source.
user_sequence_push = PushSource(name="user_sequence_push", batch_source=offline_source("user_sequence"))

# The order of what the user did: the newest 100 (hour, item, type) slots of the configured sequence
# types (views included), oldest first, as JSON lists: items, types, the hour's start (epoch seconds)
# and the events in the slot (a burst of views of one item is one slot). The user tower's sequence
# encoder reads the newest of them.
user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=timedelta(days=36500),  # a user's history does not expire: an idle user comes back to it
    schema=[Field(name="sequence_items", dtype=String), Field(name="sequence_types", dtype=String),
            Field(name="sequence_times", dtype=String), Field(name="sequence_counts", dtype=String)],
    source=user_sequence_push,
    online=True,
    tags={"family": "behaviour"},
)

# What the item is and how it sells: catalogue attributes and daily popularity and CTR.
item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=timedelta(days=36500),  # the catalogue row is stamped at epoch and must stay visible
    schema=[
        Field(name="title", dtype=String), Field(name="category", dtype=String),
        Field(name="top_category", dtype=String), Field(name="brand", dtype=String),
        Field(name="description", dtype=String), Field(name="price", dtype=Float64),
        Field(name="views_7d", dtype=Int64), Field(name="views_30d", dtype=Int64),
        Field(name="clicks_7d", dtype=Int64), Field(name="clicks_30d", dtype=Int64),
        Field(name="purchases_7d", dtype=Int64), Field(name="purchases_30d", dtype=Int64),
        Field(name="ctr_7d", dtype=Float64), Field(name="ctr_30d", dtype=Float64),
    ],
    source=offline_source("item_features"),
    online=True,
    tags={"family": "item"},
)

# The request itself: device, channel and time are only known when the request arrives.
request_context = RequestSource(
    name="request_context",
    schema=[Field(name="device", dtype=String), Field(name="channel", dtype=String),
            Field(name="request_timestamp", dtype=UnixTimestamp)],
)


# Context features, computed by the same Python code offline (training) and online (serving).
@on_demand_feature_view(
    sources=[request_context],
    schema=[
        Field(name="hour_sin", dtype=Float64), Field(name="hour_cos", dtype=Float64),
        Field(name="weekday", dtype=Int64), Field(name="is_weekend", dtype=Int64),
        Field(name="context_device", dtype=String), Field(name="context_channel", dtype=String),
    ],
    mode="python",
    tags={"family": "context"},
)
def context_features(inputs: dict) -> dict:
    import math  # the UDF travels as source through the registry: imports live inside it
    from datetime import UTC, datetime

    out: dict = {"hour_sin": [], "hour_cos": [], "weekday": [], "is_weekend": [],
                 "context_device": [], "context_channel": []}
    for ts, device, channel in zip(inputs["request_timestamp"], inputs["device"], inputs["channel"],
                                   strict=True):
        if isinstance(ts, int | float):  # JSON clients of `feast serve` send epoch seconds or ISO text
            ts = datetime.fromtimestamp(ts, tz=UTC)
        elif isinstance(ts, str):
            ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        hour = ts.hour + ts.minute / 60.0 if ts is not None else 12.0
        weekday = ts.weekday() if ts is not None else 0
        out["hour_sin"].append(math.sin(2 * math.pi * hour / 24))
        out["hour_cos"].append(math.cos(2 * math.pi * hour / 24))
        out["weekday"].append(weekday)
        out["is_weekend"].append(int(weekday >= 5))
        out["context_device"].append(device or "unknown")
        out["context_channel"].append(channel or "unknown")
    return out


# The behaviour features at the request time: "the N days before the request", offline at each
# training row's time and online at each request, by the same code (``pipeline/windows.py``).
@on_demand_feature_view(
    sources=[user_activity, request_context],
    schema=_behaviour_fields,
    mode="python",
    tags={"family": "behaviour"},
)
def user_behaviour_now(inputs: dict) -> dict:
    from datetime import UTC, datetime  # the UDF travels as source through the registry

    from feature_repo.pipeline.windows import BEHAVIOUR_FEATURES, behaviour_at

    out: dict = {name: [] for name in BEHAVIOUR_FEATURES}
    for tiles, last, ts in zip(inputs["activity_tiles"], inputs["activity_last"], inputs["request_timestamp"],
                               strict=True):
        if isinstance(ts, str):
            ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        if ts is None:
            ts = datetime.now(UTC)
        seconds = float(ts) if isinstance(ts, int | float) else (
            ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
        for name, value in behaviour_at(tiles, last, seconds).items():
            out[name].append(value)
    return out


# What the models read of ``user_text``: its features, not the fold's state.
USER_TEXT_FEATURES = ("recent_queries", "recent_titles", "last_search_query", "last_search_at")

# Exactly what profile model v1 reads; the model's metadata names this service.
profile_v1 = FeatureService(
    name="profile_v1",
    features=[user_personal, user_behaviour_now, user_text[list(USER_TEXT_FEATURES)], context_features],
    tags={"model": "profile", "version": "1"},
)

# Exactly what profile model v2 reads: v1 plus the behaviour sequence.
profile_v2 = FeatureService(
    name="profile_v2",
    features=[user_personal, user_behaviour_now, user_text[list(USER_TEXT_FEATURES)], user_sequence,
              context_features],
    tags={"model": "profile", "version": "2"},
)

# The item tower's inputs.
items_v1 = FeatureService(name="items_v1", features=[item_features], tags={"model": "item", "version": "1"})
