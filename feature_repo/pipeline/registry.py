"""The workspace's Feast repo: import the definitions for a workspace, open the store, apply."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path

from feature_repo.pipeline import feast_adapter
from feature_repo.pipeline.feast_config import REPO_DIR, write_yaml, yaml_path


@contextmanager
def _workspace_env(workspace: Path, profile: str):
    """The definitions module reads the workspace and profile from the environment at import."""
    old = {k: os.environ.get(k) for k in ("PERSONA_WORKSPACE", "PERSONA_PROFILE")}
    os.environ["PERSONA_WORKSPACE"] = str(workspace.resolve())
    os.environ["PERSONA_PROFILE"] = profile
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_definitions(workspace: Path, profile: str):
    """Import ``feature_repo/features.py`` fresh for this workspace (as Feast's CLI would)."""
    with _workspace_env(workspace, profile):
        spec = importlib.util.spec_from_file_location("persona_feature_definitions", REPO_DIR / "features.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling need the module registered
        spec.loader.exec_module(module)
    return module


def feature_store(workspace: Path):
    from feast import FeatureStore

    path = yaml_path(workspace)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `persona features apply` first")
    store = FeatureStore(repo_path=str(REPO_DIR), fs_yaml_file=path)
    _write_ahead_log(store)
    feast_adapter.connection_per_thread(store)
    return store


def _write_ahead_log(store) -> None:
    """The SQLite online store in WAL mode (kept by the file): a push commits with one sync instead
    of several, and readers (the service) never wait for a writer (a materialize)."""
    online = store.config.online_store
    if getattr(online, "type", None) == "sqlite" and online.path and Path(online.path).exists():
        with contextlib.closing(sqlite3.connect(online.path, timeout=30)) as con:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")


def apply(workspace: Path, profile: str):
    """Write the yaml and register every Feast object of the definitions module."""
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    write_yaml(profile, workspace)
    module = load_definitions(workspace, profile)
    kinds = (Entity, FeatureView, OnDemandFeatureView, FeatureService, DataSource)
    objects = [v for v in vars(module).values() if isinstance(v, kinds)]
    store = feature_store(workspace)
    store.apply(objects)
    return store, objects
