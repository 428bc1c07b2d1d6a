"""A verdict store shared by replicas: PostgreSQL (WATCHER_DATABASE_URL), a real server from
Debian's packages (harness.postgres). Any replica answers any file's verdict; verdicts outlive
a SIGKILL; one replica sends the webhooks; a database that goes down loses nothing, is
reported, and is taken up again without a restart; its password is never logged."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from harness import EICAR
from harness.daemon import DaemonProcess
from harness.events import wait_until
from harness.files import files_under, staged
from harness.http_client import get
from harness.postgres import Postgres
from harness.receiver import Receiver
from test_webhooks import SECRET, checked
from test_webhooks import _metric as metric
from watcher.errors import ConfigError, StoreUnavailable
from watcher.settings import load_settings
from watcher.store import VerdictRecord
from watcher.store.postgres import PostgresStore, Redactor

SETTLED = ("file.clean", "file.infected")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replica(env: dict[str, str], state: Path, url: str, name: str, **extra: str) -> DaemonProcess:
    """A daemon on the shared uploads tree with a state directory of its own; `name` is its
    session's application_name (to tell which replica holds the webhook sender's lock)."""
    return DaemonProcess(
        {
            **env,
            "WATCHER_STATE_DIR": str(state),
            "WATCHER_DATABASE_URL": f"{url}&application_name={name}",
            **extra,
        }
    )


def decided_by(daemons: list[DaemonProcess], path: str) -> DaemonProcess:
    (decider,) = [d for d in daemons for e in SETTLED if d.events.named(e, path=path)]
    return decider


def settled(daemons: list[DaemonProcess]) -> int:
    return sum(len(d.events.named(e)) for d in daemons for e in SETTLED)


def assert_no_password(postgres: Postgres, *daemons: DaemonProcess) -> None:
    for daemon in daemons:
        assert daemon.lines, "nothing logged?"
        leaked = [line for line in daemon.lines if postgres.password.encode() in line]
        assert leaked == []


def rows(url: str) -> dict[str, tuple[str, str | None]]:
    """path -> (verdict, location), read from the database itself."""
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("SELECT path, verdict, location FROM watcher_verdicts").fetchall()
    return {
        os.fsdecode(bytes(p)): (v, None if loc is None else os.fsdecode(bytes(loc)))
        for p, v, loc in found
    }


def test_a_verdict_one_replica_reached_is_answered_by_the_other(
    subprocess_env: dict[str, str],
    dirs: dict[str, Path],
    tmp_path: Path,
    database_url: str,
    postgres_server: Postgres,
) -> None:
    """Two daemons (one with two scan processes) on one uploads tree, separate state
    directories, one database: each file is answered by the replica that did not decide it,
    by path and by content."""
    a = replica(subprocess_env, tmp_path / "state-a", database_url, "a", WATCHER_PROCESSES="2")
    b = replica(subprocess_env, tmp_path / "state-b", database_url, "b")
    daemons = [a.start(), b.start()]
    try:
        files = {f"in/f{n:02}.txt": b"body %d" % n for n in range(12)}
        files["bad.com"] = EICAR
        (dirs["uploads"] / "in").mkdir()
        for name, body in files.items():
            (dirs["uploads"] / name).write_bytes(body)
        wait_until(lambda: settled(daemons) == len(files), 30, "every file to be decided")
        wait_until(lambda: not staged(dirs["uploads"]), 20, "every record to be written")
        for name, body in files.items():
            other = b if decided_by(daemons, name) is a else a
            status = get(other.http_address, "/v1/files/" + quote(name)).json()
            assert status["sha256"] == sha(body), (name, status)
            if body == EICAR:
                assert status["state"] == "infected" and status["signature"]
                assert status["location"].startswith("quarantine/")
            else:
                assert status["state"] == "clean" and status["location"] == f"processed/{name}"
        other = b if decided_by(daemons, "bad.com") is a else a
        by_content = get(other.http_address, f"/v1/verdicts/{sha(EICAR)}").json()
        assert by_content["state"] == "infected"
        assert [f["path"] for f in by_content["files"]] == ["bad.com"]
        assert {p: v for p, (v, _) in rows(database_url).items()} == {
            p: "infected" if body == EICAR else "clean" for p, body in files.items()
        }
    finally:
        for daemon in daemons:
            daemon.kill()
    assert_no_password(postgres_server, *daemons)


def test_a_wait_on_one_replica_answers_when_the_other_decides_the_file(
    subprocess_env: dict[str, str], dirs: dict[str, Path], tmp_path: Path, database_url: str
) -> None:
    """`?wait=30` for each upload on both replicas, asked before the files arrive: each
    request answers within seconds, also on the replica that did not decide the file (the
    database tells it: LISTEN/NOTIFY), not at its 30 s limit."""
    a = replica(subprocess_env, tmp_path / "state-a", database_url, "a")
    b = replica(subprocess_env, tmp_path / "state-b", database_url, "b")
    daemons = [a.start(), b.start()]
    names = [f"w{n}.txt" for n in range(6)]
    answers: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}

    def ask(index: int, name: str) -> None:
        started = time.monotonic()
        body = get(daemons[index].http_address, f"/v1/files/{name}?wait=30", 40).json()
        answers[index, name] = (time.monotonic() - started, body)

    askers = [threading.Thread(target=ask, args=(i, name)) for i in range(2) for name in names]
    try:
        for asker in askers:
            asker.start()
        time.sleep(0.5)  # the requests are held: nothing is there yet
        for name in names:
            (dirs["uploads"] / name).write_bytes(name.encode())
        for asker in askers:
            asker.join(40)
        for (index, name), (took_s, body) in answers.items():
            assert body["state"] == "clean" and body["sha256"] == sha(name.encode())
            assert took_s < 10, f"replica {index} answered {name} after {took_s:.1f}s"
        assert len(answers) == 2 * len(names)
    finally:
        for daemon in daemons:
            daemon.kill()


def test_verdicts_survive_a_sigkill_and_a_restart_with_postgresql(
    subprocess_env: dict[str, str], dirs: dict[str, Path], tmp_path: Path, database_url: str
) -> None:
    """Killed twice: once after its verdicts were stored, once after a delivery whose record
    the database refused (a table lock held past WATCHER_DATABASE_TIMEOUT_S). Restarted on a
    fresh state directory: the database alone answers, and the refused record is written from
    the claim's journal."""
    env = {**subprocess_env, "WATCHER_DATABASE_TIMEOUT_S": "1"}
    daemon = replica(env, tmp_path / "state-1", database_url, "first").start()
    blocker = psycopg.connect(database_url, autocommit=True)
    try:
        (dirs["uploads"] / "report.txt").write_bytes(b"figures")
        (dirs["uploads"] / "bad.com").write_bytes(EICAR)
        wait_until(lambda: settled([daemon]) == 2, 20, "both verdicts")
        wait_until(lambda: not staged(dirs["uploads"]), 10, "the records to be written")
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE watcher_verdicts IN EXCLUSIVE MODE")  # reads go on
        (dirs["uploads"] / "late night.txt").write_bytes(b"delivered, not yet recorded")
        daemon.events.wait_for("store.write_failed", timeout_s=20)
        assert (dirs["processed"] / "late night.txt").exists() and staged(dirs["uploads"])
        addr = daemon.http_address
        assert get(addr, "/v1/files/report.txt").json()["state"] == "clean"  # reads go on...
        ready = get(addr, "/readyz")  # ...but writes do not: still not ready
        assert ready.status == 503 and ready.json()["failing"] == ["verdict_store"]
        assert "timeout" in ready.json()["checks"]["verdict_store"]
        assert daemon.events.named("store.available") == []
        daemon.kill()
        blocker.execute("ROLLBACK")
        assert "late night.txt" not in rows(database_url)

        daemon = replica(env, tmp_path / "state-2", database_url, "second").start()
        addr = daemon.http_address
        started = time.monotonic()
        clean = get(addr, "/v1/files/report.txt?wait=20").json()
        assert time.monotonic() - started < 5  # answered from the database, not at the limit
        assert clean["state"] == "clean" and clean["sha256"] == sha(b"figures")
        assert get(addr, "/v1/files/bad.com").json()["state"] == "infected"
        daemon.events.wait_for("file.recovered", path="late night.txt")
        wait_until(lambda: not staged(dirs["uploads"]), 20, "the claim to be settled")
        late = get(addr, "/v1/files/late%20night.txt").json()
        assert late["state"] == "clean" and late["location"] == "processed/late night.txt"
        assert rows(database_url)["late night.txt"] == ("clean", "processed/late night.txt")
    finally:
        blocker.close()
        daemon.kill()


def sender_of(url: str) -> str | None:
    """The application_name of the session holding the webhook sender's lock."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    return None if row is None else str(row[0])


def test_two_replicas_on_one_database_send_every_webhook_event_once(
    subprocess_env: dict[str, str], dirs: dict[str, Path], tmp_path: Path, database_url: str
) -> None:
    """Both replicas decide files; one holds the sender's lock and sends every event, once.
    Then the receiver is down while more files are decided, the sender stops: the other
    takes over and sends those too (the ones the stopped replica decided included)."""
    receiver = Receiver().start()
    hooks = {
        "WATCHER_WEBHOOK_URL": receiver.url,
        "WATCHER_WEBHOOK_SECRET": SECRET,
        "WATCHER_WEBHOOK_MAX_BACKOFF_S": "0.3",
        "WATCHER_WEBHOOK_MAX_ATTEMPTS": "1000",
    }
    names = {"a": tmp_path / "state-a", "b": tmp_path / "state-b"}
    daemons = {n: replica(subprocess_env, s, database_url, n, **hooks) for n, s in names.items()}
    for daemon in daemons.values():
        daemon.start()
    try:
        first = [f"one-{n:02}.txt" for n in range(20)]
        for name in first:
            (dirs["uploads"] / name).write_bytes(name.encode())
        receiver.wait_for(len(first), timeout_s=30)
        sender = wait_until(lambda: sender_of(database_url), 10, "a sender")
        assert sender in daemons
        receiver.stop()
        second = [f"two-{n:02}.txt" for n in range(20)]
        for name in second:
            (dirs["uploads"] / name).write_bytes(name.encode())
        wait_until(lambda: settled(list(daemons.values())) == 40, 30, "every file decided")
        wait_until(lambda: not staged(dirs["uploads"]), 20, "every record written")
        assert daemons[sender].terminate() == 0
        receiver.start()
        posts = receiver.wait_for(len(first) + len(second), timeout_s=30)
        time.sleep(1.0)  # anything sent twice would arrive now
        assert len(receiver.posts) == len(posts)
        events = [checked(p) for p in receiver.posts]
        assert set(Counter(e["id"] for e in events).values()) == {1}
        assert sorted(e["file"]["path"] for e in events) == sorted(first + second)
        survivor = "b" if sender == "a" else "a"
        assert sender_of(database_url) == survivor
    finally:
        for daemon in daemons.values():
            daemon.kill()
        receiver.stop()


def test_the_database_stopped_mid_stream_loses_nothing_and_is_taken_up_again(
    subprocess_env: dict[str, str],
    dirs: dict[str, Path],
    tmp_path: Path,
    database_url: str,
    postgres_server: Postgres,
) -> None:
    """`pg_ctl stop -m immediate` while files stream in: files go on being scanned and
    delivered, their claims wait; the outage is logged once and fails readiness; once the
    database is back every delivered file has its record and its webhook event, without a
    restart."""
    receiver = Receiver().start()
    env = {
        **subprocess_env,
        "WATCHER_DATABASE_TIMEOUT_S": "2",
        "WATCHER_WEBHOOK_URL": receiver.url,
        "WATCHER_WEBHOOK_SECRET": SECRET,
        "WATCHER_WEBHOOK_MAX_BACKOFF_S": "0.3",
    }
    daemon = replica(env, tmp_path / "state", database_url, "solo").start()
    files = {f"s{n:03}.txt": b"stream %d" % n for n in range(60)}
    stopped = threading.Event()
    down = False

    def stream() -> None:
        for n, (name, body) in enumerate(files.items()):
            if n == 20:
                stopped.wait(30)
            (dirs["uploads"] / name).write_bytes(body)
            time.sleep(0.03)

    writer = threading.Thread(target=stream)
    writer.start()
    try:
        wait_until(lambda: settled([daemon]) >= 20, 30, "the first files")
        postgres_server.stop("immediate")
        down = True
        stopped.set()
        (unavailable,) = daemon.events.wait_for("store.unavailable", timeout_s=20)
        assert unavailable["backend"] == "postgresql" and unavailable["level"] == "ERROR"
        writer.join(30)
        wait_until(lambda: files_under(dirs["processed"]) == files, 30, "every delivery")
        assert staged(dirs["uploads"])  # delivered; their claims wait for their records
        ready = get(daemon.http_address, "/readyz")
        assert ready.status == 503 and ready.json()["failing"] == ["verdict_store"]
        assert metric(daemon, "watcher_verdict_store_up") == 0.0
        assert get(daemon.http_address, "/v1/files/s059.txt").json()["state"] == "clean"

        postgres_server.start()
        down = False
        daemon.events.wait_for("store.available", timeout_s=20)
        wait_until(lambda: not staged(dirs["uploads"]), 30, "the claims to be settled")
        assert rows(database_url) == {name: ("clean", f"processed/{name}") for name in files}
        assert get(daemon.http_address, "/readyz").status == 200
        assert metric(daemon, "watcher_verdict_store_up") == 1.0
        # At least once: an event sent just before the stop may not have been marked sent.
        wait_until(lambda: pushed(receiver) == set(files), 30, "every event")
        assert len(daemon.events.named("store.unavailable")) == 1  # once per outage
        assert len(daemon.events.named("store.write_failed")) == 1  # not once per retry
    finally:
        stopped.set()
        writer.join(30)
        if down:
            postgres_server.start()
        daemon.kill()
        receiver.stop()
    assert_no_password(postgres_server, daemon)


def pushed(receiver: Receiver) -> set[str]:
    return {checked(p)["file"]["path"] for p in list(receiver.posts)}


def test_a_daemon_refused_by_the_database_starts_delivers_and_never_logs_the_password(
    subprocess_env: dict[str, str], dirs: dict[str, Path], database_url: str, tmp_path: Path
) -> None:
    """A wrong password in the URL: the daemon starts, delivers, keeps the claims, says why
    (`store.unavailable`, readiness), and the password it was given appears nowhere."""
    password = "Wr0ng-" + os.urandom(6).hex()
    url = database_url.replace("watcher:pw-", f"watcher:{password}-pw-")
    env = {**subprocess_env, "WATCHER_DATABASE_TIMEOUT_S": "2"}
    daemon = replica(env, tmp_path / "state", url, "wrong")
    try:
        daemon.start()
        (dirs["uploads"] / "f.txt").write_bytes(b"waits for its record")
        (unavailable,) = daemon.events.wait_for("store.unavailable", timeout_s=20)
        assert "password authentication failed" in unavailable["reason"]
        wait_until(lambda: (dirs["processed"] / "f.txt").exists(), 20, "the delivery")
        assert staged(dirs["uploads"])
        ready = get(daemon.http_address, "/readyz").json()
        assert "password authentication failed" in ready["checks"]["verdict_store"]
    finally:
        daemon.kill()
    leaked = [line for line in daemon.lines if password.encode() in line]
    assert daemon.lines and leaked == []


def test_the_url_is_a_secret_in_settings_and_errors(tmp_path: Path) -> None:
    url = "postgresql://watcher:s3cr%40t@db.internal:5432/verdicts?sslmode=require"
    settings = load_settings(database_url=url)
    assert "s3cr" not in repr(settings) and "s3cr" not in settings.model_dump_json()
    assert settings.database_conninfo() == url
    with pytest.raises(ConfigError) as refused:
        load_settings(database_url="mysql://watcher:s3cr3t@db/verdicts")
    assert "WATCHER_DATABASE_URL" in str(refused.value) and "s3cr3t" not in str(refused.value)
    secret_file = tmp_path / "url"
    secret_file.write_text(url + "\n")
    assert load_settings(database_url_file=secret_file).database_conninfo() == url
    redact = Redactor(url)
    assert redact("auth failed for s3cr@t, s3cr%40t, " + url) == "auth failed for ***, ***, ***"


def postgres_pids(server: Postgres) -> list[int]:
    """The server's postmaster and every process it started."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


def test_a_frozen_database_fails_an_operation_in_bounded_time_then_is_used_again(
    postgres_server: Postgres, database_url: str
) -> None:
    """A server that takes the bytes but never answers (every process of it SIGSTOPped):
    statement_timeout cannot fire there; the watchdog ends the operation (StoreUnavailable)
    within twice WATCHER_DATABASE_TIMEOUT_S, and the store works again once it thaws."""
    store = PostgresStore(database_url, timeout_s=1.0)
    store.open()
    record = VerdictRecord(id="x", path="x.txt", verdict="clean", decided_at=1.0)
    store.record([record])
    outcome: list[Any] = []

    def write() -> None:
        try:
            store.record([record])
            outcome.append("written")
        except StoreUnavailable as err:
            outcome.append(err)

    pids = postgres_pids(postgres_server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "the write hung"
        assert isinstance(outcome[0], StoreUnavailable) and time.monotonic() - started < 5
        assert store.problem() is not None
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: _written(store, record), 20, "the store to be used again")
    assert store.problem() is None and store.by_path("x.txt") == record
    store.close()


def _written(store: PostgresStore, record: VerdictRecord) -> bool:
    try:
        store.record([record])
    except StoreUnavailable:
        return False
    return True
