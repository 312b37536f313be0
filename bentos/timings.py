"""Where a request's time goes: per-stage laps, and (with ``PERSONA_TIMINGS=1``) the pauses that stall it."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from bentos import settings

logger = logging.getLogger("persona.service")


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
        if settings.TIMINGS:
            total = (self.last - self.start) * 1000
            body["timings_ms"] = {k: round(v, 3) for k, v in {**self.ms, "total": total}.items()}
        return body


def log_pauses(threshold_ms: float = 20.0) -> None:
    """Log what can stall a request: each garbage collection longer than ``threshold_ms``, and each Feast
    registry refresh (a request that finds the cache expired does it)."""
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


if settings.TIMINGS:
    log_pauses()
