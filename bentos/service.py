"""Persona's BentoML service: /rank, /profile and /events over one workspace.

The model comes from the BentoML model store (``PERSONA_MODEL_TAG``, default the latest
``persona-profile``, packaged into the bento by ``persona build``); features come only through its
Feast FeatureServices; the whole catalogue's item vectors sit in one tensor on the device and are
rebuilt when a newer model or a changed catalogue appears. Query text goes through a separate
``TextEncoder`` service with adaptive batching. Events are validated with the ingestion gate,
appended to the event log first, and then the user's fresh state is pushed online, so the next
/rank and /profile see them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, Field

WORKSPACE = Path(os.environ.get("PERSONA_WORKSPACE", "workspace")).resolve()
os.environ.setdefault("BENTOML_HOME", str(WORKSPACE / "bentoml"))
MODEL_TAG = os.environ.get("PERSONA_MODEL_TAG", "latest")
MODEL_REF = f"persona-profile:{MODEL_TAG}"  # training.workflow.MODEL_NAME
PINNED = MODEL_TAG != "latest"  # a pinned tag is never swapped for a newer model
REFRESH_SECONDS = float(os.environ.get("PERSONA_REFRESH_SECONDS", "30"))
SESSION_GAP = timedelta(minutes=30)  # a search this recent is still the live query (as in training)
TEXT_CACHE_SIZE = 50_000  # user-text embeddings kept in memory (about 75 MB for MiniLM)
MAX_EVENTS = 500
MAX_BODY_BYTES = 2_000_000
MAX_CANDIDATES = 10_000
logger = logging.getLogger("persona.service")


class RequestGuard:
    """Reject what the API cannot take with a JSON 4xx before it reaches BentoML.

    - an API key, when ``PERSONA_API_KEY`` is set (401; the health probes stay open);
    - a POST body that is not JSON (415) or larger than ``MAX_BODY_BYTES`` (413).
    """

    OPEN = ("/healthz", "/livez", "/readyz", "/metrics", "/docs", "/docs.json", "/")

    def __init__(self, app) -> None:
        self.app = app
        self.key = os.environ.get("PERSONA_API_KEY")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope.get("headers") or []}
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
            problem = None
            if self.key and given != self.key:
                problem = (401, "missing or wrong API key (header X-API-Key)")
            elif scope.get("method") == "POST":
                if not headers.get("content-type", "").lower().startswith("application/json"):
                    problem = (415, "send the request body as JSON (Content-Type: application/json)")
                elif int(headers.get("content-length") or 0) > MAX_BODY_BYTES:
                    problem = (413, f"request body over {MAX_BODY_BYTES} bytes")
            if problem:
                from starlette.responses import JSONResponse

                await JSONResponse({"error": problem[1]}, status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class StoreUnavailable(RuntimeError):
    """The online store did not answer: a clear 503, and the next request tries again."""


def _unavailable(ctx: bentoml.Context, exc: StoreUnavailable) -> dict[str, Any]:
    ctx.response.status_code = HTTPStatus.SERVICE_UNAVAILABLE
    return {"error": str(exc), "retry": True}


class RequestContext(BaseModel):
    device: str | None = Field(None, max_length=256, examples=["app"])
    channel: str | None = Field(None, max_length=256, examples=["search"])
    timestamp: datetime | None = Field(None, description="Request time; defaults to now (UTC).")


@dataclass(frozen=True)
class Ranker:
    """One model and the catalogue's item vectors, swapped as a whole so a request sees one version."""

    tag: str
    model: Any
    meta: dict
    catalogue: str  # fingerprint of the items and their materialised features
    item_ids: list[str]
    item_index: dict[str, int]
    catalogue_table: Any  # the event log's items table (what the push path joins events to)
    item_info: list[dict]  # title, category and weekly views per item, for the reasons
    item_vectors: Any  # (n_items, dim) tensor on the device

    @property
    def history_lookup(self):
        """The catalogue the user tower reads the user's engaged items from."""
        from training.model import Catalogue

        return Catalogue(self.item_index, self.item_vectors)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(tag: str, device: str):
    """A model from the store (the bento's own store when built), with its text cache bounded."""
    from training.workflow import load_from_bentoml

    model, meta, full_tag = load_from_bentoml(tag, device)
    model.text_cache_size = TEXT_CACHE_SIZE
    return full_tag, model, meta


def _utc(value) -> Any:
    import pandas as pd

    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts


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


@bentoml.service(resources={"gpu": 1, "cpu": "2"}, traffic={"timeout": 30})
class Persona:
    model_ref = bentoml.models.BentoModel(MODEL_REF)  # packaged into the bento by `persona build`
    encoder = bentoml.depends(TextEncoder)

    def __init__(self) -> None:
        from eventlog.store import EventLog
        from feature_repo.pipeline import stores
        from persona import config

        self.cfg = config.load(WORKSPACE)
        self.device = _device()
        self.store = stores.feature_store(WORKSPACE)
        self.log = EventLog(self.cfg.resolved_event_log_url())
        self.lock = threading.Lock()
        self.user_service = self._user_service()
        self.ranker = self._ranker(*_load_model(str(self.model_ref.tag), self.device))
        self.encoder_tag: str | None = None  # the model the encoder runs; the batch path needs ours
        self.watcher: asyncio.Task | None = None

    @bentoml.on_startup
    async def _start_watching(self) -> None:
        self.watcher = asyncio.create_task(self._watch())

    @bentoml.on_shutdown
    async def _stop_watching(self) -> None:
        if self.watcher:
            self.watcher.cancel()

    # --- model and catalogue -------------------------------------------------------------------
    def _catalogue_fingerprint(self) -> str:
        """Changes when items are added or updated, or item features are materialised again."""
        import sqlalchemy as sa

        from eventlog.store import items

        with self.log.engine.connect() as conn:
            count, updated = conn.execute(sa.select(sa.func.count(), sa.func.max(items.c.updated_at))).one()
        view = self.store.get_feature_view("item_features", allow_registry_cache=False)
        materialised = view.materialization_intervals[-1][1] if view.materialization_intervals else None
        return f"{count}|{updated}|{materialised}"

    def _ranker(self, tag: str, model, meta: dict, fingerprint: str | None = None) -> Ranker:
        """Item vectors for the whole catalogue, in one tensor on the device."""
        import torch

        from training.dataset import online_catalogue
        from training.model import in_batches

        fingerprint = fingerprint or self._catalogue_fingerprint()
        table = self.log.read_table("items")
        item_ids = table["item_id"].astype(str).tolist()
        items = online_catalogue(self.store, item_ids)
        with torch.no_grad():
            vectors = in_batches(model.item_vectors, items, 512).to(self.device)
        info = items.reindex(columns=["item_title", "item_category", "item_views_7d"]).to_dict("records")
        return Ranker(tag, model, meta, fingerprint, item_ids, {i: n for n, i in enumerate(item_ids)}, table, info,
                      vectors)

    def _changed_ranker(self) -> Ranker | None:
        """A ranker for a newer model (unless pinned) or a changed catalogue; None when nothing changed."""
        current = self.ranker
        latest = current.tag if PINNED else str(bentoml.models.get(MODEL_REF).tag)
        fingerprint = self._catalogue_fingerprint()
        if latest != current.tag:
            return self._ranker(*_load_model(latest, self.device), fingerprint=fingerprint)
        if fingerprint != current.catalogue:
            return self._ranker(current.tag, current.model, current.meta, fingerprint=fingerprint)
        return None

    def _user_service(self):
        """The registry lookup costs ~4 ms: fetched at start and on each refresh tick, not per request."""
        from training.dataset import USER_SERVICE

        return self.store.get_feature_service(USER_SERVICE, allow_cache=False)

    async def _sync_encoder(self, tag: str) -> None:
        if self.encoder_tag != tag:
            remote = getattr(self.encoder, "to_async", None)  # a local instance when run in-process
            self.encoder_tag = await remote.use_model(tag) if remote else self.encoder.use_model(tag)

    async def _watch(self) -> None:
        """Every ``PERSONA_REFRESH_SECONDS``: swap in a newer model or a changed catalogue.

        The encoder switches first; until it runs the same model, query text is encoded in process.
        """
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                self.user_service = await asyncio.to_thread(self._user_service)  # `features apply` may change it
                fresh = await asyncio.to_thread(self._changed_ranker)
                await self._sync_encoder((fresh or self.ranker).tag)
                if fresh is not None:
                    self.ranker = fresh
                    logger.info("ranker refreshed: model %s, catalogue %s (%d items)", fresh.tag, fresh.catalogue,
                                len(fresh.item_ids))
            except Exception as exc:  # noqa: BLE001 - keep serving the current version; try again next tick
                logger.warning("refresh skipped: %s: %s", type(exc).__name__, exc)

    # --- features ---------------------------------------------------------------------------------
    def _user_frame(self, user_id: str, query: str | None, context: RequestContext | None):
        """Online user + context features; the live query is the request's, else the session's last search."""
        import pandas as pd

        ctx = context or RequestContext()
        when = _utc(ctx.timestamp or datetime.now(UTC))
        row = {"user_id": user_id, "device": ctx.device, "channel": ctx.channel, "request_timestamp": when}
        try:
            frame = self.store.get_online_features(features=self.user_service, entity_rows=[row]).to_df()
        except Exception as exc:  # noqa: BLE001 - Redis, SQLite and gRPC raise different types
            raise StoreUnavailable(f"online feature store unavailable: {type(exc).__name__}") from exc
        source = "request" if query else None
        last_search = frame["last_search_query"].iloc[0] if "last_search_query" in frame else None
        # A search within the session gap is the live query: the same rule that made the training rows.
        if not query and isinstance(last_search, str) and (
                pd.Timedelta(0) <= when - _utc(frame["last_search_at"].iloc[0]) <= SESSION_GAP):
            query, source = last_search, "session"
        frame["query"] = query
        frame["request_timestamp"] = when  # the sequence's time gaps are measured to the request
        known = pd.notna(frame.get("view_count_30d", pd.Series([None])).iloc[0]) or pd.notna(
            frame.get("age", pd.Series([None])).iloc[0])
        return frame, bool(known), source

    def _user_vector(self, ranker: Ranker, frame, batched: bool):
        """With a query the text goes through the batching encoder; without, the cached in-process one."""
        import torch

        from training.model import user_text

        text = None
        if batched and ranker.model.bert is not None and ranker.model.cfg.use_text and self.encoder_tag == ranker.tag:
            try:
                encoded = np.array(self.encoder.encode(user_text(frame)), dtype=np.float32)
                text = torch.from_numpy(encoded).to(self.device)
            except Exception as exc:  # noqa: BLE001 - overloaded or restarting: encode in process instead
                logger.warning("text encoder unavailable (%s); encoding in process", type(exc).__name__)
        with torch.no_grad():
            return ranker.model.user_vectors(frame, text, catalogue=ranker.history_lookup)

    def _seen(self, user_id: str) -> set[str]:
        import sqlalchemy as sa

        from eventlog.store import events

        with self.log.engine.connect() as conn:
            rows = conn.execute(sa.select(events.c.item_id).where(
                events.c.user_id == user_id, events.c.event_type.in_(list(self.cfg.positives)),
                events.c.item_id.is_not(None)).distinct())
            return {r[0] for r in rows}

    @bentoml.api(route="/rank")
    def rank(
        self,
        user_id: Annotated[str, Field(min_length=1, max_length=256, examples=["u000001"])],
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
        import torch

        ranker = self.ranker
        try:
            frame, known, source = self._user_frame(user_id, query, context)
        except StoreUnavailable as exc:
            return _unavailable(ctx, exc)
        live_query = frame["query"].iloc[0]
        with torch.no_grad():
            user = self._user_vector(ranker, frame, batched=live_query is not None)
            scores = ranker.model.score(user, ranker.item_vectors).squeeze(0)
        allowed = torch.ones(len(ranker.item_ids), dtype=torch.bool, device=scores.device)
        unknown: list[str] = []
        if candidates is not None:
            allowed[:] = False
            for c in candidates:
                if c in ranker.item_index:
                    allowed[ranker.item_index[c]] = True
                else:
                    unknown.append(c)
        if exclude_seen:
            for item in self._seen(user_id):
                if item in ranker.item_index:
                    allowed[ranker.item_index[item]] = False
        scores = scores.masked_fill(~allowed, float("-inf"))
        top = torch.topk(scores, min(k, int(allowed.sum()))) if allowed.any() else None
        results, user_row = [], frame.iloc[0]
        if top is not None:
            for score, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                item = ranker.item_info[idx]
                results.append({"item_id": ranker.item_ids[idx], "score": round(float(score), 4),
                                "title": item.get("item_title"),
                                "reasons": _reasons(user_row, item, live_query, source)})
        return {"user_id": user_id, "items": results, "cold_start": not known, "unknown_candidates": unknown,
                "query": live_query, "query_source": source, "model": ranker.tag}

    @bentoml.api(route="/profile")
    def profile(self, user_id: Annotated[str, Field(min_length=1, max_length=256, examples=["u000001"])],
                ctx: bentoml.Context = None) -> dict[str, Any]:
        """The profile vector and a readable summary of the user."""
        ranker = self.ranker
        try:
            frame, known, _ = self._user_frame(user_id, None, None)
        except StoreUnavailable as exc:
            return _unavailable(ctx, exc)
        import torch

        vector = torch.nn.functional.normalize(self._user_vector(ranker, frame, batched=False), dim=-1)
        vector = vector.squeeze(0).cpu().tolist()  # unit length: ranking is by cosine
        row = frame.iloc[0]
        return {"user_id": user_id, "known": known, "vector": [round(v, 5) for v in vector],
                "summary": _summary(row, self._last_event(user_id))}

    def _last_event(self, user_id: str) -> str | None:
        import sqlalchemy as sa

        from eventlog.store import events

        with self.log.engine.connect() as conn:
            ts = conn.execute(sa.select(sa.func.max(events.c.event_timestamp)).where(
                events.c.user_id == user_id)).scalar()
        return ts.isoformat() + "Z" if ts is not None else None

    @bentoml.api(route="/events")
    def post_events(self, events: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_EVENTS)],
                    ctx: bentoml.Context) -> dict[str, Any]:
        """Validate, append to the event log (idempotent on event_id), then push fresh features."""
        import pandas as pd

        from eventlog.ingest import ingest
        from eventlog.sources import Batch, StructuralError, normalise
        from feature_repo.pipeline.build import push_users
        from validation.gate import Gate, GateSettings

        try:
            tb = normalise("events", pd.DataFrame(events), "request")
        except StructuralError as exc:
            ctx.response.status_code = 422
            return {"accepted": [], "rejected": [{"index": None, "reason": str(exc).replace("request: ", "")}]}
        v = self.cfg.validation
        gate = Gate(GateSettings(max_reject_share=1.0, clock_skew_minutes=v.clock_skew_minutes,
                                 on_schema_drift="accept", engine="pandas"))  # the same suites, in-process
        with self.lock:
            report, result = ingest(Batch("POST /events", {"events": tb}), self.log, gate)
        verdict = result.verdicts["events"]
        rejected = [{"index": row, "event_id": tb.frame["event_id"].iloc[row],
                     "reasons": [{"rule": x.rule, "column": x.column, "reason": x.reason} for x in vs]}
                    for row, vs in sorted(verdict.violations.items())]
        ok = [i for i in range(len(tb.frame)) if i not in verdict.violations]
        users = sorted(set(tb.frame["user_id"].iloc[ok].dropna()))
        online = "updated"
        try:
            ranker = self.ranker
            known_items = set(tb.frame["item_id"].iloc[ok].dropna()) <= ranker.item_index.keys()
            push_users(self.store, self.log, users, items=ranker.catalogue_table if known_items else None)
        except Exception as exc:  # noqa: BLE001 - the events are safe in the log; features catch up at the next build
            online = f"deferred: online store unavailable ({type(exc).__name__}); the events are in the event log"
            ctx.response.status_code = HTTPStatus.ACCEPTED
        if rejected:
            ctx.response.status_code = 422
        return {"accepted": [tb.frame["event_id"].iloc[i] for i in ok], "rejected": rejected,
                "pushed_users": users if online == "updated" else [], "online_update": online}


def _reasons(user, item, query: str | None, source: str | None) -> list[str]:
    import pandas as pd

    reasons = []
    if query and isinstance(item.get("item_title"), str):
        words = set(query.lower().split()) & set(item["item_title"].lower().replace(",", " ").split())
        if words:
            recent = "recent " if source == "session" else ""
            reasons.append(f"matches your {recent}search for '{' '.join(sorted(words))}'")
    category = item.get("item_category")
    for n in (1, 2, 3):
        top = user.get(f"top_category_{n}_30d")
        if isinstance(top, str) and top == category:
            reasons.append(f"matches your interest in {category.split('>')[-1].lower()}")
            break
    views = item.get("item_views_7d")
    if pd.notna(views) and views >= 20:
        reasons.append("popular this week")
    return reasons or ["picked for your profile"]


def _summary(row, last_event: str | None) -> dict[str, Any]:
    import pandas as pd

    def num(name):
        v = row.get(name)
        return 0 if v is None or pd.isna(v) else v

    cats = [row.get(f"top_category_{n}_30d") for n in (1, 2, 3)]
    purchases, clicks = num("purchase_count_30d"), num("click_count_30d")
    segment = ("new" if num("view_count_30d") + clicks == 0 else "buyer" if purchases >= 3
               else "shopper" if purchases >= 1 else "browser")
    queries = row.get("recent_queries")
    return {"top_categories": [c for c in cats if isinstance(c, str)],
            "recent_intents": queries.split(" | ")[:3] if isinstance(queries, str) and queries else [],
            "segment": segment, "last_event": last_event, "age_band": row.get("age_band"),
            "activity_30d": {"views": int(num("view_count_30d")), "clicks": int(clicks),
                             "purchases": int(purchases), "spend": round(float(num("spend_30d")), 2)}}


Persona.add_asgi_middleware(RequestGuard)
