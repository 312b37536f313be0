"""Persona's BentoML service: /rank, /profile, /events, /forget and /export over one workspace.

The model comes from the BentoML model store (``PERSONA_MODEL_TAG``, default the latest, packaged into the
bento by ``persona build``); features come only through its Feast FeatureServices. The ``Persona`` class
only routes; each job is its own module, in the order a request meets them:

- ``edge.py``: ``RequestGuard`` (API key, non-JSON, oversized bodies) and ``answer`` (a store outage is a
  503 to retry; any other failure a JSON 500, with its cause in the log);
- ``intake.py``: /events: bounds, the gate, the append, the push; ``privacy_routes.py``: /forget, /export;
- ``user_state.py``: one user's online features, and what the event log says;
- ``ranking.py``: the model with its item vectors, the user vector, top-k;
- ``answers.py``: the wording; ``settings.py``: the ``PERSONA_*`` settings; ``explorer.py``: /ui;
- ``metrics_labels.py``: Prometheus labels by route (a path may hold a user id).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Annotated, Any

import bentoml
import numpy as np
import torch
from pydantic import Field

from bentos import explorer, metrics_labels, privacy_routes, settings
from bentos.answers import profile_answer, rank_answer
from bentos.edge import UI_MOUNT, RequestGuard, answer
from bentos.intake import Intake
from bentos.ranking import (
    QueryEncoder,
    Rankers,
    best_device,
    load_model,
    rank_items,
    set_torch_threads,
    user_vector,
)
from bentos.timings import Laps
from bentos.user_state import RequestContext, UserFeatures, UserHistory
from core import config
from eventlog import tombstones
from eventlog.store import EventLog
from feature_repo.pipeline.registry import feature_store

metrics_labels.install()  # before BentoML builds the app: a metric is labelled by route, never by a user's id

logger = logging.getLogger("persona.service")
logger.setLevel(logging.INFO)  # the server's root logger stops at WARNING: refreshes are worth a line


# --- the services --------------------------------------------------------------------------------------
@bentoml.service(resources={"gpu": 1, "cpu": "1"}, workers=1, traffic={"timeout": 30})
class TextEncoder:
    """BERT over user text with adaptive batching: concurrent /rank queries share one forward pass."""

    model_ref = bentoml.models.BentoModel(settings.MODEL_REF)

    def __init__(self) -> None:
        self.device = best_device()
        self.tag, self.model, _ = load_model(str(self.model_ref.tag), self.device)

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=20)
    def encode(self, texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return self.model.encode_text(texts, self.model.cfg.user_max_len).float().cpu().numpy()

    @bentoml.api
    def use_model(self, tag: str) -> str:
        """Switch to ``tag`` (the ranking service calls this when it swaps models)."""
        if tag != self.tag:
            self.tag, self.model, _ = load_model(tag, self.device)
        return self.tag

    @bentoml.api
    def clear_texts(self) -> bool:
        """Drop the cached text vectors (``/forget``: they may hold an erased user's queries)."""
        if self.model.texts is not None:
            with self.model.texts.lock:
                self.model.texts.vectors.clear()
        return True


UserId = Annotated[str, Field(min_length=1, max_length=256, examples=["u000001"])]


@bentoml.asgi_app(explorer.create_app(settings.WORKSPACE), path=UI_MOUNT)  # the profile explorer at /ui
@bentoml.service(resources={"gpu": 1, "cpu": "2"}, traffic={"timeout": 30}, threads=settings.THREADS)
class Persona:
    """The API: each method hands its request to the modules named above."""

    model_ref = bentoml.models.BentoModel(settings.MODEL_REF)  # packaged into the bento by `persona build`
    encoder = bentoml.depends(TextEncoder)

    def __init__(self) -> None:
        set_torch_threads()
        cfg = config.load(settings.WORKSPACE)
        store = feature_store(settings.WORKSPACE)
        log = EventLog(cfg.resolved_event_log_url())
        self.rankers = Rankers(store, log, best_device(), settings.WORKSPACE)
        self.features = UserFeatures(store)
        self.history = UserHistory(log, cfg.positives)
        self.intake = Intake(cfg, log, store)
        self.cfg = cfg
        self.queries = QueryEncoder(lambda: self.encoder)
        self.ranker = self.rankers.build(*load_model(str(self.model_ref.tag), self.rankers.device))
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
            await asyncio.sleep(settings.REFRESH_SECONDS)
            try:
                await asyncio.to_thread(self._follow_erasures)  # `persona forget` run beside the service
                self.features.service = await asyncio.to_thread(self.features.fetch_service)  # `features apply`
                fresh = await asyncio.to_thread(self.rankers.changed, self.ranker)
                await self.queries.follow((fresh or self.ranker).tag)
                if fresh is not None:
                    self.ranker = fresh
                    stage = fresh.two_stage
                    logger.info("ranker refreshed: model %s, catalogue %s (%d items ranked of %d), %s", fresh.tag,
                                fresh.catalogue, len(fresh.item_ids), len(fresh.catalogue_ids),
                                "two towers" if stage is None else f"recall + rank ({stage.spec.scope} requests)")
            except Exception as exc:  # noqa: BLE001 - keep serving the current version; try again next tick
                logger.warning("refresh skipped: %s: %s", type(exc).__name__, exc)

    def _follow_erasures(self) -> None:
        """A new tombstone (``persona forget`` from the CLI, or another replica's /forget): drop the
        cached text vectors, which may hold an erased user's queries."""
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
        candidates: Annotated[list[str] | None, Field(max_length=settings.MAX_CANDIDATES)] = None,
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
            ranked = rank_items(ranker, vector, user.frame, k, candidates, leave_out, user.source == "session")
            laps.lap("top_k")
            return laps.attach(rank_answer(user_id, ranker, ranked, user), "answer")

        return answer(ctx, "/rank", user_id, work)

    @bentoml.api(route="/profile")
    def profile(self, user_id: UserId, ctx: bentoml.Context = None) -> dict[str, Any]:
        """The profile vector and a readable summary of the user."""
        user_id = self.intake.privacy.user_id(user_id)

        def work() -> dict[str, Any]:
            user = self.features.read(user_id, None, None)
            vector = torch.nn.functional.normalize(user_vector(self.ranker, user.frame), dim=-1)
            # unit length: ranking is by cosine
            return profile_answer(user_id, user, vector.squeeze(0).cpu().tolist(), self.history.last_event(user_id))

        return answer(ctx, "/profile", user_id, work)

    @bentoml.api(route="/events")
    def post_events(self, events: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=settings.MAX_EVENTS)],
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
            ranking = rank_answer(uid, ranker, rank_items(ranker, vector, user.frame, 10, None,
                                                          self.history.seen(uid)), user)
            return privacy_routes.export(self, self.cfg, uid, profile, ranking)

        return answer(ctx, "/export", user_id, work)


Persona.add_asgi_middleware(RequestGuard)
