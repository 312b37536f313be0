"""Recall + rank where it serves: saved with the model, run by `/rank` and `persona recommend` with the
same code, its reasons naming the source and the user's own behaviour, fresh events in the next ranking."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from test_service import BIN, _in_process, featured_workspace, serve, service_env, stop

from persona import sample_data
from training.recall.fit import Behaviours
from training.recall.package import LayoutChanged, TwoStage, TwoStageSpec
from training.recall.ranker import Ranker, RankerConfig
from training.workflow import top_per_user

SOURCE_WORDS = ("you viewed", "you added", "you saved", "you clicked", "often together with", "popular this week",
                "from a brand you looked at", "search for")


@pytest.fixture(scope="module")
def two_stage_shop():
    return sample_data.generate(n_users=300, n_items=200, days=30, seed=23)


@pytest.fixture(scope="module")
def server(tmp_path_factory, two_stage_shop, tiny_bert):
    root = tmp_path_factory.mktemp("two_stage")
    ws = featured_workspace(root, two_stage_shop)
    env = service_env(ws, PERSONA_REFRESH_SECONDS="1", PERSONA_RECALL_REFRESH_SECONDS="1")
    # --serve recall-rank: on this small shop the evaluation may keep the towers (auto); these tests are
    # about the recall + rank path itself.
    subprocess.run([str(BIN / "persona"), "train", "-w", str(ws), "--bert", tiny_bert, "--epochs", "2",
                    "--splits", "global", "--no-baselines", "--no-refit", "--serve", "recall-rank"],
                   env=env, check=True, capture_output=True, timeout=900)
    proc, url, log_file = serve(env, root / "server.log")
    with httpx.Client(base_url=url, timeout=30) as client:
        client.workspace, client.env, client.root = ws, env, root
        yield client
    stop(proc, log_file)


def _iso(ts) -> str:
    return pd.Timestamp(ts).isoformat().replace("+00:00", "Z")


def _active_users(shop, n: int) -> list[str]:
    return shop["events"]["user_id"].value_counts().index[:n].tolist()


def test_the_model_version_carries_its_ranker(server):
    """Saved with the model, and the report says what /rank runs and why."""
    report = next((server.workspace / "reports" / "training").glob("*/report.md")).read_text()
    assert "`/rank` runs recall + rank (`--serve recall-rank`)" in report
    folders = list((server.workspace / "bentoml" / "models").glob("*/*/two_stage"))
    assert len(folders) == 1
    spec = json.loads((folders[0] / "spec.json").read_text())
    assert "view" in spec["behaviours"]["sequence"] and spec["with_tower"] and spec["lexical"]
    manifest = json.loads((folders[0].parent / "manifest.json").read_text())["files"]
    assert {"two_stage/ranker.pt", "two_stage/spec.json"} <= set(manifest)  # a half-written save is never served


def test_rank_runs_recall_then_rank_and_says_why(server, two_stage_shop):
    reasons = []
    for user in _active_users(two_stage_shop, 5):
        body = server.post("/rank", json={"user_id": user, "k": 10}).json()
        assert body["ranking"] == "recall + rank", body
        assert len(body["items"]) == 10
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert len({i["item_id"] for i in body["items"]}) == 10
        assert all(i["reasons"] for i in body["items"])
        reasons += [r for i in body["items"] for r in i["reasons"]]
    assert any(any(w in r for w in SOURCE_WORDS) for r in reasons), reasons
    # A cold user gets k items too (popular ones, then the towers' order).
    cold = server.post("/rank", json={"user_id": "never-seen", "k": 10}).json()
    assert cold["cold_start"] and len(cold["items"]) == 10


def test_given_candidates_are_all_ranked_by_the_ranker(server, two_stage_shop):
    user = _active_users(two_stage_shop, 1)[0]
    pool = sorted(two_stage_shop["items"]["item_id"])[:30]
    body = server.post("/rank", json={"user_id": user, "k": 30, "candidates": pool + ["nope"],
                                      "exclude_seen": False}).json()
    assert body["ranking"] == "recall + rank" and body["unknown_candidates"] == ["nope"]
    assert sorted(i["item_id"] for i in body["items"]) == pool


def test_recommend_gives_what_rank_gives(server, two_stage_shop, tmp_path):
    """Offline (`persona recommend`: the behaviour rebuilt from the log) equals online (`/rank`: the online
    store's sequence row) for the same users at the same time. The time is a day after the newest event:
    `recommend` reads item features point in time, and the newest daily item rows are stamped after the
    last event, so only then do both read the same item rows."""
    users = _active_users(two_stage_shop, 4) + [two_stage_shop["events"]["user_id"].value_counts().index[-1]]
    (tmp_path / "users.csv").write_text("user_id\n" + "\n".join(users) + "\n")
    out = tmp_path / "recs.csv"
    at = pd.Timestamp(two_stage_shop["events"]["event_timestamp"].max()) + pd.Timedelta(days=1, minutes=30)
    subprocess.run([str(BIN / "persona"), "recommend", "-w", str(server.workspace), "--output", str(out),
                    "--users", str(tmp_path / "users.csv"), "--k", "10", "--as-of", _iso(at)],
                   env=server.env, check=True, capture_output=True, timeout=600)
    recs = pd.read_csv(out, keep_default_na=False)
    assert "reasons" in recs and (recs["reasons"] != "").any()
    for user in users:
        body = server.post("/rank", json={"user_id": user, "k": 10, "context": {"timestamp": _iso(at)}}).json()
        mine = recs[recs["user_id"] == user].sort_values("rank")
        assert [i["item_id"] for i in body["items"]] == mine["item_id"].tolist(), user
        np.testing.assert_allclose([i["score"] for i in body["items"]], mine["score"], atol=2e-3)


def test_fresh_views_reach_the_next_ranking_with_their_reason(server, two_stage_shop):
    """Three views of an item the user never touched, posted to /events: the next /rank has it, and says so."""
    events, catalogue = two_stage_shop["events"], sorted(two_stage_shop["items"]["item_id"])
    end = pd.Timestamp(events["event_timestamp"].max())
    moved = 0
    for n, user in enumerate(_active_users(two_stage_shop, 12)[6:]):
        touched = set(events.loc[events["user_id"] == user, "item_id"].dropna())
        at = end + pd.Timedelta(minutes=30)
        before = server.post("/rank", json={"user_id": user, "k": 20, "context": {"timestamp": _iso(at)}}).json()
        item = next(i for i in catalogue[n * 7:] if i not in touched and i not in
                    {x["item_id"] for x in before["items"]})
        views = [{"event_id": f"fresh-{n}-{v}", "user_id": user, "item_id": item, "event_type": "view",
                  "event_timestamp": _iso(end + pd.Timedelta(minutes=v + 1)), "device": "app"} for v in range(3)]
        assert server.post("/events", json={"events": views}).status_code == 200
        after = server.post("/rank", json={"user_id": user, "k": 20, "context": {"timestamp": _iso(at)}}).json()
        found = [i for i in after["items"] if i["item_id"] == item]
        if found:
            moved += 1
            assert "you viewed this 3 times today" in found[0]["reasons"], found[0]
    assert moved >= 4, moved  # the ranker learnt that people go back to what they just looked at


def test_new_events_rebuild_the_recall_state(server, two_stage_shop):
    """Item counts follow the log: an item that many people viewed this hour becomes "popular this week"
    (the popular source's top) once the recall state is rebuilt, off the request path, after new events."""
    events = two_stage_shop["events"]
    end = pd.Timestamp(events["event_timestamp"].max())
    views = events[events["event_type"] == "view"]["item_id"].value_counts()
    item = views.index[-1]  # the least viewed
    ask = {"user_id": "a-newcomer", "k": 1, "candidates": [item],  # counts take the events before the hour
           "context": {"timestamp": _iso(end + pd.Timedelta(hours=2))}}

    def reasons() -> list[str]:
        body = server.post("/rank", json=ask).json()
        assert body["ranking"] == "recall + rank" and [i["item_id"] for i in body["items"]] == [item]
        return body["items"][0]["reasons"]

    assert "popular this week" not in reasons()
    viewers = events["user_id"].value_counts().index[-40:]
    batch = [{"event_id": f"crowd-{n}-{v}", "user_id": user, "item_id": item, "event_type": "view",
              "event_timestamp": _iso(end + pd.Timedelta(minutes=5 + v)), "device": "app"}
             for n, user in enumerate(viewers) for v in range(3)]
    assert server.post("/events", json={"events": batch}).status_code == 200
    deadline = time.time() + 60
    while time.time() < deadline and "popular this week" not in reasons():
        time.sleep(1)
    assert "popular this week" in reasons()


def test_recall_rank_through_the_graph_ranks_as_the_full_scan(server, two_stage_shop, monkeypatch,
                                                              fresh_bentoml_metrics):
    """Past PERSONA_ANN_MIN_ITEMS the towers' proposals to recall + rank come from the nearest-neighbour
    graph and each candidate's tower score is computed alone (no scan of the catalogue a request); on
    this catalogue that is the running server's answer, which scores every item."""
    at = _iso(pd.Timestamp(two_stage_shop["events"]["event_timestamp"].max()) + pd.Timedelta(hours=1))
    with _in_process(server, monkeypatch, PERSONA_ANN_MIN_ITEMS="1") as client:
        for user in _active_users(two_stage_shop, 12) + ["a-stranger"]:
            body = {"user_id": user, "k": 10, "context": {"timestamp": at}}
            graph, full = client.post("/rank", json=body).json(), server.post("/rank", json=body).json()
            assert graph["ranking"] == full["ranking"] == "recall + rank", (graph, full)
            assert [i["item_id"] for i in graph["items"]] == [i["item_id"] for i in full["items"]], user
            assert np.allclose([i["score"] for i in graph["items"]], [i["score"] for i in full["items"]], atol=1e-4)
            assert [i["reasons"] for i in graph["items"]] == [i["reasons"] for i in full["items"]]


def _tiny_stage(behaviours: Behaviours, names: list[str]):
    shop = sample_data.generate(n_users=30, n_items=20, days=5, seed=3)
    spec = TwoStageSpec(names, behaviours, True, True)
    ranker = Ranker(len(names), RankerConfig(), np.zeros(len(names)), np.ones(len(names)))
    return TwoStage(ranker, spec, shop["events"], shop["items"], shop["items"]["item_id"].tolist())


def test_a_changed_behaviour_layout_is_refused_not_misread():
    """A ranker learnt on other behaviour types cannot read this shop's features: a clear refusal (serving
    then falls back to the towers), never columns in the wrong places."""
    behaviours = Behaviours(["view", "purchase"], ["purchase"], {"purchase": 1.0})
    with pytest.raises(LayoutChanged):
        _tiny_stage(behaviours, ["not", "the", "layout"])


def test_a_ranker_saved_before_a_layout_change_recommends_by_the_towers_not_an_error(caplog):
    """``persona recommend`` with a ranker whose columns no longer match (saved before an upgrade): the
    towers' top k, as ``/rank`` falls back, and a warning naming the cause."""
    shop = sample_data.generate(n_users=30, n_items=20, days=5, seed=3)
    events, items = shop["events"], shop["items"]
    item_ids = items["item_id"].astype(str).tolist()
    users = events["user_id"].drop_duplicates().head(5).tolist()
    scores = np.random.default_rng(0).normal(size=(len(users), len(item_ids))).astype(np.float32)
    names = ["an", "old", "layout"]
    saved = (Ranker(len(names), RankerConfig(), np.zeros(len(names)), np.ones(len(names))),
             TwoStageSpec(names, Behaviours(["view", "purchase"], ["purchase"], {"purchase": 1.0}), True, False))
    as_of = pd.Timestamp(events["event_timestamp"].max())
    towers = top_per_user(events, items, item_ids, users, scores.copy(), {"purchase": 1.0}, 5, as_of)
    with caplog.at_level("WARNING"):
        got = top_per_user(events, items, item_ids, users, scores.copy(), {"purchase": 1.0}, 5, as_of, two_stage=saved)
    pd.testing.assert_frame_equal(got, towers)
    assert "until the next persona train" in caplog.text


def _wait_for(check, seconds: float = 90) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return True
        time.sleep(1)
    return False


def test_a_second_day_new_items_new_users_restart_and_forget(server, two_stage_shop, tmp_path):
    """A shop's life for the recall state: a day-two item and day-two users join co-occurrence; a restarted
    service ranks as the running one does (rebuilt from the log = refreshed in place); erasing the users
    who made a pair removes it from the recall state too."""
    events, items = two_stage_shop["events"], two_stage_shop["items"]
    end = pd.Timestamp(events["event_timestamp"].max())
    rare = events["item_id"].value_counts()
    old_item = rare.index[-1]  # an item few people touched: the pair below is the day-two users' alone
    new_item = "day2-item"
    folder = tmp_path / "day2"
    folder.mkdir()
    items.head(1).assign(item_id=new_item, title="Day-two walnut desk organiser").to_csv(folder / "items.csv",
                                                                                          index=False)
    newcomers = ["day2-maker-a", "day2-maker-b", "probe-user"]  # the day's new users come in its batch too
    two_stage_shop["users"].head(3).assign(user_id=newcomers).to_csv(folder / "users.csv", index=False)
    for args in (("ingest", "--source", str(folder)), ("features", "build"), ("features", "materialize")):
        done = subprocess.run([str(BIN / "persona"), *args, "-w", str(server.workspace)], env=server.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    at = {"timestamp": _iso(end + pd.Timedelta(hours=1))}

    def ask(user: str, candidates: list[str] | None = None, k: int = 10) -> dict:
        body = {"user_id": user, "k": k, "context": at} | ({"candidates": candidates} if candidates else {})
        return server.post("/rank", json=body).json()

    assert _wait_for(lambda: ask("probe-user", [new_item])["unknown_candidates"] == [])
    makers = newcomers[:2]
    views = [{"event_id": f"day2-{user}-{item}", "user_id": user, "item_id": item, "event_type": "view",
              "event_timestamp": _iso(end + pd.Timedelta(minutes=10 + n)), "device": "app"}
             for user in makers for n, item in enumerate((old_item, new_item))]
    views.append({"event_id": "day2-probe", "user_id": "probe-user", "item_id": old_item, "event_type": "view",
                  "event_timestamp": _iso(end + pd.Timedelta(minutes=20)), "device": "app"})
    posted = server.post("/events", json={"events": views})
    assert posted.status_code == 200, posted.text

    def together() -> bool:
        return any("often together with" in r for r in ask("probe-user", [new_item])["items"][0]["reasons"])

    assert _wait_for(together), ask("probe-user", [new_item])
    assert ask(makers[0])["ranking"] == "recall + rank"

    # A restart rebuilds the recall state from the log: it must rank as the running service does.
    time.sleep(3)  # past PERSONA_RECALL_REFRESH_SECONDS: the running one has seen every event
    users = ["probe-user", *makers, *_active_users(two_stage_shop, 2), "never-seen"]
    running = {user: ask(user) for user in users}
    proc, url, log_file = serve(server.env, server.root / "restarted.log")
    try:
        with httpx.Client(base_url=url, timeout=30) as again:
            for user in users:
                body = again.post("/rank", json={"user_id": user, "k": 10, "context": at}).json()
                assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in running[user]["items"]], user
                assert [i["reasons"] for i in body["items"]] == [i["reasons"] for i in running[user]["items"]]
                np.testing.assert_allclose([i["score"] for i in body["items"]],
                                           [i["score"] for i in running[user]["items"]], atol=1e-4)
    finally:
        stop(proc, log_file)

    # `persona forget` beside the service: the pair the erased users made leaves the recall state.
    done = subprocess.run([str(BIN / "persona"), "forget", "-w", str(server.workspace), "--user", makers[0],
                           "--user", makers[1], "--reason", "test"], env=server.env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _wait_for(lambda: not together()), ask("probe-user", [new_item])
    assert ask(makers[0])["cold_start"]
