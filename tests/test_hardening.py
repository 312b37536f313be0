"""Faults and races a careful operator or an attacker would try: forget is final and touches only
what is the user's; ids no command can type are refused at the door; a model is never scrubbed.

Each test reproduces the fault first (it failed before its fix) on real SQLite logs, real files and
real `persona` processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from core import config as config_mod
from core.privacy import Privacy
from eventlog import locks
from eventlog.sources import load_batch
from eventlog.store import EventLog
from ingestion.ingest import ingest
from privacy.export import export_user
from privacy.forget import forget
from validation.gate import Gate, GateSettings

BIN = Path(sys.executable).parent
NOW = pd.Timestamp("2026-11-01 12:00", tz="UTC")


def _write(folder: Path, tables: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        pd.DataFrame(rows).to_csv(folder / f"{name}.csv", index=False)
    return folder


def _ingest(cfg, folder: Path) -> None:
    log = EventLog(cfg.resolved_event_log_url())
    try:
        ingest(load_batch(folder), log, Gate(GateSettings(max_reject_share=1.0)),
               privacy=Privacy.for_workspace(cfg.workspace, cfg))  # as `persona ingest` does
    finally:
        log.dispose()


def _event(event_id: str, user: str, item: str, **extra) -> dict:
    return {"event_id": event_id, "user_id": user, "item_id": item, "event_type": "view",
            "event_timestamp": (NOW - pd.Timedelta(hours=1)).isoformat(), **extra}


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("PERSONA_WORKSPACE", raising=False)
    monkeypatch.delenv("PERSONA_EVENT_LOG_URL", raising=False)
    return config_mod.load(tmp_path / "ws")


def _quarantined(cfg) -> pd.DataFrame:
    log = EventLog(cfg.resolved_event_log_url())
    try:
        return log.quarantined()
    finally:
        log.dispose()


def test_export_and_forget_take_only_the_users_own_quarantined_rows(cfg, tmp_path):
    """User 100042 and item 100042: another user's quarantined review of that item, and the item's own
    quarantined row, are not the user's (they matched by the id's text before)."""
    _ingest(cfg, _write(tmp_path / "day1", {
        "users": [{"user_id": "100042"}, {"user_id": "100077"}],
        "items": [{"item_id": "100042", "title": "Stapler", "category": "Office"},
                  {"item_id": "i2", "title": "Pen", "category": "Office"},
                  {"item_id": "i3", "title": "Ink", "category": "Office", "price": -1}],  # quarantined
        "events": [_event("e1", "100042", "i2"),
                   _event("e2", "100077", "100042", event_type="review", rating=9, text="stapler jams"),
                   _event("e3", "100042", "i2", event_type="review", rating=0, text="mine, bad rating")]}))
    before = _quarantined(cfg)
    assert len(before) == 3
    exported = export_user(cfg, "100042")
    mine = [json.dumps(r["payload"]) for r in exported["raw"]["quarantine"]]
    assert len(mine) == 1 and "mine, bad rating" in mine[0]
    report = forget(cfg, ["100042"])
    assert report.complete and report.event_log["quarantine"] == 1
    left = _quarantined(cfg)
    assert sorted(left["record_key"]) == ["e2", "i3"]  # the other user's review and the item's row stay


def test_a_padded_id_in_the_quarantine_is_erased(cfg, tmp_path):
    """A CSV cell `" u_padded"` is the user `u_padded`: the quarantine keeps the raw text, padding and all."""
    _ingest(cfg, _write(tmp_path / "day1", {
        "users": [{"user_id": "u_padded"}],
        "items": [{"item_id": "i1", "title": "Pen", "category": "Office"}],
        "events": [_event("e1", "u_padded", "i1"), _event("e2", " u_padded", "i1", event_type="review", rating=7)]}))
    payloads = " ".join(_quarantined(cfg)["payload"])
    assert '" u_padded"' in payloads
    report = forget(cfg, ["u_padded"])
    assert report.complete and report.event_log["quarantine"] == 1
    assert _quarantined(cfg).empty


def test_an_id_with_a_nul_character_is_quarantined_with_its_rule(cfg, tmp_path):
    """No command line can pass it, so it could never be erased or exported: it is refused at the door."""
    _ingest(cfg, _write(tmp_path / "day1", {
        "users": [{"user_id": "u_ok"}, {"user_id": "u_nul\x00x"}],
        "items": [{"item_id": "i1", "title": "Pen", "category": "Office"}],
        "events": [_event("e1", "u_ok", "i1")]}))
    rows = _quarantined(cfg)
    assert list(rows["rule"]) == ["id_characters"] and list(rows["column_name"]) == ["user_id"]
    assert "NUL" in rows["reason"].iloc[0]
    log = EventLog(cfg.resolved_event_log_url())
    try:
        assert list(log.read_table("users")["user_id"]) == ["u_ok"]
    finally:
        log.dispose()


def test_forget_leaves_the_model_store_alone(cfg, tmp_path):
    """A model's files are not user data: the packaged BERT's vocabulary holds ordinary words that a
    user's unique search may contain (scrubbing them broke the text model and the bento's sources)."""
    word = "zebrakumquatvocab"
    _ingest(cfg, _write(tmp_path / "day1", {
        "users": [{"user_id": "u_searcher"}],
        "items": [{"item_id": "i1", "title": "Pen", "category": "Office"}],
        "events": [_event("e1", "u_searcher", "i1"),
                   {**_event("e2", "u_searcher", ""), "event_type": "search", "item_id": None, "query": word}]}))
    model = cfg.workspace / "bentoml" / "models" / "persona-profile" / "v1" / "bert" / "tokenizer.json"
    bento = cfg.workspace / "bentoml" / "bentos" / "persona" / "v1" / "src" / "bentos" / "service.py"
    for path, text in ((model, json.dumps({"vocab": {word: 7, "pen": 8}})), (bento, f"# {word}\nimport os\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    kept = {p: p.read_bytes() for p in (model, bento)}
    report = forget(cfg, ["u_searcher"])
    assert report.complete, report.remaining
    assert {p: p.read_bytes() for p in kept} == kept


def _lock_taken(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["local", "spark"])
def test_a_build_running_during_forget_cannot_bring_the_user_back(cfg, tmp_path, shop, profile):
    """`persona features build &`, then `persona forget` while it runs: the build read the user before
    the forget and wrote after it, so the user's rows came back. Now forget waits for it, then erases.
    On the spark profile too: Spark's tasks read the log in ranges and write folders of part files."""
    if profile == "spark":
        pytest.importorskip("pyspark", reason="the spark extra is installed by `make test`")
        cfg.workspace.mkdir(parents=True, exist_ok=True)
        (cfg.workspace / "persona.yaml").write_text("profile: spark\n")
        cfg = config_mod.load(cfg.workspace)
    data = tmp_path / "shop"
    data.mkdir()
    for name, frame in shop.items():
        frame.to_csv(data / f"{name}.csv", index=False)
    env = {**os.environ, "PERSONA_WORKSPACE": str(cfg.workspace), "SPARK_LOCAL_IP": "127.0.0.1"}
    for args in (["ingest", "--source", str(data)], ["features", "apply"]):
        subprocess.run([str(BIN / "persona"), *args, "-w", str(cfg.workspace)], env=env, check=True,
                       capture_output=True, timeout=600)
    user = str(shop["events"]["user_id"].value_counts().index[0])
    lock = locks.lock_file(cfg.resolved_event_log_url())
    build = subprocess.Popen([str(BIN / "persona"), "features", "build", "-w", str(cfg.workspace), "--no-check"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _lock_taken(lock):  # the build holds the log's erasure lock from its read to its write
            assert build.poll() is None, "the build ended without ever holding the erasure lock"
            assert time.monotonic() < deadline, "the build never took the erasure lock"
            time.sleep(0.01)
        report = forget(cfg, [user])  # waits for the build, then erases what it wrote
        assert build.wait(timeout=600) == 0, build.stdout.read().decode()[-2000:]
    finally:
        if build.poll() is None:
            build.kill()
    assert report.complete, report.remaining
    assert cfg.profile == profile
    parts = sorted((cfg.workspace / "offline").rglob("*.parquet"))  # local: a file a table; spark: part files
    assert any("user_id" in pd.read_parquet(p) for p in parts)
    for path in parts:
        table = pd.read_parquet(path)
        if "user_id" in table:
            assert user not in set(table["user_id"]), f"{path.name} holds the erased user again"


KILLED_SAVE = """
import os, shutil, signal, sys
from pathlib import Path
import bentoml, pandas as pd
from core.config import MODEL_NAME
from training.encoding import FeatureSpec
from training.model import ModelConfig, ProfileModel
bert, kill_at = sys.argv[1], sys.argv[2]
frame = pd.DataFrame({"age": [30.0, 40.0]})
model = ProfileModel.build(ModelConfig(bert_path=bert), FeatureSpec.fit(frame, frame, ["age"], [], [], []))
copied, copyfile = [], shutil.copyfile
def copy_or_die(src, dst, **kw):  # BentoML copies a new version into the store file by file
    if str(dst).startswith(os.environ["BENTOML_HOME"]) and Path(dst).name == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    copied.append(dst)
    return copyfile(src, dst, **kw)
shutil.copyfile = copy_or_die
with bentoml.models.create(MODEL_NAME, metadata={}) as saved:
    model.save(Path(saved.path))
print(saved.tag)
"""

# What a fresh process (a service, `persona recommend`) resolves: BentoML fixes its store per process.
STORE_VIEW = """
import json
from bentoml.exceptions import NotFound
from training.model_store import incomplete_versions, latest_complete, load_from_bentoml
try:
    latest = latest_complete()
except NotFound:
    latest = None
loaded = load_from_bentoml("latest")[2] if latest else None
print(json.dumps({"latest": latest, "loaded": loaded, "incomplete": incomplete_versions()}))
"""


def test_a_model_save_killed_half_way_is_never_served(tmp_path, tiny_bert, monkeypatch):
    """`kill -9` while the new version is copied into the store: it is not `latest`, it does not load,
    and `persona status` can name it; the version before it is served."""
    from training.model import IncompleteModel, ProfileModel

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    script, view = tmp_path / "save.py", tmp_path / "view.py"
    script.write_text(KILLED_SAVE)
    view.write_text(STORE_VIEW)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def save(kill_at: str) -> subprocess.CompletedProcess:
        return run(str(script), tiny_bert, kill_at)

    def store_view() -> dict:
        seen = run(str(view))
        assert seen.returncode == 0, seen.stderr[-2000:]
        return json.loads(seen.stdout.strip().splitlines()[-1])

    assert store_view() == {"latest": None, "loaded": None, "incomplete": []}
    whole = save("-")
    assert whole.returncode == 0, whole.stderr[-2000:]
    good = whole.stdout.strip().splitlines()[-1]
    killed = save("model.safetensors")  # the BERT weights: the 90 MB file
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed, in the middle of the copy
    store = tmp_path / "bentoml" / "models" / "persona-profile"
    left = [p for p in store.iterdir() if p.is_dir() and p.name != good.split(":")[1]]
    assert len(left) == 1  # the half-copied version is in the store
    assert ProfileModel.problems(left[0])
    with pytest.raises(IncompleteModel, match="incomplete"):
        ProfileModel.load(left[0])
    seen = store_view()
    assert seen["latest"] == good and seen["loaded"] == good
    # BentoML lists it when its model.yaml was copied before the kill (the copy's order is the
    # filesystem's): then `persona status` marks it incomplete.
    assert set(seen["incomplete"]) <= {f"persona-profile:{left[0].name}"}


def test_forget_with_the_online_store_down_says_pending_and_finishes_later(cfg, tmp_path):
    """No traceback: the other stores are erased, the report names the store, and a re-run completes."""
    import yaml

    from feature_repo.pipeline import feast_config, registry

    _ingest(cfg, _write(tmp_path / "day1", {
        "users": [{"user_id": "u_down"}], "items": [{"item_id": "i1", "title": "Pen", "category": "Office"}],
        "events": [_event("e1", "u_down", "i1")]}))
    registry.apply(cfg.workspace, "local")
    path = feast_config.yaml_path(cfg.workspace)
    working = path.read_text()
    down = yaml.safe_load(working)
    down["online_store"] = {"type": "redis", "connection_string": "127.0.0.1:1"}  # nothing listens there
    path.write_text(yaml.safe_dump(down))
    # A build killed while writing left a half-written table with the user in it.
    stale = cfg.workspace / "offline" / ".user_text.parquet.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("u_down half written")
    report = forget(cfg, ["u_down"])
    assert not report.complete
    assert any(r.startswith("online store: could not be erased") for r in report.remaining), report.remaining
    assert not stale.exists() and report.event_log["events"] == 1
    path.write_text(working)  # the store is back
    assert forget(cfg, ["u_down"]).complete


def test_an_export_is_its_owners_only_and_a_folder_is_a_clear_error(tmp_path):
    from privacy.export import write

    out = write({"user_id": "u1", "text": "主题 ✓"}, tmp_path / "export.json")
    assert oct(out.stat().st_mode & 0o777) == oct(0o600)
    assert json.loads(out.read_text(encoding="utf-8"))["text"] == "主题 ✓"
    with pytest.raises(ValueError, match="is a folder"):
        write({}, tmp_path)


def test_workspaces_sharing_a_log_honour_each_others_erasures(tmp_path, monkeypatch):
    """Each workspace has its own salt file; the tombstone binds to the log's salt, so a user erased
    through one workspace is skipped when the other ingests an old file."""
    monkeypatch.delenv("PERSONA_WORKSPACE", raising=False)
    monkeypatch.delenv("PERSONA_PRIVACY_SALT", raising=False)
    monkeypatch.setenv("PERSONA_EVENT_LOG_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    first, second = config_mod.load(tmp_path / "ws1"), config_mod.load(tmp_path / "ws2")
    old_file = _write(tmp_path / "day1", {
        "users": [{"user_id": "u_shared"}, {"user_id": "u_other"}],
        "items": [{"item_id": "i1", "title": "Pen", "category": "Office"}],
        "events": [_event("e1", "u_shared", "i1"), _event("e2", "u_other", "i1")]})
    _ingest(first, old_file)
    assert forget(first, ["u_shared"]).complete
    _ingest(second, old_file)  # the second workspace, its own salt file, the same log
    assert (first.workspace / "privacy_salt").read_bytes() != (second.workspace / "privacy_salt").read_bytes()
    log = EventLog(second.resolved_event_log_url())
    try:
        assert sorted(log.read_table("users")["user_id"]) == ["u_other"]
        assert list(log.read_table("events")["user_id"]) == ["u_other"]
    finally:
        log.dispose()


def test_the_quarantine_is_bounded(cfg, tmp_path):
    """Past `validation.max_quarantined_rows` a file batch is refused whole (nothing written: the file
    still has it) and an API batch keeps its good events and answers, not stores, its bad ones."""
    from eventlog.sources import Batch, normalise
    from ingestion.ingest import QuarantineFull

    _ingest(cfg, _write(tmp_path / "day1", {
        "users": [{"user_id": "u1"}], "items": [{"item_id": "i1", "title": "Pen", "category": "Office"}],
        "events": [_event("e1", "u1", "i1")]}))
    bounded = Gate(GateSettings(max_reject_share=1.0, max_quarantined_rows=3))
    bad = [_event(f"bad{n}", "u1", "i1", rating=9, event_type="review") for n in range(5)]
    log = EventLog(cfg.resolved_event_log_url())
    try:
        with pytest.raises(QuarantineFull, match="max_quarantined_rows"):
            ingest(load_batch(_write(tmp_path / "flood", {"events": [_event("ok1", "u1", "i1"), *bad]})), log, bounded)
        assert log.counts()["events"] == 1 and log.counts()["quarantined"] == 0  # nothing of it written
        request = Batch("POST /events", {"events": normalise("events", [_event("ok2", "u1", "i1"), *bad], "r")})
        as_the_service = Gate(GateSettings(max_reject_share=1.0, on_schema_drift="accept", engine="pandas",
                                           max_quarantined_rows=3))
        report, result = ingest(request, log, as_the_service)
        assert report.quarantine_full and len(result.verdicts["events"].violations) == 5
        assert log.counts()["events"] == 2 and log.counts()["quarantined"] == 3  # the good one kept; 3 stored
        assert "2 rejected row(s) were answered but not stored" in report.notes[-1]
    finally:
        log.dispose()
