"""``persona forget``: erase users everywhere Persona copied them, leaving only a tombstone.

The order makes a failed run safe to repeat: the tombstone comes first (no ingest or push can bring
the users back meanwhile), then the derived copies (online store, offline tables, files in the
workspace), and the event log last, because the log is where the users' own texts are found to scrub
the copies. Files the commands wrote outside the workspace (``privacy.outputs``) are scrubbed with the
workspace's. The tombstone is marked complete only when nothing is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from core import config as config_mod
from core.privacy import Privacy
from eventlog import erase as log_erase
from eventlog import locks, tombstones
from eventlog.store import EventLog
from feature_repo.pipeline import erase as store_erase
from privacy import outputs
from privacy.scrub import scrub_user_rows, scrub_workspace

MIN_ID_LENGTH = 6  # shorter ids would match unrelated bytes in files: the stores are still erased


@dataclass
class ForgetReport:
    users: int
    id_hashes: list[str]
    event_log: dict = field(default_factory=dict)
    offline: dict = field(default_factory=dict)
    online: int = 0
    files_changed: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)  # where something is still left: re-run
    caches_cleared: bool = False

    @property
    def complete(self) -> bool:
        return not self.remaining

    def to_dict(self) -> dict:
        return asdict(self) | {"complete": self.complete}


def forget(cfg: config_mod.Config, raw_ids: list[str], reason: str | None = None,
           log: EventLog | None = None, clear_caches: Callable[[], None] | None = None) -> ForgetReport:
    """Erase the users (raw ids, or their pseudonyms) from every store and file of the workspace."""
    own_log = log is None
    log = log or EventLog(cfg.resolved_event_log_url())
    try:
        privacy = tombstones.bound_to_log(Privacy.for_workspace(cfg.workspace, cfg), log.engine)
        raw_of: dict[str, str] = {}
        for raw in raw_ids:
            raw_of.setdefault(privacy.user_id(raw), raw)
        ids = list(raw_of)
        hashes = [privacy.hash(u) for u in ids]
        report = ForgetReport(len(ids), hashes)
        unfinished = tombstones.pending(log.engine, hashes)
        tombstones.record(log.engine, hashes, reason)  # first: from here on nothing new lets them in
        with locks.held(log.engine, exclusive=True):  # after every job that read them: then erase its copies
            _erase(cfg, log, ids, raw_of, hashes, unfinished, report, clear_caches)
        if report.complete:
            tombstones.complete(log.engine, hashes)
    finally:
        if own_log:
            log.dispose()
    return report


def _erase(cfg: config_mod.Config, log: EventLog, ids: list[str], raw_of: dict[str, str], hashes: list[str],
           unfinished: set[str], report: ForgetReport, clear_caches: Callable[[], None] | None) -> None:
    """Every copy, the online store first and the event log last (the log is where the users' own
    texts are found to scrub the copies); what is still left goes to ``report.remaining``."""
    texts = sorted(log_erase.user_texts(log, ids))
    # Reports shorten long values (to 57 characters in the gate's reasons): look for the start too.
    needles = [*_scrubbable(log, raw_of, hashes, unfinished), *texts, *{t[:57] for t in texts if len(t) > 57}]
    report.online = _store_step(report, "online store", lambda: store_erase.erase_online(cfg.workspace, ids), 0)
    report.offline = _store_step(report, "offline store",
                                 lambda: store_erase.erase_offline(cfg.profile, cfg.workspace, ids), {})
    if clear_caches is not None:
        clear_caches()
        report.caches_cleared = True
    scrubbed = scrub_workspace(cfg.workspace, needles, skip=_stores(cfg))
    outside = scrub_user_rows(outputs.files(cfg.workspace), [*ids, *raw_of.values()])  # sets, recommendations
    scrubbed.changed += outside.changed
    report.files_changed, report.files_deleted = scrubbed.changed, scrubbed.deleted
    report.event_log = asdict(log_erase.erase_users(log, ids)) | {"texts": None}
    left = log_erase.holds(log, ids)
    report.remaining += scrubbed.remaining + [f"event log: {k}" for k, n in left.items() if n]
    report.remaining += _final_vacuum(log, report)


def _store_step(report: ForgetReport, store: str, erase: Callable[[], Any], nothing: Any) -> Any:
    """One store's erase; a store that is down or unreadable leaves the erasure pending (said in
    ``remaining``), and the other stores are still erased: a re-run finishes it once the store is back."""
    try:
        return erase()
    except Exception as exc:  # noqa: BLE001 - Redis, SQLite, Postgres and files fail with their own types
        report.remaining.append(f"{store}: could not be erased ({type(exc).__name__}); re-run `persona forget` "
                                "once it is back")
        return nothing


def _scrubbable(log: EventLog, raw_of: dict[str, str], hashes: list[str], unfinished: set[str]) -> list[str]:
    """The ids worth searching files for: long enough not to match other records by chance, and
    either in the log now or left over from an unfinished run. A made-up id touches no file."""
    out = []
    for (uid, raw), h in zip(raw_of.items(), hashes, strict=True):
        if len(uid) >= MIN_ID_LENGTH and (h in unfinished or any(log_erase.holds(log, [uid]).values())):
            out += [uid] + ([raw] if raw != uid and len(raw) >= MIN_ID_LENGTH else [])
    return out


def _final_vacuum(log: EventLog, report: ForgetReport) -> list[str]:
    """Postgres: rewrite every touched table once more, now that all deletes are committed, and say
    so if another open transaction may still pin deleted rows (then re-run once it has ended)."""
    if log.engine.dialect.name != "postgresql":
        return []
    tables = (*log_erase.TOUCHED, *[t for t in report.offline if t.startswith("persona_")])
    log_erase.reclaim(log.engine, tables)
    busy = log_erase.open_snapshots(log.engine)
    return [f"postgres: {busy} other open transaction(s) may still hold deleted rows"] if busy else []


def _stores(cfg: config_mod.Config) -> list:
    """Files erased by their own code, not by the file scrubber, and the model store: a model holds
    weights, the packaged BERT's own vocabulary and a Bloom filter of salted hashes of its training
    users (``persona status`` names the versions trained on users erased since), never their rows or
    texts, and rewriting its files as if they were user data broke the model and the bento."""
    ws = cfg.workspace
    feast = ws / "feast"
    return [ws / "offline", feast / "online.db", feast / "online.db-wal", feast / "online.db-shm",
            ws / "eventlog.db", ws / "eventlog.db-wal", ws / "eventlog.db-shm", feast / "registry.db",
            ws / "bentoml" / "models", ws / "bentoml" / "bentos"]
