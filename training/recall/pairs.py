"""Pair features: what the user did to this item, its category and its brand, as of the request.

For each behaviour type, the number of the user's events on the candidate item (and on items of its
category and brand) and the hours since the newest one; then the candidate's place in the user's
recent list, and how the user's attention to it spread over time: on how many distinct hours they
came back to it, since when, how long before their last visit to the shop they last saw it, and how
much of their latest day went to it. They are read from ``Recent`` (the stored sequence), so offline
and online agree.
"""

from __future__ import annotations

import numpy as np

from training.recall.history import Recent

NEVER_HOURS = 24 * 365.0  # the recency of a behaviour the user never had on the item
RECENT_LIMIT = 100  # the recent-list place of an item the user never touched
LATEST_DAY_HOURS = 24.0  # the user's latest day: the hours up to their newest event


class ItemGroups:
    """Each catalogue item's category and brand as integer codes (-1: none), for matching."""

    def __init__(self, category: np.ndarray, brand: np.ndarray):
        self.category, self.brand = category.astype(np.int64), brand.astype(np.int64)

    @staticmethod
    def from_columns(category: list, brand: list) -> ItemGroups:
        def codes(values: list) -> np.ndarray:
            table: dict = {}
            return np.array([-1 if v is None or v != v or v == "" else table.setdefault(v, len(table))
                             for v in values], dtype=np.int64)
        return ItemGroups(codes(category), codes(brand))


def names(type_names: list[str]) -> list[str]:
    """The feature names, in the column order of :func:`pair_features`."""
    out = []
    for t in type_names:
        out += [f"item_{t}_count", f"item_{t}_hours", f"category_{t}_count", f"brand_{t}_count"]
    return out + ["item_any_count", "item_any_hours", "recent_rank", "item_share_of_user", "user_hours_since_last",
                  "user_distinct_items"] + ATTENTION


# A purchase follows views the user came back to, and views from their latest visit: on tmall-2014
# these took recall + rank from 0.1690 to 0.1730 NDCG@10 (BENCHMARKS.md, `eval_target.py --ranker`).
ATTENTION = ["item_visits", "item_first_hours", "item_hours_before_user_last", "item_latest_day_count",
             "item_latest_day_share"]


def pair_features(recent: Recent, candidates: np.ndarray, groups: ItemGroups, n_types: int,
                  now: float) -> np.ndarray:
    """[len(candidates), 4 * n_types + 11] features (counts as log1p, hours as log1p)."""
    hours = np.clip((now - recent.times) / 3600.0, 0, None)  # each slot's age, shared by both groups
    same_item = recent.items[None, :] == candidates[:, None]
    return np.concatenate([_behaviour(recent, candidates, groups, n_types, hours, same_item),
                           _attention(recent, hours, same_item)], axis=1)


def _behaviour(recent: Recent, candidates: np.ndarray, groups: ItemGroups, n_types: int, hours: np.ndarray,
               same_item: np.ndarray) -> np.ndarray:
    """Per type counts and recency on the item, its category and brand; the user's recent list."""
    n = len(candidates)
    out = np.zeros((n, 4 * n_types + 6), dtype=np.float32)
    never = np.log1p(NEVER_HOURS)
    out[:, 1:4 * n_types:4] = never
    out[:, -5], out[:, -4], out[:, -2] = never, np.log1p(float(RECENT_LIMIT)), never
    if not len(recent.items) or not n:
        return out
    slot_cat, slot_brand = _group_of(groups.category, recent.items), _group_of(groups.brand, recent.items)
    cand_cat, cand_brand = groups.category[candidates], groups.brand[candidates]
    same_cat = (slot_cat[None, :] == cand_cat[:, None]) & (cand_cat[:, None] >= 0)
    same_brand = (slot_brand[None, :] == cand_brand[:, None]) & (cand_brand[:, None] >= 0)
    # Each slot's count under its type's column: three products give every type's counts at once.
    by_type = np.zeros((len(recent.items), n_types), dtype=np.float32)
    by_type[np.arange(len(recent.items)), recent.types] = recent.counts
    out[:, 0:4 * n_types:4] = np.log1p(same_item.astype(np.float32) @ by_type)
    out[:, 2:4 * n_types:4] = np.log1p(same_cat.astype(np.float32) @ by_type)
    out[:, 3:4 * n_types:4] = np.log1p(same_brand.astype(np.float32) @ by_type)
    touched = same_item.any(axis=1)
    for k in np.unique(recent.types):  # the newest event of each type the user had, on touched candidates
        on_item = same_item[touched] & (recent.types == k)[None, :]
        newest = np.where(on_item, hours[None, :], np.inf).min(axis=1)
        out[touched, 4 * k + 1] = np.where(np.isfinite(newest), np.log1p(newest), never)
    on_item = same_item.astype(np.float32) @ recent.counts
    out[:, -6] = np.log1p(on_item)
    newest_any = np.where(same_item, hours[None, :], np.inf).min(axis=1)
    out[:, -5] = np.where(np.isfinite(newest_any), np.log1p(newest_any), never)
    out[:, -4] = np.log1p(_recent_rank(recent, candidates, RECENT_LIMIT))
    out[:, -3] = on_item / recent.counts.sum()
    out[:, -2] = np.log1p(hours.min())
    out[:, -1] = np.log1p(len(np.unique(recent.items)))
    return out


def _attention(recent: Recent, hours: np.ndarray, same_item: np.ndarray) -> np.ndarray:
    """The ``ATTENTION`` columns: distinct slots on the item, hours since the first of them, hours between
    the newest of them and the user's newest event, and the item's events (count, share) in the user's
    latest day."""
    out = np.zeros((same_item.shape[0], len(ATTENTION)), dtype=np.float32)
    never = np.log1p(NEVER_HOURS)
    out[:, 1] = out[:, 2] = never
    if not len(recent.items) or not len(out):
        return out
    touched = same_item.any(axis=1)
    on = same_item[touched]
    out[:, 0] = np.log1p(same_item.sum(axis=1))
    out[touched, 1] = np.log1p(np.where(on, hours[None, :], -np.inf).max(axis=1))
    out[touched, 2] = np.log1p(np.where(on, hours[None, :], np.inf).min(axis=1) - hours.min())
    latest = (hours <= hours.min() + LATEST_DAY_HOURS).astype(np.float32) * recent.counts
    on_latest = same_item.astype(np.float32) @ latest
    out[:, 3] = np.log1p(on_latest)
    out[:, 4] = on_latest / latest.sum()
    return out


def _group_of(codes: np.ndarray, items: np.ndarray) -> np.ndarray:
    return np.where(items >= 0, codes[np.clip(items, 0, None)], -1)


def _recent_rank(recent: Recent, candidates: np.ndarray, limit: int) -> np.ndarray:
    """The candidate's place among the user's distinct items, newest first (``limit`` if absent)."""
    order = np.argsort(-recent.times, kind="stable")
    seen = dict.fromkeys(int(i) for i in recent.items[order] if i >= 0)
    place = {item: r for r, item in enumerate(seen)}
    return np.array([place.get(int(c), limit) for c in candidates], dtype=np.float32)
