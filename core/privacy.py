"""Privacy primitives: salted hashes for tombstones, keyed pseudonyms for user ids, personal columns.

A tombstone must say "this user was erased" without keeping who: it holds a salted SHA-256 of the
id. The salt comes from ``PERSONA_PRIVACY_SALT`` or a random file generated once in the workspace,
so the hashes cannot be matched against a list of ids without it. Pseudonymous ids are an HMAC
(key from ``PERSONA_ID_KEY``): the same raw id always maps to the same pseudonym, so the service can
take raw ids and joins still work, but nothing stored reveals the raw id without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from core import config as config_mod

ENV_SALT = "PERSONA_PRIVACY_SALT"
ENV_ID_KEY = "PERSONA_ID_KEY"
SALT_FILE = "privacy_salt"
PSEUDONYM_PREFIX = "p_"
_PSEUDONYM = re.compile(r"^p_[0-9a-f]{32}$")
ERASED = "[erased]"
MASKED = "[personal: masked]"

# Columns whose values are personal data: reports and logs never show them unless allowed.
PERSONAL_COLUMNS = {
    "users": {"user_id", "age", "gender", "region", "occupation", "membership", "signup_timestamp"},
    "events": {"user_id", "query", "text", "session_id"},
    "items": set(),
}


def load_salt(workspace: Path | None, create: bool = True) -> bytes | None:
    """The tombstone salt: the environment's, else the workspace's file (made on first use)."""
    if value := os.environ.get(ENV_SALT):
        return value.encode()
    if workspace is None:
        return None
    path = Path(workspace) / SALT_FILE
    if path.exists():
        return path.read_bytes().strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path.read_bytes().strip()


def id_hash(user_id: str, salt: bytes) -> str:
    """The salted hash a tombstone or a model's training record keeps instead of the id."""
    return hashlib.sha256(salt + b"\x00" + str(user_id).encode()).hexdigest()


def pseudonym(user_id: str, key: bytes) -> str:
    """HMAC-SHA256 of the raw id, shortened to 128 bits; a pseudonym maps to itself (idempotent)."""
    value = str(user_id)
    if _PSEUDONYM.match(value):
        return value
    return PSEUDONYM_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Privacy:
    """The privacy settings of one workspace, resolved with their secrets."""

    salt: bytes | None = None
    id_key: bytes | None = None  # set only when pseudonymous ids are on
    show_personal_values: bool = False

    @classmethod
    def for_workspace(cls, workspace: Path, cfg: config_mod.Config | None = None) -> Privacy:
        cfg = cfg or config_mod.load(workspace)
        key = None
        if cfg.privacy.pseudonymous_ids:
            raw = os.environ.get(ENV_ID_KEY)
            if not raw:
                raise ValueError(f"privacy.pseudonymous_ids is on: set {ENV_ID_KEY} in the environment")
            key = raw.encode()
        return cls(load_salt(workspace), key, cfg.privacy.show_personal_values)

    @classmethod
    def for_log(cls, url: str) -> Privacy:
        """Settings when only the event log is known: its workspace is ``$PERSONA_WORKSPACE`` or, for
        a SQLite log, the folder holding the database file; else the environment alone."""
        workspace = os.environ.get("PERSONA_WORKSPACE")
        if not workspace and url.startswith("sqlite:///"):
            folder = Path(url.removeprefix("sqlite:///")).parent
            workspace = str(folder) if (folder / "persona.yaml").exists() else None
        if workspace and (Path(workspace) / "persona.yaml").exists():
            return cls.for_workspace(Path(workspace))
        return cls(load_salt(None))

    def user_id(self, raw: str) -> str:
        """The id as stored: its pseudonym when pseudonymous ids are on."""
        return pseudonym(raw, self.id_key) if self.id_key else str(raw)

    def hash(self, user_id: str) -> str:
        if self.salt is None:
            raise ValueError(f"no privacy salt: set {ENV_SALT} or give the workspace")
        return id_hash(user_id, self.salt)


def is_personal(table: str, column: str | None) -> bool:
    """Whether a column (or any of a "; "-joined list of columns) holds personal data."""
    names = [c.strip() for c in (column or "").split(";") if c.strip()]
    return any(n in PERSONAL_COLUMNS.get(table, set()) for n in names)


def mask_reason(table: str, column: str | None, reason: str) -> str:
    """A rule's reason without the offending value when the column is personal."""
    if not is_personal(table, column):
        return reason
    reason = re.sub(r"\(got .*\)$", f"(got {MASKED})", reason)
    return re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", MASKED, reason)
