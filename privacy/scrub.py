"""Scrub erased users from every file under a workspace that is not a store of its own.

Reports (validation summaries, GX validation results and Data Docs, training and feature reports),
copies of input files (``sample/``), recommendation outputs and checkpoints may all quote a user:
their id, or a query or review only they wrote. Each file that holds one of those strings loses the
record that holds it (a line, a table row, a JSON list entry, a Parquet row); a checkpoint is
deleted (the next run makes a new one). Whatever is left anywhere is reported, never hidden.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.privacy import ERASED
from feature_repo.pipeline.erase import erase_parquet_file

LINE_FILES = {".csv", ".tsv", ".md", ".txt", ".log", ".jsonl", ".yaml", ".yml"}
HTML_FILES = {".html", ".htm"}
DISPOSABLE = {".pt", ".pth", ".ckpt", ".pkl"}  # checkpoints: rebuilt by the next run
DISPOSABLE_DIRS = {"checkpoints"}


@dataclass
class ScrubResult:
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)  # files still holding a needle: erasure incomplete


def variants(needles: list[str]) -> list[str]:
    """Each string as it may be written: plain, HTML-escaped, JSON-escaped."""
    out: list[str] = []
    for n in needles:
        for v in (n, html.escape(n), html.escape(n, quote=False), json.dumps(n)[1:-1],
                  json.dumps(n, ensure_ascii=False)[1:-1]):
            if v and v not in out:
                out.append(v)
    return out


def find(path: Path, needles: list[str]) -> bool:
    if path.suffix == ".parquet":  # compressed pages: the bytes need not hold the strings
        try:
            import pyarrow.compute as pc

            return bool(pc.any(_parquet_hits(path, needles)[1]).as_py())
        except (OSError, ValueError):  # not a readable Parquet file after all: its bytes, as any other file
            pass
    data = path.read_bytes()
    return any(v.encode() in data for v in variants(needles))


def scrub_user_rows(paths: list[Path], user_ids: list[str]) -> ScrubResult:
    """Drop the rows of these users from tables Persona wrote outside the workspace (training sets,
    recommendations: Parquet or CSV with a ``user_id`` column), matching the id exactly as the offline
    store's eraser does: another user's row that quotes the same words stays. Named by their full path."""
    result = ScrubResult()
    wanted = sorted({str(u) for u in user_ids if u})
    for path in paths:
        if not wanted or path.suffix not in (".parquet", ".csv"):
            continue
        if path.suffix == ".parquet":
            try:
                dropped = erase_parquet_file(path, wanted)
            except (OSError, ValueError):  # not a readable Parquet file: nothing of ours
                continue
        else:
            dropped = _drop_csv_users(path, set(wanted))
        if dropped:
            result.changed.append(str(path))
    return result


def _drop_csv_users(path: Path, wanted: set[str]) -> int:
    import csv
    import io

    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or "user_id" not in rows[0]:
        return 0
    col = rows[0].index("user_id")
    kept = [rows[0]] + [r for r in rows[1:] if not (len(r) > col and r[col] in wanted)]
    if len(kept) == len(rows):
        return 0
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows(kept)
    tmp = path.with_name(f".{path.name}.scrub.tmp")
    tmp.write_bytes((b"\xef\xbb\xbf" if bom else b"") + out.getvalue().encode("utf-8", errors="surrogateescape"))
    tmp.replace(path)
    return len(rows) - len(kept)


def scrub_workspace(workspace: Path, needles: list[str], skip: list[Path]) -> ScrubResult:
    """Scrub every file under ``workspace`` except those under ``skip`` (stores erased by their own code)."""
    result = ScrubResult()
    needles = [n for n in dict.fromkeys(needles) if n]
    if not needles:
        return result
    skip = [p.resolve() for p in skip]
    for path in sorted(p for p in Path(workspace).rglob("*") if p.is_file() and not p.is_symlink()):
        resolved = path.resolve()
        if any(resolved == s or s in resolved.parents for s in skip) or not find(path, needles):
            continue
        rel = str(path.relative_to(workspace))
        if path.suffix in DISPOSABLE or DISPOSABLE_DIRS & {p.name for p in path.parents}:
            path.unlink()
            result.deleted.append(rel)
            continue
        scrub_file(path, needles)
        result.changed.append(rel)
        if find(path, needles):
            result.remaining.append(rel)
    return result


def scrub_file(path: Path, needles: list[str]) -> None:
    if path.suffix == ".parquet":
        _scrub_parquet(path, needles)
    elif path.suffix == ".json":
        _scrub_json(path, needles)
    elif path.suffix in HTML_FILES:
        _write(path, _scrub_html(path.read_text(errors="surrogateescape"), needles))
    elif path.suffix in LINE_FILES:
        _write(path, _drop_lines(path.read_text(errors="surrogateescape"), needles))
    else:  # any other text: the strings are overwritten in place
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            return  # binary: reported as remaining
        _write(path, _replace(text, needles))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.scrub.tmp")
    tmp.write_text(text, errors="surrogateescape")
    tmp.replace(path)


def _holds(text: str, needles: list[str]) -> bool:
    return any(v in text for v in variants(needles))


def _replace(text: str, needles: list[str]) -> str:
    for v in sorted(variants(needles), key=len, reverse=True):
        text = text.replace(v, ERASED)
    return text


def _drop_lines(text: str, needles: list[str]) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not _holds(line, needles))


_BLOCKS = [re.compile(p, re.S | re.I) for p in (r"<tr\b.*?</tr>", r"<li\b.*?</li>", r"<p\b.*?</p>")]


def _scrub_html(text: str, needles: list[str]) -> str:
    """Drop the table rows, list items and paragraphs that hold a needle; overwrite what remains."""
    for pattern in _BLOCKS:
        text = pattern.sub(lambda m: "" if _holds(m.group(0), needles) else m.group(0), text)
    return _replace(text, needles)


def _scrub_json(path: Path, needles: list[str]) -> None:
    try:
        data = json.loads(path.read_text())
    except ValueError:
        _write(path, _replace(path.read_text(errors="surrogateescape"), needles))
        return
    path.write_text(json.dumps(_clean(data, needles), indent=2, default=str))


def _clean(value, needles: list[str]):
    """List entries that hold a needle go; strings that hold one are overwritten; keys too."""
    if isinstance(value, list):
        return [_clean(v, needles) for v in value if not _holds(json.dumps(v, default=str), needles)]
    if isinstance(value, dict):
        return {(_replace(k, needles) if isinstance(k, str) else k): _clean(v, needles) for k, v in value.items()}
    if isinstance(value, str) and _holds(value, needles):
        return _replace(value, needles)
    return value


def _scrub_parquet(path: Path, needles: list[str]) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table, hit = _parquet_hits(path, needles)
    tmp = path.with_name(f".{path.name}.scrub.tmp")
    pq.write_table(table.filter(pc.invert(hit)), tmp, coerce_timestamps="us",
                   allow_truncated_timestamps=True)  # Spark reads microseconds, not nanoseconds
    tmp.replace(path)


def _parquet_hits(path: Path, needles: list[str]):
    """The file's table and which of its rows hold a needle in a text column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    hit = pa.array([False] * table.num_rows)
    for name in table.column_names:
        column = table[name]
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        for n in needles:
            hit = pc.or_(hit, pc.fill_null(pc.match_substring(column, n), False))
    return table, hit
