"""The service's privacy pieces: /forget, /export, pseudonymous ids at the edge, erased users at intake.

Kept apart from ``service.py`` so the routes there stay one call each. Both routes need the API key:
without ``PERSONA_API_KEY`` configured they answer 403 instead of being open to anyone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from core.privacy import Privacy

ERASED_RULE = "erased_user"


def key_configured() -> bool:
    return bool(os.environ.get("PERSONA_API_KEY"))


def refused() -> dict[str, Any]:
    return {"error": "this route needs PERSONA_API_KEY set on the server (and sent as X-API-Key)"}


def unreadable(user_ids: list[str]) -> dict[str, Any] | None:
    """Ids no store can hold (a lone surrogate, a NUL): a 400, not a failed erasure."""
    for uid in user_ids:
        try:
            uid.encode()
        except UnicodeEncodeError:
            return {"error": "user ids must be valid UTF-8 text"}
        if "\x00" in uid:
            return {"error": "user ids must not contain NUL"}
    return None


def screen(tb, log, privacy: Privacy):
    """Pseudonymise posted events and take out those of erased users: (batch, positions taken out)."""
    from eventlog.sources import Batch
    from eventlog.tombstones import drop_erased, subset
    from ingestion.screen import pseudonymise_table

    if privacy.id_key:
        tb = pseudonymise_table(tb, privacy)
    _, kept = drop_erased(Batch("POST /events", {"events": tb}), log.engine, privacy.hash)
    mask = kept.get("events")
    if mask is None:
        return tb, []
    return subset(tb, mask), [int(p) for p in np.flatnonzero(~mask)]


def erased_rejection(index: int) -> dict[str, Any]:
    return {"index": index, "event_id": None, "reasons": [
        {"rule": ERASED_RULE, "column": "user_id", "reason": "this user was erased (persona forget); not stored"}]}


def clear_caches(service) -> None:
    """Drop every cached text vector, in this process and in the text encoder: they may be a user's text."""
    from training.model import _TEXT_CACHES, _TEXT_CACHES_LOCK

    with _TEXT_CACHES_LOCK:
        caches = list(_TEXT_CACHES.values())
    for texts in caches:  # every BERT's cache in this process, the ranker's included
        with texts.lock:
            texts.vectors.clear()
    try:
        service.encoder.clear_texts()
    except Exception:  # noqa: BLE001 - an encoder that is down holds nothing to clear after its restart
        logging.getLogger("persona.service").warning("text encoder cache not cleared")


def forget(service, cfg, user_ids: list[str], reason: str | None) -> dict[str, Any]:
    from privacy.forget import forget as run_forget

    report = run_forget(cfg, user_ids, reason, log=service.history.log, clear_caches=lambda: clear_caches(service))
    return report.to_dict() | {"id_hashes": report.id_hashes}


def export(service, cfg, user_id: str, profile: dict, ranking: dict) -> dict[str, Any]:
    from privacy.export import export_user

    data = export_user(cfg, user_id, log=service.history.log, store=service.features.store)
    return data | {"profile": profile, "latest_ranking": ranking}
