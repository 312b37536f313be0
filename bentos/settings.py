"""The service's settings: ``PERSONA_*`` environment variables, read once when the service starts.

Modules read them as ``settings.NAME`` (not ``from bentos.settings import NAME``), so a test that reloads
this module after changing the environment is seen everywhere.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from core.config import MODEL_NAME
from training.recall.fit import SESSION_GAP as LIVE_QUERY_GAP

WORKSPACE = Path(os.environ.get("PERSONA_WORKSPACE", "workspace")).resolve()
os.environ.setdefault("BENTOML_HOME", str(WORKSPACE / "bentoml"))  # the workspace's model store
MODEL_TAG = os.environ.get("PERSONA_MODEL_TAG", "latest")
MODEL_REF = f"{MODEL_NAME}:{MODEL_TAG}"
PINNED = MODEL_TAG != "latest"  # a pinned tag is never swapped for a newer model
REFRESH_SECONDS = float(os.environ.get("PERSONA_REFRESH_SECONDS", "30"))
# Text embeddings kept in memory (about 75 MB for MiniLM at 50k).
TEXT_CACHE_SIZE = int(os.environ.get("PERSONA_TEXT_CACHE_SIZE", "50000"))
THREADS = int(os.environ.get("PERSONA_THREADS", "4"))  # requests the ranking service runs side by side
TORCH_THREADS = int(os.environ.get("PERSONA_TORCH_THREADS", "1"))  # torch's threads per request
# Recall + rank when the model has a ranker ("off": the two towers' top k, as before the ranker).
RECALL_RANK = os.environ.get("PERSONA_RECALL_RANK", "on").lower() not in ("off", "0", "false", "no")
# A query the towers cannot read (Chinese for all-MiniLM-L6-v2) is ranked by its words first; off: as read.
QUERY_WORDS = os.environ.get("PERSONA_QUERY_WORDS", "on").lower() not in ("off", "0", "false", "no")
# The recall state built from the event log (co-occurrence, item counts, the lexical index) is rebuilt at
# most this often after new events; a user's own behaviour reaches /rank through the online store at once.
RECALL_REFRESH_SECONDS = float(os.environ.get("PERSONA_RECALL_REFRESH_SECONDS", "60"))
# From this many ranked items on, /rank's top k comes from an approximate nearest-neighbour graph
# (bentos/nearest.py) built with the ranker; below it, the exact scan (faster there, and exact).
ANN_MIN_ITEMS = int(os.environ.get("PERSONA_ANN_MIN_ITEMS", "100000"))
TIMINGS = os.environ.get("PERSONA_TIMINGS") == "1"  # /rank answers carry their per-stage times (timings_ms)

# Fixed bounds, not read from the environment.
MAX_EVENTS = 500  # events per POST /events
MAX_CANDIDATES = 10_000  # candidates per /rank
SESSION_GAP = LIVE_QUERY_GAP.to_pytimedelta()  # a search this recent is still the live query (training's rule)
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)  # request times taken
