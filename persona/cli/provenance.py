"""Which users trained which model: the Bloom filter saved with a model, erased users kept out of a
new one, and the saved models that still hold some (shown by `persona status`)."""

from __future__ import annotations

import os
from pathlib import Path

from core.config import MODEL_NAME
from persona.cli.common import _event_log, _privacy


def _models(workspace: Path) -> list[dict]:
    """Trained profile models in the workspace's BentoML store, newest first."""
    if not (workspace / "bentoml").exists() and "BENTOML_HOME" not in os.environ:
        return []
    from training.model_store import bentoml_home

    bentoml_home(workspace)
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        found = bentoml.models.list(MODEL_NAME)
    except NotFound:  # a model store without any Persona model yet
        return []
    from training.model import ProfileModel

    models = sorted(found, key=lambda m: m.info.creation_time, reverse=True)
    # A save killed half way leaves a version that is not served (`latest` is the newest complete one).
    return [{"tag": str(m.tag), "created": m.info.creation_time.isoformat(),
             "complete": not ProfileModel.problems(Path(m.path))} for m in models]


def _erased_in_models(cfg, models: list[dict]) -> list[dict]:
    """The model versions whose training data held users erased since (by their Bloom filters)."""
    if not models:
        return []
    import bentoml

    from eventlog import tombstones
    from training.provenance import trained_on_erased

    log = _event_log(cfg)
    try:
        erased = tombstones.erased_hashes(log.engine)
    finally:
        log.dispose()
    out = []
    for m in models if erased else []:
        n = trained_on_erased(bentoml.models.get(m["tag"]).info.metadata, erased)
        if n:
            out.append({"tag": m["tag"], "erased_users": n})
    return out


def _provenance(cfg, events) -> dict:
    """The model's training users as a Bloom filter of salted hashes (see training/provenance.py)."""
    from training.provenance import METADATA_KEY, bloom

    privacy = _privacy(cfg)
    return {METADATA_KEY: bloom([privacy.hash(u) for u in events["user_id"].astype(str).unique()])}


def _without_erased(cfg, events):
    """Events of tombstoned users never reach a new model (the log no longer holds them, but be sure)."""
    from eventlog import tombstones

    log = _event_log(cfg)
    try:
        erased = tombstones.erased_hashes(log.engine)
    finally:
        log.dispose()
    if not erased:
        return events
    privacy = _privacy(cfg)
    gone = {u for u in events["user_id"].astype(str).unique() if privacy.hash(u) in erased}
    return events[~events["user_id"].isin(gone)]
