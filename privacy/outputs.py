"""The files Persona writes where the user asks (`persona training-set --output`, `persona recommend
--output`): outside the workspace, so the workspace's scrub would not see them. Each command records its
output here before writing it; `persona forget` scrubs every recorded output that still exists.
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD = "outputs.json"  # in the workspace: one absolute path per output, in the order first written


def record(workspace: Path, output: Path) -> None:
    """Remember ``output`` (a file or a folder) as a copy of user data that a forget must reach."""
    paths = recorded(workspace)
    path = str(Path(output).resolve())
    if path not in paths:
        target = Path(workspace) / RECORD
        tmp = target.with_name(f".{RECORD}.tmp")
        tmp.write_text(json.dumps({"outputs": [*paths, path]}, indent=2))
        tmp.replace(target)


def recorded(workspace: Path) -> list[str]:
    target = Path(workspace) / RECORD
    return json.loads(target.read_text())["outputs"] if target.exists() else []


def files(workspace: Path) -> list[Path]:
    """Every file of the recorded outputs outside the workspace (inside, the workspace's scrub sees them)."""
    ws = Path(workspace).resolve()
    out: list[Path] = []
    for path in map(Path, recorded(workspace)):
        if path == ws or ws in path.parents or not path.exists():
            continue
        out += sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    return out
