"""One user at request time: their online features with the request's context, and what the event log says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, Field, field_validator

from bentos import settings
from bentos.edge import StoreUnavailable, is_outage
from bentos.timings import Laps
from core.contract import is_null
from eventlog.store import events
from training.dataset import USER_SERVICE


class RequestContext(BaseModel):
    device: str | None = Field(None, max_length=256, examples=["app"])
    channel: str | None = Field(None, max_length=256, examples=["search"])
    timestamp: datetime | None = Field(None, description="Request time; defaults to now (UTC).")

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, value: datetime | None) -> datetime | None:
        """Times the feature code can compute with (pandas' nanosecond range ends in 2262)."""
        earliest, latest = settings.EARLIEST, settings.LATEST
        if value is not None and not earliest <= (value if value.tzinfo else value.replace(tzinfo=UTC)) < latest:
            raise ValueError(f"timestamp must be in [{earliest:%Y-%m-%d}, {latest:%Y-%m-%d})")
        return value


class UserFrame(NamedTuple):
    frame: Any  # one row: the model's input
    known: bool  # the online store has the user
    source: str | None  # where the live query came from: "request", "session" or None


def _utc(value) -> Any:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts


class UserFeatures:
    """One user's online features and the request's context, as the model's input frame."""

    def __init__(self, store) -> None:
        self.store = store
        self.service = self.fetch_service()

    def fetch_service(self) -> tuple[Any, list[str]]:
        """The feature service, with the features it reads from stored views (not computed on demand):
        a user is known when one of those has a value. The registry lookups cost a few ms: done at
        start and on each refresh tick, not per request."""
        self.store.registry.refresh()  # here, each tick: a request never finds Feast's registry cache expired
        service = self.store.get_feature_service(USER_SERVICE, allow_cache=False)
        on_demand = {v.name for v in self.store.list_on_demand_feature_views(allow_cache=True)}
        stored = [f.name for p in service.feature_view_projections if p.name not in on_demand for f in p.features]
        with contextlib.suppress(Exception):  # the first read after a refresh rebuilds Feast's caches: do it here
            self.store.get_online_features(features=service, entity_rows=[
                {"user_id": "", "device": None, "channel": None, "request_timestamp": datetime.now(UTC)}])
        return service, stored

    def read(self, user_id: str, query: str | None, context: RequestContext | None,
             laps: Laps | None = None) -> UserFrame:
        """The live query is the request's, else the session's last search."""
        laps = laps or Laps()
        service, stored = self.service
        ctx = context or RequestContext()
        when = _utc(ctx.timestamp or datetime.now(UTC))
        row = {"user_id": user_id, "device": ctx.device, "channel": ctx.channel, "request_timestamp": when}
        try:
            response = self.store.get_online_features(features=service, entity_rows=[row])
            laps.lap("feast_fetch")
            values = {name: column[0] for name, column in response.to_dict().items()}
            laps.lap("feast_to_df")
        except Exception as exc:
            if is_outage(exc):  # Redis, SQLite and gRPC raise different types
                raise StoreUnavailable(f"online feature store unavailable: {type(exc).__name__}") from exc
            raise
        source = "request" if query else None
        last_search = values.get("last_search_query")
        # A search within the session gap is the live query: the same rule that made the training rows.
        if not query and isinstance(last_search, str) and (
                pd.Timedelta(0) <= when - _utc(values["last_search_at"]) <= settings.SESSION_GAP):
            query, source = last_search, "session"
        values["query"] = query
        values["request_timestamp"] = when  # the sequence's time gaps are measured to the request
        known = any(not is_null(values.get(name)) for name in stored)  # on-demand features have values for anyone
        return UserFrame(one_row_frame(values), known, source)


def one_row_frame(values: dict[str, Any]):
    """One request's values as a one-row frame of Python objects, the model's input: one object block, no
    type inference (20 us, where Feast's ``to_df`` took 670 us, more than the user tower's forward pass).
    The model converts each column itself, as it does for a training frame."""
    cells = np.empty((1, len(values)), dtype=object)
    cells[0, :] = list(values.values())
    return pd.DataFrame(cells, columns=list(values), dtype=object)


class UserHistory:
    """What the event log says about one user: the items to leave out, and the newest event.

    The statements are built once: building one per request cost twice what running it did (SQLite)."""

    def __init__(self, log, positives: Iterable[str]) -> None:
        self.log, self.positives = log, list(positives)
        user = sa.bindparam("user_id")
        self._seen = sa.select(events.c.item_id).where(
            events.c.user_id == user, events.c.event_type.in_(self.positives),
            events.c.item_id.is_not(None)).distinct()
        self._last = sa.select(sa.func.max(events.c.event_timestamp)).where(events.c.user_id == user)

    def seen(self, user_id: str) -> set[str]:
        with self.log.engine.connect() as conn:  # fetched at once: row by row, 2,500 items cost 4 ms
            return set(conn.execute(self._seen, {"user_id": user_id}).scalars().all())

    def last_event(self, user_id: str) -> str | None:
        with self.log.engine.connect() as conn:
            ts = conn.execute(self._last, {"user_id": user_id}).scalar()
        return ts.isoformat() + "Z" if ts is not None else None
