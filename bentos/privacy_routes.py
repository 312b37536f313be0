"""/forget and /export over HTTP: the key check, the id check, and the caches only the service holds.

The work itself is ``privacy/``'s. Both routes need the API key: without ``PERSONA_API_KEY``
configured they answer 403 instead of being open to anyone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from core.config import Config
from privacy.export import export_user
from privacy.forget import forget as run_forget
from training import text_cache


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


def clear_caches(service) -> None:
    """Drop every cached text vector, in this process and in the text encoder: they may be a user's text."""
    text_cache.clear_all()  # every BERT's cache in this process, the ranker's included
    try:
        service.encoder.clear_texts()
    except Exception:  # noqa: BLE001 - an encoder that is down holds nothing to clear after its restart
        logging.getLogger("persona.service").warning("text encoder cache not cleared")


def forget(service, cfg: Config, user_ids: list[str], reason: str | None) -> dict[str, Any]:
    report = run_forget(cfg, user_ids, reason, log=service.history.log, clear_caches=lambda: clear_caches(service))
    return report.to_dict() | {"id_hashes": report.id_hashes}


def export(service, cfg: Config, user_id: str, profile: dict, ranking: dict) -> dict[str, Any]:
    data = export_user(cfg, user_id, log=service.history.log, store=service.features.store)
    return data | {"profile": profile, "latest_ranking": ranking}
