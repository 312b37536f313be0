"""The event log as a Spark data source: each task reads one key range of a table where it lives.

The log is any SQLAlchemy database (SQLite in a workspace, Postgres in production). The driver asks
the database only where the ranges start (a count and one indexed ``OFFSET`` query per boundary);
each Spark task opens its own connection, streams its range in chunks and hands Spark Arrow
batches. So no process holds the whole log, and a range on ``user_id`` holds whole users: the fold
runs on it as it is, with no shuffle.

A URL with a password never travels in the plan: the tasks read it from the same environment
variable the driver did (on a cluster, the executors' pods get the same secret).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pandas as pd
import sqlalchemy as sa

from core.config import ENV_EVENT_LOG_URL, ENV_POSTGRES_URL
from core.contract import CONTRACT

try:
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
except ImportError:  # the spark extra is not installed: only the spark profile needs it, and says so
    DataSource = DataSourceReader = InputPartition = object

NAME = "persona_eventlog"
ROWS_PER_PARTITION = 100_000  # a task's share of a table: what one executor core folds at once (~1 GB)
READ_CHUNK = 20_000  # rows per database fetch and Arrow batch
SPARK_TYPES = {"string": "string", "int": "bigint", "float": "double", "timestamp": "timestamp"}


def spark_schema(table: str, columns: list[str] | None = None) -> str:
    """The contract's columns of ``table`` (or those of ``columns``, in their order) as a Spark DDL string."""
    kinds = {c.name: c.type for c in CONTRACT[table]}
    return ", ".join(f"`{name}` {SPARK_TYPES[kinds[name]]}" for name in (columns or list(kinds)))


def url_options(url: str) -> dict[str, str]:
    """How the tasks find the log: the URL itself when it holds no secret, else the name of the
    environment variable that holds it."""
    if sa.engine.make_url(url).password is None:
        return {"url": url}
    for name in (ENV_EVENT_LOG_URL, ENV_POSTGRES_URL):
        if os.environ.get(name) == url:
            return {"url_env": name}
    raise ValueError(f"an event log URL with a password must come from {ENV_EVENT_LOG_URL} or {ENV_POSTGRES_URL} "
                     "in the environment, so that Spark's tasks read it there and never from the plan")


def log_url(options) -> str:
    """The log's URL in a task: given in the options, or read from the environment variable they name."""
    return options["url"] if "url" in options else os.environ[options["url_env"]]


def key_ranges(engine: sa.Engine, table: str, key: str,
               rows_per_partition: int = ROWS_PER_PARTITION) -> list[tuple[str | None, str | None]]:
    """Half-open ranges [lo, hi) of ``key`` (None: unbounded) holding about ``rows_per_partition`` rows
    each. Boundaries are key values, so all rows of one key fall in one range."""
    t = sa.table(table, sa.column(key))
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
        parts = max(1, -(-n // rows_per_partition))
        cuts: list[str] = []
        for k in range(1, parts):
            value = conn.execute(sa.select(t.c[key]).where(t.c[key].is_not(None)).order_by(t.c[key])
                                 .offset(k * n // parts).limit(1)).scalar()
            if value is not None and (not cuts or value != cuts[-1]):  # the database's order, not Python's
                cuts.append(value)
    bounds: list[str | None] = [None, *cuts, None]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _arrow_schema(table: str):
    import pyarrow as pa

    types = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC")}
    return pa.schema([(c.name, types[c.type]) for c in CONTRACT[table]])


def typed(chunk: pd.DataFrame, table: str) -> pd.DataFrame:
    """A fetched chunk in the contract's types (timestamps are stored as naive UTC)."""
    out = pd.DataFrame(index=chunk.index)
    for c in CONTRACT[table]:
        values = chunk[c.name] if c.name in chunk else pd.Series(None, index=chunk.index, dtype=object)
        if c.type == "timestamp":
            out[c.name] = pd.to_datetime(values, utc=True).astype("datetime64[us, UTC]")
        elif c.type == "int":
            out[c.name] = pd.to_numeric(values, errors="coerce").astype("Int64")
        elif c.type == "float":
            out[c.name] = pd.to_numeric(values, errors="coerce").astype("float64")
        else:
            out[c.name] = values.astype(object).where(values.notna(), None)
    return out


class _Reader(DataSourceReader):
    def __init__(self, options) -> None:
        self.options = {k.lower(): v for k, v in dict(options).items()}

    def partitions(self) -> list[InputPartition]:
        return [InputPartition(tuple(r)) for r in json.loads(self.options["ranges"])]

    def read(self, partition: InputPartition) -> Iterator:
        import pyarrow as pa

        table, key = self.options["table"], self.options["key"]
        lo, hi = partition.value
        t = sa.table(table, *[sa.column(c.name) for c in CONTRACT[table]])
        stmt = sa.select(*t.c)
        if lo is not None:
            stmt = stmt.where(t.c[key] >= lo)
        if hi is not None:
            stmt = stmt.where(t.c[key] < hi)
        schema = _arrow_schema(table)
        engine = sa.create_engine(log_url(self.options))
        try:
            with engine.connect().execution_options(stream_results=True) as conn:  # a server-side cursor
                for chunk in pd.read_sql(stmt, conn, chunksize=READ_CHUNK):
                    yield pa.RecordBatch.from_pandas(typed(chunk, table), schema=schema, preserve_index=False)
        finally:
            engine.dispose()


class EventLogSource(DataSource):
    """``spark.read.format("persona_eventlog")`` with options ``table``, ``key``, ``ranges`` (JSON from
    :func:`key_ranges`) and those of :func:`url_options`."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> str:
        return spark_schema(self.options["table"])

    def reader(self, schema) -> DataSourceReader:
        return _Reader(self.options)


def read_table(spark, url: str, table: str, key: str, rows_per_partition: int = ROWS_PER_PARTITION):
    """A Spark DataFrame over one of the log's tables, one partition per key range."""
    engine = sa.create_engine(url)
    try:
        ranges = key_ranges(engine, table, key, rows_per_partition)
    finally:
        engine.dispose()
    spark.dataSource.register(EventLogSource)
    return (spark.read.format(NAME).option("table", table).option("key", key).option("ranges", json.dumps(ranges))
            .options(**url_options(url)).load())
