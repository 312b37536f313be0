"""Privacy by design: `persona forget` leaves no trace of a planted user in any store or file, on the
local and prod profiles; `persona export` holds every planted value; re-ingesting old files does not
bring the user back; pseudonymous ids; no personal values in reports and logs."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import redis
import sqlalchemy as sa

from core import config as config_mod
from core.privacy import Privacy
from eventlog.sources import load_batch
from eventlog.store import EventLog
from feature_repo.pipeline import registry
from ingestion.ingest import ingest
from persona import cli, sample_data
from validation.gate import Gate, GateSettings

PLANTED = "u_planted_" + uuid.uuid4().hex[:8]
EVENT = "ev" + uuid.uuid4().hex[:6]  # event ids do not embed the user id (pseudonymous mode hashes user ids only)
QUERY = "zebrakumquat planted query 4711"
REVIEW = "walrusquince planted review 9034"
REGION = "PlantedRegionQ7x"
OCCUPATION = "PlantedOccupationZ3"
LONG_QUERY = "plantedlongquery " * 70  # over the 1,000-character bound: quarantined, and a GX sample value
NEEDLES = [PLANTED, QUERY, REVIEW, REGION, OCCUPATION, "plantedlongquery"]


def planted_tables(shop: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The shop plus one user with unique personal values, searches, a review and a quarantined row."""
    end = shop["events"]["event_timestamp"].max()
    item = shop["items"]["item_id"].iloc[3]
    user = shop["users"].head(1).assign(user_id=PLANTED, region=REGION, occupation=OCCUPATION, age=37)
    rows = [
        {"event_id": f"{EVENT}-s1", "event_type": "search", "query": QUERY, "item_id": None},
        {"event_id": f"{EVENT}-v1", "event_type": "view", "item_id": item},
        {"event_id": f"{EVENT}-c1", "event_type": "click", "item_id": item},
        {"event_id": f"{EVENT}-p1", "event_type": "purchase", "item_id": item, "value": 12.0},
        {"event_id": f"{EVENT}-r1", "event_type": "review", "item_id": item, "text": REVIEW, "rating": 5.0},
        {"event_id": f"{EVENT}-bad", "event_type": "search", "query": LONG_QUERY, "item_id": None},
    ]
    events = pd.DataFrame([{**r, "user_id": PLANTED, "event_timestamp": end - pd.Timedelta(hours=5 - n)}
                           for n, r in enumerate(rows)])
    return {"users": pd.concat([shop["users"], user], ignore_index=True),
            "items": shop["items"],
            "events": pd.concat([shop["events"], events], ignore_index=True)}


@pytest.fixture(params=["local", pytest.param("prod", marks=[pytest.mark.postgres, pytest.mark.redis]), "spark"])
def workspace(request, tmp_path, monkeypatch):
    profile = request.param
    monkeypatch.delenv("PERSONA_WORKSPACE", raising=False)
    if profile == "spark":
        pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
        monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    redis_db = None
    if profile == "prod":
        redis_db = 5 + (uuid.uuid4().int % 8)
        monkeypatch.setenv("PERSONA_POSTGRES_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("PERSONA_REDIS_URL", f"redis://127.0.0.1:6379/{redis_db}")
        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()
    cfg = config_mod.load(tmp_path / "ws", profile)
    monkeypatch.setenv("BENTOML_HOME", str(cfg.workspace / "bentoml"))  # this workspace's model store only
    return cfg, redis_db


def _pipeline(cfg, data: Path) -> None:
    cli.validate(source=str(data), workspace=cfg.workspace, profile=cfg.profile, strict=False, docs=True)
    cli.ingest(source=str(data), workspace=cfg.workspace, profile=cfg.profile, strict=False, as_json=False)
    cli.features_apply(workspace=cfg.workspace, profile=cfg.profile)
    cli.features_build(workspace=cfg.workspace, profile=cfg.profile, check=False)
    cli.features_materialize(workspace=cfg.workspace, profile=cfg.profile, full=False)


def traces(workspace: Path, needles: list[str]) -> list[str]:
    """Every file under the workspace holding a needle, byte for byte."""
    found = []
    for path in workspace.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(workspace)}: {n!r}" for n in needles if n.encode() in data]
    return found


def _files(workspace: Path) -> dict[str, bytes]:
    """The workspace's reports, copies and checkpoints (not the databases, which a VACUUM rewrites)."""
    return {str(p): p.read_bytes() for p in workspace.rglob("*") if p.is_file()
            and not {"feast", "offline"} & {q.name for q in p.parents} and ".db" not in p.name}


def postgres_traces(url: str, needles: list[str]) -> list[str]:
    """Every table's rows as text, and its data file's bytes (dead tuples included), for each needle."""
    engine = sa.create_engine(url)
    found = []
    try:
        with engine.connect() as conn:
            for (name,) in conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")):
                text = " ".join(str(r) for r in conn.execute(sa.text(f'SELECT t::text FROM "{name}" t')))
                found += [f"{name}: {n!r}" for n in needles if n in text]
            # The files of every table, index and TOAST table: deleted tuples would survive there.
            files = conn.execute(sa.text(
                "SELECT c.relname, pg_relation_filepath(c.oid) FROM pg_class c WHERE c.relkind IN ('r', 'i', 't') "
                "AND (c.relnamespace = 'public'::regnamespace OR c.oid IN (SELECT reltoastrelid FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace)) AND pg_relation_filepath(c.oid) IS NOT NULL"))
            for name, path in files.all():
                data = bytes(conn.execute(sa.text("SELECT pg_read_binary_file(:p)"),
                                          {"p": path}).scalar() or b"")
                found += [f"{name} file: {n!r}" for n in needles if n.encode() in data]
    finally:
        engine.dispose()
    return found


def redis_traces(db: int, needles: list[str]) -> list[str]:
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    found = []
    for key in client.scan_iter(count=1000):
        blob = key + b"".join(k + v for k, v in client.hgetall(key).items())
        found += [f"redis {key[:40]!r}: {n!r}" for n in needles if n.encode() in blob]
    return found


def test_forget_leaves_no_trace_and_export_holds_everything(workspace, shop, tmp_path):
    cfg, redis_db = workspace
    data = tmp_path / "day1"
    sample_data.write(planted_tables(shop), data)
    _pipeline(cfg, data)
    # Copies a workspace collects: an input copy, a training report, a checkpoint, a recommendation file.
    sample_data.write(planted_tables(shop), cfg.workspace / "sample")
    (cfg.workspace / "reports" / "training" / "t1").mkdir(parents=True)
    (cfg.workspace / "reports" / "training" / "t1" / "report.md").write_text(f"# report\n\nworst user: {PLANTED}\n")
    (cfg.workspace / "checkpoints" / "refit").mkdir(parents=True)
    (cfg.workspace / "checkpoints" / "refit" / "epoch-1.pt").write_bytes(b"\x00weights" + PLANTED.encode())
    pd.DataFrame({"user_id": [PLANTED, "u000001"], "item_id": ["i1", "i2"]}).to_parquet(
        cfg.workspace / "recs.parquet")
    store = registry.feature_store(cfg.workspace)
    assert store.get_online_features(features=["user_personal:region"],
                                     entity_rows=[{"user_id": PLANTED}]).to_dict()["region"] == [REGION]

    out = tmp_path / "export.json"
    cli.export(user=PLANTED, output=out, workspace=cfg.workspace, profile=cfg.profile)
    exported = out.read_text()
    for needle in NEEDLES:
        assert needle in exported, needle
    body = json.loads(exported)
    assert body["raw"]["quarantine"] and body["features"]["online"]["user_personal"]["region"] == REGION
    assert body["features"]["offline"]["user_text"] and QUERY in body["profile_tags"]["recent_intents"][0]
    assert body["latest_ranking"] is None  # no model trained in this workspace

    assert traces(cfg.workspace, [PLANTED, QUERY, REVIEW])  # the search below is not blind
    # A made-up or very short id erases nothing else: every report and copy stays as it was.
    before = _files(cfg.workspace)
    cli.forget(user=["0", "nobody-of-that-name"], workspace=cfg.workspace, profile=cfg.profile, reason=None,
               as_json=True)
    assert _files(cfg.workspace) == before
    if cfg.profile == "prod":
        assert postgres_traces(cfg.resolved_event_log_url(), [PLANTED, QUERY, REVIEW])
        assert redis_traces(redis_db, [PLANTED])
    cli.forget(user=[PLANTED], workspace=cfg.workspace, profile=cfg.profile, reason="ticket 1", as_json=True)
    assert traces(cfg.workspace, NEEDLES) == []
    if cfg.profile == "prod":
        assert postgres_traces(cfg.resolved_event_log_url(), NEEDLES) == []
        assert redis_traces(redis_db, NEEDLES) == []
    online = store.get_online_features(features=["user_personal:region", "user_text:recent_queries"],
                                       entity_rows=[{"user_id": PLANTED}]).to_dict()
    assert online["region"] == [None] and online["recent_queries"] == [None]
    # Idempotent: a second run finds nothing and completes.
    cli.forget(user=[PLANTED], workspace=cfg.workspace, profile=cfg.profile, reason=None, as_json=True)

    # The old file again: the user's rows are skipped and reported, the user stays gone.
    log = EventLog(cfg.resolved_event_log_url())
    report, _ = ingest(load_batch(data), log, Gate(GateSettings(on_schema_drift="accept")),
                       privacy=Privacy.for_workspace(cfg.workspace))
    assert any("erased users" in n for n in report.notes), report.notes
    assert PLANTED not in set(log.read_table("users")["user_id"])
    assert PLANTED not in set(log.read_table("events")["user_id"])
    assert PLANTED not in log.quarantined()["payload"].str.cat()
    log.dispose()
    assert traces(cfg.workspace, [PLANTED, QUERY, REVIEW]) == []


def test_offline_eraser_rewrites_spark_part_files(tmp_path):
    """The spark profile's folders of part files (and staging copies) lose the user's rows."""
    from feature_repo.pipeline.erase import erase_offline

    for folder in ("user_text", ".staging/user_text"):
        (tmp_path / "offline" / folder).mkdir(parents=True)
        pd.DataFrame({"user_id": [PLANTED, "u1"], "recent_queries": [QUERY, "other"]}).to_parquet(
            tmp_path / "offline" / folder / "part-00000.parquet")
    removed = erase_offline("spark", tmp_path, [PLANTED])
    assert sum(removed.values()) == 2
    assert traces(tmp_path, [PLANTED, QUERY]) == []
    assert list(pd.read_parquet(tmp_path / "offline" / "user_text")["user_id"]) == ["u1"]


def test_duckdb_files_are_rewritten(tmp_path):
    import duckdb

    path = tmp_path / "offline" / "features.duckdb"
    path.parent.mkdir()
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE user_text AS SELECT * FROM (VALUES (?, ?), ('u1', 'other')) t(user_id, q)",
                [PLANTED, QUERY])
    con.close()
    from feature_repo.pipeline.erase import erase_offline

    erase_offline("local", tmp_path, [PLANTED])
    assert traces(tmp_path, [PLANTED, QUERY]) == []
    con = duckdb.connect(str(path))
    assert con.execute("SELECT user_id FROM user_text").fetchall() == [("u1",)]
    con.close()


def test_bloom_filter_records_training_users():
    from core.privacy import id_hash
    from training.provenance import bloom, might_contain, trained_on_erased

    salt = b"s"
    users = [f"u{n:05d}" for n in range(2000)]
    meta = {"trained_users": bloom([id_hash(u, salt) for u in users])}
    assert all(might_contain(meta["trained_users"], id_hash(u, salt)) for u in users[:200])
    others = [id_hash(f"x{n}", salt) for n in range(2000)]
    assert sum(might_contain(meta["trained_users"], h) for h in others) < 20  # about 1 in 1000
    assert trained_on_erased(meta, {id_hash("u00007", salt)}) == 1
    assert json.dumps(meta)  # JSON-safe: it lives in the BentoML metadata


def test_reasons_of_personal_columns_are_masked():
    from core.privacy import mask_reason

    masked = mask_reason("events", "query", f"query is at most 1000 characters (got '{LONG_QUERY[:57]}...')")
    assert "plantedlongquery" not in masked
    assert mask_reason("items", "price", "price >= 0 (got -1.0)") == "price >= 0 (got -1.0)"


def _capture_all_logs(caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    logging.getLogger("persona.service").propagate = True


def test_service_forget_export_caches_models_and_clean_logs(tmp_path, shop, tiny_bert, monkeypatch, caplog,
                                                             capsys, fresh_bentoml_metrics):
    """Through the in-process ASGI app: /export, /forget (API key), caches, cold start, erased models."""
    import importlib

    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore
    from starlette.testclient import TestClient

    from training import text_cache as model_mod

    def cached(text: str) -> bool:
        return any(text in t for cache in list(model_mod._TEXT_CACHES.values()) for t, _ in list(cache.vectors))

    _capture_all_logs(caplog)
    monkeypatch.delenv("PERSONA_WORKSPACE", raising=False)
    cfg = config_mod.load(tmp_path / "ws", "local")
    data = tmp_path / "day1"
    sample_data.write(planted_tables(shop), data)
    monkeypatch.setenv("BENTOML_HOME", str(cfg.workspace / "bentoml"))
    BentoMLContainer.model_store.set(ModelStore(str(cfg.workspace / "bentoml" / "models")))
    train = dict(workspace=cfg.workspace, profile="local", epochs=1, batch_size=256, finetune_layers=0,
                 max_positives=100, bert=tiny_bert, device="cpu", splits="global", baselines=False, refit=False,
                 resume=False)
    try:
        cli.validate(source=str(data), workspace=cfg.workspace, profile="local", strict=False, docs=True)
        cli.ingest(source=str(data), workspace=cfg.workspace, profile="local", strict=False, as_json=False)
        cli.features_apply(workspace=cfg.workspace, profile="local")
        cli.features_build(workspace=cfg.workspace, profile="local", check=True)
        cli.features_materialize(workspace=cfg.workspace, profile="local", full=False)
        cli.train_cmd(**train)
        out = tmp_path / "export.json"
        cli.export(user=PLANTED, output=out, workspace=cfg.workspace, profile="local")
        ranking = json.loads(out.read_text())["latest_ranking"]
        assert len(ranking["items"]) == 10 and all(item["reasons"] for item in ranking["items"])
        monkeypatch.setenv("PERSONA_WORKSPACE", str(cfg.workspace))
        monkeypatch.setenv("PERSONA_API_KEY", "k-123")
        monkeypatch.setenv("PERSONA_REFRESH_SECONDS", "0.5")  # the tick that follows a CLI `forget`
        import bentos.service as service
        from bentos import settings

        importlib.reload(settings)  # the settings are read from the environment at import
        service = importlib.reload(service)
        with TestClient(service.Persona.to_asgi()) as client:
            key = {"X-API-Key": "k-123"}
            assert client.post("/forget", json={"user_ids": [PLANTED]}).status_code == 401
            ranked = client.post("/rank", json={"user_id": PLANTED, "query": QUERY, "k": 5}, headers=key)
            assert ranked.status_code == 200 and ranked.json()["cold_start"] is False
            assert cached(QUERY)
            exported = client.post("/export", json={"user_id": PLANTED}, headers=key)
            assert exported.status_code == 200, exported.text
            for needle in NEEDLES:
                assert needle in exported.text, needle
            assert exported.json()["latest_ranking"]["items"][0]["reasons"]
            # `persona forget` from the CLI while the service runs: its next tick drops the cached text.
            cli.forget(user=[PLANTED], workspace=cfg.workspace, profile="local", reason="ticket 7", as_json=True)
            deadline = time.monotonic() + 20
            while cached(QUERY) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not cached(QUERY)
            someone = shop["users"]["user_id"].iloc[0]
            assert client.post("/rank", json={"user_id": someone, "query": QUERY}, headers=key).status_code == 200
            assert cached(QUERY)
            # /forget itself (idempotent after the CLI run) clears the caches at once.
            forgot = client.post("/forget", json={"user_ids": [PLANTED], "reason": "request 7"}, headers=key)
            assert forgot.status_code == 200 and forgot.json()["complete"], forgot.text
            assert not cached(QUERY)
            assert client.post("/profile", json={"user_id": PLANTED}, headers=key).json()["known"] is False
            assert client.post("/rank", json={"user_id": PLANTED}, headers=key).json()["cold_start"] is True
            event = {"user_id": PLANTED, "event_type": "search", "query": QUERY,
                     "event_timestamp": "2026-06-29T10:00:00Z"}
            again = client.post("/events", headers=key, json={"events": [event]})
            assert again.status_code == 422 and again.json()["rejected"][0]["reasons"][0]["rule"] == "erased_user"
        assert traces(cfg.workspace, NEEDLES) == []
        printed = [capsys.readouterr().out]
        cli.status(workspace=cfg.workspace, profile="local", as_json=True)
        printed.append(capsys.readouterr().out)
        status = json.loads(printed[-1])
        assert [m["tag"] for m in status["models_trained_on_erased_users"]] == [status["models"][0]["tag"]]
        cli.train_cmd(**train)  # the next version is trained without the erased user
        printed.append(capsys.readouterr().out)
        cli.status(workspace=cfg.workspace, profile="local", as_json=True)
        printed.append(capsys.readouterr().out)
        status = json.loads(printed[-1])
        assert len(status["models"]) == 2
        assert [m["tag"] for m in status["models_trained_on_erased_users"]] == [status["models"][1]["tag"]]
    finally:
        BentoMLContainer.model_store.reset()
    # No personal value in any log line of the whole run, nor in any report written during it.
    personal = [REGION, OCCUPATION, QUERY, REVIEW, "plantedlongquery"]
    logged = caplog.text + "".join(printed) + capsys.readouterr().out
    assert [p for p in personal if p in logged] == []
    assert traces(cfg.workspace / "reports", personal) == [] and traces(cfg.workspace / "gx", personal) == []


def test_pseudonymous_ids_end_to_end(tmp_path, shop, monkeypatch):
    from core.privacy import pseudonym

    monkeypatch.setenv("PERSONA_ID_KEY", "secret-key-for-tests")
    monkeypatch.delenv("PERSONA_WORKSPACE", raising=False)
    cfg = config_mod.load(tmp_path / "ws", "local")
    monkeypatch.setenv("BENTOML_HOME", str(cfg.workspace / "bentoml"))
    cfg.privacy.pseudonymous_ids = True
    cfg.save()
    data = tmp_path / "day1"
    sample_data.write(planted_tables(shop), data)
    _pipeline(cfg, data)
    alias = pseudonym(PLANTED, b"secret-key-for-tests")
    assert traces(cfg.workspace, [PLANTED]) == []  # no raw id anywhere: log, quarantine, stores, reports
    assert traces(cfg.workspace, [alias])  # the pseudonym is what is stored
    out = tmp_path / "export.json"
    cli.export(user=PLANTED, output=out, workspace=cfg.workspace, profile="local")  # by the raw id
    body = json.loads(out.read_text())
    assert body["user_id"] == alias and body["pseudonymous"] and QUERY in out.read_text()
    cli.forget(user=[PLANTED], workspace=cfg.workspace, profile="local", reason=None, as_json=True)
    assert traces(cfg.workspace, [alias, QUERY, REVIEW]) == []
    log = EventLog(cfg.resolved_event_log_url())
    report, _ = ingest(load_batch(data), log, Gate(GateSettings(on_schema_drift="accept")),
                       privacy=Privacy.for_workspace(cfg.workspace))
    assert any("erased users" in n for n in report.notes)
    log.dispose()


def test_a_forget_arriving_while_persona_train_runs(tmp_path, shop, tiny_bert):
    """`persona forget` while `persona train` runs (in another process, holding the user's rows in memory):
    the forget completes without waiting for the training; the version that training then saves is listed
    under `models_trained_on_erased_users` (its weights may reflect the user: the README's policy); no file
    the training wrote after the forget holds the user's id or texts; and the next `persona train` is free
    of them."""
    import subprocess
    import sys

    from test_service import featured_workspace, service_env

    ws = featured_workspace(tmp_path, planted_tables(shop))
    env = service_env(ws)
    persona = str(Path(sys.executable).parent / "persona")
    train = [persona, "train", "-w", str(ws), "--bert", tiny_bert, "--epochs", "2", "--splits", "global",
             "--no-refit"]
    out = (tmp_path / "train.log").open("w")
    running = subprocess.Popen(train, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "training set" not in (tmp_path / "train.log").read_text() and time.monotonic() < deadline:
            assert running.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.5)
        forgot = subprocess.run([persona, "forget", "-w", str(ws), "--user", PLANTED, "--json"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert forgot.returncode == 0, forgot.stdout + forgot.stderr
        assert running.poll() is None, "the training ended before the forget: not a race"
        assert running.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if running.poll() is None:
            running.kill()
        out.close()
    status = json.loads(subprocess.run([persona, "status", "-w", str(ws), "--json"], env=env, capture_output=True,
                                       text=True, check=True).stdout)
    assert [m["tag"] for m in status["models_trained_on_erased_users"]] == [status["models"][0]["tag"]]
    assert traces(ws, NEEDLES) == []
    again = subprocess.run(train, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    status = json.loads(subprocess.run([persona, "status", "-w", str(ws), "--json"], env=env, capture_output=True,
                                       text=True, check=True).stdout)
    assert len(status["models"]) == 2  # newest first: the new version is free of the user
    assert [m["tag"] for m in status["models_trained_on_erased_users"]] == [status["models"][1]["tag"]]


def test_rows_of_an_erased_user_leave_outputs_outside_the_workspace_by_exact_id(tmp_path):
    """Known answer: the user's rows go from a Parquet part (with Hadoop's checksum beside it) and from a
    CSV with a BOM and Chinese text; user_10 (the erased id is its prefix) and a row quoting the same
    words stay; the outputs are found through the workspace's record, and one inside it is left to the
    workspace's own scrub."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from privacy import outputs
    from privacy.scrub import find, scrub_user_rows

    ws, sets = tmp_path / "ws", tmp_path / "sets"
    ws.mkdir()
    sets.mkdir()
    part = sets / "part-00000.parquet"
    pq.write_table(pa.table({"user_id": ["user_1", "user_10", "user_1"], "query": ["茶壶", "茶壶", "kettle"],
                             "event_timestamp": pd.to_datetime(["2024-01-01"] * 3, utc=True)}), part,
                   compression="zstd")
    (sets / ".part-00000.parquet.crc").write_bytes(b"old checksum")
    recs = tmp_path / "recs.csv"
    recs.write_bytes("user_id,rank,reasons\nuser_1,1,你看过 3 次\nuser_10,1,你看过 3 次\n".encode("utf-8-sig"))
    inside = ws / "recs.csv"
    inside.write_text("user_id\nuser_1\n")
    for path in (sets, recs, inside, sets):
        outputs.record(ws, path)
    assert outputs.recorded(ws) == sorted([str(sets.resolve()), str(recs.resolve()), str(inside.resolve())])
    assert find(part, ["user_1"]) and not find(part, ["nobody"])  # in the columns, not the compressed bytes

    result = scrub_user_rows(outputs.files(ws), ["user_1"])
    assert sorted(result.changed) == sorted([str(part.resolve()), str(recs.resolve())])
    assert pq.read_table(part).to_pydict()["user_id"] == ["user_10"]
    assert not (sets / ".part-00000.parquet.crc").exists()
    assert recs.read_bytes() == "user_id,rank,reasons\nuser_10,1,你看过 3 次\n".encode("utf-8-sig")
    assert inside.read_text() == "user_id\nuser_1\n"
    assert scrub_user_rows(outputs.files(ws), ["user_1"]).changed == []  # nothing left: nothing rewritten


def test_outputs_recorded_by_many_writers_at_once_are_all_kept(tmp_path):
    """Commands recording their outputs at the same time (each holds the erasure lock shared): no record
    overwrites another."""
    from concurrent.futures import ThreadPoolExecutor

    from privacy import outputs

    ws = tmp_path / "ws"
    ws.mkdir()
    paths = [tmp_path / f"out-{k}.csv" for k in range(64)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: outputs.record(ws, p), paths + paths))
    assert outputs.recorded(ws) == sorted(str(p.resolve()) for p in paths)
