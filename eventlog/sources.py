"""Read a batch of contract tables from a folder of CSV/Parquet files or a SQLAlchemy URL.

The loader does structure only: it finds the tables, checks that required columns exist, and
coerces every column to its contract type (string ids, UTC timestamps, numbers). Problems that
sink the whole batch raise :class:`StructuralError` before anything is written. A *cell* that cannot
be coerced is not structural: it is recorded as a :class:`CellIssue` and left as null, and the
validation gate quarantines its row (the seam between this module and ``validation/``).
"""

from __future__ import annotations

import codecs
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from core.contract import CONTRACT, INVALID_UTF8, TABLES, columns, required_columns
from core.plain import plain

codecs.register_error("persona_mark_invalid", lambda err: (INVALID_UTF8 * (err.end - err.start), err.end))

FILE_SUFFIXES = (".csv", ".parquet")
_TZ_SUFFIX = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$", re.IGNORECASE)
# How "not a number" and infinity are spelled in text (CSV), and by str() of a float.
_NON_FINITE = {f"{sign}{word}" for sign in ("", "+", "-") for word in ("nan", "inf", "infinity")}


class StructuralError(ValueError):
    """A batch-level problem: missing required column, unreadable source, uncoercible column."""


@dataclass(frozen=True)
class CellIssue:
    row: int  # 0-based position in the table batch
    column: str
    rule: str
    reason: str


@dataclass
class TableBatch:
    table: str
    origin: str  # file path or "URL#table", for messages
    frame: pd.DataFrame  # every contract column, normalised; extra columns kept as strings
    raw: pd.DataFrame  # the original values as text, for quarantine payloads
    present: list[str]  # columns the source actually had, in source order
    row_numbers: np.ndarray  # 1-based data-row numbers in the source (CSV line = row + 1)
    issues: list[CellIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)


@dataclass
class Batch:
    """One delivery of contract tables.

    ``kind`` says how it arrived: ``"files"`` or ``"sql"`` (:func:`load_batch`), ``"replay"``
    (quarantined rows retried) or ``"api"`` (built in code, such as ``POST /events``). Only file and
    SQL batches set the column baseline that schema drift is checked against: a request that
    carries four fields, or a replay of a few rows, says nothing about the shape of the next file.
    """

    source: str
    tables: dict[str, TableBatch]
    kind: str = "api"

    @property
    def rows(self) -> int:
        return sum(len(t) for t in self.tables.values())


def is_url(source: str) -> bool:
    return "://" in source


def load_batch(source: str | Path) -> Batch:
    """Read whatever subset of users/items/events the source holds and normalise it."""
    src = str(source)
    raw_tables = _read_sql(src) if is_url(src) else _read_folder(Path(src))
    if not raw_tables:
        raise StructuralError(
            f"{_redact(src)}: no contract table found (expected users, items and/or events "
            f"as {' or '.join(FILE_SUFFIXES)} files, or SQL tables with those names)")
    tables = {name: normalise(name, frame, origin) for name, (frame, origin) in raw_tables.items()}
    return Batch(source=_redact(src), tables=tables, kind="sql" if is_url(src) else "files")


def _redact(url: str) -> str:
    """Hide a password in a SQLAlchemy URL before it reaches a message or a log."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _read_folder(folder: Path) -> dict[str, tuple[pd.DataFrame, str]]:
    if not folder.is_dir():
        raise StructuralError(f"{folder}: not a folder (and not a SQLAlchemy URL)")
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    for table in TABLES:
        found = [folder / f"{table}{s}" for s in FILE_SUFFIXES if (folder / f"{table}{s}").exists()]
        if len(found) > 1:
            raise StructuralError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
        if found:
            out[table] = (_read_file(found[0], table), str(found[0]))
    return out


def _read_file(path: Path, table: str) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            return _read_parquet(path, table)
        if path.stat().st_size == 0:
            raise StructuralError(f"{path}: the file is empty (not even a header row)")
        holds_nul = _holds_nul(path)  # refuses binary data before pandas reads any of it
        csv = {"encoding": "utf-8", "encoding_errors": "persona_mark_invalid"}
        # pandas renames a repeated header (a second user_id becomes "user_id.1"), so the header
        # is checked as written before the data is read.
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, **csv)
        named = [n for n in (header.iloc[0] if len(header) else []) if n.strip()]  # "" is "Unnamed: n"
        _no_duplicate_columns(named, str(path))
        # Everything as text: the contract, not pandas' guesses, decides types. Only an empty
        # field is null ("NA" may be a real region code). Bytes that are not UTF-8 become INVALID_UTF8
        # and the gate quarantines their rows instead of the whole file failing.
        # pandas' C parser ends a field at a NUL byte (an id "u1\0x" read as "u1"): a file that holds
        # one is read by the Python parser, which keeps it, so the gate can refuse that id by name.
        engine = "python" if holds_nul else "c"
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], engine=engine, **csv)
    except StructuralError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types; all mean "unreadable"
        raise StructuralError(f"{path}: unreadable: {type(exc).__name__}: {exc}") from exc


# Bytes no text file is made of: C0 controls but tab, line feed, form feed and carriage return.
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13))


def _holds_nul(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether the file holds a NUL byte; a file that is not text is refused on the way.

    A CSV may hold the odd NUL or control character in a field (the gate names its row), but a file
    in which more than 1% of the bytes read so far are such (all NULs, random junk, a compressed or
    UTF-16 file) is binary: it is refused after at most one chunk more, never read into rows.
    """
    nul = False
    control = seen = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            seen += len(block)
            control += len(block) - len(block.translate(None, _CONTROL_BYTES))
            nul = nul or b"\x00" in block
            if control > 64 and control * 100 > seen:
                raise StructuralError(
                    f"{path}: not a text CSV file: {control:,} of its first {seen:,} bytes are NUL or other "
                    "control bytes (binary data, or text in an encoding other than UTF-8 such as UTF-16)")
    return nul


def _read_parquet(path: Path, table: str) -> pd.DataFrame:
    """A Parquet file; a NaN stored in a numeric contract column is kept apart from a null.

    pandas reads both a null and a NaN float as NaN, so a NaN (which a CSV spells "NaN" and the gate
    quarantines) would pass as a missing value. Such cells are handed on as the text "NaN".
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    _no_duplicate_columns(pq.read_schema(path).names, str(path))
    frame = pd.read_parquet(path)
    numeric = [c.name for c in CONTRACT[table] if c.type in ("int", "float") and c.name in frame.columns
               and pd.api.types.is_float_dtype(frame[c.name])]
    if numeric:
        stored = pq.read_table(path, columns=numeric)
        for name in numeric:
            is_nan = pc.fill_null(pc.is_nan(stored[name].cast("float64")), False).to_numpy()
            if is_nan.any():
                frame[name] = frame[name].astype(object).where(~is_nan, "NaN")
    return frame


def _no_duplicate_columns(names: list, origin: str) -> None:
    """Two columns of one name (spaces around a name do not count) are a structural error."""
    stripped = [str(n).strip() for n in names]
    dupes = [n for i, n in enumerate(stripped) if n in stripped[:i]]
    if dupes:
        raise StructuralError(f"{origin}: column {dupes[0]!r} appears more than once")


def _read_sql(url: str) -> dict[str, tuple[pd.DataFrame, str]]:
    try:
        engine = sa.create_engine(url)
    except Exception as exc:
        raise StructuralError(f"{_redact(url)}: unreadable: {type(exc).__name__}: {exc}") from exc
    try:
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
            return {t: (pd.read_sql_table(t, conn), f"{_redact(url)}#{t}") for t in TABLES if t in names}
    except Exception as exc:
        raise StructuralError(f"{_redact(url)}: unreadable: {type(exc).__name__}: {exc}") from exc
    finally:
        engine.dispose()


def normalise(table: str, frame: pd.DataFrame | list[dict], origin: str) -> TableBatch:
    """Check structure and coerce every contract column to its type.

    ``frame`` may also be the records themselves (dicts, as parsed from JSON). Prefer that for JSON
    input: a DataFrame cannot tell a NaN from a missing value, since pandas stores both as NaN, so
    a NaN ``value`` in a DataFrame passes as null, while in records it is quarantined as it is
    when a CSV spells it "NaN". Infinity is quarantined either way.
    """
    if not isinstance(frame, pd.DataFrame):
        single = _single_record(table, frame, origin) if len(frame) == 1 else None
        if single is not None:
            return single
        frame = _records_frame(table, frame)
    frame = frame.reset_index(drop=True)
    _no_duplicate_columns(list(frame.columns), origin)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required_columns(table) if c not in frame.columns]
    if missing:
        raise StructuralError(
            f"{origin}: required column {missing[0]!r} is missing "
            f"(found: {', '.join(frame.columns) or 'no columns'})")
    present = list(frame.columns)
    raw = frame.astype(object).where(frame.notna(), None).astype(str).where(frame.notna(), None)
    for name in [c for c in frame.columns if pd.api.types.is_object_dtype(frame[c])]:
        # Nested values (a JSON object or list) stay Python objects: the event log stores them as
        # JSON and a quarantine payload keeps them, instead of their repr() text.
        cells = frame[name].to_numpy(dtype=object)
        nested = np.fromiter((isinstance(v, dict | list | np.ndarray) for v in cells), dtype=bool, count=len(cells))
        if nested.any():
            kept = raw[name].to_numpy(dtype=object).copy()
            for i in np.flatnonzero(nested):  # one by one: equal-length lists must not become a 2-D array
                kept[i] = plain(cells[i])
            raw[name] = kept
    out = pd.DataFrame(index=frame.index)
    issues: list[CellIssue] = []
    notes: list[str] = []
    spec = columns(table)
    for name, col in spec.items():
        if name not in frame.columns:
            out[name] = pd.Series(pd.NA, index=frame.index, dtype=_dtype(col.type))
            continue
        # A list or object (a Parquet list<string> column, a JSON array) is no single value: it is
        # nulled and its row quarantined ("scalar_value"), never stored as its printed form.
        cells = frame[name]
        nested = _non_scalar(cells)
        if nested.any():
            cells = cells.astype(object).where(~nested, None)
        values, bad, note = _coerce(cells, col.type)
        non_finite = _non_finite(cells) if col.type in ("int", "float") else np.zeros(len(frame), bool)
        mistyped = bad[~non_finite[bad]]
        filled = int(frame[name].notna().sum() - non_finite.sum())
        wrong = len(mistyped) + int(nested.sum())
        if wrong and wrong == filled and filled >= max(2, len(frame) / 2):
            # The whole column is of another type (a sparse column's one bad cell is a row issue).
            if not len(mistyped):
                first = int(np.flatnonzero(nested)[0])
                raise StructuralError(
                    f"{origin}: column {name!r} holds lists or objects, not single {col.type} values "
                    f"(row {first + 1} has {_shown(frame[name].iloc[first])})")
            example = frame[name].iloc[mistyped[0]]
            raise StructuralError(
                f"{origin}: column {name!r} cannot be read as {col.type}: none of its "
                f"{filled} values parse (row {mistyped[0] + 1} has {str(example)[:60]!r})")
        issues += [CellIssue(int(i), name, "scalar_value",
                             f"{name}={_shown(frame[name].iloc[i])} is a list or object, not a single value")
                   for i in np.flatnonzero(nested)]
        out[name] = values
        issues += [CellIssue(int(i), name, "finite_number",
                             f"{name}={str(frame[name].iloc[i])[:60]!r} is not a finite number")
                   if non_finite[i] else
                   CellIssue(int(i), name, "type",
                             f"{name}={str(frame[name].iloc[i])[:60]!r} is not a valid {col.type}")
                   for i in bad]
        if note:
            notes.append(f"{origin}: column {name!r}: {note}")
    for extra in (c for c in frame.columns if c not in spec):
        out[extra] = raw[extra]
    if len(frame) == 0:
        notes.append(f"{origin}: header only, no rows")
    if table == "events":
        out["event_id"] = _fill_event_ids(out)
    ordered = [c.name for c in CONTRACT[table]] + [c for c in out.columns if c not in spec]
    return TableBatch(table, origin, out[ordered], raw, present, np.arange(1, len(frame) + 1),
                      issues, notes)


_PLAIN_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)?(?:Z|[+-]\d{2}:\d{2})?")


def _single_record(table: str, records: list[dict], origin: str) -> TableBatch | None:
    """One plain record (a single ``POST /events`` event) normalised without pandas' per-column work,
    which was most of such a request's time; None when the record needs the general path.

    Plain means: contract fields only, their names already clean, the required ones present;
    strings as ``str``; numbers as finite ``int``/``float`` (not ``bool``), whole for an ``int``
    field; timestamps in the ISO 8601 spellings that :data:`_PLAIN_ISO` accepts; any value may be
    null. Such a record cannot raise a cell issue, and the result is the general path's, column for
    column and type for type (``tests/test_sources.py`` checks both on a corpus of records)."""
    record, spec = records[0], columns(table)
    if not isinstance(record, dict) or any(not isinstance(k, str) or k not in spec for k in record):
        return None
    if any(name not in record for name in required_columns(table)):
        return None  # the general path names the missing column
    values, notes = {}, []
    for name, col in spec.items():
        value = record.get(name)
        if value is None:
            values[name] = None
        elif col.type == "string" and isinstance(value, str):
            values[name] = value.strip() or None
        elif col.type in ("int", "float") and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value) or abs(value) >= 2**53 or (col.type == "int" and not float(value).is_integer()):
                return None
            values[name] = int(value) if col.type == "int" else float(value)
        elif col.type == "timestamp" and isinstance(value, str) and _PLAIN_ISO.fullmatch(text := value.strip()):
            try:
                stamp = pd.Timestamp(datetime.fromisoformat(text.replace("Z", "+00:00")))
            except ValueError:
                return None
            if not 1700 <= stamp.year <= 2200:  # pandas' own parse has bounds: leave the edges to it
                return None
            if stamp.tzinfo is None:
                stamp = stamp.tz_localize("UTC")
                notes.append(f"{origin}: column {name!r}: {_naive_note(1)}")
            values[name] = stamp.tz_convert("UTC")
        else:
            return None
    out = pd.DataFrame({name: pd.array([values[name]], dtype=_dtype(col.type)) for name, col in spec.items()})
    if table == "events":
        out["event_id"] = _fill_event_ids(out)
    raw = pd.DataFrame({name: pd.array([None if v is None else str(v)], dtype=object) for name, v in record.items()})
    return TableBatch(table, origin, out, raw, list(record), np.arange(1, 2), [], notes)


def _records_frame(table: str, records: list[dict]) -> pd.DataFrame:
    """Records (dicts from JSON) as a frame, a NaN in a numeric contract field kept apart from null.

    ``pd.DataFrame`` turns a missing key, a None and a NaN alike into NaN. A non-finite float in a
    numeric field is handed on as its text ("NaN", "inf"), which the loader quarantines as in a CSV.
    """
    numeric = {c.name for c in CONTRACT[table] if c.type in ("int", "float")}

    def mark(key, value):
        if key in numeric and isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    return pd.DataFrame([{k: mark(k, v) for k, v in r.items()} for r in records])


_NESTED = (dict, list, tuple, set, np.ndarray)


def _non_scalar(series: pd.Series) -> np.ndarray:
    """Cells that hold a list, array or object instead of one value (only an object column can)."""
    if not pd.api.types.is_object_dtype(series):
        return np.zeros(len(series), dtype=bool)
    cells = series.to_numpy(dtype=object)
    return np.fromiter((isinstance(v, _NESTED) for v in cells), dtype=bool, count=len(cells))


def _shown(value) -> str:
    """A cell for a message: a nested value as JSON-like text, cut at 60 characters."""
    text = repr(plain(value)) if isinstance(value, _NESTED) else repr(str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _non_finite(series: pd.Series) -> np.ndarray:
    """Cells that hold NaN or infinity, as a float or as text; a null is not one of them."""
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return np.isinf(series.to_numpy(dtype=float, na_value=0.0))
    text = series.astype("string").str.strip().str.lower()
    return (series.notna() & text.isin(_NON_FINITE).fillna(False)).to_numpy(dtype=bool)


def _dtype(kind: str) -> str:
    return {"string": "string[pyarrow]", "int": "Int64", "float": "Float64",
            "timestamp": "datetime64[us, UTC]"}[kind]


def _coerce(series: pd.Series, kind: str) -> tuple[pd.Series, np.ndarray, str]:
    """Return the coerced column, the positions of cells that failed, and a note for the report."""
    notna = series.notna().to_numpy()
    note = ""
    if kind == "string":
        if pd.api.types.is_float_dtype(series) and (series.dropna() % 1 == 0).all():
            series = series.astype("Int64")  # ids stored as numbers in a database: 42, not "42.0"
        # Arrow-backed strings: vectorised length and search checks in the gate.
        values = series.astype("string[pyarrow]").str.strip()
        return values.where(values != "", pd.NA), np.array([], dtype=int), note
    if kind in ("int", "float"):
        values = pd.to_numeric(series, errors="coerce")
        bad = notna & values.isna().to_numpy()
        if kind == "int":
            fractional = values.notna() & (values % 1 != 0)
            bad |= fractional.to_numpy()
            values = values.where(~fractional).round().astype("Int64")
        else:
            values = values.astype("Float64")
        bad |= np.isinf(values.to_numpy(dtype=float, na_value=0.0))
        return values.where(~bad), np.flatnonzero(bad), note
    # timestamp
    if pd.api.types.is_datetime64_any_dtype(series):
        if getattr(series.dt, "tz", None) is None:
            note = "naive timestamps read as UTC"
            values = series.dt.tz_localize("UTC")
        else:
            values = series.dt.tz_convert("UTC")
        return values.astype("datetime64[us, UTC]"), np.array([], dtype=int), note
    text = series.astype("string").str.strip()
    naive_mask = (~text.str.contains(_TZ_SUFFIX, na=True)).to_numpy()
    values = pd.Series(pd.NaT, index=series.index, dtype="datetime64[us, UTC]")
    # Naive and zoned spellings are parsed apart: pandas would otherwise apply a neighbour's offset.
    for part in (naive_mask, ~naive_mask):
        if part.any():
            values[part] = pd.to_datetime(text[part], utc=True, errors="coerce", format="ISO8601")
    retry = notna & values.isna().to_numpy()
    if retry.any():  # non-ISO spellings ("03/01/2026 10:00 +0800"): slower, so only for the rest
        values[retry] = pd.to_datetime(text[retry], utc=True, errors="coerce", format="mixed")
    bad = notna & values.isna().to_numpy()
    naive = int((naive_mask & notna).sum())
    if naive:
        note = _naive_note(naive)
    return values.astype("datetime64[us, UTC]"), np.flatnonzero(bad), note


def _naive_note(count: int) -> str:
    return f"{count} naive timestamps read as UTC"


_HASHED = ["user_id", "event_timestamp", "event_type", "item_id", "query", "text", "rating", "value",
           "session_id"]


def _fill_event_ids(events: pd.DataFrame) -> pd.Series:
    """Keep given ids; give the rest a stable hash of their normalised content."""
    ids = events["event_id"].astype("string")
    missing = ids.isna()
    if missing.any():
        content = events.loc[missing, _HASHED].astype("string").fillna("\x00")
        hashed = pd.util.hash_pandas_object(content, index=False).to_numpy()
        filled = pd.Series([f"h{h:016x}" for h in hashed], index=content.index, dtype="string")
        ids = ids.where(~missing, filled.reindex(ids.index))
    return ids
