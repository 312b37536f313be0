"""The files Persona writes where the user asks (`persona training-set --output`, `persona recommend
--output`): outside the workspace, so the workspace's scrub would not see them. Each command records its
output here before writing it; `persona forget` scrubs every recorded output that still exists.

One small file per output (named by a hash of its path) under ``WORKSPACE/outputs/``: two commands
recording at once (both hold the erasure lock shared) never overwrite each other's record.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

RECORDS = "outputs"  # in the workspace: {"path": absolute path} per output


def record(workspace: Path, output: Path) -> None:
    """Remember ``output`` (a file or a folder) as a copy of user data that a forget must reach."""
    path = str(Path(output).resolve())
    folder = Path(workspace) / RECORDS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(path.encode()).hexdigest()[:32]}.json"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # its own: the same output twice at once
        tmp.write_text(json.dumps({"path": path}))
        tmp.replace(target)


def recorded(workspace: Path) -> list[str]:
    folder = Path(workspace) / RECORDS
    return sorted(json.loads(p.read_text())["path"] for p in folder.glob("*.json")) if folder.is_dir() else []


def files(workspace: Path) -> list[Path]:
    """Every file of the recorded outputs outside the workspace (inside, the workspace's scrub sees them)."""
    ws = Path(workspace).resolve()
    out: list[Path] = []
    for path in map(Path, recorded(workspace)):
        if path == ws or ws in path.parents or not path.exists():
            continue
        out += sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    return out
