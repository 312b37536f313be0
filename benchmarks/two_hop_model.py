"""The baseline a team would otherwise build: features from `feast serve`, then this separate model call.

It holds the same model and catalogue vectors as Persona and ranks from features posted to it, so
the only difference from ``/rank`` is the extra network hop and the JSON round trip of the features.
Served by ``bench_serving.py``; not part of the product.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml

WORKSPACE = Path(os.environ["PERSONA_WORKSPACE"]).resolve()


@bentoml.service(resources={"cpu": "2"})
class TwoHopModel:
    def __init__(self) -> None:
        import torch

        from core import config
        from eventlog.store import EventLog
        from feature_repo.pipeline import registry
        from training.dataset import online_catalogue
        from training.model import in_batches
        from training.model_store import load_from_bentoml

        self.model, _, _ = load_from_bentoml("latest")
        store = registry.feature_store(WORKSPACE)
        log = EventLog(config.load(WORKSPACE).resolved_event_log_url())
        self.item_ids = log.read_table("items")["item_id"].astype(str).tolist()
        with torch.no_grad():
            self.item_vectors = in_batches(self.model.item_vectors, online_catalogue(store, self.item_ids), 512)

    @bentoml.api
    def score(self, features: dict[str, list[Any]], query: str | None = None, k: int = 10) -> list[dict]:
        """``features`` is the ``feast serve`` response turned into columns."""
        import pandas as pd
        import torch

        frame = pd.DataFrame(features)
        frame["query"] = query
        from training.model import Catalogue

        lookup = Catalogue({i: n for n, i in enumerate(self.item_ids)}, self.item_vectors)
        with torch.no_grad():
            scores = self.model.score(self.model.user_vectors(frame, catalogue=lookup), self.item_vectors).squeeze(0)
        top = torch.topk(scores, k)
        return [{"item_id": self.item_ids[i], "score": float(s)}
                for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
