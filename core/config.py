"""Workspace configuration: one dataset's event log, stores, models and reports live in one folder.

``WORKSPACE/persona.yaml`` holds the settings a data scientist may change. Secrets never live
there: database URLs for the ``prod`` profile come from the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

PROFILES = ("local", "prod", "spark")
CONFIG_FILE = "persona.yaml"
ENV_EVENT_LOG_URL = "PERSONA_EVENT_LOG_URL"  # overrides the event log in any profile
ENV_POSTGRES_URL = "PERSONA_POSTGRES_URL"  # prod: offline store, registry and event log; spark: the last two
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


@dataclass(frozen=True)
class Behaviour:
    """What one event type means for training and for the user's sequence (``behaviours:`` in persona.yaml)."""

    weight: float = 0.0  # its weight as a training target; 0: not a target
    sequence: bool = True  # enters the user's sequence and recent titles (an exposure never does)
    exposure: bool = False  # shown, not opened: a negative in training


# The built-in types. A shop overrides any field of one with a partial mapping (`view: {exposure: true}`
# for a log whose `view` means an impression) and declares its own (`share: {weight: 1.0}`).
DEFAULT_BEHAVIOURS: dict[str, Behaviour] = {
    "impression": Behaviour(exposure=True),
    "view": Behaviour(),  # a product page opened: in the sequence, not a target
    "click": Behaviour(weight=1.0),
    "favorite": Behaviour(weight=2.0),
    "add_to_cart": Behaviour(weight=2.0),
    "purchase": Behaviour(weight=4.0),
    "review": Behaviour(weight=3.0),
    "search": Behaviour(sequence=False),  # queries have their own text features
}
# The same names as core.contract.EVENT_TYPES (a test holds them equal): not imported from there, since
# the contract loads pandas and `persona --help` loads this module.
BEHAVIOUR_FIELDS = tuple(f.name for f in fields(Behaviour))
MAX_TYPE_NAME = 256  # the contract's bound on an event_type value (SHORT_TEXT)


def sequence_types_of(behaviours: Mapping[str, Behaviour]) -> tuple[str, ...]:
    """The types that enter a user's sequence: declared so, and not exposures."""
    return tuple(t for t, b in behaviours.items() if b.sequence and not b.exposure)


def exposure_types_of(behaviours: Mapping[str, Behaviour]) -> tuple[str, ...]:
    return tuple(t for t, b in behaviours.items() if b.exposure)


DEFAULT_SEQUENCE_TYPES = sequence_types_of(DEFAULT_BEHAVIOURS)
DEFAULT_EXPOSURE_TYPES = exposure_types_of(DEFAULT_BEHAVIOURS)


@dataclass
class Config:
    workspace: Path
    profile: str = "local"
    event_log_url: str | None = None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Every declared behaviour type: the built-ins (DEFAULT_BEHAVIOURS) merged with persona.yaml's.
    behaviours: dict[str, Behaviour] = field(default_factory=lambda: dict(DEFAULT_BEHAVIOURS))
    # The text encoder (a local Hugging Face folder): `persona train`'s default for --bert, and the
    # vocabulary the feature checks measure unknown tokens against. None: all-MiniLM-L6-v2.
    text_model: str | None = None

    @property
    def positives(self) -> dict[str, float]:
        """The training targets and their weights: every type with a weight above 0."""
        return {t: b.weight for t, b in self.behaviours.items() if b.weight > 0}

    @property
    def event_types(self) -> tuple[str, ...]:
        """Every declared type: the gate quarantines any other."""
        return tuple(self.behaviours)

    @property
    def sequence_types(self) -> tuple[str, ...]:
        return sequence_types_of(self.behaviours)

    @property
    def exposure_types(self) -> tuple[str, ...]:
        return exposure_types_of(self.behaviours)

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
        if self.profile in ("prod", "spark") and (url := os.environ.get(ENV_POSTGRES_URL)):
            return url  # spark with Postgres: a production deployment, the prod profile's log
        if self.profile == "prod":
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
    behaviours = merge_behaviours(data.pop("behaviours", None), data.pop("positives", None), str(path))
    unknown = set(data) - {"profile", "event_log_url", "text_model"}
    if unknown:
        raise ValueError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    cfg = Config(workspace=ws, validation=validation, privacy=privacy, behaviours=behaviours, **data)
    if profile:
        cfg.profile = profile
    if cfg.profile not in PROFILES:
        raise ValueError(f"unknown profile {cfg.profile!r}; choose one of {', '.join(PROFILES)}")
    if not path.exists():
        cfg.save()
    return cfg


def merge_behaviours(declared, legacy_positives=None, where: str = CONFIG_FILE) -> dict[str, Behaviour]:
    """The built-in behaviours with persona.yaml's ``behaviours:`` merged in, type by type and field by field.

    ``legacy_positives``: the ``positives:`` mapping (type -> weight) of a persona.yaml written before
    behaviour types were configurable. It is read as the weights: the types it lists get theirs, every
    other built-in none; sequence and exposure keep today's defaults.
    """
    out = dict(DEFAULT_BEHAVIOURS)
    if legacy_positives is not None:
        if declared:
            raise ValueError(f"{where}: both `positives:` (the old setting) and `behaviours:` are set: move the "
                             "weights under `behaviours:` (for example `click: {weight: 1.0}`) and delete `positives:`")
        if not isinstance(legacy_positives, Mapping):
            raise ValueError(f"{where}: `positives:` must map event types to weights")
        out = {t: replace(b, weight=0.0) for t, b in out.items()}
        declared = {t: {"weight": w} for t, w in legacy_positives.items()}
    if declared is None:
        return out
    if not isinstance(declared, Mapping):
        raise ValueError(f"{where}: `behaviours:` must map event types to their settings "
                         f"({', '.join(BEHAVIOUR_FIELDS)})")
    for name, settings in declared.items():
        out[name] = _behaviour(name, settings, out.get(name, Behaviour()), where)
    return out


def _behaviour(name, settings, base: Behaviour, where: str) -> Behaviour:
    """One type's settings over ``base`` (its built-in defaults, or a plain type's), checked."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_TYPE_NAME:
        raise ValueError(f"{where}: behaviours: {name!r} is not a usable event type name")
    what = f"{where}: behaviours.{name}"
    settings = {} if settings is None else settings
    if not isinstance(settings, Mapping):
        raise ValueError(f"{what}: expected a mapping of {', '.join(BEHAVIOUR_FIELDS)}, got {settings!r}")
    unknown = sorted(map(str, set(settings) - set(BEHAVIOUR_FIELDS)))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}; a behaviour has "
                         f"{', '.join(BEHAVIOUR_FIELDS)}")
    weight = settings.get("weight", base.weight)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(f"{what}: weight must be a number, got {weight!r}")
    if weight < 0:
        raise ValueError(f"{what}: weight must be >= 0 (0: not a training target), got {weight}")
    for flag in ("sequence", "exposure"):
        if not isinstance(settings.get(flag, False), bool):
            raise ValueError(f"{what}: {flag} must be true or false, got {settings[flag]!r}")
    out = replace(base, **{**settings, "weight": float(weight)})
    if out.exposure and out.weight > 0:
        raise ValueError(f"{what}: an exposure (shown, not opened) is a negative in training, so it cannot have "
                         f"a weight ({out.weight}): set weight: 0 or exposure: false")
    return out
