"""Windows that end at the request time: per-user hourly tiles, summed inside the window when asked.

A user's activity state is a list of hourly tiles (counts per event type, spend, engaged prices,
categories, devices, channels and distinct items of that hour) for the last ``RETAINED_HOURS`` hours
before their newest event, plus the newest time of each event type (and of any event, ``any``).
Adding an event to a tile commutes, so a late event lands exactly where a rebuild would put it, and a state is the same
whatever order its events arrived in. At request time T, a window of N days sums the tiles of
the 24·N hours up to T's hour (hour-granular, the same rule offline at each training row's time
and online at each request), so an idle user's windows empty out as T moves on.

The functions here are the whole definition: the batch build folds each user's events through
them, and the ``user_behaviour_now`` on-demand view calls :func:`behaviour_at`.
"""

from __future__ import annotations

import json
import math

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "search", "review")
RECENCY_TYPES = ("view", "click", "add_to_cart", "purchase", "search")
PRICED = ("click", "add_to_cart", "purchase")  # engaged events whose item price is averaged
WINDOW_HOURS = {"1d": 24, "7d": 7 * 24, "30d": 30 * 24}
RETAINED_HOURS = WINDOW_HOURS["30d"]  # tiles kept: the longest window
HOUR = 3600


def new_state() -> dict:
    return {"tiles": {}, "last": {}, "text": {}}  # text: each tile's JSON, kept until the tile changes


def add_event(state: dict, ts: float, event_type: str, item_id, category, price, value, device, channel) -> None:
    """Fold one event (epoch seconds ``ts``) into ``state``; the order of calls does not matter."""
    hour = int(ts // HOUR)
    state.setdefault("text", {}).pop(hour, None)
    tile = state["tiles"].setdefault(hour, {"n": {}, "spend": 0.0, "ps": 0.0, "pn": 0, "cat": {}, "dev": {},
                                            "ch": {}, "items": []})
    tile["n"][event_type] = tile["n"].get(event_type, 0) + 1
    if event_type == "purchase":
        paid = value if _number(value) else price
        tile["spend"] += paid if _number(paid) else 0.0
    if event_type in PRICED and _number(price):
        tile["ps"] += price
        tile["pn"] += 1
    for key, name in (("cat", category), ("dev", device), ("ch", channel)):
        if name is not None:
            tile[key][name] = tile[key].get(name, 0) + 1
    if item_id is not None and item_id not in tile["items"]:
        tile["items"].append(item_id)
    if event_type in RECENCY_TYPES:
        state["last"][event_type] = max(state["last"].get(event_type, ts), ts)
    state["last"]["any"] = max(state["last"].get("any", ts), ts)  # the newest event of any type


def trim(state: dict) -> dict:
    """Drop tiles and newest times older than the longest window before the newest tile: no
    request at or after the user's newest event can see them."""
    if state["tiles"]:
        oldest = max(state["tiles"]) - RETAINED_HOURS
        state["tiles"] = {h: t for h, t in state["tiles"].items() if h > oldest}
        state["text"] = {h: t for h, t in state.get("text", {}).items() if h > oldest}
        state["last"] = {e: ts for e, ts in state["last"].items() if int(ts // HOUR) > oldest}
    return state


def encode(state: dict) -> tuple[str, str]:
    """``activity_tiles`` and ``activity_last`` as canonical JSON (sorted, so equal states are equal
    text). A tile's text is reused until it changes: the build encodes a state after every event."""
    text = state.setdefault("text", {})
    parts = []
    for hour in sorted(state["tiles"]):
        if hour not in text:
            text[hour] = json.dumps([hour, _canonical(state["tiles"][hour])], separators=(",", ":"), sort_keys=True)
        parts.append(text[hour])
    return "[" + ",".join(parts) + "]", json.dumps(state["last"], separators=(",", ":"), sort_keys=True)


_DECODER = json.JSONDecoder()


def decode(tiles_json: str | None, last_json: str | None) -> dict:
    """The state from its JSON; no state (a user without events) is empty.

    Each tile's own text is kept beside it, so that :func:`encode` rewrites only the tiles that
    changed: a push re-encoded all 720 hourly tiles of a busy user for one new event. The text is
    only reused when it is what :func:`encode` writes for that tile (canonical JSON)."""
    tiles, text = {}, {}
    if tiles_json:
        try:
            tiles, text = _tiles_with_text(tiles_json)
        except ValueError:  # not in encode's layout: parse it whole, encode afresh
            tiles, text = {int(h): t for h, t in json.loads(tiles_json)}, {}
    return {"tiles": tiles, "last": json.loads(last_json) if last_json else {}, "text": text}


def _tiles_with_text(tiles_json: str) -> tuple[dict, dict]:
    tiles, text = {}, {}
    end, pos = len(tiles_json) - 1, 1  # inside the outer [ ... ]
    while pos < end:
        (hour, tile), stop = _DECODER.raw_decode(tiles_json, pos)
        tiles[int(hour)] = tile
        text[int(hour)] = tiles_json[pos:stop]
        if tiles_json[stop] not in ",]":
            raise ValueError("unexpected separator")
        pos = stop + 1
    first = next(iter(tiles), None)
    try:
        canonical = first is None or text[first] == json.dumps([first, _canonical(tiles[first])],
                                                               separators=(",", ":"), sort_keys=True)
    except (KeyError, TypeError):
        canonical = False
    return tiles, text if canonical else {}  # written some other way: encode afresh


def _canonical(tile: dict) -> dict:
    return {**tile, "items": sorted(tile["items"]), "spend": round(tile["spend"], 6), "ps": round(tile["ps"], 6)}


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def behaviour_at(tiles_json: str | None, last_json: str | None, request_ts: float) -> dict:
    """Every ``user_behaviour`` feature of a user at request time ``request_ts`` (epoch seconds)."""
    try:
        state = decode(tiles_json, last_json)
    except (TypeError, ValueError):  # only Feast's schema inference sends random text: answer typed values
        return {k: (v if v is not None else _TYPED[k]) for k, v in behaviour_at(None, None, request_ts).items()}
    return behaviour_of(state, request_ts)


_COUNT_KEYS = [(f"{e}_count_{name}", name, e) for name in WINDOW_HOURS for e in EVENT_TYPES]
_RECENCY_KEYS = [(f"hours_since_last_{e}", e) for e in RECENCY_TYPES]


def behaviour_of(state: dict, request_ts: float) -> dict:
    """:func:`behaviour_at` on a decoded state (the build calls it once per event time, so the
    tiles are walked once, in hour order, with plain dicts)."""
    now_hour = int(request_ts // HOUR)
    counts = {name: dict.fromkeys(EVENT_TYPES, 0) for name in WINDOW_HOURS}
    spend = priced_sum = 0.0
    priced = 0
    cats: dict = {}
    devices: dict = {}
    channels: dict = {}
    items: set = set()
    tiles = state["tiles"]
    for hour in sorted(tiles):
        age = now_hour - hour
        if not 0 <= age < RETAINED_HOURS:
            continue
        tile = tiles[hour]
        for name, hours in WINDOW_HOURS.items():
            if age < hours:
                window = counts[name]
                for e, n in tile["n"].items():
                    window[e] = window.get(e, 0) + n
        # Sums of the tiles as stored (rounded, see _canonical), so a state read back from the
        # online store and one still in memory give the same value.
        spend += round(tile["spend"], 6)
        priced_sum += round(tile["ps"], 6)
        priced += tile["pn"]
        for total, part in ((cats, tile["cat"]), (devices, tile["dev"]), (channels, tile["ch"])):
            for key, n in part.items():
                total[key] = total.get(key, 0) + n
        items.update(tile["items"])
    out: dict = {key: counts[name][e] for key, name, e in _COUNT_KEYS}
    for key, e in _RECENCY_KEYS:
        last = state["last"].get(e)
        age = (request_ts - last) / HOUR if last is not None else None
        out[key] = max(age, 0.0) if age is not None and age < RETAINED_HOURS else None
    out["spend_30d"] = float(spend)
    out["avg_price_engaged_30d"] = priced_sum / priced if priced else None
    out["ctr_30d"] = _ratio(out["click_count_30d"], out["view_count_30d"])
    out["cart_rate_30d"] = _ratio(out["add_to_cart_count_30d"], out["click_count_30d"])
    out["purchase_rate_30d"] = _ratio(out["purchase_count_30d"], out["add_to_cart_count_30d"])
    ranked = sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(cats.values()) or 1
    for k in range(1, 4):
        name, n = ranked[k - 1] if len(ranked) >= k else (None, 0)
        out[f"top_category_{k}_30d"] = name
        out[f"top_category_{k}_share_30d"] = n / total
    out["distinct_items_30d"] = len(items)
    out["distinct_categories_30d"] = len(cats)
    out["top_device_30d"] = _mode(devices)
    out["top_channel_30d"] = _mode(channels)
    return out


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def _mode(counts: dict):
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else None


_TYPED = {**dict.fromkeys((f"hours_since_last_{e}" for e in RECENCY_TYPES), 0.0), "avg_price_engaged_30d": 0.0,
          "ctr_30d": 0.0, "cart_rate_30d": 0.0, "purchase_rate_30d": 0.0, "top_device_30d": "",
          "top_channel_30d": "", **{f"top_category_{k}_30d": "" for k in range(1, 4)}}
BEHAVIOUR_FEATURES = tuple(behaviour_at(None, None, 0.0))  # the output names, in order
# Each feature's pandas type in the offline tables (the Feast schema's Int64, Float64 and String).
_STRINGS = ("top_category_1_30d", "top_category_2_30d", "top_category_3_30d", "top_device_30d", "top_channel_30d")
FEATURE_TYPES = {name: object if name in _STRINGS else "int64" if isinstance(value, int) else "float64"
                 for name, value in behaviour_at(None, None, 0.0).items()}
