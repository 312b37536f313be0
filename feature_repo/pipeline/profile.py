"""The readable profile: one summary of a user's features, for `/profile`, the explorer and export.

It reads the request-time features (windows that end at the request, not at the user's last event),
so a merchandiser, an application and a subject-access export see the same segment and interests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

SEGMENT_FEATURES = ("view_count_30d", "click_count_30d", "purchase_count_30d")  # what the segment reads


def summary(row: Mapping[str, Any], last_event: str | None) -> dict[str, Any]:
    """Top categories, recent intents, segment and 30-day activity from one user's feature values."""

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
