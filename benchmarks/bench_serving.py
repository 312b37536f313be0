"""Serving benchmarks (issue 6), over HTTP on loopback, with a 10k-item catalogue.

Starts, on one workspace: ``bentoml serve`` (Persona + its TextEncoder), a bare ``feast serve``,
and the two-hop baseline's model service (``two_hop_model.py``). Then measures, sequentially
unless said otherwise:

- ``/rank`` over the whole catalogue without a query (target p99 <= 15 ms), the first request of
  each user (its profile text not yet encoded) and later ones;
- the same against a second service with ``PERSONA_RECALL_RANK=off`` (the two towers' top k, as before
  recall + rank), in alternating blocks: recall + rank's p99 over the towers' (target <= 1.3x);
- ``/rank`` with a search query (target p99 <= 50 ms) and with 100 candidates;
- throughput with 8 concurrent clients, with and without a query;
- freshness: ``/events`` (one view) until ``/profile`` shows it (target p99 <= 50 ms);
- a bare ``feast serve`` fetch of the same user's FeatureService, and the two-hop design
  (that fetch, then the model call): ``/rank`` / bare fetch, target <= 1.5x.

The workspace is kept in ``BENCH_SERVING_WS`` (default a temp folder) so reruns skip the set-up.
Writes benchmarks/serving_results.json and benchmarks/serving_latency.png.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from bench_common import percentiles, wait_ready, write_results
from tqdm import tqdm

from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import feast_config, materialize, registry
from feature_repo.pipeline.build import build
from ingestion.ingest import ingest
from persona import sample_data
from validation.gate import Gate

N_ITEMS = int(os.environ.get("BENCH_ITEMS", 10_000))
N_USERS = int(os.environ.get("BENCH_SERVE_USERS", 2_000))
N_REQ = int(os.environ.get("BENCH_REQUESTS", 500))
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prepare(ws: Path) -> dict[str, pd.DataFrame]:
    shop = sample_data.generate(n_users=N_USERS, n_items=N_ITEMS, days=30, seed=5)
    if (ws / "ready").exists():
        return shop
    data = ws.parent / "data"
    sample_data.write(shop, data)
    ws.mkdir(parents=True, exist_ok=True)
    log = EventLog(f"sqlite:///{ws / 'eventlog.db'}")
    ingest(load_batch(data), log, Gate())
    registry.apply(ws, "local")
    build(log, "local", ws)
    materialize.materialize(ws)
    log.dispose()
    subprocess.run([str(BIN / "persona"), "train", "-w", str(ws), "--finetune-layers", "0", "--epochs", "1",
                    "--max-positives", "1000", "--splits", "global", "--no-baselines", "--no-refit"],
                   env=env_for(ws), check=True, timeout=1800)
    (ws / "ready").touch()
    return shop


def newest_event(ws: Path):
    log = EventLog(f"sqlite:///{ws / 'eventlog.db'}")
    newest = pd.Timestamp(log.read_table("events")["event_timestamp"].max())
    log.dispose()
    return newest.tz_localize("UTC") if newest.tzinfo is None else newest


def env_for(ws: Path) -> dict:
    return {**os.environ, "PERSONA_WORKSPACE": str(ws), "BENTOML_HOME": str(ws / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, ready: str, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    if wait_ready(proc, ready):  # a 10k-item catalogue is encoded before the service is ready
        return proc
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")


def feast_body(user: str, now: pd.Timestamp) -> dict:
    return {"feature_service": "profile_v1",
            "entities": {"user_id": [user], "device": ["app"], "channel": ["search"],
                         "request_timestamp": [int(now.timestamp())]}}


def feast_columns(response: dict) -> dict[str, list]:
    names = response["metadata"]["feature_names"]
    return {name: result["values"] for name, result in zip(names, response["results"], strict=True)}


def measure(client: httpx.Client, label: str, calls, check=None) -> list[float]:
    samples = []
    for call in tqdm(calls, desc=label, leave=False):
        t0 = time.perf_counter()
        r = call()
        samples.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"{label}: {r.status_code} {r.text[:300]}")
        if check:
            check(r)
    return samples


def throughput(url: str, bodies: list[dict], clients: int = 8) -> float:
    def worker(part: list[dict]) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            for body in part:
                c.post("/rank", json=body).raise_for_status()
        return len(part)

    parts = [bodies[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(worker, parts))
    return round(done / (time.perf_counter() - t0), 1)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in results["latency"].items()]
    fig, ax = plt.subplots(figsize=(8, 4))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [v["p50_ms"] for _, v in rows], 0.4, label="p50")
    ax.barh(y + 0.2, [v["p99_ms"] for _, v in rows], 0.4, label="p99")
    ax.set_yticks(y, [k for k, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms (HTTP, loopback)")
    ax.set_title(f"Persona serving, {results['items']:,} items")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ws = Path(os.environ.get("BENCH_SERVING_WS") or tempfile.mkdtemp(prefix="persona-serve-")) / "ws"
    shop = prepare(ws)
    env = env_for(ws)
    logs = ws.parent
    p_rank, p_feast, p_model, p_towers = free_port(), free_port(), free_port(), free_port()
    procs = [
        start([str(BIN / "bentoml"), "serve", "bentos.service:Persona", "--host", "127.0.0.1", "--port", str(p_rank)],
              env, f"http://127.0.0.1:{p_rank}/readyz", logs / "persona.log"),
        start([str(BIN / "bentoml"), "serve", "bentos.service:Persona", "--host", "127.0.0.1", "--port",
               str(p_towers)], {**env, "PERSONA_RECALL_RANK": "off"}, f"http://127.0.0.1:{p_towers}/readyz",
              logs / "persona-towers.log"),
        start([str(BIN / "feast"), "-c", str(REPO / "feature_repo"), "-f", str(feast_config.yaml_path(ws)), "serve",
               "-h", "127.0.0.1", "-p", str(p_feast), "--no-access-log"], env,
              f"http://127.0.0.1:{p_feast}/health", logs / "feast.log"),
        start([str(BIN / "bentoml"), "serve", "two_hop_model:TwoHopModel", "--host", "127.0.0.1", "--port",
               str(p_model)], {**env, "PYTHONPATH": str(REPO)}, f"http://127.0.0.1:{p_model}/readyz",
              logs / "two_hop.log", cwd=REPO / "benchmarks"),
    ]
    try:
        results = run(shop, ws, f"http://127.0.0.1:{p_rank}", f"http://127.0.0.1:{p_feast}",
                      f"http://127.0.0.1:{p_model}", f"http://127.0.0.1:{p_towers}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    write_results("serving", results)
    plot(results, Path(__file__).parent / "serving_latency.png")


def before_and_after(rank: httpx.Client, towers: httpx.Client, users: list[str], blocks: int = 4) -> dict:
    """``/rank`` without a query on the towers-only service ("before") and on recall + rank ("after"), in
    alternating blocks of the same users, so both see the same machine load."""
    samples: dict[str, list[float]] = {"before": [], "after": []}
    for who in (towers, rank):  # warm both: every user's profile text encoded once
        measure(who, "warm-up", [(lambda u=u, who=who: who.post("/rank", json={"user_id": u})) for u in users])
    for b in range(blocks):
        part = users[b::blocks]
        for name, who in (("before", towers), ("after", rank)):
            samples[name] += measure(who, f"/rank {name}", [
                (lambda u=u, who=who: who.post("/rank", json={"user_id": u})) for u in part],
                check=lambda r, name=name: _ranked_by(r, "two towers" if name == "before" else "recall + rank"))
    return {name: percentiles(values) for name, values in samples.items()}


def _ranked_by(response: httpx.Response, how: str) -> None:
    if response.json().get("ranking") != how:
        raise RuntimeError(f"expected a ranking by {how}, got {response.json().get('ranking')}")


def run(shop: dict, ws: Path, rank_url: str, feast_url: str, model_url: str, towers_url: str) -> dict:
    rng = np.random.default_rng(0)
    ev = shop["events"]
    users = list(ev["user_id"].drop_duplicates().sample(min(N_REQ, ev["user_id"].nunique()), random_state=0))
    queries = list(ev.loc[ev["event_type"] == "search", "query"].dropna().drop_duplicates().head(200))
    item_ids = list(shop["items"]["item_id"])
    pick = [users[i] for i in rng.integers(0, len(users), N_REQ)]
    now = pd.Timestamp.now(tz="UTC")
    lat: dict[str, dict] = {}
    with httpx.Client(base_url=rank_url, timeout=60) as rank, httpx.Client(base_url=feast_url, timeout=60) as feast, \
            httpx.Client(base_url=model_url, timeout=60) as model:
        def rank_call(body):
            return lambda: rank.post("/rank", json=body)

        lat["/rank, first request per user"] = percentiles(measure(
            rank, "rank cold", [rank_call({"user_id": u}) for u in users]))
        lat["/rank, no query"] = percentiles(measure(rank, "rank", [rank_call({"user_id": u}) for u in pick]))
        with httpx.Client(base_url=towers_url, timeout=60) as towers:
            pair = before_and_after(rank, towers, pick)
        lat["/rank, no query: two towers only (before recall + rank)"] = pair["before"]
        lat["/rank, no query: recall + rank (same run, alternating)"] = pair["after"]
        qs = [queries[i] for i in rng.integers(0, len(queries), N_REQ)]
        lat["/rank, with a query"] = percentiles(measure(
            rank, "rank+query", [rank_call({"user_id": u, "query": q}) for u, q in zip(pick, qs, strict=True)]))
        cands = [list(rng.choice(item_ids, 100, replace=False)) for _ in range(N_REQ)]
        lat["/rank, 100 candidates"] = percentiles(measure(
            rank, "rank+candidates", [rank_call({"user_id": u, "candidates": c}) for u, c in zip(pick, cands,
                                                                                                  strict=True)]))
        lat["feast serve fetch (bare)"] = percentiles(measure(
            feast, "feast", [(lambda u=u: feast.post("/get-online-features", json=feast_body(u, now))) for u in pick]))

        def two_hop(u: str, q: str | None = None):
            def call():
                features = feast.post("/get-online-features", json=feast_body(u, now))
                features.raise_for_status()
                return model.post("/score", json={"features": feast_columns(features.json()), "query": q})
            return call

        lat["two-hop: feast serve + model call"] = percentiles(measure(model, "two-hop", [two_hop(u) for u in pick]))
        lat["two-hop, with a query"] = percentiles(measure(
            model, "two-hop+query", [two_hop(u, q) for u, q in zip(pick, qs, strict=True)]))

        # After the log's newest event (earlier runs appended theirs), with ids unique to this run, and
        # within the last 30 days of now: /profile's windows end at the request, and the sample shop's
        # window ends on a fixed date.
        end = max(newest_event(ws), ev["event_timestamp"].max(), pd.Timestamp.now(tz="UTC") - pd.Timedelta(minutes=10))
        run_id = f"{time.time():.0f}"
        item = item_ids[0]

        def fresh(n: int, u: str) -> float:
            before = rank.post("/profile", json={"user_id": u}).json()["summary"]["activity_30d"]["views"]
            t0 = time.perf_counter()
            event = {"event_id": f"bench-{run_id}-{n}", "user_id": u, "event_type": "view", "item_id": item,
                     "event_timestamp": (end + pd.Timedelta(seconds=n + 1)).isoformat()}
            rank.post("/events", json={"events": [event]}).raise_for_status()
            while rank.post("/profile", json={"user_id": u}).json()["summary"]["activity_30d"]["views"] == before:
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError(f"/profile never showed event {event['event_id']}")
            return time.perf_counter() - t0

        fresh(0, pick[0])  # warm-up: the first push loads DuckDB and pandas paths
        fresh_samples = [fresh(n, u) for n, u in enumerate(tqdm(pick[:200], desc="freshness", leave=False), 1)]
        lat["freshness: /events to changed /profile"] = percentiles(fresh_samples)

    tput = {"no query": throughput(rank_url, [{"user_id": u} for u in pick]),
            "with a query": throughput(rank_url, [{"user_id": u, "query": q} for u, q in zip(pick, qs, strict=True)])}
    bare = lat["feast serve fetch (bare)"]
    ratio = {"p50": round(lat["/rank, no query"]["p50_ms"] / bare["p50_ms"], 2),
             "p99": round(lat["/rank, no query"]["p99_ms"] / bare["p99_ms"], 2)}
    recall_rank = {q: round(pair["after"][f"{q}_ms"] / pair["before"][f"{q}_ms"], 2) for q in ("p50", "p99")}
    return {"items": len(item_ids), "users": len(users), "requests": N_REQ, "latency": lat,
            "recall_rank_over_towers": recall_rank,
            "throughput_8_clients_rps": tput, "rank_over_bare_feast_fetch": ratio,
            "cpu": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
