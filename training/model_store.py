"""The BentoML model store: where ``persona train`` saves each model version and serving loads it.

A version is the folder ``ProfileModel.save`` writes, plus metadata: the feature services and
features it reads, the normalisation, the data window, the configs, the metrics and the code version.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from core.config import MODEL_NAME
from training import dataset
from training.model import ProfileModel
from training.recall import package
from training.train import config_dict

if TYPE_CHECKING:
    from training.workflow import RunConfig


def bentoml_home(workspace: Path) -> None:
    """Keep the model store inside the workspace unless the user chose one."""
    os.environ.setdefault("BENTOML_HOME", str((workspace / "bentoml").resolve()))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def code_version() -> str:
    """The git commit this code is at, recorded in each model version ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - a copy without git still trains
        return "unknown"


def save_to_bentoml(model: ProfileModel, store, metrics: pd.DataFrame | None, events: pd.DataFrame | None,
                    cfg: RunConfig, extra: dict | None = None, two_stage=None, window: dict | None = None):
    """``bentoml.models.create``: the weights, tokenizer, feature spec and everything needed to serve;
    ``two_stage``: recall + rank's ranker and its layout (``training.recall.package``), when trained;
    ``window``: the data window (from, to, events) where no events frame was read (a training set)."""
    import bentoml

    metadata = {
        "feature_services": {"user": dataset.USER_SERVICE, "item": dataset.ITEM_SERVICE},
        "features": {"user": dataset.service_features(store, dataset.USER_SERVICE),
                     "item": dataset.service_features(store, dataset.ITEM_SERVICE)},
        "normalisation": {k: list(v) for k, v in model.spec.stats.items()},
        "data_window": window or {"from": events["event_timestamp"].min().isoformat(),
                                  "to": events["event_timestamp"].max().isoformat(), "events": int(len(events))},
        "model_config": asdict(model.cfg),
        "train_config": config_dict(cfg.train),
        "splits": list(cfg.splits),
        "metrics": json.loads(metrics.to_json(orient="records")) if metrics is not None else [],
        "code_version": code_version(),
        "ranking": ("two towers" if two_stage is None else
                    "recall + rank" if two_stage[1].scope == "all" else "recall + rank for searches, else two towers"),
        **(extra or {}),
    }
    metadata = _metadata_safe(json.loads(json.dumps(metadata, default=str)))
    with bentoml.models.create(MODEL_NAME, metadata=metadata, labels={"stage": "refit"}) as bento_model:
        if two_stage is not None:  # first: the model's manifest, written last, then lists its files too
            package.save(Path(bento_model.path) / package.FOLDER, *two_stage)
        model.save(Path(bento_model.path))
    return bento_model.tag


def _metadata_safe(value):
    """BentoML metadata takes no None: drop null dict entries, spell nulls in lists as "null"."""
    if isinstance(value, dict):
        return {k: _metadata_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_metadata_safe(v) if v is not None else "null" for v in value]
    return value


def load_from_bentoml(tag: str = "latest", device: str = "cpu") -> tuple[ProfileModel, dict, str]:
    """The model with a version (or ``latest``: the newest complete one, or a full ``name:version``
    tag): model, metadata, full tag. An incomplete version raises ``IncompleteModel``."""
    import bentoml

    if tag in ("latest", f"{MODEL_NAME}:latest"):
        tag = latest_complete()
    bento_model = bentoml.models.get(tag if ":" in tag else f"{MODEL_NAME}:{tag}")
    return ProfileModel.load(Path(bento_model.path), device), bento_model.info.metadata, str(bento_model.tag)


def saved_two_stage(tag: str):
    """The version's recall + rank ranker and layout, or None when it was saved without one."""
    import bentoml

    return package.load(Path(bentoml.models.get(tag).path) / package.FOLDER)


def latest_complete() -> str:
    """The newest version whose files are all there. BentoML's own ``latest`` is the newest by time,
    which a save killed while BentoML copied it into the store would be."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        versions = sorted(bentoml.models.list(MODEL_NAME), key=lambda m: m.info.creation_time, reverse=True)
    except NotFound:
        versions = []
    for version in versions:
        if not ProfileModel.problems(Path(version.path)):
            return str(version.tag)
    raise NotFound(f"no complete {MODEL_NAME} model in the store: run `persona train`")


def incomplete_versions() -> list[str]:
    """Versions a save left half written (``persona status`` names them)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return [str(m.tag) for m in bentoml.models.list(MODEL_NAME) if ProfileModel.problems(Path(m.path))]
    except NotFound:
        return []
