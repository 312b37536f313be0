"""Windows that end at the request time: per-user hourly tiles, with running sums kept beside them.

A user's activity state is a list of hourly tiles (counts per event type, spend, engaged prices,
categories, devices, channels and distinct items of that hour) for the last ``RETAINED_HOURS`` hours
before their newest event, the newest time of each event type (and of any event, ``any``), and the
sums of the tiles inside each window that ends at the newest event. Adding an event commutes (money
is kept in integer micro-units), so a late event lands exactly where a rebuild would put it, and a
state is the same whatever order its events arrived in. At request time T, a window of N days sums
the tiles of the 24·N hours up to T's hour (hour-granular, the same rule offline at each training
row's time and online at each request), so an idle user's windows empty out as T moves on.

Why the sums: a push (and a request) used to parse and walk all 720 tiles, so a user with 10,000
events in a month cost 70 times a new one. Now a push parses only the tiles it changes or that
leave a window, and a request only the tiles that left a window since the newest event. The
distinct-item count stays exact: each tile counts, in ``u``, the items whose newest tile it is, so
the items of a window are the sum of its tiles' ``u``. Which tile last held an item is found in the
stored text (a plain substring search, then that one tile parsed), or, for a state folded in
memory, in an index.

The functions here are the whole definition: the batch build folds each user's events through
them, and the ``user_behaviour_now`` on-demand view calls :func:`behaviour_at`.
"""

from __future__ import annotations

import bisect
import json
import math

from core.contract import EVENT_TYPES

RECENCY_TYPES = ("view", "click", "favorite", "add_to_cart", "purchase", "search")
PRICED = ("click", "add_to_cart", "purchase")  # engaged events whose item price is averaged
WINDOW_HOURS = {"1d": 24, "7d": 7 * 24, "30d": 30 * 24}
RETAINED_HOURS = WINDOW_HOURS["30d"]  # tiles kept: the longest window
HOUR = 3600
MICRO = 1_000_000  # money in tiles and sums: integer micro-units, so sums do not depend on order
FORMAT = 2  # the stored layout; an older one is parsed whole once and rewritten
SEPARATOR = ",\n"  # between tiles' texts: JSON text escapes every newline, so this splits exactly


def new_state() -> dict:
    """An empty state. ``text`` keeps each unchanged tile's JSON; ``where`` (item -> newest hour
    holding it) is complete for a state folded in memory and ``None`` for a decoded one, whose
    ``blob`` (the text it came from) is searched instead."""
    return {"tiles": {}, "text": {}, "hours": [], "last": {}, "sums": _empty_sums(), "where": {}, "blob": None}


def _empty_sums() -> dict:
    return {"v": FORMAT, "n": {name: {} for name in WINDOW_HOURS}, "spend": 0, "ps": 0, "pn": 0,
            "cat": {}, "dev": {}, "ch": {}, "d": 0}


def _new_tile() -> dict:
    return {"n": {}, "spend": 0, "ps": 0, "pn": 0, "cat": {}, "dev": {}, "ch": {}, "items": [], "u": 0}


def _micros(x: float) -> int:
    return round(x * MICRO)


def _bump(counts: dict, key, by: int) -> None:
    value = counts.get(key, 0) + by
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


# --- folding an event ----------------------------------------------------------------------------------
def add_event(state: dict, ts: float, event_type: str, item_id, category, price, value, device, channel) -> None:
    """Fold one event (epoch seconds ``ts``) into ``state``; the order of calls does not matter."""
    hour = int(ts // HOUR)
    hours = state["hours"]
    if hours and hour <= hours[-1] - RETAINED_HOURS:
        return  # before every window at or after the newest event: a rebuild drops it too
    if not hours or hour > hours[-1]:
        _advance(state, hour)
    tile = _writable(state, hour)
    newest = hours[-1]
    sums = state["sums"]
    for name, span in WINDOW_HOURS.items():
        if newest - hour < span:
            _bump(sums["n"][name], event_type, 1)
    _bump(tile["n"], event_type, 1)
    if event_type == "purchase":
        paid = value if _number(value) else price
        spent = _micros(paid) if _number(paid) else 0
        tile["spend"] += spent
        sums["spend"] += spent
    if event_type in PRICED and _number(price):
        for target in (tile, sums):
            target["ps"] += _micros(price)
            target["pn"] += 1
    for key, name in (("cat", category), ("dev", device), ("ch", channel)):
        if name is not None:
            _bump(tile[key], name, 1)
            _bump(sums[key], name, 1)
    if item_id is not None and item_id not in tile["items"]:
        _add_item(state, tile, hour, item_id)
    last = state["last"]
    if event_type in RECENCY_TYPES:
        last[event_type] = max(last.get(event_type, ts), ts)
    last["any"] = max(last.get("any", ts), ts)  # the newest event of any type


def _advance(state: dict, hour: int) -> None:
    """Move the state's newest hour to ``hour``: tiles leave the windows they fall out of, and
    those older than every window are dropped."""
    hours = state["hours"]
    if hours:
        cut = bisect.bisect_right(hours, hour - RETAINED_HOURS)
        afresh = _mostly_gone(hours, cut)
        if not afresh:
            _slide(state, state["sums"], hours[-1], hour)
        for h in hours[:cut]:
            state["tiles"].pop(h, None)
            state["text"].pop(h, None)
        del hours[:cut]
        if afresh:
            state["sums"] = walked_sums(state, hour)
    oldest = hour - RETAINED_HOURS
    state["last"] = {e: ts for e, ts in state["last"].items() if int(ts // HOUR) > oldest}


def _mostly_gone(hours: list[int], cut: int) -> bool:
    """Whether more tiles leave the longest window (the first ``cut``) than stay in it: then the
    windows are summed afresh from the staying tiles instead of taking out the leaving ones."""
    return cut > len(hours) - cut


def _slide(state: dict, sums: dict, old: int, new: int) -> None:
    """Take out of ``sums`` (the windows ending at hour ``old``) the tiles that are outside the
    windows ending at hour ``new``. Only those tiles are parsed."""
    hours = state["hours"]
    for name, span in WINDOW_HOURS.items():
        if new - span >= old:  # every tile left this window
            sums["n"][name] = {}
            continue
        lo, hi = bisect.bisect_right(hours, old - span), bisect.bisect_right(hours, new - span)
        for h in hours[lo:hi]:
            _add_counts(sums["n"][name], _tile(state, h), -1)
    for h in hours[:bisect.bisect_right(hours, new - RETAINED_HOURS)]:
        tile = _tile(state, h)
        _add_totals(sums, tile, -1)
        sums["d"] -= tile["u"]


def _add_counts(counts: dict, tile: dict, sign: int) -> None:
    """A tile's event counts into (``sign`` 1) or out of (-1) one window's counts."""
    for e, n in tile["n"].items():
        _bump(counts, e, sign * n)


def _add_totals(sums: dict, tile: dict, sign: int) -> None:
    """A tile's money and category, device and channel counts into or out of the 30-day sums."""
    for key in ("spend", "ps", "pn"):
        sums[key] += sign * tile[key]
    for key in ("cat", "dev", "ch"):
        for name, n in tile[key].items():
            _bump(sums[key], name, sign * n)


def _tile(state: dict, hour: int) -> dict:
    """A tile, parsed from its text the first time it is needed."""
    tile = state["tiles"].get(hour)
    if tile is None:
        tile = state["tiles"][hour] = json.loads(state["text"][hour])[1]
    return tile


def _writable(state: dict, hour: int) -> dict:
    """A tile about to change (created if new): its kept text no longer holds."""
    if hour in state["text"] or hour in state["tiles"]:
        tile = _tile(state, hour)
        state["text"].pop(hour, None)
        return tile
    bisect.insort(state["hours"], hour)
    tile = state["tiles"][hour] = _new_tile()
    return tile


def _add_item(state: dict, tile: dict, hour: int, item_id: str) -> None:
    """Add an item to a tile that lacked it, keeping ``u`` (items whose newest tile this is)."""
    previous = _newest_holding(state, item_id)
    tile["items"].append(item_id)
    if previous is None or previous < hour:
        tile["u"] += 1
        if previous is None:
            state["sums"]["d"] += 1
        else:
            _writable(state, previous)["u"] -= 1
        if state["where"] is not None:
            state["where"][item_id] = hour


def _newest_holding(state: dict, item_id: str) -> int | None:
    """The newest retained tile holding ``item_id``, or ``None``."""
    hours = state["hours"]
    if state["where"] is not None:  # folded in memory: the index is complete
        hour = state["where"].get(item_id)
        return hour if hour is not None and hours and hour >= hours[0] else None
    best = max((h for h, t in state["tiles"].items() if h not in state["text"] and item_id in t["items"]),
               default=None)  # tiles changed since decoding: their text is gone
    blob = state["blob"]
    token, end = json.dumps(item_id), len(blob or "")
    while blob and (pos := blob.rfind(token, 0, end)) >= 0:
        start = blob.rfind(SEPARATOR, 0, pos) + len(SEPARATOR)  # the tile's text starts after it
        start = start if start >= len(SEPARATOR) else 1  # the first tile starts after "["
        hour = int(blob[start + 1:blob.index(",", start)])
        if best is not None and hour <= best:
            break
        if hour in state["text"] and item_id in _tile(state, hour)["items"]:
            return hour  # unchanged since decoding, retained, and truly holding it (not a category)
        end = start
    return best


# --- the stored text -------------------------------------------------------------------------------------
def encode(state: dict) -> tuple[str, str]:
    """``activity_tiles`` and ``activity_last`` (which carries the sums) as canonical JSON, so equal
    states are equal text. A tile's text is reused until it changes."""
    text, parts = state["text"], []
    for hour in state["hours"]:
        if hour not in text:
            text[hour] = json.dumps([hour, _canonical(state["tiles"][hour])], separators=(",", ":"), sort_keys=True)
        parts.append(text[hour])
    tiles = "[" + SEPARATOR.join(parts) + "]"
    if state["where"] is None:  # a decoded state searches the text it would now be decoded from
        state["blob"] = tiles
    last = json.dumps({**state["last"], "sums": state["sums"]}, separators=(",", ":"), sort_keys=True)
    return tiles, last


def _canonical(tile: dict) -> dict:
    return {**tile, "items": sorted(tile["items"])}


def decode(tiles_json: str | None, last_json: str | None) -> dict:
    """The state from its JSON; no state (a user without events) is empty.

    Only the tiles' hours are read: each tile is parsed when a change or a window needs it. A state
    stored in an older layout (no sums) is parsed whole and its sums computed once."""
    last = json.loads(last_json) if last_json else {}
    sums = last.pop("sums", None)
    if not tiles_json or tiles_json == "[]":
        return {**new_state(), "last": last}
    if not isinstance(sums, dict) or sums.get("v") != FORMAT:
        return _migrated(json.loads(tiles_json), last)
    parts = tiles_json[1:-1].split(SEPARATOR)
    hours = [int(part[1:part.index(",")]) for part in parts]
    return {**new_state(), "text": dict(zip(hours, parts, strict=True)), "hours": hours, "last": last,
            "sums": sums, "where": None, "blob": tiles_json}


def _migrated(pairs: list, last: dict) -> dict:
    """A state from an older layout: floats for money, no ``u``, no sums."""
    state = new_state()
    tiles = {int(hour): tile for hour, tile in pairs}
    for tile in tiles.values():
        for key in ("spend", "ps"):
            tile[key] = tile[key] if isinstance(tile.get(key), int) else _micros(tile.get(key) or 0.0)
        tile.setdefault("pn", 0)
    if tiles:
        newest = max(tiles)
        tiles = {h: t for h, t in tiles.items() if h > newest - RETAINED_HOURS}
        last = {e: ts for e, ts in last.items() if int(ts // HOUR) > newest - RETAINED_HOURS}
    for hour in sorted(tiles, reverse=True):  # newest first: an item's first tile met is its newest
        tile = tiles[hour]
        tile["u"] = sum(1 for i in tile["items"] if i not in state["where"])
        for item in tile["items"]:
            state["where"].setdefault(item, hour)
    state.update(tiles=tiles, hours=sorted(tiles), last=last)
    state["sums"] = walked_sums(state, max(tiles)) if tiles else _empty_sums()
    return state


def walked_sums(state: dict, hour: int) -> dict:
    """The sums of the windows ending at ``hour``, walked over every tile: what the running sums
    must equal (tests), and the answer for a request before the state's newest event."""
    sums = _empty_sums()
    items: set = set()
    for h in state["hours"]:
        age = hour - h
        if not 0 <= age < RETAINED_HOURS:
            continue
        tile = _tile(state, h)
        for name, span in WINDOW_HOURS.items():
            if age < span:
                _add_counts(sums["n"][name], tile, 1)
        _add_totals(sums, tile, 1)
        items.update(tile["items"])
    sums["d"] = len(items)
    return sums


def tiles_of(state: dict) -> dict:
    """Every tile, parsed (for readers that look at each hour, such as the explorer)."""
    return {h: _tile(state, h) for h in state["hours"]}


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# --- the features at a request time ----------------------------------------------------------------------
def behaviour_at(tiles_json: str | None, last_json: str | None, request_ts: float) -> dict:
    """Every ``user_behaviour`` feature of a user at request time ``request_ts`` (epoch seconds)."""
    try:
        state = decode(tiles_json, last_json)
    except (TypeError, ValueError, KeyError, IndexError):  # only Feast's schema inference sends random text
        return {k: (v if v is not None else _TYPED[k]) for k, v in behaviour_at(None, None, request_ts).items()}
    return behaviour_of(state, request_ts)


# A count per built-in type and window. A shop's own types (``behaviours:`` in persona.yaml) enter the
# tiles and the sequence but get no columns: Feast schemas are fixed when the repo is applied.
_COUNT_KEYS = [(f"{e}_count_{name}", name, e) for name in WINDOW_HOURS for e in EVENT_TYPES]
_RECENCY_KEYS = [(f"hours_since_last_{e}", e) for e in RECENCY_TYPES]


def behaviour_of(state: dict, request_ts: float) -> dict:
    """:func:`behaviour_at` on a decoded state: the stored sums, less the tiles that left each
    window between the newest event and the request (the only tiles parsed)."""
    hours, now = state["hours"], int(request_ts // HOUR)
    if hours and now < hours[-1]:  # a request before the newest event (a pinned time): walk the tiles
        sums = walked_sums(state, now)
    else:
        stored = state["sums"]
        sums = {**stored, "n": {k: dict(v) for k, v in stored["n"].items()},
                **{k: dict(stored[k]) for k in ("cat", "dev", "ch")}}
        if hours and now > hours[-1]:
            if _mostly_gone(hours, bisect.bisect_right(hours, now - RETAINED_HOURS)):
                sums = walked_sums(state, now)
            else:
                _slide(state, sums, hours[-1], now)
    return _features(sums, state["last"], request_ts)


def _features(sums: dict, last: dict, request_ts: float) -> dict:
    counts = sums["n"]
    out: dict = {key: counts[name].get(e, 0) for key, name, e in _COUNT_KEYS}
    for key, e in _RECENCY_KEYS:
        seen = last.get(e)
        age = (request_ts - seen) / HOUR if seen is not None else None
        out[key] = max(age, 0.0) if age is not None and age < RETAINED_HOURS else None
    out["spend_30d"] = sums["spend"] / MICRO
    out["avg_price_engaged_30d"] = sums["ps"] / MICRO / sums["pn"] if sums["pn"] else None
    out["ctr_30d"] = _ratio(out["click_count_30d"], out["view_count_30d"])
    out["cart_rate_30d"] = _ratio(out["add_to_cart_count_30d"], out["click_count_30d"])
    out["purchase_rate_30d"] = _ratio(out["purchase_count_30d"], out["add_to_cart_count_30d"])
    cats = sums["cat"]
    ranked = sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(cats.values()) or 1
    for k in range(1, 4):
        name, n = ranked[k - 1] if len(ranked) >= k else (None, 0)
        out[f"top_category_{k}_30d"] = name
        out[f"top_category_{k}_share_30d"] = n / total
    out["distinct_items_30d"] = sums["d"]
    out["distinct_categories_30d"] = len(cats)
    out["top_device_30d"] = _mode(sums["dev"])
    out["top_channel_30d"] = _mode(sums["ch"])
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
