"""Search in Chinese through `/rank` (issue 25): a query and three candidates, is the matching title first?

The check a reviewer runs on real Taobao queries, on what this repository holds: `persona quickstart
--locale zh` (the Chinese sample shop, default model), then the 500 real titles of
``../shared/data/zh-catalogue`` ingested as a second-day batch (built and materialised), as a shop
adds a catalogue. Each real item is asked for with a query a shopper types for it, its fine category
(``洗发水``, ``蓝牙耳机``), against two items of other coarse categories, for a new user, through
`/rank` as served (`persona train`'s choice), with ``PERSONA_RECALL_RANK=off`` (the two towers, a query
they cannot read ranked by its words first), and with ``PERSONA_QUERY_WORDS=off`` too (the towers as
they read the query: before that rule).
Character overlap (the number of the query's characters in the title) is the reference row.

Writes benchmarks/zh_search_results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from bench_common import write_results
from bench_serving import env_for, free_port, start

CATALOGUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh-catalogue"
BIN = Path(sys.executable).parent


def persona(*args: str, env: dict, log: Path) -> None:
    with log.open("ab") as out:
        subprocess.run([str(BIN / "persona"), *args], check=True, env=env, stdout=out, stderr=subprocess.STDOUT)


def questions(items: pd.DataFrame, seed: int = 0) -> list[dict]:
    """Each item with its fine category as the query, and two items of other coarse categories."""
    rng = np.random.default_rng(seed)
    items = items.assign(coarse=items["category"].str.split(">").str[0],
                         fine=items["category"].str.split(">").str[-1]).reset_index(drop=True)
    out = []
    for row in items.itertuples():
        others = items.index[items["coarse"] != row.coarse].to_numpy()
        if len(others) < 2:
            continue
        pick = rng.choice(others, 2, replace=False)
        out.append({"query": row.fine, "target": row.item_id,
                    "candidates": [row.item_id, *items.loc[pick, "item_id"]]})
    return out


def overlap_first(qs: list[dict], titles: dict[str, str]) -> float:
    """Character overlap: the target strictly ahead of both others (a tie is not a win)."""
    def score(q: str, item: str) -> int:
        return sum(ch in titles[item] for ch in q)
    return float(np.mean([score(q["query"], q["target"]) > max(score(q["query"], c) for c in q["candidates"][1:])
                          for q in qs]))


def first_rate(url: str, qs: list[dict]) -> dict:
    wins, ranking = [], set()
    with httpx.Client(base_url=url, timeout=60) as client:
        for n, q in enumerate(qs):
            body = client.post("/rank", json={"user_id": f"zh-searcher-{n}", "query": q["query"], "k": 3,
                                              "candidates": q["candidates"]}).json()
            ranking.add(body.get("ranking", "two towers"))
            wins.append(bool(body["items"]) and body["items"][0]["item_id"] == q["target"])
    return {"first": round(float(np.mean(wins)), 4), "ranking": sorted(ranking)}


def main() -> None:
    root = Path(os.environ.get("BENCH_ZH_WS") or tempfile.mkdtemp(prefix="persona-zh-"))
    ws, log = root / "ws", root / "commands.log"
    env = env_for(ws)
    items = pd.read_csv(CATALOGUE / "items.csv", dtype=str)
    if not (root / "day2" / "items.csv").exists():  # BENCH_ZH_WS of an earlier run: its shop, served again
        persona("quickstart", "--locale", "zh", "-w", str(ws), env=env, log=log)
        (root / "day2").mkdir(exist_ok=True)
        items.to_csv(root / "day2" / "items.csv", index=False)
        for args in (("ingest", "--source", str(root / "day2")), ("features", "build"),
                     ("features", "materialize")):
            persona(*args, "-w", str(ws), env=env, log=log)
    report = sorted((ws / "reports" / "training").glob("*/report.md"))[-1].read_text()
    verdict = report.split("## What `persona train` serves", 1)[1].split("\n\n", 2)[1] if "serves" in report else ""
    qs = questions(items)
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "questions": len(qs),
                     "served_by_train": verdict.strip(),
                     "character_overlap": round(overlap_first(qs, dict(zip(items["item_id"], items["title"],
                                                                           strict=True))), 4)}
    for label, extra in (("served", {}), ("towers", {"PERSONA_RECALL_RANK": "off"}),
                         ("towers, as read", {"PERSONA_RECALL_RANK": "off", "PERSONA_QUERY_WORDS": "off"})):
        port = free_port()
        proc = start([str(BIN / "persona"), "serve", "--workspace", str(ws), "--host", "127.0.0.1", "--port",
                      str(port)], {**env, **extra}, f"http://127.0.0.1:{port}/readyz", root / f"{label}.log")
        try:
            results[label] = first_rate(f"http://127.0.0.1:{port}", qs)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print(label, json.dumps(results[label], ensure_ascii=False), flush=True)
    write_results("zh_search", results)


if __name__ == "__main__":
    main()
