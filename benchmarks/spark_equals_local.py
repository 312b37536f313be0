"""The spark profile's build from the log against the local build, on a real contract folder.

    .venv/bin/python benchmarks/spark_equals_local.py ../shared/data/tmall-2014 [more folders]

Each folder is written straight into a fresh SQLite event log (no gate: these folders pass it), then
built twice: ``compute_all`` on the whole log (the local profile's kernel) and ``build_from_log`` on
Spark ``local[2]`` (tasks reading ranges of users). Every table must be equal, value for value; prints
rows, the two times, and the ranges the log was read in.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from bench_common import load_log

from eventlog.sources import load_batch
from feature_repo.pipeline import feast_config, spark_source
from feature_repo.pipeline.build import read_offline_spark
from feature_repo.pipeline.compute import compute_all
from feature_repo.pipeline.spark_build import build_from_log


def check(folder: Path, root: Path) -> None:
    tables = {name: t.frame for name, t in load_batch(folder).tables.items()}
    log = load_log(root, tables)
    url = str(log.engine.url)
    started = time.perf_counter()
    local = compute_all(log.read_table("events"), log.read_table("items"), log.read_table("users"))
    local_s = time.perf_counter() - started
    log.dispose()
    ranges = len(spark_source.key_ranges(sa.create_engine(url), "events", "user_id"))
    conf = feast_config.feature_store_config("spark", root)["offline_store"]["spark_conf"]
    started = time.perf_counter()
    rows = build_from_log(url, root, conf)
    spark_s = time.perf_counter() - started
    built = read_offline_spark(root)
    assert rows == {name: len(frame) for name, frame in local.items()}, (rows, {n: len(f) for n, f in local.items()})
    for name, a in local.items():
        key = [c for c in ("user_id", "item_id") if c in a][0]
        a = a.sort_values([key, "event_timestamp"]).reset_index(drop=True)
        b = built[name][list(a.columns)].sort_values([key, "event_timestamp"]).reset_index(drop=True)
        b["event_timestamp"] = pd.to_datetime(b["event_timestamp"], utc=True).astype(a["event_timestamp"].dtype)
        pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=1e-9,
                                      obj=f"{folder.name}.{name}")
    print(f"{folder.name}: equal; rows {rows}; local {local_s:.1f} s, spark {spark_s:.1f} s, {ranges} range(s)",
          flush=True)


def main() -> None:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    for arg in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            check(Path(arg), Path(tmp))


if __name__ == "__main__":
    main()
