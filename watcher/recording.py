"""Recording verdicts so that a delivered file always has one, whenever the daemon dies.

The order that makes it hold:

1. before a delivery step, the pipeline notes the verdict in the claim's journal
   (`Staging.note_verdict`, one line: the `VerdictRecord` as JSON);
2. the file becomes visible in its destination;
3. the committer (watcher/delivery.py) fsyncs the destination, then hands the batch's claims
   to `Recorder.settle`, which commits their records (and their webhook events) in one
   transaction; only then are the claims' staging names dropped.

A SIGKILL before 3 completes leaves the claim in staging with its verdict in the journal:
the next start finds the file delivered (`Deliverer.finish_interrupted`) and settles the claim
through the committer, writing the record then. After 3, the record is there; settling again
is harmless (records replace by id, events are unique by key).

Outcomes that deliver nothing (rejected, held) are recorded from the daemon's results
(`record_result`); a late detection by the rescan through `mark_late`. Each committed record
is handed to the `listeners` (the verdict lookup wakes its waiters, the webhook sender).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from watcher.claims import Claim, new_id
from watcher.errors import StoreUnavailable
from watcher.logs import emit
from watcher.settings import Settings
from watcher.store import STORE_FILE, VerdictRecord, VerdictStore, iso, location_of, target_id
from watcher.store.sqlite import SqliteStore
from watcher.verdict import Outcome

if TYPE_CHECKING:
    from watcher.pipeline import Result

# Webhook targets: (target id, the verdict words it wants, or None for every one).
Target = tuple[str, frozenset[str] | None]
_encode = json.JSONEncoder(separators=(",", ":")).encode


def verdict_note(
    claim: Claim,
    outcome: Outcome,
    size: int | None,
    sha256: str | None,
    definitions: str | None,
    **known: Any,
) -> dict[str, Any]:
    """The record of a claim's verdict as the journal keeps it until the claim is settled."""
    record = VerdictRecord(
        id=claim.id,
        path=claim.rel,
        verdict=outcome.verdict_word or outcome.value,
        decided_at=time.time(),
        sha256=sha256,
        size=size,
        definitions=definitions,
        claimed_at=claim.claimed_at,
        **known,
    )
    return record.to_json()


class Recorder:
    def __init__(
        self,
        store: VerdictStore | None,
        processed_dir: str,
        quarantine_dir: str,
        targets: Sequence[Target] = (),
    ) -> None:
        self.store = store
        self.processed_dir = processed_dir
        self.quarantine_dir = quarantine_dir
        self.targets = tuple(targets)
        self.listeners: list[Callable[[VerdictRecord], None]] = []

    def open(self) -> None:
        if self.store is not None:
            self.store.open()
            if self.listeners:  # other replicas' records wake this one's waiters too
                self.store.subscribe(lambda record: self._notify([record]))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- writers ------------------------------------------------------------------------

    def settle(self, claims: Sequence[Claim]) -> None:
        """The committer's hook: record the claims' verdicts before their staging names go.

        Raises when the store cannot take them (the committer keeps the claims and retries).
        """
        records = []
        for claim in claims:
            try:
                if claim.verdict is not None:
                    records.append(self._record_of(claim))
            except (TypeError, ValueError) as err:  # a journal line we cannot read back
                emit("store.write_failed", count=1, reason=str(err), path=claim.rel)
        try:
            self._commit(records, [("v-" + r.id, "file.verdict", r) for r in records])
        except StoreUnavailable:
            raise
        except Exception:  # one record the store cannot take must not hold back the others
            for record in records:
                self._commit_alone(record)

    def _commit_alone(self, record: VerdictRecord) -> None:
        try:
            self._commit([record], [("v-" + record.id, "file.verdict", record)])
        except StoreUnavailable:
            raise
        except Exception as err:  # never storable: its claim settles without it (logged)
            emit("store.write_failed", count=1, reason=str(err), path=record.path)

    def record_result(self, result: Result) -> None:
        """Daemon listener: outcomes that deliver nothing (rejected, held) are recorded here."""
        if result.outcome not in (Outcome.REJECTED, Outcome.HELD) or result.fields.get("repeat"):
            return
        location = f"uploads/{result.rel}" if result.outcome is Outcome.REJECTED else None
        if result.outcome is Outcome.HELD and result.dest is not None:
            location = f"held/{result.dest.name}"
        record = VerdictRecord(
            id=new_id(),
            path=result.rel,
            verdict=result.outcome.verdict_word or "",
            decided_at=time.time(),
            sha256=result.sha256,
            size=result.size,
            reason=result.reason,
            cause=result.cause,
            location=location,
        )
        try:
            self._commit([record], [("v-" + record.id, "file.verdict", record)])
        except Exception as err:
            emit("store.write_failed", count=1, reason=str(err))

    def mark_late(self, late: VerdictRecord, processed_location: str) -> VerdictRecord:
        """A delivered file found infected by the rescan (`late`: its new record, with the
        quarantine as location): the delivered file's record is updated, the app is told."""
        merged = late
        if self.store is not None:
            merged = self.store.mark_late(late.path, processed_location, late.sha256, late)
        self._commit([], [(f"late-{late.id}", "file.infected_late", merged)], store=False)
        self._notify([merged])
        return merged

    # -- helpers ------------------------------------------------------------------------

    def _record_of(self, claim: Claim) -> VerdictRecord:
        assert claim.verdict is not None
        location = location_of(claim.dest, self.processed_dir, self.quarantine_dir)
        # One construction: from_json then with_location (dataclasses.replace) made two.
        note = claim.verdict if location is None else {**claim.verdict, "location": location}
        return VerdictRecord.from_json(note)

    def _commit(
        self,
        records: Sequence[VerdictRecord],
        events: Iterable[tuple[str, str, VerdictRecord]],
        store: bool = True,
    ) -> None:
        rows = [
            (key, target, self._body(key, kind, record))
            for key, kind, record in events
            for target, wanted in self.targets
            if wanted is None or record.verdict in wanted
        ]
        if self.store is not None and (records or rows):
            self.store.record(records if store else [], rows)
        if store:
            self._notify(records)

    def _notify(self, records: Sequence[VerdictRecord]) -> None:
        for record in records:
            for listener in self.listeners:
                try:
                    listener(record)
                except Exception:
                    emit("listener.error", exception=True)

    @staticmethod
    def _body(key: str, kind: str, record: VerdictRecord) -> str:
        return _encode(
            {"id": key, "type": kind, "created_at": iso(time.time()), "file": record.public()}
        )


def recorder_from_settings(settings: Settings) -> Recorder:
    store: VerdictStore | None = None
    url = settings.database_conninfo()
    if url is not None:  # replicas share it (watcher/store/postgres.py)
        from watcher.store.postgres import PostgresStore  # psycopg only where it is used

        store = PostgresStore(url, settings.database_timeout_s)
    elif settings.verdict_store == "sqlite":
        store = SqliteStore(settings.state_dir / STORE_FILE)
    wanted = frozenset(settings.webhook_verdicts)
    targets = [(target_id(url), wanted) for url in settings.webhook_url]
    return Recorder(store, str(settings.processed_dir), str(settings.quarantine_dir), targets)
