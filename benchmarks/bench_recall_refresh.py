"""Serving's recall state (co-occurrence, item counts) rebuilt from the event log: the whole log as one
frame (before) against the log read in chunks (``training/recall/shop.py``, now), at two log sizes.

    cd benchmarks && ../.venv/bin/python bench_recall_refresh.py                 # 300k and 1.2M events
    cd benchmarks && ../.venv/bin/python bench_recall_refresh.py 100000 400000

For each size a generated shop (10,000 items, 90 days: the service holds the last month and a day of
events in full, the older ones as counts) is written straight into a SQLite event log. Each way is run
in its own process; it reports the wall time and the peak resident memory the build added (the peak
RSS, reset before it, less the RSS before it; Linux). Writes benchmarks/recall_refresh_results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from bench_common import load_log, write_results

from eventlog.store import EventLog
from persona import sample_data
from training.recall.fit import Behaviours, make_recall
from training.recall.shop import counts_from_log

DAYS, ITEMS, EVENTS_PER_USER_DAY = 90, 10_000, 2.2  # the generator's rate at 10,000 items
BEHAVIOURS = Behaviours(["view", "click", "favorite", "add_to_cart", "purchase", "review", "search"],
                        ["click", "favorite", "add_to_cart", "purchase", "review"],
                        {"purchase": 1.0, "add_to_cart": 0.5, "favorite": 0.3, "click": 0.2})


def child(way: str, url: str) -> None:
    """One build in this process: print its seconds and the memory it added."""
    log = EventLog(url)
    items = log.read_table("items")
    now = datetime.now(UTC)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    if way == "frame":
        recall = make_recall(log.read_table("events"), items, BEHAVIOURS, True)
    else:
        counts = counts_from_log(log, items["item_id"].astype(str).tolist(), BEHAVIOURS, now)
        recall = make_recall(None, items, BEHAVIOURS, True, counts=counts)
    seconds = time.perf_counter() - started
    peak = _peak_rss()
    print(json.dumps({"seconds": round(seconds, 1), "added_peak_mb": round((peak - before) / 2**20),
                      "similarity_nnz": int(recall.sources[1].sim.nnz)}))


def _peak_rss() -> int:
    """The process's peak resident memory since it was last reset (Linux's VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(n_events: int, root: Path) -> dict:
    users = max(100, round(n_events / (EVENTS_PER_USER_DAY * DAYS)))
    shop = sample_data.generate(users, ITEMS, DAYS, seed=0)
    folder = root / f"log_{n_events}"
    load_log(folder, shop).dispose()
    out = {"events": len(shop["events"]), "users": users, "items": ITEMS, "days": DAYS}
    del shop
    url = f"sqlite:///{folder / 'eventlog.db'}"
    for way in ("frame", "chunks"):
        done = subprocess.run([sys.executable, __file__, "--child", way, url], check=True, capture_output=True,
                              text=True)
        out[way] = json.loads(done.stdout.strip().splitlines()[-1])
    print(out, flush=True)
    return out


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
        return
    sizes = [int(a) for a in sys.argv[1:]] or [300_000, 1_200_000]
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results["runs"].append(run(n, Path(tmp)))
    small, large = results["runs"][0], results["runs"][-1]

    def ratio(a: float, b: float) -> float:
        return round(a / max(b, 0.1), 2)
    results["ratios"] = {
        "events_largest_to_smallest": ratio(large["events"], small["events"]),
        **{f"{way}_memory_largest_to_smallest": ratio(large[way]["added_peak_mb"], small[way]["added_peak_mb"])
           for way in ("frame", "chunks")},
        "chunks_to_frame_memory_at_largest": ratio(large["chunks"]["added_peak_mb"], large["frame"]["added_peak_mb"]),
        "chunks_to_frame_seconds_at_largest": ratio(large["chunks"]["seconds"], large["frame"]["seconds"])}
    write_results("recall_refresh", results)


if __name__ == "__main__":
    main()
