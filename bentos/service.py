"""Persona's BentoML service: /rank, /profile and /events over one workspace.

The model comes from the BentoML model store (``PERSONA_MODEL_TAG``, default the latest
``persona-profile``, packaged into the bento by ``persona build``); features come only through its
Feast FeatureServices; the item vectors of every item with online features sit in one tensor on the
device and are rebuilt when a newer model or a changed catalogue appears. Query text goes through a
separate ``TextEncoder`` service with adaptive batching. Events are validated with the ingestion gate,
appended to the event log first, and then the user's fresh state is pushed online, so the next
/rank and /profile see them.

The ``Persona`` class only routes; each job is its own small piece, in the order a request meets them:

- ``edge.py``: ``RequestGuard`` (API key, non-JSON, a body over 2 MB however it arrives) and ``answer``
  (a store outage is a 503 to retry; any other failure a JSON 500, with its cause in the log);
- ``intake.py``: /events: bounds on fields outside the contract, the gate, the append, the push;
- here, ``UserFeatures`` and ``UserHistory``: one user's online features, and what the event log says;
- here, ``Rankers``, ``QueryEncoder`` and ``top_items``: the model with its item vectors, the user vector, top-k;
- ``answers.py``: ``rank_answer`` and ``profile_answer`` (with ``reasons`` and ``summary``), the wording.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import bentoml
import numpy as np
from pydantic import BaseModel, Field, field_validator

from bentos import explorer, privacy_routes
from bentos.answers import profile_answer, rank_answer, reasons, summary  # noqa: F401 - the wording, re-exported
from bentos.edge import (  # noqa: F401 - re-exported: the edge is part of this service's API
    MAX_BODY_BYTES,
    QuietClientErrors,
    RequestGuard,
    StoreUnavailable,
    _incident,
    answer,
    is_outage,
)
from bentos.intake import MAX_UNKNOWN_FIELD_BYTES, MAX_UNKNOWN_FIELDS, Intake, UserLocks  # noqa: F401
from core.contract import is_null

WORKSPACE = Path(os.environ.get("PERSONA_WORKSPACE", "workspace")).resolve()
os.environ.setdefault("BENTOML_HOME", str(WORKSPACE / "bentoml"))
MODEL_TAG = os.environ.get("PERSONA_MODEL_TAG", "latest")
MODEL_REF = f"persona-profile:{MODEL_TAG}"  # training.workflow.MODEL_NAME
PINNED = MODEL_TAG != "latest"  # a pinned tag is never swapped for a newer model
REFRESH_SECONDS = float(os.environ.get("PERSONA_REFRESH_SECONDS", "30"))
SESSION_GAP = timedelta(minutes=30)  # a search this recent is still the live query (as in training)
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)  # request times taken
# Text embeddings kept in memory (about 75 MB for MiniLM at 50k).
TEXT_CACHE_SIZE = int(os.environ.get("PERSONA_TEXT_CACHE_SIZE", "50000"))
THREADS = int(os.environ.get("PERSONA_THREADS", "4"))  # requests the ranking service runs side by side
TORCH_THREADS = int(os.environ.get("PERSONA_TORCH_THREADS", "1"))  # torch's threads per request
TIMINGS = os.environ.get("PERSONA_TIMINGS") == "1"  # /rank answers carry their per-stage times (timings_ms)
MAX_EVENTS = 500
MAX_CANDIDATES = 10_000
logger = logging.getLogger("persona.service")
logger.setLevel(logging.INFO)  # the server's root logger stops at WARNING: refreshes are worth a line


# --- the model and the catalogue -----------------------------------------------------------------------
@dataclass(frozen=True)
class Ranker:
    """One model and the catalogue's item vectors, swapped as a whole so a request sees one version."""

    tag: str
    model: Any
    meta: dict
    catalogue: str  # fingerprint of the items and their materialised features
    item_ids: list[str]  # the ranked items: those with online features
    item_index: dict[str, int]
    catalogue_ids: frozenset[str]  # every item in the event log, materialised or not
    item_info: list[dict]  # title, category and weekly views per item, for the reasons
    item_vectors: Any  # (n_items, dim) tensor on the device

    @property
    def history_lookup(self):
        """The catalogue the user tower reads the user's engaged items from."""
        from training.model import Catalogue

        return Catalogue(self.item_index, self.item_vectors)

    @functools.cached_property
    def unit_vectors(self):
        """The item vectors at unit length, once per ranker: ranking is by cosine, and normalising the
        whole catalogue on every request cost more than the matmul and top-k together."""
        import torch

        with torch.inference_mode():
            return torch.nn.functional.normalize(self.item_vectors, dim=-1)


def _torch_threads() -> None:
    """Requests run side by side (``PERSONA_THREADS``), each on one core: torch's own threads on top
    of them fought for the same cores (on 2 vCPUs under load, a user tower's p90 went from 8 ms with
    one thread to 175 ms with two)."""
    import torch

    torch.set_num_threads(TORCH_THREADS)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(tag: str, device: str):
    """A model from the store (the bento's own store when built), with its text cache bounded."""
    from training.workflow import load_from_bentoml

    model, meta, full_tag = load_from_bentoml(tag, device)
    model.text_cache_size = TEXT_CACHE_SIZE
    return full_tag, model, meta


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block (a catalogue rebuild: its 10k-row frames set off
    full collections that stopped every request for 0.1-1 s); then the young generations only."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.collect(1)
            gc.enable()


@functools.cache
def _freeze_startup_heap() -> None:
    """Once, after the first ranker is built (before any request): import what /events needs (the gate
    brings in Great Expectations), collect, then move every object alive (modules, the model, the first
    catalogue) to the collector's permanent generation. Full collections walked that heap on the request
    path, 0.5-1.2 s each on 2 vCPUs, set off by the allocations of a catalogue rebuild or a push; they now
    walk only what came later."""
    import gc
    import importlib

    for module in ("ingestion.ingest", "validation.gate", "feature_repo.pipeline.build"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    gc.collect()
    gc.freeze()


class Rankers:
    """Builds rankers: a model with the vectors of the items whose features are online.

    An item appended to the event log but not materialised yet has no features online: it is left out
    (null title, the same vector as every other such item) until ``features materialize`` brings them.
    """

    def __init__(self, store, log, device: str, workspace: Path) -> None:
        self.store, self.log, self.device, self.workspace = store, log, device, workspace

    def fingerprint(self) -> str:
        """Changes when items are added or updated, or item features are materialised again (by Feast,
        or by the sync of changed keys that follows it: a new item's features come that way)."""
        import sqlalchemy as sa

        from eventlog.store import items
        from feature_repo.pipeline.online import SYNC_FILE

        with self.log.engine.connect() as conn:
            count, updated = conn.execute(sa.select(sa.func.count(), sa.func.max(items.c.updated_at))).one()
        view = self.store.get_feature_view("item_features", allow_registry_cache=False)
        materialised = view.materialization_intervals[-1][1] if view.materialization_intervals else None
        try:
            synced = (self.workspace / "feast" / SYNC_FILE).stat().st_mtime_ns
        except OSError:  # never synced
            synced = None
        return f"{count}|{updated}|{materialised}|{synced}"

    def build(self, tag: str, model, meta: dict, fingerprint: str | None = None) -> Ranker:
        import torch

        from training.dataset import online_catalogue
        from training.model import in_batches

        fingerprint = fingerprint or self.fingerprint()
        with _collector_paused():  # it runs beside requests: no full collections set off by its objects
            table = self.log.read_table("items")
            logged = table["item_id"].astype(str).tolist()
            online = online_catalogue(self.store, logged)
            features = [c for c in online.columns if c != "item_id"]
            served = online[online[features].notna().any(axis=1)].reset_index(drop=True)
            with torch.no_grad():
                vectors = in_batches(model.item_vectors, served, 512) if len(served) else torch.zeros(0, model.cfg.dim)
            item_ids = served["item_id"].astype(str).tolist()
            info = served.reindex(columns=["item_title", "item_category", "item_views_7d"]).to_dict("records")
            ranker = Ranker(tag, model, meta, fingerprint, item_ids, {i: n for n, i in enumerate(item_ids)},
                            frozenset(logged), info, vectors.to(self.device))
        _freeze_startup_heap()
        return ranker

    def changed(self, current: Ranker) -> Ranker | None:
        """A ranker for a newer model (unless pinned) or a changed catalogue; None when nothing changed."""
        latest = current.tag if PINNED else str(bentoml.models.get(MODEL_REF).tag)
        fingerprint = self.fingerprint()
        if latest != current.tag:
            return self.build(*_load_model(latest, self.device), fingerprint=fingerprint)
        if fingerprint != current.catalogue:
            return self.build(current.tag, current.model, current.meta, fingerprint=fingerprint)
        return None


# --- one user's features -------------------------------------------------------------------------------
class RequestContext(BaseModel):
    device: str | None = Field(None, max_length=256, examples=["app"])
    channel: str | None = Field(None, max_length=256, examples=["search"])
    timestamp: datetime | None = Field(None, description="Request time; defaults to now (UTC).")

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, value: datetime | None) -> datetime | None:
        """Times the feature code can compute with (pandas' nanosecond range ends in 2262)."""
        if value is not None and not EARLIEST <= (value if value.tzinfo else value.replace(tzinfo=UTC)) < LATEST:
            raise ValueError(f"timestamp must be in [{EARLIEST:%Y-%m-%d}, {LATEST:%Y-%m-%d})")
        return value


class UserFrame(NamedTuple):
    frame: Any  # one row: the model's input
    known: bool  # the online store has the user
    source: str | None  # where the live query came from: "request", "session" or None


def _utc(value) -> Any:
    import pandas as pd

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
        from training.dataset import USER_SERVICE

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
        import pandas as pd

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
                pd.Timedelta(0) <= when - _utc(values["last_search_at"]) <= SESSION_GAP):
            query, source = last_search, "session"
        values["query"] = query
        values["request_timestamp"] = when  # the sequence's time gaps are measured to the request
        known = any(not is_null(values.get(name)) for name in stored)  # on-demand features have values for anyone
        return UserFrame(one_row_frame(values), known, source)


def one_row_frame(values: dict[str, Any]):
    """One request's values as a one-row frame of Python objects, the model's input: one object block, no
    type inference (20 us, where Feast's ``to_df`` took 670 us, more than the user tower's forward pass).
    The model converts each column itself, as it does for a training frame."""
    import pandas as pd

    cells = np.empty((1, len(values)), dtype=object)
    cells[0, :] = list(values.values())
    return pd.DataFrame(cells, columns=list(values), dtype=object)


class UserHistory:
    """What the event log says about one user: the items to leave out, and the newest event.

    The statements are built once: building one per request cost twice what running it did (SQLite)."""

    def __init__(self, log, positives: Iterable[str]) -> None:
        import sqlalchemy as sa

        from eventlog.store import events

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


# --- ranking -------------------------------------------------------------------------------------------
class Laps:
    """Wall time per stage of one request, in ms: ``PERSONA_TIMINGS=1`` adds them to the answer as
    ``timings_ms`` (with their ``total``), else they are only counted."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """The time since the previous lap goes to ``stage``."""
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - self.last) * 1000
        self.last = now

    def attach(self, body: dict[str, Any], stage: str) -> dict[str, Any]:
        """``body``, its making timed as ``stage``, with ``timings_ms`` when timings are on."""
        self.lap(stage)
        if TIMINGS:
            total = (self.last - self.start) * 1000
            body["timings_ms"] = {k: round(v, 3) for k, v in {**self.ms, "total": total}.items()}
        return body


def _log_pauses(threshold_ms: float = 20.0) -> None:
    """With timings on, what can stall a request goes to the log: each garbage collection longer than
    ``threshold_ms``, and each Feast registry refresh (a request that finds the cache expired does it)."""
    import gc

    started: dict[str, float] = {}

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            ms = (time.perf_counter() - started.pop("t")) * 1000
            if ms > threshold_ms:
                logger.warning("gc pause %.0f ms (generation %d)", ms, info["generation"])

    gc.callbacks.append(watch)
    logging.getLogger("feast.infra.registry.caching_registry").setLevel(logging.INFO)


if TIMINGS:
    _log_pauses()


class QueryEncoder:
    """Query text through the batching ``TextEncoder`` service, once that runs the ranker's model."""

    def __init__(self, encoder: Callable[[], Any]) -> None:
        self.encoder = encoder  # the dependency, looked up when used
        self.tag: str | None = None  # the model the encoder runs

    async def follow(self, tag: str) -> None:
        if self.tag != tag:
            encoder = self.encoder()
            remote = getattr(encoder, "to_async", None)  # a local instance when run in-process
            self.tag = await remote.use_model(tag) if remote else encoder.use_model(tag)

    def encode(self, ranker: Ranker, frame):
        """The user text's vectors, or None: then the model encodes it in process (cached)."""
        import torch

        from training.model import user_text

        if ranker.model.bert is None or not ranker.model.cfg.use_text or self.tag != ranker.tag:
            return None
        try:
            encoded = np.array(self.encoder().encode(user_text(frame)), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - overloaded or restarting: encode in process instead
            logger.warning("text encoder unavailable (%s); encoding in process", type(exc).__name__)
            return None
        return torch.from_numpy(encoded).to(ranker.item_vectors.device)


def user_vector(ranker: Ranker, frame, text=None):
    """The user tower's vector (inference mode: no autograd bookkeeping at all, unlike ``no_grad``)."""
    import torch

    with torch.inference_mode():
        return ranker.model.user_vectors(frame, text, catalogue=ranker.history_lookup)


class Ranked(NamedTuple):
    indices: list[int]  # rows of the ranker's items, best first
    scores: list[float]
    unknown: list[str]  # candidates the ranker does not rank


def top_items(ranker: Ranker, user, k: int, candidates: list[str] | None, leave_out: set[str]) -> Ranked:
    """The k best items for the user vector, among the candidates (all items if None), less ``leave_out``."""
    import torch

    with torch.inference_mode():  # the model's score (cosine / temperature), over the cached unit vectors
        unit_user = torch.nn.functional.normalize(user, dim=-1)
        scores = (unit_user @ ranker.unit_vectors.T / ranker.model.cfg.temperature).squeeze(0)
    # Rows set in one indexed write each: element by element, a user with 2,500 seen items cost 5 ms.
    unknown = []
    if candidates is None:
        allowed = torch.ones(len(ranker.item_ids), dtype=torch.bool, device=scores.device)
    else:
        rows = [ranker.item_index.get(c) for c in candidates]
        unknown = [c for c, row in zip(candidates, rows, strict=True) if row is None]
        allowed = torch.zeros(len(ranker.item_ids), dtype=torch.bool, device=scores.device)
        allowed[_row_tensor([row for row in rows if row is not None], scores.device)] = True
    allowed[_row_tensor([ranker.item_index[i] for i in leave_out if i in ranker.item_index], scores.device)] = False
    if not allowed.any():
        return Ranked([], [], unknown)
    top = torch.topk(scores.masked_fill(~allowed, float("-inf")), min(k, int(allowed.sum())))
    return Ranked(top.indices.tolist(), top.values.tolist(), unknown)


def _row_tensor(rows: list[int], device):
    import torch

    return torch.tensor(rows, dtype=torch.long, device=device)


# --- the services --------------------------------------------------------------------------------------
@bentoml.service(resources={"gpu": 1, "cpu": "1"}, workers=1, traffic={"timeout": 30})
class TextEncoder:
    """BERT over user text with adaptive batching: concurrent /rank queries share one forward pass."""

    model_ref = bentoml.models.BentoModel(MODEL_REF)

    def __init__(self) -> None:
        self.device = _device()
        self.tag, self.model, _ = _load_model(str(self.model_ref.tag), self.device)

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=20)
    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.encode_text(texts, self.model.cfg.user_max_len).float().cpu().numpy()

    @bentoml.api
    def use_model(self, tag: str) -> str:
        """Switch to ``tag`` (the ranking service calls this when it swaps models)."""
        if tag != self.tag:
            self.tag, self.model, _ = _load_model(tag, self.device)
        return self.tag

    @bentoml.api
    def clear_texts(self) -> bool:
        """Drop the cached text vectors (``/forget``: they may hold an erased user's queries)."""
        if self.model.texts is not None:
            with self.model.texts.lock:
                self.model.texts.vectors.clear()
        return True


UserId = Annotated[str, Field(min_length=1, max_length=256, examples=["u000001"])]


@bentoml.asgi_app(explorer.create_app(WORKSPACE), path=explorer.MOUNT)  # the profile explorer at /ui
@bentoml.service(resources={"gpu": 1, "cpu": "2"}, traffic={"timeout": 30}, threads=THREADS)
class Persona:
    """The API: each method hands its request to the pieces above."""

    model_ref = bentoml.models.BentoModel(MODEL_REF)  # packaged into the bento by `persona build`
    encoder = bentoml.depends(TextEncoder)

    def __init__(self) -> None:
        from core import config
        from eventlog import tombstones
        from eventlog.store import EventLog
        from feature_repo.pipeline import stores

        _torch_threads()
        cfg = config.load(WORKSPACE)
        store = stores.feature_store(WORKSPACE)
        log = EventLog(cfg.resolved_event_log_url())
        self.rankers = Rankers(store, log, _device(), WORKSPACE)
        self.features = UserFeatures(store)
        self.history = UserHistory(log, cfg.positives)
        self.intake = Intake(cfg, log, store)
        self.cfg = cfg
        self.queries = QueryEncoder(lambda: self.encoder)
        self.ranker = self.rankers.build(*_load_model(str(self.model_ref.tag), self.rankers.device))
        self.watcher: asyncio.Task | None = None
        self.erased_count = tombstones.count(log.engine)  # a new tombstone clears the caches (each tick)

    @bentoml.on_startup
    async def _start_watching(self) -> None:
        self.watcher = asyncio.create_task(self._watch())

    @bentoml.on_shutdown
    async def _stop_watching(self) -> None:
        if self.watcher:
            self.watcher.cancel()

    async def _watch(self) -> None:
        """Every ``PERSONA_REFRESH_SECONDS``: swap in a newer model or a changed catalogue.

        The encoder switches first; until it runs the same model, query text is encoded in process.
        """
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await asyncio.to_thread(self._follow_erasures)  # `persona forget` run beside the service
                self.features.service = await asyncio.to_thread(self.features.fetch_service)  # `features apply`
                fresh = await asyncio.to_thread(self.rankers.changed, self.ranker)
                await self.queries.follow((fresh or self.ranker).tag)
                if fresh is not None:
                    self.ranker = fresh
                    logger.info("ranker refreshed: model %s, catalogue %s (%d items ranked of %d)", fresh.tag,
                                fresh.catalogue, len(fresh.item_ids), len(fresh.catalogue_ids))
            except Exception as exc:  # noqa: BLE001 - keep serving the current version; try again next tick
                logger.warning("refresh skipped: %s: %s", type(exc).__name__, exc)

    def _follow_erasures(self) -> None:
        """A new tombstone (``persona forget`` from the CLI, or another replica's /forget): drop the
        cached text vectors, which may hold an erased user's queries."""
        from eventlog import tombstones

        count = tombstones.count(self.history.log.engine)
        if count != self.erased_count:
            privacy_routes.clear_caches(self)
            logger.info("caches cleared after an erasure (%d tombstones)", count)
        self.erased_count = count

    @bentoml.api(route="/rank")
    def rank(
        self,
        user_id: UserId,
        query: Annotated[str | None, Field(max_length=1000, examples=["waterproof trail running shoes"])] = None,
        context: RequestContext | None = None,
        candidates: Annotated[list[str] | None, Field(max_length=MAX_CANDIDATES)] = None,
        k: Annotated[int, Field(ge=1, le=200)] = 10,
        exclude_seen: bool = True,
        ctx: bentoml.Context = None,
    ) -> dict[str, Any]:
        """Rank the catalogue (or the candidates) for a user, with an optional live query.

        If the online store is down the answer is a 503 with a JSON reason (no degraded ranking):
        ranking without the user's features would silently be a different product.
        """
        user_id = self.intake.privacy.user_id(user_id)  # a raw id becomes its pseudonym when those are on

        def work() -> dict[str, Any]:
            laps, ranker = Laps(), self.ranker
            user = self.features.read(user_id, query, context, laps)
            laps.lap("frame")
            live = user.frame["query"].iloc[0] is not None  # with a query: the batching encoder
            text = self.queries.encode(ranker, user.frame) if live else None
            laps.lap("query_encode")
            vector = user_vector(ranker, user.frame, text)
            laps.lap("user_tower")
            leave_out = self.history.seen(user_id) if exclude_seen else set()
            laps.lap("seen")
            ranked = top_items(ranker, vector, k, candidates, leave_out)
            laps.lap("top_k")
            return laps.attach(rank_answer(user_id, ranker, ranked, user), "answer")

        return answer(ctx, "/rank", user_id, work)

    @bentoml.api(route="/profile")
    def profile(self, user_id: UserId, ctx: bentoml.Context = None) -> dict[str, Any]:
        """The profile vector and a readable summary of the user."""
        user_id = self.intake.privacy.user_id(user_id)

        def work() -> dict[str, Any]:
            import torch

            user = self.features.read(user_id, None, None)
            vector = torch.nn.functional.normalize(user_vector(self.ranker, user.frame), dim=-1)
            # unit length: ranking is by cosine
            return profile_answer(user_id, user, vector.squeeze(0).cpu().tolist(), self.history.last_event(user_id))

        return answer(ctx, "/profile", user_id, work)

    @bentoml.api(route="/events")
    def post_events(self, events: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_EVENTS)],
                    ctx: bentoml.Context) -> dict[str, Any]:
        """Validate, append to the event log (idempotent on event_id), then push fresh features."""
        def work() -> dict[str, Any]:
            status, body = self.intake.post(events)
            ctx.response.status_code = status
            return body

        return answer(ctx, "/events", "-", work)

    @bentoml.api(route="/forget")
    def forget(self, user_ids: Annotated[list[UserId], Field(min_length=1, max_length=100,
                                                             examples=[["u_to_erase"]])],
               reason: Annotated[str | None, Field(max_length=500)] = None, ctx: bentoml.Context = None
               ) -> dict[str, Any]:
        """Erase users everywhere (see `persona forget`) and clear the caches. Needs the API key."""
        if not privacy_routes.key_configured():
            ctx.response.status_code = HTTPStatus.FORBIDDEN
            return privacy_routes.refused()
        if bad := privacy_routes.unreadable(user_ids):
            ctx.response.status_code = HTTPStatus.BAD_REQUEST
            return bad
        return answer(ctx, "/forget", "-", lambda: privacy_routes.forget(self, self.cfg, user_ids, reason))

    @bentoml.api(route="/export")
    def export(self, user_id: UserId, ctx: bentoml.Context = None) -> dict[str, Any]:
        """Everything held about the user, with the profile and the latest ranking. Needs the API key."""
        if not privacy_routes.key_configured():
            ctx.response.status_code = HTTPStatus.FORBIDDEN
            return privacy_routes.refused()
        if bad := privacy_routes.unreadable([user_id]):
            ctx.response.status_code = HTTPStatus.BAD_REQUEST
            return bad

        def work() -> dict[str, Any]:
            uid, ranker = self.intake.privacy.user_id(user_id), self.ranker
            user = self.features.read(uid, None, None)
            vector = user_vector(ranker, user.frame)
            profile = profile_answer(uid, user, vector.squeeze(0).cpu().tolist(), self.history.last_event(uid))
            ranking = rank_answer(uid, ranker, top_items(ranker, vector, 10, None, self.history.seen(uid)), user)
            return privacy_routes.export(self, self.cfg, uid, profile, ranking)

        return answer(ctx, "/export", user_id, work)


Persona.add_asgi_middleware(RequestGuard)
