"""What every benchmark script shares: a timer, an ungated log loader, and result files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from eventlog.sources import normalise
from eventlog.store import EventLog, new_batch_id


def percentiles(samples: list[float], digits: int = 3) -> dict:
    """Latency figures in ms from samples in seconds."""
    ms = np.array(samples) * 1000
    p50, p99 = (round(float(np.percentile(ms, q)), digits) for q in (50, 99))
    return {"p50_ms": p50, "p99_ms": p99, "mean_ms": round(float(ms.mean()), digits), "n": len(samples)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


WRITE_ROWS = 500_000  # rows written per transaction by ``load_log`` (a row's dict costs about 1 KB)


def load_log(folder: Path, tables: dict[str, pd.DataFrame]) -> EventLog:
    """Write generated tables straight into a fresh SQLite event log (no gate: it is timed elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = EventLog(f"sqlite:///{folder / 'eventlog.db'}")
    bid = new_batch_id()
    for name, frame in tables.items():
        tb = normalise(name, frame, name)
        for first in range(0, max(len(tb.frame), 1), WRITE_ROWS):  # a transaction a slice: bounded memory
            with log.engine.begin() as conn:
                log.write(conn, name, tb.frame.iloc[first:first + WRITE_ROWS], tb.present, bid)
    return log


def write_results(name: str, results: dict) -> None:
    out = Path(__file__).parent / f"{name}_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)


def wait_ready(proc: subprocess.Popen, url: str, tries: int = 1200) -> bool:
    """Poll ``url`` every 0.5 s until it answers 200 (True), the process exits or the tries run out."""
    for _ in range(tries):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False
