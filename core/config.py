"""Workspace configuration: one dataset's event log, stores, models and reports live in one folder.

``WORKSPACE/persona.yaml`` holds the settings a data scientist may change. Secrets never live
there: database URLs for the ``prod`` profile come from the environment.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

PROFILES = ("local", "prod", "spark")
CONFIG_FILE = "persona.yaml"
ENV_EVENT_LOG_URL = "PERSONA_EVENT_LOG_URL"  # overrides the event log in any profile
ENV_POSTGRES_URL = "PERSONA_POSTGRES_URL"  # prod: offline store, registry and event log
ENV_REDIS_URL = "PERSONA_REDIS_URL"  # prod: online store
MODEL_NAME = "persona-profile"  # the BentoML model every `persona train` saves a version of


@dataclass
class ValidationConfig:
    max_reject_share: float = 0.10  # above this share of bad rows the whole batch is held
    clock_skew_minutes: float = 5.0  # timestamps this far in the future are still accepted
    on_schema_drift: str = "hold"  # hold | accept: new or missing columns vs the previous batch
    feature_drift: str = "warn"  # warn | fail: key feature means moved against the previous build
    # Open rows the quarantine may hold. Past it a file batch is refused whole (nothing written) and
    # /events answers its rejected events without storing them: a flood of bad rows cannot fill the disk.
    max_quarantined_rows: int = 100_000


@dataclass
class PrivacyConfig:
    # Hash user ids at ingestion with HMAC (key from $PERSONA_ID_KEY): no raw id is stored after that.
    pseudonymous_ids: bool = False
    # Show values of personal columns (age, region, query, review text...) in data-quality reports.
    show_personal_values: bool = False


@dataclass
class Config:
    workspace: Path
    profile: str = "local"
    event_log_url: str | None = None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Event types that count as positives for training, with their weights; views are exposures.
    positives: dict[str, float] = field(default_factory=lambda: {
        "click": 1.0, "add_to_cart": 2.0, "purchase": 4.0, "review": 3.0})

    @property
    def sample_dir(self) -> Path:
        return self.workspace / "sample"

    @property
    def reports_dir(self) -> Path:
        return self.workspace / "reports"

    def resolved_event_log_url(self) -> str:
        """Environment first, then the workspace file, then a SQLite file in the workspace."""
        if url := os.environ.get(ENV_EVENT_LOG_URL):
            return url
        if self.event_log_url:
            return self.event_log_url
        if self.profile == "prod":
            if url := os.environ.get(ENV_POSTGRES_URL):
                return url
            raise ValueError(f"profile 'prod' needs {ENV_POSTGRES_URL} (or {ENV_EVENT_LOG_URL}) "
                             "in the environment")
        return f"sqlite:///{(self.workspace / 'eventlog.db').resolve()}"

    def save(self) -> Path:
        self.workspace.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("workspace")
        path = self.workspace / CONFIG_FILE
        path.write_text("# Persona workspace settings. Secrets (database URLs with passwords) belong in\n"
                        f"# the environment: {ENV_EVENT_LOG_URL}, {ENV_POSTGRES_URL}, {ENV_REDIS_URL}.\n"
                        + yaml.safe_dump(data, sort_keys=False))
        return path


def read_profile(workspace: Path | str) -> str:
    """The workspace's profile, read without creating ``persona.yaml`` (``load`` would: importing the
    Feast definitions must not write to the workspace)."""
    path = Path(workspace) / CONFIG_FILE
    data = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    return os.environ.get("PERSONA_PROFILE") or data.get("profile", "local")


def load(workspace: Path | str, profile: str | None = None) -> Config:
    """Read ``persona.yaml`` (creating it with defaults), with ``profile`` overriding the file."""
    ws = Path(workspace)
    path = ws / CONFIG_FILE
    data = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    validation = ValidationConfig(**(data.pop("validation", None) or {}))
    privacy = PrivacyConfig(**(data.pop("privacy", None) or {}))
    unknown = set(data) - {"profile", "event_log_url", "positives"}
    if unknown:
        raise ValueError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    cfg = Config(workspace=ws, validation=validation, privacy=privacy, **data)
    if profile:
        cfg.profile = profile
    if cfg.profile not in PROFILES:
        raise ValueError(f"unknown profile {cfg.profile!r}; choose one of {', '.join(PROFILES)}")
    if not path.exists():
        cfg.save()
    return cfg
