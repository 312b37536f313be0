"""The wording of the service's answers: ranked items with their reasons, and a profile with its summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from feature_repo.pipeline.profile import summary
from training.recall.lexical import matched_terms

if TYPE_CHECKING:
    from bentos.ranking import Ranked, Ranker
    from bentos.user_state import UserFrame


def rank_answer(user_id: str, ranker: Ranker, ranked: Ranked, user: UserFrame) -> dict[str, Any]:
    query = user.frame["query"].iloc[0]
    row = user.frame.iloc[0]
    items = []
    for n, (idx, score) in enumerate(zip(ranked.indices, ranked.scores, strict=True)):
        item = ranker.item_info[idx]
        own = ranked.reasons[n] if ranked.reasons is not None else []
        items.append({"item_id": ranker.item_ids[idx], "score": round(float(score), 4),
                      "title": item.get("item_title"), "reasons": merged_reasons(own, row, item, query, user.source)})
    return {"user_id": user_id, "items": items, "cold_start": not user.known, "unknown_candidates": ranked.unknown,
            "query": query, "query_source": user.source, "model": ranker.tag, "ranking": ranked.how}


def merged_reasons(own: list[str], row, item, query: str | None, source: str | None) -> list[str]:
    """Recall + rank's reasons (the source and the user's own behaviour) first, then the profile's."""
    searched = any("search for" in r for r in own)
    profile = reasons(row, item, None if searched else query, source)
    if own:
        profile = [r for r in profile if r != FALLBACK]
    return list(dict.fromkeys(own + profile))


def profile_answer(user_id: str, user: UserFrame, vector: list[float], last_event: str | None) -> dict[str, Any]:
    return {"user_id": user_id, "known": user.known, "vector": [round(v, 5) for v in vector],
            "summary": summary(user.frame.iloc[0], last_event)}


def reasons(user, item, query: str | None, source: str | None) -> list[str]:
    out = []
    if query and isinstance(item.get("item_title"), str):
        words = matched_terms(query, item["item_title"])  # words, numbers, and CJK pieces (no spaces in Chinese)
        if words:
            recent = "recent " if source == "session" else ""
            out.append(f"matches your {recent}search for '{' '.join(words)}'")
    category = item.get("item_category")
    for n in (1, 2, 3):
        top = user.get(f"top_category_{n}_30d")
        if isinstance(top, str) and top == category:
            out.append(f"matches your interest in {category.split('>')[-1].lower()}")
            break
    views = item.get("item_views_7d")
    if pd.notna(views) and views >= 20:
        out.append("popular this week")
    return out or [FALLBACK]


FALLBACK = "picked for your profile"
