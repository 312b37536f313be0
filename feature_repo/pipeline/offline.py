"""Write the feature tables into the profile's offline store: Parquet files (local), Parquet
folders (spark) or Postgres tables (prod)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import sqlalchemy as sa


def write_offline(profile: str, workspace: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Replace each feature table in the profile's offline store (the event log is the truth)."""
    if profile == "prod":
        _write_postgres(tables)
        return
    folder = workspace / "offline"
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        if profile == "spark":
            _write_spark_folder(folder / name, microseconds(frame))
        else:
            _write_parquet(folder, name, microseconds(frame))


def microseconds(frame: pd.DataFrame) -> pd.DataFrame:
    """Feast's stores keep microseconds: every timezone-aware column as ``datetime64[us, UTC]``."""
    frame = frame.copy()
    for col in frame.columns:
        if isinstance(frame[col].dtype, pd.DatetimeTZDtype):
            frame[col] = frame[col].astype("datetime64[us, UTC]")
    return frame


def _write_parquet(folder: Path, name: str, frame: pd.DataFrame) -> None:
    tmp = folder / f".{name}.parquet.tmp"
    frame.to_parquet(tmp, index=False)
    tmp.replace(folder / f"{name}.parquet")  # readers never see a half-written table


def _write_spark_folder(target: Path, frame: pd.DataFrame) -> None:
    """Spark reads directories of parquet with microsecond timestamps."""
    target.mkdir(exist_ok=True)
    for old in target.glob("*.parquet"):
        old.unlink()
    frame.to_parquet(target / "part-00000.parquet", index=False, coerce_timestamps="us",
                     allow_truncated_timestamps=True)


def _write_postgres(tables: dict[str, pd.DataFrame]) -> None:
    """COPY each table into ``persona_<name>`` in one transaction (fast, and atomic per build)."""
    engine = sa.create_engine(os.environ["PERSONA_POSTGRES_URL"])
    try:
        with engine.begin() as conn:
            for name, frame in tables.items():
                table = f"persona_{name}"
                frame = microseconds(frame)
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
                frame.head(0).to_sql(table, conn, index=False)
                conn.execute(sa.text(f'CREATE INDEX ON "{table}" ({frame.columns[0]}, event_timestamp)'))
                buffer = io.StringIO()
                # An explicit NULL marker: in CSV, COPY would read an empty string as NULL.
                frame.to_csv(buffer, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S.%f%z",
                             na_rep="\\N")
                buffer.seek(0)
                cols = ", ".join(f'"{c}"' for c in frame.columns)
                with conn.connection.cursor() as cur, cur.copy(
                        f'COPY "{table}" ({cols}) FROM STDIN WITH (FORMAT csv, NULL \'\\N\')') as copy:
                    while chunk := buffer.read(1 << 20):
                        copy.write(chunk)
    finally:
        engine.dispose()
