"""``persona export``: everything Persona holds about one user, as readable JSON (a subject access request).

Raw rows from the event log (users row, events, quarantined rows), every offline feature row keyed by
the user and the online features (each store gives its own rows: ``feature_repo/pipeline/erase.py``),
and the readable profile that ``/profile`` shows. The service's ``POST /export``
adds the latest ranking with its reasons.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from core import config as config_mod
from core.privacy import Privacy
from eventlog import erase as log_erase
from eventlog.store import EventLog
from feature_repo.pipeline import erase as store_erase
from feature_repo.pipeline.feast_config import yaml_path
from feature_repo.pipeline.profile import summary
from feature_repo.pipeline.registry import feature_store
from training.dataset import USER_SERVICE
from training.model_store import bentoml_home, load_from_bentoml
from training.workflow import recommend


def export_user(cfg: config_mod.Config, raw_id: str, log: EventLog | None = None, store=None) -> dict:
    privacy = Privacy.for_workspace(cfg.workspace, cfg)
    uid = privacy.user_id(raw_id)
    own_log = log is None
    log = log or EventLog(cfg.resolved_event_log_url())
    try:
        raw = log_erase.user_rows(log, [uid])
    finally:
        if own_log:
            log.dispose()
    if store is None and yaml_path(cfg.workspace).exists():
        store = feature_store(cfg.workspace)
    online = store_erase.online_rows(store, uid) if store is not None else {}
    offline = {name: records(frame) for name, frame in store_erase.offline_rows(cfg.profile, cfg.workspace,
                                                                                 uid).items()}
    now = datetime.now(UTC)
    return {"user_id": uid, "exported_at": now.isoformat(timespec="seconds"),
            "pseudonymous": privacy.id_key is not None,
            "raw": {name: records(frame) for name, frame in raw.items()},
            "features": {"offline": offline, "online": online},
            "profile_tags": profile_tags(store, uid, online, now)}


def export_with_ranking(cfg: config_mod.Config, raw_id: str) -> dict:
    """The CLI's export: everything above plus the newest model's ranking (the service adds its own)."""
    data = export_user(cfg, raw_id)
    data["latest_ranking"] = latest_ranking(cfg, data["user_id"], data["features"]["online"])
    return data


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: ISO times, no NaN, nested JSON text opened up."""
    if frame is None or frame.empty:
        return []
    out = json.loads(frame.to_json(orient="records", date_format="iso", default_handler=str))
    for row in out:
        for key in ("extra", "payload"):
            if isinstance(row.get(key), str):
                with contextlib.suppress(ValueError):
                    row[key] = json.loads(row[key])
    return out


def profile_tags(store, uid: str, online: dict[str, dict], now: datetime) -> dict:
    """The readable profile (the one ``/profile`` and the explorer show), as of ``now``, with the
    personal attributes used and whether the online store knows the user."""
    values: dict = {}
    if store is not None:
        service = store.get_feature_service(USER_SERVICE, allow_cache=True)
        row = store.get_online_features(features=service, entity_rows=[
            {"user_id": uid, "device": None, "channel": None, "request_timestamp": now}]).to_dict()
        values = {k: v[0] for k, v in row.items()}
    personal = online.get("user_personal", {})
    return {**summary(values, None), "membership": personal.get("membership"),
            "known_online": any(v is not None for view in online.values() for v in view.values())}


def latest_ranking(cfg: config_mod.Config, uid: str, online: dict[str, dict], k: int = 10) -> dict | None:
    """The newest model's top ``k`` for the user as of now, with short reasons; None without a model."""
    bentoml_home(cfg.workspace)
    if not (Path(os.environ["BENTOML_HOME"]) / "models").exists():
        return None
    try:
        model, _, tag = load_from_bentoml("latest")
    except Exception:  # noqa: BLE001 - bentoml raises its own NotFound: no model yet
        return None
    log = EventLog(cfg.resolved_event_log_url())
    try:
        events, items = log.read_table("events"), log.read_table("items")
    finally:
        log.dispose()
    now = pd.Timestamp(datetime.now(UTC))
    store = feature_store(cfg.workspace)
    recs = recommend(model, store, events, items, cfg.positives, k, [uid], now)
    info = items.set_index("item_id")
    interests = set(profile_tags(store, uid, online, now)["top_categories"])
    return {"model": tag, "as_of": now.isoformat(), "items": [
        {"rank": int(r.rank), "item_id": r.item_id, "score": round(float(r.score), 4),
         "title": info["title"].get(r.item_id), "reasons": _reasons(info["category"].get(r.item_id), interests)}
        for r in recs.itertuples()]}


def _reasons(category, interests: set[str]) -> list[str]:
    if isinstance(category, str) and category in interests:
        return [f"matches your interest in {category.split('>')[-1].lower()}"]
    return ["picked for your profile"]


def write(data: dict, output: Path) -> Path:
    """The export as UTF-8 JSON, readable by its owner only (it is one person's data)."""
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder: give a file name, such as {output / 'export.json'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    os.chmod(output, 0o600)  # an existing file keeps its mode through O_CREAT: set it
    return output
