"""The wording of the service's answers: ranked items with their reasons, and a profile's summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bentos.service import Ranked, Ranker, UserFrame


def rank_answer(user_id: str, ranker: Ranker, ranked: Ranked, user: UserFrame) -> dict[str, Any]:
    query = user.frame["query"].iloc[0]
    row = user.frame.iloc[0]
    items = []
    for idx, score in zip(ranked.indices, ranked.scores, strict=True):
        item = ranker.item_info[idx]
        items.append({"item_id": ranker.item_ids[idx], "score": round(float(score), 4),
                      "title": item.get("item_title"), "reasons": reasons(row, item, query, user.source)})
    return {"user_id": user_id, "items": items, "cold_start": not user.known, "unknown_candidates": ranked.unknown,
            "query": query, "query_source": user.source, "model": ranker.tag}


def profile_answer(user_id: str, user: UserFrame, vector: list[float], last_event: str | None) -> dict[str, Any]:
    return {"user_id": user_id, "known": user.known, "vector": [round(v, 5) for v in vector],
            "summary": summary(user.frame.iloc[0], last_event)}


def reasons(user, item, query: str | None, source: str | None) -> list[str]:
    import pandas as pd

    out = []
    if query and isinstance(item.get("item_title"), str):
        words = set(query.lower().split()) & set(item["item_title"].lower().replace(",", " ").split())
        if words:
            recent = "recent " if source == "session" else ""
            out.append(f"matches your {recent}search for '{' '.join(sorted(words))}'")
    category = item.get("item_category")
    for n in (1, 2, 3):
        top = user.get(f"top_category_{n}_30d")
        if isinstance(top, str) and top == category:
            out.append(f"matches your interest in {category.split('>')[-1].lower()}")
            break
    views = item.get("item_views_7d")
    if pd.notna(views) and views >= 20:
        out.append("popular this week")
    return out or ["picked for your profile"]


def summary(row, last_event: str | None) -> dict[str, Any]:
    import pandas as pd

    def num(name):
        v = row.get(name)
        return 0 if v is None or pd.isna(v) else v

    cats = [row.get(f"top_category_{n}_30d") for n in (1, 2, 3)]
    purchases, clicks = num("purchase_count_30d"), num("click_count_30d")
    segment = ("new" if num("view_count_30d") + clicks == 0 else "buyer" if purchases >= 3
               else "shopper" if purchases >= 1 else "browser")
    queries = row.get("recent_queries")
    return {"top_categories": [c for c in cats if isinstance(c, str)],
            "recent_intents": queries.split(" | ")[:3] if isinstance(queries, str) and queries else [],
            "segment": segment, "last_event": last_event, "age_band": row.get("age_band"),
            "activity_30d": {"views": int(num("view_count_30d")), "clicks": int(clicks),
                             "purchases": int(purchases), "spend": round(float(num("spend_30d")), 2)}}
