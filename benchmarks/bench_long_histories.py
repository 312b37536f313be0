"""The default ``persona train`` on a long-history log: where the minutes go (issue 22's 10-minute target).

A log shaped like ml-latest-small (610 users, about 9,000 items, 100k events, heavy-tailed histories:
the longest user has thousands of events, most of them rated in bursts on a few days) is generated
here, then ``persona ingest``, ``features apply``, ``features build`` and ``persona train`` with no
options run on it. The stage times come from the training report's "Where the time went".

It also times Feast's point-in-time join for the training rows of the user with the longest history
against as many rows of the users with the shortest ones (``--join-only``: that alone, without the
training), with the look-backs of ``training/point_in_time.py`` and without them: Feast's join
matches each entity row with every earlier feature row of its user, so unbounded its cost grows with
the square of a user's history.

``BENCH_LONG_EVENTS`` sizes the log (default 100,000). Writes benchmarks/long_histories_results.json.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from bench_common import write_results

from persona import sample_data

BIN = Path(sys.executable).parent
USERS, ITEMS = 610, 9_000


def long_history_shop(events: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Users with lognormal history lengths (20 at least), each rating in bursts over a few years."""
    rng = np.random.default_rng(seed)
    shop = sample_data.generate(USERS, ITEMS, 1, seed=seed)  # realistic users and item texts
    lengths = np.maximum(20, rng.lognormal(4.3, 1.2, USERS)).astype(int)
    lengths = np.round(lengths * events / lengths.sum()).astype(int).clip(20)
    popularity = 1.0 / np.arange(1, ITEMS + 1) ** 0.9
    popularity /= popularity.sum()
    item_ids = shop["items"]["item_id"].to_numpy()
    rows = []
    start = pd.Timestamp("2022-01-01", tz="UTC")
    for user, n in zip(shop["users"]["user_id"], lengths, strict=True):
        picked = rng.choice(ITEMS, size=min(n, ITEMS), replace=False, p=popularity)
        days = np.sort(rng.choice(1200, size=max(1, n // 40 + 1)))  # a few rating days
        when = start + pd.to_timedelta(rng.choice(days, len(picked)), unit="D") \
            + pd.to_timedelta(rng.integers(0, 3600, len(picked)), unit="s")
        rows.append(pd.DataFrame({"user_id": user, "item_id": item_ids[picked], "event_timestamp": when,
                                  "rating": rng.integers(1, 6, len(picked)).astype(float)}))
    log = pd.concat(rows, ignore_index=True).sort_values("event_timestamp", kind="stable")
    log["event_type"] = "review"
    log["event_id"] = [f"r{i:09d}" for i in range(len(log))]
    return {"users": shop["users"], "items": shop["items"], "events": log.reset_index(drop=True)}


def persona(*args: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / "persona"), *args], check=True, env=env)  # its progress shows as it runs
    return time.perf_counter() - start


def join_cost(ws: Path, rows_of: str, bounded: bool = True) -> dict:
    """Feast's point-in-time user features for one set of training rows, in a fresh process (its peak
    memory is the join's): the heaviest user's rows, or as many rows of the lightest users; with the
    look-backs of training/point_in_time.py, or (``bounded=False``) Feast's unbounded join."""
    code = f"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from core import config
from eventlog.store import EventLog
from feature_repo.pipeline import registry
from training import dataset, point_in_time
if not {bounded!r}:
    point_in_time.MIN_MATCHES_PER_ROW = float("inf")  # never worth bounding: Feast's own join
ws = Path({str(ws)!r})
cfg = config.load(ws)
log = EventLog(cfg.resolved_event_log_url())
examples = dataset.build_examples(log.read_table("events"), log.read_table("items"), cfg.positives, 0, seed=0,
                                  exposure_types=cfg.exposure_types)
counts = examples["user_id"].value_counts()
if {rows_of!r} == "heaviest":
    rows = examples[examples["user_id"] == counts.index[0]]
else:
    rows = examples[examples["user_id"].isin(counts.index[::-1][:300])].head(int(counts.iloc[0]))
rows = rows[["example_id", "user_id", "event_timestamp", "device", "channel", "request_timestamp"]]
rows = rows.assign(event_timestamp=dataset.micro(rows["event_timestamp"]),
                   request_timestamp=dataset.micro(rows["request_timestamp"]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
dataset.historical_user_features(registry.feature_store(ws), rows)
print(json.dumps({{"rows": len(rows), "users": int(rows["user_id"].nunique()),
                  "seconds": round(time.perf_counter() - start, 1),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "peak_mb_before": before // 1024}}))
"""
    script = ws.parent / "join_cost.py"  # a script file: GX ignores `python -c` here
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_seconds(report: Path) -> dict[str, float]:
    """The "Where the time went" table of a training report."""
    text = report.read_text()
    section = text.split("## Where the time went", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(.+?)\s*\|\s*([\d.]+)\s*\|\s*$", section, flags=re.M)
    return {name: round(float(sec), 1) for name, sec in rows}


def main() -> None:
    n = int(os.environ.get("BENCH_LONG_EVENTS", 100_000))
    shop = long_history_shop(n)
    counts = shop["events"].groupby("user_id").size()
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "events": len(shop["events"]), "users": USERS, "items": ITEMS,
                     "history_length": {"median": int(counts.median()), "max": int(counts.max())}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample_data.write(shop, tmp / "shop")
        ws = tmp / "ws"
        env = {**os.environ, "BENTOML_HOME": str(ws / "bentoml"), "HF_HUB_OFFLINE": "1",
               "BENTOML_DO_NOT_TRACK": "true"}
        results["prepare_seconds"] = round(sum(persona(*cmd, "-w", str(ws), env=env) for cmd in (
            ("ingest", "--source", str(tmp / "shop")), ("features", "apply"), ("features", "build"))), 1)
        if "--join-only" not in sys.argv:  # first: the joins below fill memory (20 GB) and evict the page cache
            results["train_seconds"] = round(persona("train", "-w", str(ws), env=env), 1)
            report_dir = sorted((ws / "reports" / "training").glob("*/"))[-1]
            results["stages"] = stage_seconds(report_dir / "report.md")
            table = pd.read_csv(report_dir / "metrics.csv")
            results["ndcg10"] = table[table["segment"] == "all"].set_index("model")["NDCG@10"].round(4).to_dict()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            results["peak_rss_mb_prepare_and_train"] = round(children.ru_maxrss / 1024)
            print(json.dumps(results["stages"], indent=2), flush=True)
        results["point_in_time_join"] = {
            **{who: join_cost(ws, who) for who in ("lightest", "heaviest")},
            **{f"{who}_unbounded": join_cost(ws, who, bounded=False) for who in ("lightest", "heaviest")}}
        print(json.dumps(results["point_in_time_join"], indent=2), flush=True)
    write_results("long_histories", results)


if __name__ == "__main__":
    main()
