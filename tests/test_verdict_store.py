"""The verdict store: verdicts outlive the daemon (SIGKILL included), answer by path and by
content, are updated by a late detection, and are bounded by age and count."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from harness import EICAR
from harness.clamd import Clamd
from harness.daemon import DaemonProcess
from harness.events import Events, wait_until
from harness.files import files_under, staged
from harness.http_client import get
from harness.mirror import SignatureServer, freshclam_command, unique_marker
from harness.receiver import Receiver
from watcher.claims import Claim
from watcher.recording import Recorder
from watcher.service import Service
from watcher.settings import Settings
from watcher.store import STORE_FILE, VerdictRecord, VerdictStore

Start = Callable[..., Service]
MakeStore = Callable[..., VerdictStore]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_verdicts_are_answered_after_a_sigkill_and_a_restart(
    subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    daemon = DaemonProcess(subprocess_env).start()
    try:
        (dirs["uploads"] / "in").mkdir()
        (dirs["uploads"] / "in" / "report.txt").write_bytes(b"figures")
        (dirs["uploads"] / "bad.com").write_bytes(EICAR)
        daemon.events.wait_for("file.clean", path="in/report.txt")
        daemon.events.wait_for("file.infected", path="bad.com")
        wait_until(lambda: not staged(dirs["uploads"]), 10, "the deliveries to be committed")
        daemon.kill()

        daemon.start()
        addr = daemon.http_address
        started = time.monotonic()
        clean = get(addr, "/v1/files/in/report.txt?wait=20").json()
        assert time.monotonic() - started < 5  # answered from the store, not at the limit
        assert clean["state"] == "clean" and clean["sha256"] == sha(b"figures")
        assert clean["location"] == "processed/in/report.txt" and clean["size"] == 7
        assert clean["scanned_at"] and clean["definitions"]
        infected = get(addr, "/v1/files/bad.com").json()
        assert infected["state"] == "infected" and infected["signature"]
        assert (dirs["quarantine"] / infected["location"].removeprefix("quarantine/")).exists()
        by_content = get(addr, f"/v1/verdicts/{sha(EICAR)}").json()
        assert by_content["state"] == "infected"
        assert [f["path"] for f in by_content["files"]] == ["bad.com"]
    finally:
        daemon.kill()


def test_a_file_delivered_just_before_a_sigkill_has_its_verdict_after_the_restart(
    subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """The store is locked by another writer: the file reaches processed, its record cannot
    be written, the daemon is killed. The claim's journal holds the verdict: the next start
    writes it."""
    daemon = DaemonProcess(subprocess_env).start()
    blocker = sqlite3.connect(dirs["state"] / STORE_FILE, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # every other writer waits
        (dirs["uploads"] / "late night.txt").write_bytes(b"delivered, not yet recorded")
        wait_until(lambda: (dirs["processed"] / "late night.txt").exists(), 20, "the delivery")
        assert staged(dirs["uploads"])  # its claim waits for the record
        daemon.kill()
        blocker.execute("ROLLBACK")
        assert blocker.execute("SELECT COUNT(*) FROM verdicts").fetchone() == (0,)

        daemon.start()
        body = get(daemon.http_address, "/v1/files/late%20night.txt?wait=20").json()
        assert body["state"] == "clean" and body["location"] == "processed/late night.txt"
        assert body["sha256"] == sha(b"delivered, not yet recorded")
        daemon.events.wait_for("file.recovered", path="late night.txt")
        wait_until(lambda: not staged(dirs["uploads"]), 10, "the claim to be settled")
        (row,) = blocker.execute("SELECT verdict, location FROM verdicts").fetchall()
        assert row == ("clean", b"processed/late night.txt")  # paths are stored as bytes
        assert files_under(dirs["processed"]) == {"late night.txt": b"delivered, not yet recorded"}
    finally:
        blocker.close()
        daemon.kill()


def test_verdicts_by_content_list_every_file_with_those_bytes(
    start_daemon: Start, dirs: dict[str, Path], events: Events, store_settings: dict[str, Any]
) -> None:
    daemon = start_daemon(**store_settings)
    (dirs["uploads"] / "a.txt").write_bytes(b"same bytes")
    (dirs["uploads"] / "b.txt").write_bytes(b"same bytes")
    events.wait_for("file.clean", count=2)
    wait_until(lambda: len(get(daemon, f"/v1/verdicts/{sha(b'same bytes')}").json()["files"]) == 2)
    body = get(daemon, f"/v1/verdicts/{sha(b'same bytes').upper()}").json()
    assert body["state"] == "clean" and body["sha256"] == sha(b"same bytes")
    assert sorted(f["path"] for f in body["files"]) == ["a.txt", "b.txt"]
    assert get(daemon, f"/v1/verdicts/{sha(b'never seen')}").json()["state"] == "unknown"
    assert get(daemon, "/v1/verdicts/abc").status == 400


def test_a_late_detection_updates_the_stored_verdict_and_tells_the_app(
    make_settings: Callable[..., Settings],
    own_clamd: Clamd,
    dirs: dict[str, Path],
    events: Events,
    mirror: SignatureServer,
    tmp_path: Path,
) -> None:
    marker = unique_marker()
    body = b"looks fine\n" + marker + b"\n"
    receiver = Receiver().start()
    command = freshclam_command(tmp_path / "freshclam.conf", own_clamd.db, mirror.url("new.ndb"))
    daemon = Service(
        make_settings(
            clamav_socket=own_clamd.socket,
            definitions_dir=own_clamd.db,
            update_command=command,
            webhook_url=receiver.url,
            webhook_secret="s3cret",
        )
    )
    daemon.start()
    try:
        (dirs["uploads"] / "late.bin").write_bytes(body)
        events.wait_for("file.clean", path="late.bin")
        assert receiver.wait_for(1)[0].json()["file"]["state"] == "clean"
        mirror.publish("new.ndb", {"Watcher.Test.LateStore": marker})
        daemon.jobs.run_now("update-definitions")
        (late,) = events.wait_for("file.infected_late", path="late.bin", timeout_s=60)

        status = get(daemon, "/v1/files/late.bin").json()
        assert status["state"] == "infected" and status["detected_late_at"]
        assert status["location"] == f"quarantine/{late['id']}" and status["signature"]
        assert status["sha256"] == sha(body)
        first, second = receiver.wait_for(2)
        event = second.json()
        assert event["type"] == "file.infected_late" and event["id"] == f"late-{late['id']}"
        assert event["file"]["state"] == "infected" and event["file"]["path"] == "late.bin"
        assert first.json()["id"] != event["id"]
    finally:
        daemon.close()
        receiver.stop()


def record(n: int, at: float, path: str = "f") -> VerdictRecord:
    return VerdictRecord(id=f"id-{n}", path=f"{path}{n}", verdict="clean", decided_at=at)


def test_retention_deletes_records_past_the_age_then_the_oldest_beyond_the_count(
    make_store: MakeStore,
) -> None:
    store = make_store()
    now = time.time()
    store.record([record(n, now - 100 + n) for n in range(10)] + [record(99, now - 10_000)])
    assert store.prune(older_than=now - 1000, max_records=6) == 5  # the ancient one, 4 oldest
    assert store.by_path("f99") is None and store.by_path("f3") is None
    assert [store.by_path(f"f{n}") is not None for n in range(4, 10)] == [True] * 6


def test_the_prune_job_applies_the_retention_settings(
    start_daemon: Start, events: Events, store_settings: dict[str, Any]
) -> None:
    daemon = start_daemon(verdict_retention="1d", verdict_max_records=1000, **store_settings)
    store = daemon.daemon.recorder.store
    assert store is not None
    now = datetime.now(UTC)
    old = (now - timedelta(days=2)).timestamp()
    store.record([record(1, old), record(2, now.timestamp())])
    assert daemon.jobs.prune_verdicts(now) == 1
    (pruned,) = events.named("verdicts.pruned")
    assert pruned["deleted"] == 1 and pruned["max_records"] == 1000
    assert store.by_path("f2") is not None and store.by_path("f1") is None


def test_names_that_are_not_utf8_are_stored_and_found(make_store: MakeStore) -> None:
    store = make_store()
    name = b"caf\xe9 \xff.txt".decode("utf-8", "surrogateescape")
    record = VerdictRecord(
        id="x",
        path=name,
        verdict="unscannable",
        decided_at=1.0,
        location=f"processed/{name}",
        reason=f"cannot read {name}",
    )
    store.record([record])
    found = store.by_path(name)
    assert found is not None and found.path == name and found.location == f"processed/{name}"
    assert found.reason == "cannot read caf\\udce9 \\udcff.txt"  # escaped, not refused


def test_an_upload_whose_name_is_not_utf8_has_its_verdict_stored_and_pushed(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    """The soak's names found it: such a record refused by the store held back every claim."""
    receiver = Receiver().start()
    try:
        daemon = start_daemon(webhook_url=receiver.url, webhook_secret="s")
        raw = b"r\xe9sum\xe9 \xff.txt"
        (dirs["uploads"] / "plain.txt").write_bytes(b"plain")
        with open(os.path.join(os.fsencode(dirs["uploads"]), raw), "wb") as f:
            f.write(b"latin-1 name")
        name = os.fsdecode(raw)
        events.wait_for("file.clean", path=name)
        wait_until(lambda: not staged(dirs["uploads"]), 10, "both claims to be settled")
        assert not events.named("store.write_failed")
        body = get(daemon, "/v1/files/r%E9sum%E9%20%FF.txt").json()
        assert body["state"] == "clean" and body["size"] == 12  # from the store
        assert os.fsencode(body["location"]) == b"processed/" + raw
        pushed = {os.fsencode(p.json()["file"]["path"]) for p in receiver.wait_for(2)}
        assert pushed == {b"plain.txt", raw}
    finally:
        receiver.stop()


def test_a_record_the_store_can_never_take_does_not_hold_back_the_others(
    make_store: MakeStore, tmp_path: Path, events: Events
) -> None:
    """The one seam faked: a store refusing one record for good (a bug's stand-in)."""

    class Refusing:
        def record(self, records: Any, events: Any = ()) -> None:
            if any(r.path == "poison" for r in records):
                raise ValueError("cannot be stored")
            super().record(records, events)  # type: ignore[misc]

    store = make_store(Refusing)
    recorder = Recorder(store, str(tmp_path / "processed"), str(tmp_path / "quarantine"))
    claims = []
    for rel in ("a.txt", "poison", "b.txt"):
        claim = Claim(f"id-{rel}", rel, tmp_path / rel, 1.0, dest=str(tmp_path / "processed" / rel))
        claim.verdict = VerdictRecord(
            id=claim.id, path=rel, verdict="clean", decided_at=2.0
        ).to_json()
        claims.append(claim)
    recorder.settle(claims)  # does not raise: the committer drops all three claims
    assert store.by_path("a.txt") is not None and store.by_path("b.txt") is not None
    assert store.by_path("poison") is None
    (failed,) = events.named("store.write_failed")
    assert failed["path"] == "poison" and failed["reason"] == "cannot be stored"


def test_records_the_store_refused_are_written_once_it_takes_them_again(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    """Locked past its busy timeout: `store.write_failed`, the claim waits (the file is
    delivered); unlocked: the record is written and the claim settled, without a restart."""
    daemon = start_daemon()
    blocker = sqlite3.connect(dirs["state"] / STORE_FILE, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        (dirs["uploads"] / "waits.txt").write_bytes(b"waits for its record")
        (failed,) = events.wait_for("store.write_failed", timeout_s=30)
        assert failed["count"] == 1 and "locked" in failed["reason"]
        assert (dirs["processed"] / "waits.txt").exists() and staged(dirs["uploads"])
        blocker.execute("ROLLBACK")
        wait_until(lambda: not staged(dirs["uploads"]), 30, "the claim to be settled")
        store = daemon.daemon.recorder.store
        assert store is not None
        found = store.by_path("waits.txt")
        assert found is not None and found.verdict == "clean"
        assert found.location == "processed/waits.txt"
    finally:
        blocker.close()
