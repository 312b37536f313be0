"""/rank over HTTP as the catalogue grows from 10,000 items past ``PERSONA_ANN_MIN_ITEMS`` (issue 24's
target: p99 at a million within 1.5 x its p99 at 10,000).

    cd benchmarks && ../.venv/bin/python bench_rank_catalogue.py       # 10,000 then 100,000 items
    BENCH_CATALOGUE_SIZES=10000,1000000 ../.venv/bin/python bench_rank_catalogue.py   # a million

A million items is not the default because the run takes about 22 minutes on this machine's two cores:
growing the catalogue (build, then ``persona features materialize``, whose sync of changed keys writes
about 5,000 keys a second to the SQLite online store) takes about 5 minutes, and each service about 5
more to read a million items, embed them and build its graph.

One shop (2,000 users, 10,000 items, 30 days) is ingested, built, materialised and trained on
(``--serve recall-rank``, so the model carries its ranker). Then, for each size, the catalogue grows in
place to that many items (generated items upserted into the event log, ``persona features build`` and
``persona features materialize``, as a shop would), and two services start on the workspace: one with
recall + rank, one with ``PERSONA_RECALL_RANK=off`` (the towers' top k: the exact scan below
``PERSONA_ANN_MIN_ITEMS``, 100,000, the nearest-neighbour graph above). ``/rank`` without a query is
timed on both, in alternating blocks of the same users. The new items are unknown to the model's id
vocabulary, as a shop's new items are until the next ``persona train``; their texts are the generator's.
Each service's memory is read after its timed requests, over its process tree (the server and its
worker): the resident memory then, and the sum of each process's own peak (Linux's VmHWM), an upper
bound on the tree's peak. Writes benchmarks/rank_catalogue_results.json.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
from bench_common import load_log, percentiles, write_results
from bench_serving import BIN, env_for, free_port, start

from eventlog.store import EventLog, new_batch_id
from persona import sample_data

SIZES = [int(s) for s in os.environ.get("BENCH_CATALOGUE_SIZES", "10000,100000").split(",")]
USERS, REQUESTS, BLOCKS = 2_000, 400, 4
FIRST_ITEMS = SIZES[0]


def persona(*args: str, env: dict) -> None:
    subprocess.run([str(BIN / "persona"), *args], env=env, check=True, stdout=subprocess.DEVNULL, timeout=7200)


def prepare(ws: Path) -> dict[str, pd.DataFrame]:
    """The shop, its features and a model trained on it (the first size's catalogue)."""
    shop = sample_data.generate(n_users=USERS, n_items=FIRST_ITEMS, days=30, seed=5)
    load_log(ws, shop).dispose()
    env = env_for(ws)
    for step in (["features", "apply"], ["features", "build"], ["features", "materialize"]):
        persona(*step, "-w", str(ws), env=env)
    persona("train", "-w", str(ws), "--finetune-layers", "0", "--epochs", "1", "--max-positives", "1000",
            "--splits", "global", "--no-baselines", "--no-refit", "--serve", "recall-rank", env=env)
    return shop


def grow(ws: Path, size: int, have: int) -> float:
    """Upsert generated items until the catalogue holds ``size``; rebuild and materialise. Seconds taken."""
    started = time.perf_counter()
    if size > have:
        items, _ = sample_data.make_items(np.random.default_rng(size), size - have)
        items["item_id"] = [f"grown-{have + n}" for n in range(len(items))]
        log = EventLog(f"sqlite:///{ws / 'eventlog.db'}")
        with log.engine.begin() as conn:
            log.write(conn, "items", items, items.columns, new_batch_id())
        log.dispose()
        env = env_for(ws)
        persona("features", "build", "-w", str(ws), env=env)
        persona("features", "materialize", "-w", str(ws), env=env)
    return time.perf_counter() - started


def tree_memory_mb(pid: int) -> dict[str, float]:
    """A process tree's resident memory now and the sum of its processes' peaks, in MB."""
    root = psutil.Process(pid)
    rss = peak = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            rss += proc.memory_info().rss
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except (psutil.NoSuchProcess, FileNotFoundError):
            continue
        peak += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    return {"rss_mb": round(rss / 2**20), "peak_sum_mb": round(peak / 2**20)}


def timed_blocks(clients: dict[str, httpx.Client], users: list[str]) -> dict[str, list[float]]:
    """Each service in turn, a block of the users at a time, so both see the same machine load."""
    samples: dict[str, list[float]] = {name: [] for name in clients}
    per_block = len(users) // BLOCKS
    for block in range(BLOCKS):
        for name, client in clients.items():
            for user in users[block * per_block:(block + 1) * per_block]:
                t0 = time.perf_counter()
                response = client.post("/rank", json={"user_id": user})
                samples[name].append(time.perf_counter() - t0)
                response.raise_for_status()
    return samples


def measure(ws: Path, users: list[str], size: int) -> dict:
    env, logs = env_for(ws), ws.parent
    ports = {"recall + rank": free_port(), "two towers (PERSONA_RECALL_RANK=off)": free_port()}
    procs, started = [], time.perf_counter()
    try:
        for name, port in ports.items():
            extra = {"PERSONA_RECALL_RANK": "off"} if "off" in name else {}
            procs.append(start([str(BIN / "bentoml"), "serve", "bentos.service:Persona", "--host", "127.0.0.1",
                                "--port", str(port)], {**env, **extra}, f"http://127.0.0.1:{port}/readyz",
                               logs / f"persona-{size}-{port}.log"))
        ready = time.perf_counter() - started
        clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) for name, port in ports.items()}
        for client in clients.values():  # warm-up: the first requests build caches
            for user in users[:20]:
                client.post("/rank", json={"user_id": user}).raise_for_status()
        ranking = {name: clients[name].post("/rank", json={"user_id": users[0]}).json().get("ranking")
                   for name in clients}
        samples = timed_blocks(clients, users)
        memory = {name: tree_memory_mb(proc.pid) for name, proc in zip(ports, procs, strict=True)}
        for client in clients.values():
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)
    return {"items": size, "services_ready_seconds": round(ready, 1), "ranking": ranking, "memory": memory,
            "latency": {name: percentiles(values) for name, values in samples.items()}}


def main() -> None:
    root = Path(os.environ.get("BENCH_RANK_CATALOGUE_WS") or tempfile.mkdtemp(prefix="persona-catalogue-"))
    ws = root / "ws"
    shop = prepare(ws)
    rng = np.random.default_rng(0)
    known = shop["events"]["user_id"].drop_duplicates().tolist()
    users = [known[i] for i in rng.integers(0, len(known), REQUESTS)]
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "users": USERS, "requests_per_service": REQUESTS, "runs": []}
    have = FIRST_ITEMS
    for size in SIZES:
        grew = grow(ws, size, have)
        have = max(have, size)
        run = {**measure(ws, users, size), "grow_seconds": round(grew, 1)}
        print(run, flush=True)
        results["runs"].append(run)
    small, large = results["runs"][0], results["runs"][-1]
    results["p99_largest_over_smallest"] = {
        name: round(large["latency"][name]["p99_ms"] / small["latency"][name]["p99_ms"], 2)
        for name in small["latency"]}
    write_results("rank_catalogue", results)


if __name__ == "__main__":
    main()
