"""``persona export``: everything Persona holds about one user, as readable JSON (a subject access request).

Raw rows from the event log (users row, events, quarantined rows), every offline feature row keyed by
the user, the online features, and profile tags derived from them. The service's ``POST /export``
adds the latest ranking with its reasons.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from core import config as config_mod
from core.privacy import Privacy
from eventlog import erase as log_erase
from eventlog.store import EventLog
from feature_repo.pipeline import stores

KEY = "user_id"


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
    if store is None and stores.yaml_path(cfg.workspace).exists():
        store = stores.feature_store(cfg.workspace)
    online = online_features(store, uid) if store is not None else {}
    return {"user_id": uid, "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "pseudonymous": privacy.id_key is not None,
            "raw": {name: records(frame) for name, frame in raw.items()},
            "features": {"offline": offline_features(cfg, uid), "online": online},
            "profile_tags": tags(online)}


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


def offline_features(cfg: config_mod.Config, uid: str) -> dict[str, list[dict]]:
    """The user's rows in every offline table of the profile."""
    out: dict[str, list[dict]] = {}
    if cfg.profile == "prod":
        import sqlalchemy as sa

        engine = sa.create_engine(os.environ["PERSONA_POSTGRES_URL"])
        try:
            with engine.connect() as conn:
                inspector = sa.inspect(conn)
                for name in sorted(inspector.get_table_names()):
                    if name.startswith("persona_") and KEY in {c["name"] for c in inspector.get_columns(name)}:
                        frame = pd.read_sql(sa.text(f'SELECT * FROM "{name}" WHERE {KEY} = :u'), conn,
                                            params={"u": uid})
                        out[name.removeprefix("persona_")] = records(frame)
        finally:
            engine.dispose()
        return out
    folder = Path(cfg.workspace) / "offline"
    for name in stores.TABLES:
        path = folder / name if cfg.profile == "spark" else folder / f"{name}.parquet"
        if not path.exists():
            continue
        frame = pd.read_parquet(path)
        if KEY in frame:
            out[name] = records(frame[frame[KEY] == uid])
    return out


def online_features(store, uid: str) -> dict[str, dict]:
    """Each user-keyed view's online values for the user."""
    out = {}
    for view in store.list_feature_views(allow_cache=True):
        if KEY not in view.join_keys:
            continue
        refs = [f"{view.name}:{f.name}" for f in view.features]
        row = store.get_online_features(features=refs, entity_rows=[{KEY: uid}]).to_dict()
        out[view.name] = {k: _plain(v[0]) for k, v in row.items() if k != KEY}
    return out


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, datetime | pd.Timestamp):
        return pd.Timestamp(value).isoformat()
    return value


def tags(online: dict[str, dict]) -> dict:
    """The readable profile: interests, intents, segment, the personal attributes used."""
    behaviour = online.get("user_behaviour", {})
    text = online.get("user_text", {})
    personal = online.get("user_personal", {})
    cats = [behaviour.get(f"top_category_{n}_30d") for n in (1, 2, 3)]
    queries = text.get("recent_queries")
    purchases = behaviour.get("purchase_count_30d") or 0
    return {"top_categories": [c for c in cats if isinstance(c, str)],
            "recent_intents": queries.split(" | ")[:3] if isinstance(queries, str) and queries else [],
            "segment": "buyer" if purchases >= 3 else "shopper" if purchases >= 1 else "browser",
            "age_band": personal.get("age_band"), "membership": personal.get("membership"),
            "known_online": any(v is not None for view in online.values() for v in view.values())}


def latest_ranking(cfg: config_mod.Config, uid: str, online: dict[str, dict], k: int = 10) -> dict | None:
    """The newest model's top ``k`` for the user as of now, with short reasons; None without a model."""
    import os

    from training.workflow import bentoml_home, load_from_bentoml, recommend

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
    recs = recommend(model, stores.feature_store(cfg.workspace), events, items, cfg.positives, k, [uid], now)
    info = items.set_index("item_id")
    interests = set(tags(online)["top_categories"])
    return {"model": tag, "as_of": now.isoformat(), "items": [
        {"rank": int(r.rank), "item_id": r.item_id, "score": round(float(r.score), 4),
         "title": info["title"].get(r.item_id), "reasons": _reasons(info["category"].get(r.item_id), interests)}
        for r in recs.itertuples()]}


def _reasons(category, interests: set[str]) -> list[str]:
    if isinstance(category, str) and category in interests:
        return [f"matches your interest in {category.split('>')[-1].lower()}"]
    return ["picked for your profile"]


def write(data: dict, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    return output
