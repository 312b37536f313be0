"""``/events``: bound what the contract does not cover, then the one door of ``ingestion/`` (screen,
gate, append), then fold the new events into their users' online state, one user at a time."""

from __future__ import annotations

import contextlib
import json
import threading
import zlib
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any

from bentos.edge import incident, is_outage
from core.contract import columns
from core.privacy import Privacy
from eventlog import locks, tombstones
from eventlog.sources import Batch, StructuralError, normalise
from eventlog.tombstones import ErasedSet
from feature_repo.pipeline.push import push_events
from ingestion.ingest import admit
from ingestion.screen import Screened, erased_rejection, screen
from validation.gate import Gate, GateSettings

MAX_UNKNOWN_FIELDS = 32  # fields outside the events contract, per event (the log keeps them as `extra`)
MAX_UNKNOWN_FIELD_BYTES = 4096  # each one's size as JSON


class UserLocks:
    """Per-user ordering: a request holds its users' locks from the append to the push, so a state read
    before another request's append is never written over that request's newer state. Striped, and
    taken in one order, so two requests never wait on each other in a circle."""

    def __init__(self, stripes: int = 64) -> None:
        self.stripes = [threading.Lock() for _ in range(stripes)]

    @contextlib.contextmanager
    def hold(self, user_ids: Iterable[str]) -> Iterator[None]:
        wanted = sorted({zlib.crc32(str(u).encode()) % len(self.stripes) for u in user_ids})
        with contextlib.ExitStack() as stack:
            for n in wanted:
                stack.enter_context(self.stripes[n])
            yield


def unknown_field_problems(event: dict[str, Any], known: set[str]) -> list[dict[str, Any]]:
    """Fields outside the contract are kept (as the log's `extra`), within bounds: how many, how big."""
    unknown = [k for k in event if str(k).strip() not in known]
    if len(unknown) > MAX_UNKNOWN_FIELDS:
        return [{"rule": "unknown_field_count", "column": None,
                 "reason": f"{len(unknown)} fields outside the contract; at most {MAX_UNKNOWN_FIELDS}"}]
    problems = []
    for name in unknown:
        size = len(json.dumps(event[name], ensure_ascii=False, default=str).encode())
        if size > MAX_UNKNOWN_FIELD_BYTES:
            problems.append({"rule": "unknown_field_size", "column": str(name)[:256],
                             "reason": f"{str(name)[:256]!r} is {size} bytes as JSON; at most "
                                       f"{MAX_UNKNOWN_FIELD_BYTES} for a field outside the contract"})
    return problems


class Intake:
    """/events: bound what the contract does not cover, gate, append to the event log, push online."""

    def __init__(self, cfg, log, store) -> None:
        self.cfg, self.log, self.store = cfg, log, store
        self.append_lock = threading.Lock()  # one append at a time: idempotent on event_id
        self.users = UserLocks()
        # Pseudonyms and tombstones at the door, with the log's salt (shared by every workspace on the log).
        self.privacy = tombstones.bound_to_log(Privacy.for_workspace(cfg.workspace, cfg), log.engine)
        self.erased = ErasedSet(log.engine)  # one tombstone read per request, a full one per erasure
        self.stale: set[str] = set()  # users whose last push failed: the next one recomputes from the log

    def post(self, events: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """The status and the answer: which events were accepted, which rejected and why."""
        known = set(columns("events"))
        rejected, kept = [], []
        for n, event in enumerate(events):
            problems = unknown_field_problems(event, known)
            if problems:
                given = event.get("event_id")
                rejected.append({"index": n, "event_id": None if given is None else str(given)[:256],
                                 "reasons": problems})
            else:
                kept.append(n)
        if not kept:
            return 422, {"accepted": [], "rejected": rejected, "pushed_users": [], "online_update": "updated"}
        try:
            tb = normalise("events", [events[n] for n in kept], "request")  # records: a NaN stays a NaN
        except StructuralError as exc:
            return 422, {"accepted": [], "rejected": rejected + [
                {"index": None, "reason": str(exc).replace("request: ", "")}]}
        # Screen to push under the log's erasure lock: a forget meanwhile waits, then erases what this wrote.
        with locks.held(self.log.engine):
            screened = screen(Batch("POST /events", {"events": tb}), self.privacy, self.erased.hashes())
            erased = screened.removed("events")  # erased users' events are not stored
            rejected += [erased_rejection(kept[p]) for p in erased]
            gone = set(erased)
            kept = [k for p, k in enumerate(kept) if p not in gone]
            if not kept:
                return 422, {"accepted": [], "rejected": rejected, "pushed_users": [], "online_update": "updated"}
            tb = screened.batch.tables["events"]
            with self.users.hold(tb.frame["user_id"].dropna()):
                report, verdict = self._append(screened)
                ok = [i for i in range(len(tb.frame)) if i not in verdict.violations]
                users = sorted(set(tb.frame["user_id"].iloc[ok].dropna()))
                online = self._push(users, report.new_events)
        rejected += [{"index": kept[row], "event_id": tb.frame["event_id"].iloc[row],
                      "reasons": [{"rule": x.rule, "column": x.column, "reason": x.reason} for x in vs]}
                     for row, vs in sorted(verdict.violations.items())]
        status = 422 if rejected else 200 if online == "updated" else HTTPStatus.ACCEPTED
        body = {"accepted": [tb.frame["event_id"].iloc[i] for i in ok],
                "rejected": sorted(rejected, key=lambda r: r["index"]),
                "pushed_users": users if online == "updated" else [], "online_update": online}
        if report.quarantine_full:  # the rejected events are in this answer only: the client keeps them
            body["quarantine"] = "full: the rejected events were not stored; " + report.notes[-1]
        return status, body

    def _append(self, screened: Screened):
        v = self.cfg.validation
        gate = Gate(GateSettings(max_reject_share=1.0, clock_skew_minutes=v.clock_skew_minutes,
                                 on_schema_drift="accept", engine="pandas",
                                 max_quarantined_rows=v.max_quarantined_rows,
                                 event_types=self.cfg.event_types))  # the same suites, in-process
        with self.append_lock:
            report, result = admit(screened, self.log, gate)
        return report, result.verdicts["events"]

    def _push(self, users: list[str], new_events) -> str:
        """Fold the newly stored events into their users' online state (an event the log already
        held was folded when it arrived). If that fails the events are safe in the log: those users
        are recomputed from it at their next push, and at the next ``features materialize``."""
        if new_events is None or not len(new_events):
            return "updated"
        stored = sorted(set(new_events["user_id"]))
        try:
            push_events(self.store, self.log, new_events, stale=self.stale.intersection(stored),
                        sequence_types=self.cfg.sequence_types)
            self.stale.difference_update(stored)
        except Exception as exc:  # noqa: BLE001 - the answer says the update is deferred
            self.stale.update(stored)
            if is_outage(exc):
                return (f"deferred: online store unavailable ({type(exc).__name__}); "
                        "the events are in the event log")
            ref = incident("/events push", ",".join(users)[:256], exc)
            return f"deferred: online update failed (incident {ref}); the events are in the event log"
        return "updated"
