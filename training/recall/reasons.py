"""Why an item was ranked, in words: what the user did to it, what it goes with, what in the search it
matches, that it is popular. Read from the same candidate rows and behaviour the ranker scored.
"""

from __future__ import annotations

import numpy as np

from training.recall.cooccurrence import CooccurrenceSource
from training.recall.history import Recent
from training.recall.lexical import LexicalSource, matched_terms
from training.recall.popular import PopularSource
from training.recall.recent import RecentSource
from training.recall.two_stage import Candidates

WEEK_HOURS = 7 * 24
POPULAR_RANK = 20  # "popular this week" only for the week's top items
PHRASES = {"view": "viewed this", "click": "clicked this", "favorite": "saved this", "add_to_cart":
           "added this to your cart", "purchase": "bought this", "review": "reviewed this"}


def behaviour_phrase(recent: Recent, item: int, type_names: list[str], now: float) -> str | None:
    """"you viewed this 3 times this week and added this to your cart": the user's own events on the item,
    the strongest two types (most events first)."""
    on_item = recent.items == item
    if not on_item.any():
        return None
    hours = (now - recent.times[on_item]) / 3600.0
    parts = []
    for code in np.unique(recent.types[on_item]):
        of_type = recent.types[on_item] == code
        count = int(recent.counts[on_item][of_type].sum())
        name = type_names[code] if code < len(type_names) else "other"
        parts.append((count, name, float(hours[of_type].min())))
    parts.sort(key=lambda p: -p[0])
    words = []
    for count, name, _ in parts[:2]:
        phrase = PHRASES.get(name, f"had '{name}' on this")
        words.append(f"{phrase} {count} times" if count > 1 else phrase)
    newest = min(p[2] for p in parts)
    when = "today" if newest < 24 else "this week" if newest < WEEK_HOURS else "before"
    return f"you {' and '.join(words)} {when}"


def brand_phrase(brands: np.ndarray, slot_brands: np.ndarray, recent: Recent, item: int) -> str | None:
    """"from a brand you looked at 4 times": the user's events on other items of the candidate's brand
    (``slot_brands``: each slot's item's brand, -1 for none)."""
    if brands[item] < 0 or not len(recent.items):
        return None
    count = int(recent.counts[slot_brands == brands[item]].sum())
    if not count:
        return None
    return f"from a brand you looked at {count} times" if count > 1 else "from a brand you looked at"


def together_with(sims: np.ndarray, mine: np.ndarray, titles: list) -> str | None:
    """The user's recent item most similar to this one (``sims``: its similarity to each of ``mine``)."""
    if not len(mine) or sims.max() <= 0:
        return None
    best = mine[int(np.argmax(sims))]
    return f"often together with '{_short(titles[best])}'" if titles[best] else None


def explain(recall, cands: Candidates, rows: int, recent: Recent, now: float, query: str | None, titles: list,
            texts: list[str], recent_search: bool = False) -> list[list[str]]:
    """The reasons for the first ``rows`` candidates, each's best-ranking source first. The similarities
    to the user's recent items come in one sparse read for all of them (one per item cost 0.2 ms)."""
    mine = np.unique(recent.items[recent.items >= 0])
    slot_brands = np.where(recent.items >= 0, recall.groups.brand[np.clip(recent.items, 0, None)], -1)
    at = next((k for k, s in enumerate(recall.sources) if isinstance(s, CooccurrenceSource)), None)
    sims = np.zeros((len(mine), rows), dtype=np.float32)
    if at is not None and len(mine):  # only the rows that source proposed need the similarities
        proposed = np.flatnonzero(cands.ranks[:rows, at] <= recall.per_source)
        if len(proposed):
            sims[:, proposed] = recall.sources[at].sim[mine][:, cands.items[proposed]].toarray()
    return [_reasons(recall, cands, r, recent, now, query, titles, texts, recent_search, mine, sims[:, r],
                     slot_brands) for r in range(rows)]


def _reasons(recall, cands: Candidates, row: int, recent: Recent, now: float, query: str | None, titles: list,
             texts: list[str], recent_search: bool, mine: np.ndarray, sims: np.ndarray,
             slot_brands: np.ndarray) -> list[str]:
    item = int(cands.items[row])
    facts: list[tuple[float, str]] = []
    for s, source in enumerate(recall.sources):
        rank = float(cands.ranks[row, s])
        if rank > recall.per_source:
            continue
        text = None
        if isinstance(source, RecentSource):
            text = behaviour_phrase(recent, item, recall.codes.names, now)
        elif isinstance(source, CooccurrenceSource):
            text = together_with(sims, mine, titles)
        elif isinstance(source, LexicalSource) and query:
            terms = matched_terms(query, texts[item])
            text = f"matches your {'recent ' if recent_search else ''}search for '{' '.join(terms)}'" if terms else None
        elif isinstance(source, PopularSource) and rank <= POPULAR_RANK:
            text = "popular this week"
        if text:
            facts.append((rank, text))
    if not any(isinstance(s, RecentSource) and cands.ranks[row, k] <= recall.per_source
               for k, s in enumerate(recall.sources)):
        brand = brand_phrase(recall.groups.brand, slot_brands, recent, item)
        if brand:
            facts.append((float(recall.per_source + 1), brand))
    return [text for _, text in sorted(facts, key=lambda f: f[0])]


def _short(title: str, limit: int = 60) -> str:
    return title if len(title) <= limit else title[:limit - 1] + "…"
