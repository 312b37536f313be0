"""The online path (issue 10), over HTTP against a real ``persona serve`` on a 10k-item catalogue.

Measures, sequentially, on one workspace:

- ``/rank`` without a query (target p99 <= 10 ms), with the service's own per-stage timings
  (``PERSONA_TIMINGS=1`` adds ``timings_ms`` to each answer) and the HTTP overhead (client time minus
  the service's total);
- freshness: from ``POST /events`` (one click) until ``/profile`` shows it (its 30-day clicks) and until
  ``/rank`` changes (request time pinned, seen items kept in, so only the pushed online state can change
  it), over ``BENCH_FRESH_EVENTS`` events spread over several users (target p99 <= 50 ms);
- push time against history length: ``POST /events`` (one click) for users with 10, 100, 1,000 and
  10,000 events in the log and online (the goal: flat); then ``/rank`` (no query) for the same users,
  whose request-time windows parse and sum their stored state;
- freshness again, right after a ``persona features materialize`` beside the server: the catalogue
  changed, so a refresh tick (every ``BENCH_REFRESH_SECONDS``, default 5) rebuilds the item vectors
  while events arrive. The server's log lines about GC pauses, refreshes and Feast registry refreshes
  go into the results (``PERSONA_TIMINGS=1`` makes the service log them), to explain outliers.

The workspace is kept in ``BENCH_ONLINE_WS`` (default a temp folder) so reruns skip the set-up (a
generated shop ending an hour before the set-up, the history users, features, a one-epoch model with the
real all-MiniLM-L6-v2). Build it afresh (delete the folder) once it is a day or two old: the history
users' events must stay inside the 30 days before the new ones. Writes benchmarks/online_results.json.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from bench_common import load_log, wait_ready, write_results

from eventlog.sources import normalise
from eventlog.store import new_batch_id
from feature_repo.pipeline import materialize as materialization
from feature_repo.pipeline import registry
from feature_repo.pipeline.build import build
from persona import sample_data

N_ITEMS = int(os.environ.get("BENCH_ITEMS", 10_000))
N_USERS = int(os.environ.get("BENCH_ONLINE_USERS", 1_000))
N_FRESH = int(os.environ.get("BENCH_FRESH_EVENTS", 200))
N_PUSH = int(os.environ.get("BENCH_PUSH_EVENTS", 30))  # per history length
N_RANK = int(os.environ.get("BENCH_REQUESTS", 500))
HISTORY = tuple(int(h) for h in os.environ.get("BENCH_HISTORY", "10,100,1000,10000").split(","))
WINDOW_DAYS, YEAR_DAYS = 29, 365  # history spans: all inside the 30-day window, or a year of it
REFRESH_SECONDS = float(os.environ.get("BENCH_REFRESH_SECONDS", 5))  # the service's refresh tick
FRESH_USERS = 8
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- the workspace -------------------------------------------------------------------------------------
def history_user(n: int, days: int = WINDOW_DAYS) -> str:
    return f"hist{n:06d}" if days == WINDOW_DAYS else f"hist{n:06d}d{days}"


def history_spans() -> list[tuple[int, int]]:
    """(events, days) of each history user: every ``HISTORY`` length within the window, and the
    longest one again over a year (most of it older than the window, as a long-time customer's)."""
    return [(n, WINDOW_DAYS) for n in HISTORY] + [(HISTORY[-1], YEAR_DAYS)]


def with_history_users(shop: dict[str, pd.DataFrame], end: pd.Timestamp, seed: int = 3) -> dict[str, pd.DataFrame]:
    """The shop plus one user per history span (``history_spans``), whose events (views, some clicks
    and carts, a few purchases) spread over the days before ``end``."""
    rng = np.random.default_rng(seed)
    users, events = shop["users"], shop["events"]
    extra_users = pd.concat([users.iloc[[0]].assign(user_id=history_user(n, d)) for n, d in history_spans()],
                            ignore_index=True)
    parts = []
    for n, days in history_spans():
        seconds = np.sort(rng.uniform(0, days * 86400, n))
        parts.append(pd.DataFrame({
            "event_id": [f"h{n}-{days}-{i:06d}" if days != WINDOW_DAYS else f"h{n}-{i:06d}" for i in range(n)],
            "user_id": history_user(n, days),
            "event_timestamp": end - pd.to_timedelta(days * 86400 - seconds, unit="s"),
            "event_type": rng.choice(["view", "click", "add_to_cart", "purchase"], n, p=[0.7, 0.2, 0.07, 0.03]),
            "item_id": rng.choice(shop["items"]["item_id"].to_numpy(), n), "device": "app", "channel": "direct",
            "session_id": [f"hs{n}-{i // 20}" for i in range(n)]}).reindex(columns=events.columns))
    return {**shop, "users": pd.concat([users, extra_users], ignore_index=True),
            "events": pd.concat([events, *parts], ignore_index=True)}


def env_for(ws: Path, timings: bool = True) -> dict:
    env = {**os.environ, "PERSONA_WORKSPACE": str(ws), "BENTOML_HOME": str(ws / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    return {**env, "PERSONA_TIMINGS": "1"} if timings else env


def prepare(ws: Path) -> dict[str, pd.DataFrame]:
    """The shop (and the workspace, unless ``ws/ready`` says it is built).

    The model is trained before the history users arrive: Feast's point-in-time join over DuckDB grows
    with the square of a user's history, and one user with 10,000 events fills the memory."""
    if (ws / "ready").exists():
        end = pd.Timestamp((ws / "ready").read_text().strip())
        return with_history_users(sample_data.generate(N_USERS, N_ITEMS, 30, seed=7, end=end), end)
    end = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=1)
    shop = sample_data.generate(N_USERS, N_ITEMS, 30, seed=7, end=end)
    log = load_log(ws, shop)
    registry.apply(ws, "local")
    features(log, ws)
    subprocess.run([str(BIN / "persona"), "train", "-w", str(ws), "--epochs", "1", "--max-positives", "1000",
                    "--splits", "global", "--no-baselines", "--no-refit"],
                   env=env_for(ws, timings=False), check=True, timeout=1800)
    full = with_history_users(shop, end)
    append(log, {name: full[name].iloc[len(shop[name]):] for name in ("users", "events")})
    features(log, ws)
    log.dispose()
    (ws / "ready").write_text(end.isoformat())
    return full


def features(log, ws: Path) -> None:
    build(log, "local", ws)
    materialization.materialize(ws, full=True)


def append(log, tables: dict[str, pd.DataFrame]) -> None:
    """Rows straight into the event log (no gate: it is not what is measured here)."""
    with log.engine.begin() as conn:
        bid = new_batch_id()
        for name, frame in tables.items():
            tb = normalise(name, frame.reset_index(drop=True), name)
            log.write(conn, name, tb.frame, tb.present, bid)


# --- the server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(ws: Path, port: int, log: Path) -> subprocess.Popen:
    """``persona serve`` on ``ws``, ready (the 10k-item catalogue is encoded before it is)."""
    env = {**env_for(ws), "PERSONA_REFRESH_SECONDS": str(REFRESH_SECONDS)}
    proc = subprocess.Popen([str(BIN / "persona"), "serve", "--workspace", str(ws), "--host", "127.0.0.1", "--port",
                             str(port)], env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    if wait_ready(proc, f"http://127.0.0.1:{port}/readyz", tries=2400):
        return proc
    stop(proc)
    raise RuntimeError(f"persona serve did not start: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to ``persona serve`` (it is ``bentoml serve``); its session is killed if anything is left."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- the measurements ----------------------------------------------------------------------------------
def iso_now() -> str:
    return pd.Timestamp.now(tz="UTC").isoformat()


def click(user: str, item: str, tag: str) -> dict:
    return {"event_id": f"online-{tag}", "user_id": user, "event_type": "click", "item_id": item,
            "event_timestamp": iso_now(), "device": "app", "channel": "direct"}


def post_event(client: httpx.Client, event: dict) -> float:
    """Seconds for ``POST /events`` with one event (which must be accepted and pushed)."""
    t0 = time.perf_counter()
    r = client.post("/events", json={"events": [event]})
    elapsed = time.perf_counter() - t0
    if r.status_code != 200 or r.json().get("online_update") != "updated":
        raise RuntimeError(f"/events: {r.status_code} {r.text[:300]}")
    return elapsed


def until(read, changed, limit: float = 10.0) -> float:
    """Seconds until ``changed(read())`` holds (each read counted in full)."""
    t0 = time.perf_counter()
    while not changed(read()):
        if time.perf_counter() - t0 > limit:
            raise RuntimeError("the change never showed")
    return time.perf_counter() - t0


def stats(samples: list[float]) -> dict:
    """p50/p95/p99/max in ms."""
    ms = np.array(samples) * 1000
    out = {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}
    return {**out, "max_ms": round(float(ms.max()), 2), "n": len(samples)}


def freshness(client: httpx.Client, users: list[str], items: list[str], run: str, n_events: int) -> dict:
    """``POST /events`` (one click) until ``/profile`` shows it, and until ``/rank`` changes.

    ``/rank`` has its request time pinned and seen items kept in: only the pushed state can change it."""
    pinned = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)).isoformat()

    def clicks(u: str) -> int:
        return client.post("/profile", json={"user_id": u}).json()["summary"]["activity_30d"]["clicks"]

    def ranked(u: str) -> list:
        body = client.post("/rank", json={"user_id": u, "exclude_seen": False, "context": {"timestamp": pinned}}).json()
        return [(i["item_id"], i["score"]) for i in body["items"]]

    rows = []
    for n in range(n_events + 1):  # the first one warms the push path up and is not counted
        user, item = users[n % len(users)], items[n % len(items)]
        before_clicks, before_rank = clicks(user), ranked(user)
        started = time.time()
        post = post_event(client, click(user, item, f"{run}-fresh-{n}"))
        profile = post + until(lambda u=user: clicks(u), lambda c, b=before_clicks: c > b)
        rank = post + until(lambda u=user: ranked(u), lambda r, b=before_rank: r != b)
        rows.append({"at": started, "post": post, "profile": profile, "rank": rank})
    rows = rows[1:]
    slowest = sorted(rows, key=lambda r: -max(r["profile"], r["rank"]))[:5]
    return {"events": len(rows), "users": len(users),
            "post_events": stats([r["post"] for r in rows]),
            "to_changed_profile": stats([r["profile"] for r in rows]),
            "to_changed_rank": stats([r["rank"] for r in rows]),
            "slowest": [{"at": time.strftime("%H:%M:%S", time.gmtime(r["at"])) + f".{int(r['at'] % 1 * 1000):03d}",
                         **{k: round(r[k] * 1000, 1) for k in ("post", "profile", "rank")}} for r in slowest]}


def materialize(ws: Path) -> float:
    """``persona features materialize`` (as a scheduler runs it beside the server): the catalogue changes,
    so the service's next refresh tick rebuilds its item vectors. Seconds it took."""
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "persona"), "features", "materialize", "-w", str(ws)], env=env_for(ws, timings=False),
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def server_lines(log: Path, *needles: str) -> list[str]:
    """The server log's lines holding any of ``needles`` (GC pauses, refreshes), shortened."""
    text = log.read_text(errors="replace").splitlines()
    return [line.split(" (trace=")[0].strip()[:200] for line in text if any(n in line for n in needles)]


def push_by_history(client: httpx.Client, items: list[str], run: str) -> dict:
    """``POST /events`` (one click) for users with each history span, interleaved."""
    spans = history_spans()
    samples: dict[tuple[int, int], list[float]] = {span: [] for span in spans}
    for n, days in spans:  # warm-up, not counted
        post_event(client, click(history_user(n, days), items[0], f"{run}-warm-{n}-{days}"))
    for i in range(N_PUSH):
        for n, days in spans:
            samples[n, days].append(post_event(client, click(history_user(n, days), items[i % len(items)],
                                                             f"{run}-h{n}-{days}-{i}")))
    out = {str(n) if days == WINDOW_DAYS else f"{n} over {days} days": stats(s) for (n, days), s in samples.items()}
    first, last = out[str(HISTORY[0])]["p50_ms"], out[str(HISTORY[-1])]["p50_ms"]
    year = out[f"{HISTORY[-1]} over {YEAR_DAYS} days"]["p50_ms"]
    return {"by_history_events": out, f"p50_ratio_{HISTORY[-1]}_to_{HISTORY[0]}": round(last / first, 2),
            f"p50_ratio_{HISTORY[-1]}_over_a_year_to_{HISTORY[0]}": round(year / first, 2)}


def rank_breakdown(client: httpx.Client, users: list[str]) -> dict:
    """``/rank`` without a query: client time, the service's stages, and the HTTP overhead."""
    for u in users:  # each user's profile text is encoded once; later requests reuse it
        client.post("/rank", json={"user_id": u}).raise_for_status()
    rng = np.random.default_rng(0)
    client_s, stages = [], []
    for u in (users[i] for i in rng.integers(0, len(users), N_RANK)):
        t0 = time.perf_counter()
        r = client.post("/rank", json={"user_id": u})
        client_s.append(time.perf_counter() - t0)
        r.raise_for_status()
        stages.append(r.json()["timings_ms"])
    frame = pd.DataFrame(stages)
    frame["http_and_bentoml"] = np.array(client_s) * 1000 - frame["total"]
    return {"client": stats(client_s), "stages_ms": {c: {
        "p50": round(float(frame[c].quantile(0.5)), 3), "p99": round(float(frame[c].quantile(0.99)), 3),
        "mean": round(float(frame[c].mean()), 3)} for c in frame.columns}}


def rank_by_history(client: httpx.Client) -> dict:
    """``/rank`` (no query) for the history users: the request-time windows parse and sum the user's
    stored tiles, so a busy user's request costs more than the generated shop's users'."""
    spans = history_spans()
    samples: dict[tuple[int, int], list[float]] = {span: [] for span in spans}
    for n, days in spans:  # warm-up: the profile text is encoded once
        client.post("/rank", json={"user_id": history_user(n, days)}).raise_for_status()
    for _ in range(N_PUSH):
        for n, days in spans:
            t0 = time.perf_counter()
            client.post("/rank", json={"user_id": history_user(n, days)}).raise_for_status()
            samples[n, days].append(time.perf_counter() - t0)
    return {str(n) if days == WINDOW_DAYS else f"{n} over {days} days": stats(s) for (n, days), s in samples.items()}


def main() -> None:
    ws = Path(os.environ.get("BENCH_ONLINE_WS") or tempfile.mkdtemp(prefix="persona-online-")) / "ws"
    shop = prepare(ws)
    events = shop["events"]
    plain = events[~events["user_id"].str.startswith("hist")]
    active = list(plain["user_id"].value_counts().index[:200])
    items = list(shop["items"]["item_id"].sample(500, random_state=1))
    port, log = free_port(), ws.parent / "persona-online.log"
    t0 = time.perf_counter()
    proc = serve(ws, port, log)
    started_s = time.perf_counter() - t0
    run = f"{time.time():.0f}"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            rank = rank_breakdown(client, active[:100])
            fresh = freshness(client, active[100:100 + FRESH_USERS], items, run, N_FRESH)
            push = push_by_history(client, items, run)
            rank_history = rank_by_history(client)
            materialize_s = materialize(ws)
            marked = time.strftime("%H:%M:%S", time.gmtime())
            refreshed = freshness(client, active[100:100 + FRESH_USERS], items, f"{run}-r", N_FRESH // 2)
    finally:
        stop(proc)
    write_results("online", {
        "items": N_ITEMS, "users": int(events["user_id"].nunique()), "server_start_s": round(started_s, 1),
        "refresh_seconds": REFRESH_SECONDS,
        "rank_no_query": rank, "rank_by_history_events": rank_history, "freshness": fresh, "push_by_history": push,
        "freshness_after_materialize": {"materialize_s": round(materialize_s, 1), "started": marked, **refreshed},
        "server_log": server_lines(log, "gc pause", "ranker refreshed", "refresh skipped", "Registry cache expired"),
        "cpu": os.cpu_count(), "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__" and sys.argv[1:] == ["--prepare"]:
    prepare(Path(os.environ["BENCH_ONLINE_WS"]) / "ws")
elif __name__ == "__main__":
    main()
