"""Many clients at once over real HTTP: `POST /rank` and `POST /events` mixed on a real `persona serve`.

16 client threads against the ranking service's threads: no answer is a 5xx, every event an answer
accepted is in the event log afterwards, and every user touched still ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
from test_service import featured_workspace, serve, service_env, stop  # the service tests' helpers

from eventlog.store import EventLog

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
API_KEY = "concurrency-key-789"
CLIENTS = 16
# Requests per client, as in the issue: 3,200 in all took 150 s on a busy 2-CPU runner (set fewer there).
PER_CLIENT = int(os.environ.get("PERSONA_TEST_REQUESTS_PER_CLIENT", "200"))


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, shop, tiny_bert):
    """The small shared shop, a one-epoch tiny-BERT model, 8 request threads and a 1-second refresh tick."""
    root = tmp_path_factory.mktemp("http_concurrency")
    ws = featured_workspace(root, shop)
    env = service_env(ws, PERSONA_API_KEY=API_KEY, PERSONA_THREADS="8", PERSONA_REFRESH_SECONDS="1",
                      PERSONA_TEXT_CACHE_SIZE="8")
    subprocess.run([str(BIN / "persona"), "train", "-w", str(ws), "--bert", tiny_bert, "--epochs", "1",
                    "--max-positives", "100", "--splits", "global", "--no-baselines", "--no-refit"],
                   env=env, check=True, capture_output=True, timeout=600)
    proc, url, server_log = serve(env, root / "server.log")
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=120, limits=limits) as client:
        client.workspace, client.log_path = ws, root / "server.log"
        yield client
    stop(proc, server_log)


def test_mixed_rank_and_events_from_16_clients(busy_server, shop):
    users = sorted(shop["users"]["user_id"].astype(str))
    items = sorted(shop["items"]["item_id"].astype(str))
    words = ["trail", "espresso", "lamp", "linen", "kettle", "yoga", "desk", "wool"]
    now = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(minutes=1)

    def event(client: int, n: int, k: int, **extra) -> dict:
        user, item = users[(client * 7 + n + k) % len(users)], items[(client * 13 + n * 3 + k) % len(items)]
        stamp = now + pd.Timedelta(milliseconds=client * 10_000 + n * 10 + k)
        return {"event_id": f"cc-{client}-{n}-{k}", "user_id": user, "item_id": item, "event_type": "view",
                "event_timestamp": stamp.isoformat().replace("+00:00", "Z"), **extra}

    def one(client: int, n: int) -> tuple[str, int, dict | str]:
        kind = n % 5
        user = users[(client * 11 + n) % len(users)]
        if kind == 0:  # a single event: the service's fast path
            route, body = "/events", {"events": [event(client, n, 0)]}
        elif kind == 1:  # a batch with one bad row: 422, the good ones stored all the same
            route, body = "/events", {"events": [event(client, n, 0), event(client, n, 1, event_type="click"),
                                                 event(client, n, 2, event_type="review", rating=9)]}
        elif kind == 2:
            route, body = "/rank", {"user_id": user, "k": 5}
        elif kind == 3:  # a live query: the batching encoder service
            route, body = "/rank", {"user_id": user, "k": 5, "query": f"{words[n % 8]} {client} {n}"}
        else:
            route, body = "/rank", {"user_id": user, "candidates": items[n % 50:n % 50 + 20], "k": 3,
                                    "context": {"device": "app"}}
        r = busy_server.post(route, json=body)
        try:
            answer = r.json()
        except ValueError:
            answer = r.text[:300]
        return route, r.status_code, answer

    def client(c: int) -> list[tuple[str, int, dict | str]]:
        return [one(c, n) for n in range(PER_CLIENT)]

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for batch in pool.map(client, range(CLIENTS)) for a in batch]
    took = time.monotonic() - started
    assert len(answers) == CLIENTS * PER_CLIENT
    errors = [a for a in answers if a[1] >= 500]
    assert not errors, (f"{len(errors)} server errors of {len(answers)}", errors[:3],
                        busy_server.log_path.read_text(errors="replace")[-3000:])
    codes = {(route, code) for route, code, _ in answers}
    assert codes <= {("/rank", 200), ("/events", 200), ("/events", 202), ("/events", 422)}, codes

    accepted = {e for route, _, body in answers if route == "/events" for e in body["accepted"]}
    rejected = {r["event_id"] for route, _, body in answers if route == "/events" for r in body["rejected"]}
    wanted = {f"cc-{c}-{n}-{k}" for c in range(CLIENTS) for n in range(PER_CLIENT) if n % 5 in (0, 1)
              for k in ((0,) if n % 5 == 0 else (0, 1))}
    assert accepted == wanted and all(r.endswith("-2") for r in rejected), sorted(accepted ^ wanted)[:5]
    log = EventLog(f"sqlite:///{busy_server.workspace / 'eventlog.db'}")
    try:
        stored = set(log.read_table("events")["event_id"])
        quarantined = set(log.quarantined()["record_key"])
    finally:
        log.dispose()
    assert accepted <= stored, sorted(accepted - stored)[:5]
    assert rejected <= quarantined and not rejected & stored

    touched = sorted({e.split("-")[1] for e in accepted})  # every client's users, ranked once more
    for c in touched:
        for n in range(0, PER_CLIENT, 5):
            user = event(int(c), n, 0)["user_id"]
            r = busy_server.post("/rank", json={"user_id": user, "k": 3})
            assert r.status_code == 200 and r.json()["items"], r.text[:300]
    print(f"{len(answers)} requests from {CLIENTS} clients in {took:.1f}s")
