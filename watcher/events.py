"""Every event watcher logs: its stable name, level, fixed message, fields and meaning.

The one list of them. `logs.emit` takes the level and message from here (call sites name the
event and give the data); metrics count every event and start the alerted ones at 0 (Prometheus'
`increase()` misses the first increment of a series that appears at 1); docs/events.md is this
table (a test renders it from here and compares), and the alert rules may name only events
listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True)
class Event:
    level: Level
    message: str  # fixed text for people; data goes in fields, never in here
    fields: str  # as documented: the fields the event carries
    meaning: str  # when it is logged, and what it means
    alerted: bool = False  # an alert rule counts it (docs/alerting)


CATALOG: dict[str, Event] = {
    "archive.detected": Event(
        "INFO",
        "found inside an archive clamd cannot read",
        "forms, member, signature",
        "found inside an archive clamd cannot read (then `file.infected`)",
    ),
    "archive.inspected": Event(
        "INFO",
        "looked into an archive clamd cannot read: clean",
        "forms, members, scanned, encrypted_accepted, duration_ms",
        "watcher looked into an archive clamd cannot read and found it clean",
    ),
    "clamd.down": Event(
        "ERROR",
        "clamd unreachable: files wait",
        "reason",
        "once per outage; intake pauses",
        alerted=True,
    ),
    "clamd.endpoint_added": Event(
        "INFO",
        "a new clamd address: vetted before it gets files",
        "endpoint",
        "re-resolving CLAMAV_HOST found a new address (a new clamd pod); it gets files once it answers PING and the canaries",
    ),
    "clamd.endpoint_down": Event(
        "WARNING",
        "a clamd endpoint failed: its scans go to the others",
        "endpoint, reason",
        "an endpoint of the pool refused a connection or lost a scan; probed again with backoff. `clamd.down` only when none is left",
    ),
    "clamd.endpoint_removed": Event(
        "INFO",
        "a clamd address is gone",
        "endpoint",
        "re-resolving CLAMAV_HOST no longer finds this address: it gets no more files",
    ),
    "clamd.endpoint_untrusted": Event(
        "ERROR",
        "a clamd endpoint answered a canary wrongly: it gets no files",
        "endpoint, problem",
        "one endpoint of the pool is misconfigured (e.g. no `AlertExceedsMax`); the others scan; vetted again with backoff",
    ),
    "clamd.endpoint_up": Event(
        "INFO",
        "a clamd endpoint answers PING and the canaries: it gets files",
        "endpoint, max_threads, down_s",
        "an endpoint joined the pool, or came back",
    ),
    "clamd.resolve_failed": Event(
        "WARNING",
        "could not resolve CLAMAV_HOST: the last addresses are kept",
        "hosts, reason",
        "re-resolving the pool's names failed",
    ),
    "clamd.trusted": Event(
        "INFO",
        "clamd answered every canary as it must",
        "canaries",
        "clamd answered every canary right (at start, and after `clamd.untrusted`)",
    ),
    "clamd.untrusted": Event(
        "ERROR",
        "clamd answered a canary wrongly: files wait until it answers right",
        "problem",
        "clamd answered a canary wrongly: files wait",
        alerted=True,
    ),
    "clamd.up": Event("INFO", "clamd is back", "down_s", "clamd answers again"),
    "commit.failed": Event(
        "ERROR",
        "could not make a delivery durable",
        "dir or path, reason",
        "fsync or unlink after a delivery failed; finished at the next start",
    ),
    "definitions.canary_unwritable": Event(
        "DEBUG",
        "no canary for the reload",
        "",
        "the update's canary could not be written: the reload is confirmed by VERSION instead",
    ),
    "definitions.changed": Event(
        "INFO",
        "clamd loaded new definitions: rescanning recent deliveries",
        "clamd_version, previous",
        "a new daily version loaded outside watcher: rescan",
    ),
    "definitions.current": Event(
        "INFO",
        "definitions are up to date",
        "clamd_version, duration_s",
        "the update found nothing new",
    ),
    "definitions.dir_empty": Event(
        "WARNING",
        "WATCHER_DEFINITIONS_DIR holds no definition files: is it clamd's?",
        "path",
        "at start: `WATCHER_DEFINITIONS_DIR` holds no definition files",
    ),
    "definitions.fresh": Event(
        "INFO", "virus definitions are fresh", "age_s, max_age_s, clamd_version", "fresh again"
    ),
    "definitions.loaded": Event("INFO", "official definitions loaded", "clamd_version", "at start"),
    "definitions.reload_unconfirmed": Event(
        "WARNING",
        "could not confirm that clamd loaded the new definitions",
        "clamd_version",
        "nothing could confirm the reload",
    ),
    "definitions.stale": Event(
        "ERROR",
        "virus definitions are older than WATCHER_DEFINITIONS_MAX_AGE",
        "age_s, max_age_s, clamd_version",
        "older than the max age (once per change)",
    ),
    "definitions.state_unreadable": Event(
        "WARNING",
        "update state unreadable: started afresh",
        "reason",
        "`updates.json` unreadable: started afresh",
    ),
    "definitions.test_only": Event(
        "ERROR",
        "clamd has no official virus definitions loaded: detection is TEST-ONLY",
        "clamd_version",
        "clamd has no official databases loaded",
    ),
    "definitions.update_failed": Event(
        "ERROR",
        "definitions update failed",
        "cause, exit_code, output (last 10 lines), failures, next_attempt_at",
        "the update failed; `cause` says why ([causes](jobs.md#definition-updates))",
        alerted=True,
    ),
    "definitions.update_interval_short": Event(
        "WARNING",
        "the ClamAV mirrors rate-limit checks more often than hourly",
        "interval_s",
        "interval below an hour",
    ),
    "definitions.update_started": Event("DEBUG", "updating", "command", "an update begins"),
    "definitions.updated": Event(
        "INFO",
        "new definitions loaded by clamd",
        "clamd_version, version, built_at, sigs, databases, reload_confirmed, notified_by_freshclam",
        "clamd loaded new definitions (`sigs`, `databases` from freshclam's report)",
    ),
    "delivery.failing": Event(
        "ERROR",
        "a destination refuses deliveries: files wait",
        "dest, reason",
        "a destination refused three deliveries in a row: files wait, not ready",
        alerted=True,
    ),
    "delivery.ok": Event("INFO", "delivering again", "dest", "a delivery there succeeded again"),
    "file.allowlisted": Event(
        "WARNING",
        "detected, but its sha256 is allowlisted: delivered",
        "path, dest, size, sha256, signature",
        "detected, delivered because its sha256 is allowlisted",
    ),
    "file.changed": Event(
        "INFO",
        "changed, or opened for writing, during its scan: scanned again",
        "path, size or reason",
        "changed during its scan, or opened for writing (`reason`): a private copy is scanned",
    ),
    "file.clean": Event("INFO", "clean", "path, dest, size, sha256", "delivered to processed"),
    "file.error": Event(
        "ERROR",
        "reading or delivering a file failed",
        "path, reason",
        "reading or delivering failed; retried with backoff (`file.retry`), or unscannable (`file.unscannable`)",
    ),
    "file.infected": Event(
        "WARNING",
        "infected: quarantined",
        "path, dest, id, size, sha256, signature",
        "quarantined",
        alerted=True,
    ),
    "file.infected_late": Event(
        "ERROR",
        "delivered earlier as clean, now detected: moved to quarantine",
        "path, processed_path, dest, id, size, sha256, signature, delivered_at, removed_from_processed",
        "a delivered file is detected by new signatures",
        alerted=True,
    ),
    "file.recovered": Event(
        "INFO",
        "delivery finished after restart",
        "path, dest",
        "a delivery cut short by a crash was finished",
    ),
    "file.released": Event(
        "INFO",
        "clamd is down: the claim goes back to uploads",
        "path, reason",
        "a file claimed when clamd went down is put back under its name in uploads, where it waits for clamd, or for another replica whose clamd answers; one whose scan clamd broke off (clamd died under it) only once clamd has been down for WATCHER_STAGING_LEASE_S",
    ),
    "file.rejected": Event(
        "WARNING",
        "not scanned",
        "path, reason",
        "symlink, not a regular file, more than one hard link",
    ),
    "file.renamed": Event(
        "WARNING",
        "name taken in processed",
        "path, dest, renamed_from, size, sha256",
        "name was taken in processed",
    ),
    "file.rescan_failed": Event(
        "WARNING", "could not be rescanned", "path, reason", "clamd gave no verdict on a rescan"
    ),
    "file.retry": Event(
        "WARNING",
        "not scanned yet: will retry",
        "path, reason, attempt, retry_in_s",
        "scan failed for a passing cause",
    ),
    "file.unscannable": Event(
        "ERROR",
        "could not be scanned",
        "path, size, sha256, reason, cause, action (`quarantined`/`held`), dest, id",
        "could not be scanned",
        alerted=True,
    ),
    "file.unscanned": Event(
        "WARNING",
        "delivered WITHOUT scanning: VIRUS_SCANNING_ENABLED=false",
        "path, dest, size, sha256",
        "delivered with scanning switched off",
    ),
    "http.accept_failed": Event(
        "WARNING",
        "cannot accept",
        "reason",
        "`accept()` failed (e.g. EMFILE): accepting pauses 0.5 s at a time until it succeeds; logged once per run of failures",
    ),
    "http.busy": Event(
        "WARNING",
        "too busy",
        "status, reason, path (or max_connections)",
        "a `?wait` refused with 503 (too many held), or the slowest head displaced by a new connection",
    ),
    "http.client_error": Event(
        "INFO",
        "request refused",
        "status, reason, path",
        "a request answered 4xx (bad path or head, 404, 405, 408, 431)",
    ),
    "http.error": Event(
        "ERROR", "request failed", "path, exception", "a request failed unexpectedly (answered 500)"
    ),
    "http.listening": Event(
        "INFO",
        "HTTP ready",
        "host, port, max_connections, max_waiters, header_timeout_s",
        "HTTP API up, with the limits in force",
    ),
    "http.log_suppressed": Event(
        "WARNING",
        "more lines of this event in one second than are logged",
        "suppressed_event, count",
        "more than ten lines of an `http.*` event in one second: the rest are counted here",
    ),
    "intake.event_failed": Event(
        "ERROR",
        "event handling failed",
        "exception",
        "handling an inotify event failed: a sweep follows (the reader thread goes on)",
    ),
    "intake.events_lost": Event(
        "WARNING",
        "inotify queue overflowed: sweeping",
        "",
        "the kernel's inotify queue overflowed: a full sweep starts at once",
    ),
    "intake.sweep_failed": Event(
        "ERROR", "sweep failed", "exception", "a sweep failed; the next one runs at its time"
    ),
    "intake.swept": Event("DEBUG", "swept", "root, files", "a sweep finished"),
    "job.failed": Event(
        "ERROR",
        "a scheduled job failed; it keeps its schedule",
        "job, reason, error / scheduled_at",
        "a job raised (`error`, with its traceback) or missed its time (`reason`: `missed`)",
        alerted=True,
    ),
    "jobs.unfinished": Event(
        "WARNING",
        "a scheduled job was still running at shutdown",
        "grace_s",
        "a job still ran when the grace time was over",
    ),
    "listener.error": Event(
        "ERROR",
        "listener failed",
        "exception",
        "a listener of final results (metrics, verdicts, delivery log) raised",
    ),
    "notify.failed": Event(
        "WARNING",
        "an operator notification could not be sent",
        "events, reason",
        "Apprise could not send a notification (`WATCHER_NOTIFY_URLS`) to any of its URLs; its events are not sent again",
    ),
    "notify.sent": Event(
        "INFO",
        "operator notification sent",
        "events, counts",
        "one Apprise message summed up `events` events (`counts` by kind)",
    ),
    "provenance.skipped": Event(
        "INFO",
        "provenance attributes not set: the filesystem or permissions do not allow them",
        "reason",
        "user extended attributes could not be set on a delivered file (unsupported, or not permitted); once per reason, the delivery goes on",
    ),
    "quarantine.deleted": Event(
        "INFO",
        "deleted from quarantine",
        "id, sha256, original_path",
        "`watcher quarantine delete`",
    ),
    "quarantine.near_full": Event(
        "WARNING",
        "quarantine is past 80% of WATCHER_QUARANTINE_MAX_BYTES",
        "bytes, max_bytes, percent",
        "past 80 % of the cap",
        alerted=True,
    ),
    "quarantine.purge_failed": Event(
        "ERROR", "purge failed", "reason", "`purge-quarantine` could not read the quarantine"
    ),
    "quarantine.purged": Event(
        "INFO",
        "quarantine retention applied",
        "count, bytes, expired, over_cap, remaining_bytes, dry_run",
        "retention ran",
    ),
    "quarantine.restored": Event(
        "WARNING",
        "restored from quarantine; sha256 allowlisted",
        "id, dest, sha256, original_path",
        "`watcher quarantine restore`",
    ),
    "rescan.finished": Event(
        "INFO",
        "recent deliveries rescanned",
        "scanned, infected, skipped, failed, window_s",
        "a rescan is done",
    ),
    "rescan.postponed": Event(
        "WARNING",
        "clamd unavailable: rescan postponed",
        "reason",
        "clamd unreachable: retried at the next tick",
    ),
    "store.available": Event(
        "INFO",
        "the verdict store takes writes again",
        "backend, down_s",
        "the first operation after `store.unavailable` went through; the claims that waited are settled within a second",
    ),
    "store.unavailable": Event(
        "ERROR",
        "the verdict store is unavailable: claims wait, nothing is lost",
        "backend, reason",
        "once per outage: the database is down or unreachable, or (SQLite) locked past its timeout or its disk full. Files are still scanned and delivered; their claims wait for their records (`store.write_failed`), `/readyz` fails `verdict_store`, `watcher_verdict_store_up` is 0, webhooks wait",
        alerted=True,
    ),
    "store.write_failed": Event(
        "ERROR",
        "the verdict store refused a write: the files' claims wait",
        "count, reason, path (when one record could never be written)",
        "records could not be written to the verdict store; the delivered files keep their claims (retried each second, or settled at the next start; the committer logs this once until a write succeeds). With `path`: that one record cannot be stored at all (a bug: report it); its file is delivered without it",
    ),
    "staging.adopted": Event(
        "INFO",
        "took over a stopped daemon's claim",
        "path, id",
        "a claim left by a stopped or dead daemon is taken over: once that daemon's lease has not moved for WATCHER_STAGING_LEASE_S (at once after a clean stop, or when it ran on this same host), and its flock is free",
    ),
    "staging.lease_failed": Event(
        "ERROR",
        "could not renew our staging lease or look at the others'",
        "exception",
        "renewing our lease failed (the uploads volume is failing?): after half of WATCHER_STAGING_LEASE_S the daemon claims and delivers nothing until a renewal succeeds",
    ),
    "staging.lease_lost": Event(
        "ERROR",
        "another daemon took over our claims: stopping",
        "dir",
        "our lease was not renewed for WATCHER_STAGING_LEASE_S (the daemon was frozen, or cut off from the uploads volume) and another daemon adopted our claims; the daemon stops, to be started afresh",
    ),
    "staging.impostor": Event(
        "ERROR",
        "something else held the name of our private directory: moved aside, not used",
        "name, moved_to, reason",
        "something else held the name `.watcher`: moved aside, never used",
    ),
    "staging.unnamed": Event(
        "WARNING",
        "claim without a name",
        "id",
        "a claim's data without its journal line (only after a power loss): delivered as `recovered/<id>`",
    ),
    "storage.full": Event(
        "ERROR",
        "destination full: files wait until space returns",
        "path, dest, reason",
        "a destination is full: the first file waits for space there",
    ),
    "storage.ok": Event(
        "INFO",
        "space is back: delivering again",
        "dest",
        "the last file that waited for space there is delivered",
    ),
    "verdicts.pruned": Event(
        "INFO",
        "verdict store retention applied",
        "deleted, max_age_s, max_records",
        "the `prune-verdicts` job deleted records past WATCHER_VERDICT_RETENTION or WATCHER_VERDICT_MAX_RECORDS",
    ),
    "watcher.ready": Event(
        "INFO",
        "ready: watching for uploads",
        "uploads, processed, quarantine, workers, observer, scanning",
        "watching",
    ),
    "watcher.scanning_disabled": Event(
        "WARNING",
        "VIRUS_SCANNING_ENABLED=false: files are delivered WITHOUT scanning",
        "",
        "started with `VIRUS_SCANNING_ENABLED=false`",
    ),
    "watcher.stopped": Event("INFO", "stopped", "in_flight / unfinished", "shutdown"),
    "watcher.stopping": Event("INFO", "stopping", "in_flight / unfinished", "shutdown"),
    "process.exited": Event(
        "ERROR",
        "a scan process exited: started again",
        "index, exit_code",
        "a scan process (WATCHER_PROCESSES > 1) exited unexpectedly; it is started again with backoff (1 s ... 30 s), and its claims are finished by whoever adopts them",
        alerted=True,
    ),
    "webhook.dead": Event(
        "ERROR",
        "a webhook event was given up: dead letter",
        "id, target, url, attempts, error",
        "an event failed `WATCHER_WEBHOOK_MAX_ATTEMPTS` times; it stays in the store's outbox as a dead letter",
        alerted=True,
    ),
    "webhook.error": Event(
        "ERROR",
        "the webhook sender failed: it tries again in a few seconds",
        "exception",
        "the webhook sender's loop raised (the verdict store busy or failing); events wait in the outbox",
    ),
    "webhook.receiver_down": Event(
        "WARNING",
        "a webhook receiver fails: its events wait and are retried",
        "target, url, reason",
        "a webhook URL refused or failed a delivery (once per run of failures); events wait in the outbox",
    ),
    "webhook.receiver_up": Event(
        "INFO",
        "a webhook receiver accepts events again",
        "target, url, down_s",
        "the first delivery after `webhook.receiver_down` succeeded",
    ),
    "worker.error": Event(
        "ERROR",
        "unexpected error",
        "exception",
        "a worker's unexpected error; the claim stays in staging",
    ),
}


def alerted() -> list[tuple[str, Level]]:
    """The events alert rules count, with their level (the label metrics pre-seed)."""
    return [(name, event.level) for name, event in CATALOG.items() if event.alerted]


def markdown_table() -> str:
    """docs/events.md's table, from the catalog (`make docs` writes it there)."""
    rows = ["| event | level | fields | when |", "|---|---|---|---|"]
    for name, event in sorted(CATALOG.items()):
        rows.append(f"| `{name}` | {event.level} | {event.fields} | {event.meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # `python -m watcher.events`: the table, for `make docs`
    print(markdown_table(), end="")
