"""The profile explorer: the ``/ui`` page and the JSON it reads, mounted on the Persona service.

The page (``bentos/ui/``: plain HTML, JS and CSS, no build step, nothing from a CDN) ranks through the
service's own ``/rank`` and posts what-if events through ``/events``; this module answers what those
endpoints do not: shop counts, the most active and coldest users, one user's features by family with
their freshness and a timeline, validation batches and reports, and the models in the store.

It runs in the Persona worker's process and reads the same workspace (event log, Feast stores, model
store). The page and its static files are open; every ``/ui/api/`` call passes ``RequestGuard`` like
any other endpoint, so the API key protects the data.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import sqlalchemy as sa
from bentoml.exceptions import NotFound
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bentos.edge import incident, is_outage
from core import config
from core.config import MODEL_NAME
from core.plain import iso, plain
from eventlog.store import EventLog, events, items
from eventlog.store import batches as batch_table
from eventlog.store import users as user_table
from feature_repo.pipeline.feast_adapter import read_rows
from feature_repo.pipeline.profile import SEGMENT_FEATURES, summary
from feature_repo.pipeline.registry import feature_store
from feature_repo.pipeline.windows import decode, tiles_of
from training.dataset import USER_SERVICE

UI_DIR = Path(__file__).with_name("ui")
FAMILIES = ("personal", "behaviour", "context", "text")
TIMELINE_EVENTS = 25
USERS_LISTED = 12
MAX_USERS_LISTED = 100
BATCHES_LISTED = 10
DAYS_CHARTED = 60
REPORT_SUFFIXES = {".html": "text/html; charset=utf-8", ".md": "text/markdown; charset=utf-8",
                   ".png": "image/png", ".json": "application/json"}


# --- the workspace, opened once per process --------------------------------------------------------------
class Workspace:
    """The event log, the Feast store and the settings of one workspace, opened on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    @cached_property
    def cfg(self):
        return config.load(self.root)

    @cached_property
    def log(self):
        return EventLog(self.cfg.resolved_event_log_url())

    @cached_property
    def store(self):
        with self._lock:
            return feature_store(self.root)

    def read_json(self, *parts: str) -> dict | None:
        path = self.root.joinpath(*parts)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


# --- small helpers --------------------------------------------------------------------------------------
def _when(text: str | None) -> datetime:
    """The request time the page asks about (default: now)."""
    if not text:
        return datetime.now(UTC)
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


# --- the shop -------------------------------------------------------------------------------------------
def shop(ws: Workspace) -> dict[str, Any]:
    """Everything the shop view shows, in one answer."""
    counts = ws.log.counts()
    lo, hi = ws.log.time_range()
    return {"counts": counts, "oldest_event": iso(lo), "newest_event": iso(hi),
            "active_users": active_users(ws, hi), "events_per_day": events_per_day(ws, hi),
            "batches": batches(ws), "reports": validation_reports(ws), "models": models(ws),
            "freshness": view_freshness(ws), "profile": ws.cfg.profile,
            "event_types": behaviour_types(ws)}


def behaviour_types(ws: Workspace) -> list[dict[str, Any]]:
    """The declared behaviour types (built-in and the shop's own, ``behaviours:`` in persona.yaml), in
    declaration order, with what each means: the chart's legend and the timeline's kinds."""
    return [{"type": name, "weight": b.weight, "sequence": name in ws.cfg.sequence_types, "exposure": b.exposure}
            for name, b in ws.cfg.behaviours.items()]


def active_users(ws: Workspace, newest: datetime | None) -> dict[str, int]:
    """Users with an event in the last 1, 7 and 30 days before the newest event (the shop's clock)."""
    if newest is None:
        return {"1d": 0, "7d": 0, "30d": 0}
    end = newest.replace(tzinfo=None)
    out = {}
    with ws.log.engine.connect() as conn:
        for name, days in (("1d", 1), ("7d", 7), ("30d", 30)):
            out[name] = conn.execute(sa.select(sa.func.count(sa.distinct(events.c.user_id))).where(
                events.c.event_timestamp > end - timedelta(days=days))).scalar_one()
    return out


def events_per_day(ws: Workspace, newest: datetime | None) -> list[dict[str, Any]]:
    """Events per day and type over the last ``DAYS_CHARTED`` days of the log, oldest first."""
    if newest is None:
        return []
    day = sa.func.date(events.c.event_timestamp)
    start = newest.replace(tzinfo=None) - timedelta(days=DAYS_CHARTED)
    stmt = (sa.select(day, events.c.event_type, sa.func.count()).where(events.c.event_timestamp > start)
            .group_by(day, events.c.event_type))
    per_day: dict[str, Counter] = {}
    with ws.log.engine.connect() as conn:
        for when, kind, n in conn.execute(stmt):
            per_day.setdefault(str(when)[:10], Counter())[kind] += n
    return [{"day": d, "total": sum(c.values()), "by_type": dict(c)} for d, c in sorted(per_day.items())]


def batches(ws: Workspace, limit: int = BATCHES_LISTED) -> list[dict[str, Any]]:
    """The newest batches with their rows, accepted and quarantined counts per table."""
    stmt = sa.select(batch_table).order_by(batch_table.c.created_at.desc()).limit(limit)
    with ws.log.engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    out = []
    for row in rows:
        recorded = json.loads(row["summary"] or "{}")
        tables = recorded.get("tables", {})
        out.append({"batch_id": row["batch_id"], "source": row["source"], "created_at": iso(row["created_at"]),
                    "status": row["status"], "kind": recorded.get("kind"),
                    "hold_reasons": recorded.get("hold_reasons") or [],
                    "rows": sum(t.get("rows", 0) for t in tables.values()),
                    "accepted": sum(t.get("accepted", 0) for t in tables.values()),
                    "quarantined": sum(t.get("quarantined", 0) for t in tables.values()),
                    "tables": {k: {n: t.get(n) for n in ("rows", "accepted", "quarantined", "rules")}
                               for k, t in tables.items()}})
    return out


def batch_detail(ws: Workspace, batch_id: str) -> dict[str, Any] | None:
    """One batch's recorded summary and its quarantined rows (the first 100)."""
    recorded = ws.log.batch_summary(batch_id)
    if recorded is None:
        return None
    rows = ws.log.quarantined()
    rows = rows[rows["batch_id"] == batch_id].head(100)
    cols = ["id", "table_name", "row_number", "record_key", "rule", "column_name", "reason", "status"]
    return {"batch_id": batch_id, "summary": json.loads(recorded),
            "quarantined": [{k: plain(v) for k, v in r.items()} for r in rows[cols].to_dict("records")]}


def validation_reports(ws: Workspace, limit: int = BATCHES_LISTED) -> list[dict[str, Any]]:
    """The data-quality summaries `persona validate` wrote, newest first (paths under reports/)."""
    folder = ws.cfg.reports_dir / "validation"
    found = sorted(folder.glob("*/summary.html"), reverse=True)[:limit] if folder.is_dir() else []
    return [{"name": p.parent.name, "html": str(p.relative_to(ws.cfg.reports_dir)),
             "md": str(p.with_suffix(".md").relative_to(ws.cfg.reports_dir))} for p in found]


def report_file(ws: Workspace, relative: str) -> Path | None:
    """A file under the workspace's reports folder, never outside it."""
    base = ws.cfg.reports_dir.resolve()
    try:  # a NUL or an over-long name in the path is no such report, not a 500 (or a 503 "outage")
        path = (base / relative).resolve()
        if not path.is_relative_to(base) or not path.is_file() or path.suffix not in REPORT_SUFFIXES:
            return None
    except (ValueError, OSError):
        return None
    return path


def models(ws: Workspace) -> list[dict[str, Any]]:
    """The profile models in the store, newest first, with their overall metrics."""
    try:
        found = sorted(bentoml.models.list(MODEL_NAME), key=lambda m: m.info.creation_time, reverse=True)
    except NotFound:
        return []
    out = []
    for m in found:
        meta = m.info.metadata or {}
        rows = [r for r in meta.get("metrics", []) if isinstance(r, dict) and r.get("segment") == "all"]
        out.append({"tag": str(m.tag), "created": iso(m.info.creation_time), "splits": meta.get("splits"),
                    "data_window": meta.get("data_window"), "feature_service": meta.get("feature_services"),
                    "metrics": [{k: plain(v) for k, v in r.items() if k in (
                        "split", "model", "NDCG@10", "Recall@10", "Recall@50", "MRR@10", "coverage", "AUC")}
                        for r in rows]})
    return out


def view_freshness(ws: Workspace) -> list[dict[str, Any]]:
    """Per feature view: its family, when it was last materialised, and its rows in the last build."""
    store = ws.store
    build = ws.read_json("feast", "last_build.json") or {}
    sync = ws.read_json("feast", "online_sync.json") or {}
    out = []
    for view in sorted(store.list_feature_views(allow_cache=False), key=lambda v: v.name):
        end = view.materialization_intervals[-1][1] if view.materialization_intervals else None
        out.append({"view": view.name, "family": view.tags.get("family"), "materialized_to": iso(end),
                    "rows_in_build": (build.get("rows") or {}).get(view.name), "built_at": iso(build.get("built_at")),
                    "synced_at": iso(sync.get("synced_at"))})
    for view in sorted(store.list_on_demand_feature_views(allow_cache=False), key=lambda v: v.name):
        out.append({"view": view.name, "family": view.tags.get("family"), "on_demand": True,
                    "materialized_to": None, "rows_in_build": None, "built_at": None, "synced_at": None})
    return out


# --- users ----------------------------------------------------------------------------------------------
def users(ws: Workspace, limit: int = USERS_LISTED) -> dict[str, Any]:
    """The most active users (events in the last 30 days of the log) and the coldest (fewest events), with
    the devices and channels seen and the newest event: what the page's pickers offer."""
    _, newest = ws.log.time_range()
    since = (newest or datetime.now(UTC)).replace(tzinfo=None) - timedelta(days=30)
    n, last = sa.func.count(events.c.event_id), sa.func.max(events.c.event_timestamp)
    active = (sa.select(events.c.user_id, n.label("events"), last.label("last_event"))
              .where(events.c.event_timestamp > since).group_by(events.c.user_id)
              .order_by(n.desc(), events.c.user_id).limit(limit))
    cold = (sa.select(user_table.c.user_id, n.label("events"), last.label("last_event"))
            .select_from(user_table.outerjoin(events, events.c.user_id == user_table.c.user_id))
            .group_by(user_table.c.user_id).order_by(n, last, user_table.c.user_id).limit(limit))
    with ws.log.engine.connect() as conn:
        out: dict[str, Any] = {name: [{"user_id": u, "events": int(k), "last_event": iso(t)}
                                      for u, k, t in conn.execute(stmt)] for name, stmt in (("active", active),
                                                                                             ("cold", cold))}
        for name, column in (("devices", events.c.device), ("channels", events.c.channel)):
            out[name] = sorted(v for (v,) in conn.execute(sa.select(column).where(column.is_not(None))
                                                          .distinct().limit(20)))
    return out | {"newest_event": iso(newest)}


def timeline(ws: Workspace, user_id: str, limit: int = TIMELINE_EVENTS) -> list[dict[str, Any]]:
    """The user's newest events with the item's title, newest first."""
    stmt = (sa.select(events.c.event_timestamp, events.c.event_type, events.c.item_id, items.c.title,
                      items.c.category, events.c.query, events.c.device, events.c.channel, events.c.value)
            .select_from(events.outerjoin(items, items.c.item_id == events.c.item_id))
            .where(events.c.user_id == user_id)
            .order_by(events.c.event_timestamp.desc(), events.c.event_id.desc()).limit(limit))
    with ws.log.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    keys = ("time", "type", "item_id", "title", "category", "query", "device", "channel", "value")
    return [{k: plain(v) if k != "time" else iso(v) for k, v in zip(keys, row, strict=True)} for row in rows]


def user(ws: Workspace, user_id: str, at: datetime, device: str | None, channel: str | None) -> dict[str, Any]:
    """One user as the model sees them at ``at``: features by family, their freshness, tags, timeline."""
    features = online_features(ws, user_id, at, device, channel)
    written = view_timestamps(ws, user_id)
    known = any(written.values())
    return {"user_id": user_id, "known": known, "at": iso(at), "tags": tags(ws, features, known),
            "families": families(ws, features, written), "timeline": timeline(ws, user_id)}


def online_features(ws: Workspace, user_id: str, at: datetime, device: str | None,
                    channel: str | None) -> dict[str, dict[str, Any]]:
    """Every feature the model reads for the user at ``at``, by view: {view: {feature: value}}."""
    service = ws.store.get_feature_service(USER_SERVICE, allow_cache=True)
    row = {"user_id": user_id, "device": device, "channel": channel, "request_timestamp": at}
    # Short names: Feast drops on-demand outputs from a full-name answer; names are unique in the service.
    values = ws.store.get_online_features(features=service, entity_rows=[row]).to_df().iloc[0]
    out = {p.name: {f.name: plain(values.get(f.name)) for f in p.features} for p in service.feature_view_projections}
    activity = ws.store.get_online_features(features=["user_activity:activity_tiles"],
                                            entity_rows=[{"user_id": user_id}]).to_df().iloc[0]
    out["user_activity"] = {"activity_tiles": plain(activity.get("activity_tiles"))}  # the on-demand view's input
    return out


def view_timestamps(ws: Workspace, user_id: str) -> dict[str, str | None]:
    """When each stored user view was last written online for this user (None: no row)."""
    service = ws.store.get_feature_service(USER_SERVICE, allow_cache=True)
    on_demand = {v.name for v in ws.store.list_on_demand_feature_views(allow_cache=True)}
    out: dict[str, str | None] = {}
    for name in [p.name for p in service.feature_view_projections if p.name not in on_demand] + ["user_activity"]:
        view = ws.store.get_feature_view(name, allow_registry_cache=True)
        (ts, _), = read_rows(ws.store, name, [user_id], [f.name for f in view.features][:1])  # with its timestamp
        out[name] = iso(ts)
    return out


def families(ws: Workspace, features: dict[str, dict[str, Any]], written: dict[str, str | None]) -> dict:
    """Views grouped by their ``family`` tag, each with its features and when it was written."""
    tagged = {v.name: v.tags.get("family") for v in ws.store.list_feature_views(allow_cache=True)}
    tagged |= {v.name: v.tags.get("family") for v in ws.store.list_on_demand_feature_views(allow_cache=True)}
    out: dict[str, list[dict[str, Any]]] = {f: [] for f in FAMILIES}
    for view, values in features.items():
        family = tagged.get(view) or "other"
        out.setdefault(family, []).append({"view": view, "written_at": written.get(view),
                                           "on_demand": view not in written, "features": _shown(values)})
    return out


def _shown(values: dict[str, Any]) -> dict[str, Any]:
    """Long JSON states (tiles, sequences) are summarised: the page shows features, not blobs."""
    out = {}
    for name, value in values.items():
        if isinstance(value, str) and len(value) > 300 and value[:1] in "[{":
            try:
                parsed = json.loads(value)
                value = f"({len(parsed)} entries, {len(value):,} characters of JSON)"
            except ValueError:
                value = value[:300] + "…"
        out[name] = value
    return out


# --- the profile's tags ---------------------------------------------------------------------------------
def tags(ws: Workspace, features: dict[str, dict[str, Any]], known: bool) -> list[dict[str, Any]]:
    """The profile summary as tags; each names the features it was read from."""
    flat = {k: v for values in features.values() for k, v in values.items()}
    seg = summary(flat, None)["segment"] if known else "cold start"
    out = [_tag("segment", [seg], list(SEGMENT_FEATURES))]
    cats = [(flat.get(f"top_category_{n}_30d"), flat.get(f"top_category_{n}_share_30d")) for n in (1, 2, 3)]
    out.append(_tag("top categories", [f"{c.split('>')[-1]} {s:.0%}" if isinstance(s, float) else c
                                       for c, s in cats if isinstance(c, str)],
                    [f"top_category_{n}_30d" for n in (1, 2, 3)] + [f"top_category_{n}_share_30d" for n in (1, 2, 3)]))
    out.append(_tag("price band", [price_band(ws, flat.get("avg_price_engaged_30d"))],
                    ["avg_price_engaged_30d", "item_features.price (catalogue quartiles)"]))
    out.append(_tag("favourite brands", favourite_brands(ws, flat.get("sequence_items")),
                    ["sequence_items", "item_features.brand"]))
    out.append(_tag("active hours", active_hours(flat.get("activity_tiles")), ["activity_tiles"]))
    device = [v for v in (flat.get("top_device_30d"), flat.get("top_channel_30d")) if isinstance(v, str)]
    out.append(_tag("device", device, ["top_device_30d", "top_channel_30d"]))
    intents = flat.get("recent_queries")
    out.append(_tag("recent intents", intents.split(" | ")[:3] if isinstance(intents, str) and intents else [],
                    ["recent_queries", "last_search_query"]))
    return out


def _tag(name: str, values: list, sources: list[str]) -> dict[str, Any]:
    return {"name": name, "values": [str(v) for v in values if v not in (None, "")], "features": sources}


def price_band(ws: Workspace, avg_price) -> str | None:
    """Budget / mid / upper / premium: where the user's average engaged price sits in the catalogue."""
    if not isinstance(avg_price, int | float) or not math.isfinite(avg_price):
        return None
    q1, q2, q3 = _price_quartiles(ws)
    band = "budget" if avg_price <= q1 else "mid" if avg_price <= q2 else "upper" if avg_price <= q3 else "premium"
    return f"{band} (avg {avg_price:,.2f})"


_quartile_cache: dict[str, tuple[float, float, float]] = {}


def _price_quartiles(ws: Workspace) -> tuple[float, float, float]:
    with ws.log.engine.connect() as conn:
        count, updated = conn.execute(sa.select(sa.func.count(), sa.func.max(items.c.updated_at))).one()
        key = f"{count}/{updated}"
        if key not in _quartile_cache:
            prices = [p for (p,) in conn.execute(sa.select(items.c.price).where(items.c.price.is_not(None)))]
            q = np.quantile(prices, [0.25, 0.5, 0.75]) if prices else (0.0, 0.0, 0.0)
            _quartile_cache.clear()
            _quartile_cache[key] = tuple(float(x) for x in q)
    return _quartile_cache[key]


def favourite_brands(ws: Workspace, sequence_json, top: int = 3) -> list[str]:
    """The brands most present among the user's last engaged items (the model's sequence)."""
    try:
        seq = json.loads(sequence_json) if isinstance(sequence_json, str) else []
    except ValueError:
        return []
    if not seq:
        return []
    with ws.log.engine.connect() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.brand).where(items.c.item_id.in_(set(seq))))
        brand = {item: name for item, name in rows}
    counts = Counter(brand[i] for i in seq if brand.get(i))
    return [b for b, _ in counts.most_common(top)]


def active_hours(tiles_json, top: int = 3) -> list[str]:
    """The UTC hours of day with the most events in the user's activity tiles."""
    try:
        tiles = tiles_of(decode(tiles_json, None)) if isinstance(tiles_json, str) else {}
    except ValueError:
        return []
    by_hour: Counter = Counter()
    for hour, tile in tiles.items():
        by_hour[hour % 24] += sum(tile["n"].values())
    return [f"{h:02d}:00–{(h + 1) % 24:02d}:00 UTC" for h, _ in by_hour.most_common(top)]


def _failure(request: Request, exc: Exception) -> Response:
    """A JSON answer, as the API gives: a store that does not answer is a 503 to retry; the rest a 500
    whose cause goes to the log under an incident id (ids only, no user data)."""
    if is_outage(exc):
        return JSONResponse({"error": f"a store is unavailable: {type(exc).__name__}", "retry": True}, status_code=503)
    found = incident(request.url.path, request.path_params.get("user_id", "-"), exc)
    return JSONResponse({"error": "internal error", "retry": False, "incident": found}, status_code=500)


def _guarded(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """The handler, with any failure answered by ``_failure`` (Starlette's own handler re-raises)."""

    def run(request: Request) -> Response:
        try:
            return handler(request)
        except Exception as exc:  # noqa: BLE001 - the one place an explorer call's failure becomes an answer
            return _failure(request, exc)

    return run


# --- the ASGI app -------------------------------------------------------------------------------------------
def create_app(root: Path) -> Starlette:
    """The app mounted at ``/ui``: the page, its static files, and the JSON under ``/api``."""
    ws = Workspace(root)

    def page(_: Request) -> Response:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-store"})

    def shop_view(_: Request) -> Response:
        return JSONResponse(shop(ws))

    def user_list(request: Request) -> Response:
        raw = request.query_params.get("limit", str(USERS_LISTED))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_USERS_LISTED:  # "-1" or "abc": a 400, not every user
            return JSONResponse({"error": f"limit must be a whole number from 1 to {MAX_USERS_LISTED}"},
                                status_code=400)
        return JSONResponse(users(ws, int(raw)))

    def user_view(request: Request) -> Response:
        params = request.query_params
        user_id = request.path_params["user_id"]
        if not 0 < len(user_id) <= 256:
            return JSONResponse({"error": "user_id must be 1 to 256 characters"}, status_code=400)
        try:
            at = _when(params.get("at"))
        except ValueError:
            return JSONResponse({"error": "at must be an ISO time"}, status_code=400)
        return JSONResponse(user(ws, user_id, at, params.get("device") or None, params.get("channel") or None))

    def batch_view(request: Request) -> Response:
        found = batch_detail(ws, request.path_params["batch_id"])
        return JSONResponse(found) if found else JSONResponse({"error": "no such batch"}, status_code=404)

    def report_view(request: Request) -> Response:
        path = report_file(ws, request.path_params["path"])
        if path is None:
            return JSONResponse({"error": "no such report"}, status_code=404)
        return FileResponse(path, media_type=REPORT_SUFFIXES[path.suffix])

    return Starlette(routes=[
        Route("/", page), Route("/index.html", page),
        Route("/api/shop", _guarded(shop_view)), Route("/api/users", _guarded(user_list)),
        Route("/api/users/{user_id:path}", _guarded(user_view)), Route("/api/batches/{batch_id}", _guarded(batch_view)),
        Route("/api/reports/{path:path}", _guarded(report_view)),
        Mount("/static", StaticFiles(directory=UI_DIR, check_dir=False), name="static"),
    ])
