"""`watcher quarantine`: list, show, delete, and restore a false positive so it is let through."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from harness import EICAR
from harness.daemon import run_cli
from harness.events import Events
from harness.files import files_under, quarantined
from harness.http_client import get
from watcher.service import Service

Start = Callable[..., Service]


def cli(dirs: dict[str, Path], *args: str):  # type: ignore[no-untyped-def]
    return run_cli(
        "quarantine", *args,
        env={
            "WATCHER_UPLOADS_DIR": str(dirs["uploads"]),
            "WATCHER_PROCESSED_DIR": str(dirs["processed"]),
            "WATCHER_QUARANTINE_DIR": str(dirs["quarantine"]),
            "WATCHER_STATE_DIR": str(dirs["state"]),
        },
    )  # fmt: skip


def quarantine_one(daemon: Service, dirs: dict[str, Path], name: str, data: bytes) -> str:
    """Upload `data` as `name`, wait for its verdict, return its quarantine id."""
    (dirs["uploads"] / name).parent.mkdir(parents=True, exist_ok=True)
    (dirs["uploads"] / name).write_bytes(data)
    body = get(daemon, f"/v1/files/{quote(name)}?wait=20").json()
    assert body["state"] == "infected", body
    return str(body["location"]).removeprefix("quarantine/")


def test_restore_moves_the_bytes_back_and_the_same_bytes_are_then_let_through(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    daemon = start_daemon()
    qid = quarantine_one(daemon, dirs, "docs/false-positive.com", EICAR)

    result = cli(dirs, "restore", qid)
    assert result.returncode == 0, result.stderr
    restored = dirs["processed"] / "docs" / "false-positive.com"
    assert restored.read_bytes() == EICAR
    assert stat.S_IMODE(restored.stat().st_mode) == 0o644
    assert not (dirs["quarantine"] / qid).exists()
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["restored_at"] and meta["restored_to"] == str(restored)
    restore_event = json.loads(result.stderr.splitlines()[-1])
    assert restore_event["event"] == "quarantine.restored" and restore_event["id"] == qid

    (dirs["uploads"] / "again.com").write_bytes(EICAR)  # the same bytes arrive again
    body = get(daemon, "/v1/files/again.com?wait=20").json()
    assert body["state"] == "clean" and body["allowlisted"] is True and body["signature"]
    (allowed,) = events.wait_for("file.allowlisted", path="again.com")
    assert allowed["sha256"] == hashlib.sha256(EICAR).hexdigest()
    assert (dirs["processed"] / "again.com").read_bytes() == EICAR
    assert len(quarantined(dirs["quarantine"])) == 1  # nothing new in quarantine
    assert not events.named("file.infected", path="again.com")


def test_restore_refuses_a_stored_path_that_escapes_the_target(
    start_daemon: Start, dirs: dict[str, Path], tmp_path: Path
) -> None:
    daemon = start_daemon()
    qid = quarantine_one(daemon, dirs, "x.com", EICAR)
    record = dirs["quarantine"] / f"{qid}.json"
    for tampered in ("../../etc/x", "/etc/x", "a/../../x"):
        meta = json.loads(record.read_text())
        record.write_text(json.dumps({**meta, "original_path": tampered}))
        result = cli(dirs, "restore", qid)
        assert result.returncode == 2, tampered
        assert "refusing" in result.stderr and "escape" not in result.stdout
    (dirs["processed"] / "out").symlink_to(tmp_path)  # a symlinked directory on the way
    record.write_text(json.dumps({**meta, "original_path": "out/x"}))
    assert cli(dirs, "restore", qid).returncode == 2
    assert (dirs["quarantine"] / qid).read_bytes() == EICAR  # untouched
    assert files_under(dirs["processed"]) == {}
    assert not (dirs["state"] / "allowlist").exists() or not any(
        (dirs["state"] / "allowlist").iterdir()
    )


def test_restore_does_not_overwrite_and_refuses_changed_bytes(
    start_daemon: Start, dirs: dict[str, Path], tmp_path: Path
) -> None:
    daemon = start_daemon()
    first = quarantine_one(daemon, dirs, "dup.com", EICAR)
    (dirs["processed"] / "dup.com").write_bytes(b"the app's own file")
    assert cli(dirs, "restore", first, "--to", str(dirs["processed"])).returncode == 0
    assert (dirs["processed"] / "dup.com").read_bytes() == b"the app's own file"
    assert (dirs["processed"] / "dup (1).com").read_bytes() == EICAR

    second = quarantine_one(daemon, dirs, "other.com", EICAR + b"x")
    data = dirs["quarantine"] / second
    data.chmod(0o600)
    data.write_bytes(b"swapped")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli(dirs, "restore", second, "--to", str(elsewhere))
    assert result.returncode == 2 and "sha256" in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_list_show_and_delete(start_daemon: Start, dirs: dict[str, Path]) -> None:
    daemon = start_daemon()
    qid = quarantine_one(daemon, dirs, "evil\x1b[31m.com", EICAR)

    listing = cli(dirs, "list")
    assert listing.returncode == 0 and qid in listing.stdout
    assert "\x1b" not in listing.stdout and "evil\\x1b[31m.com" in listing.stdout
    (entry,) = json.loads(cli(dirs, "list", "--json").stdout)
    assert entry["id"] == qid and entry["state"] == "quarantined"
    assert entry["verdict"] == "infected" and entry["size"] == len(EICAR)
    shown = json.loads(cli(dirs, "show", qid).stdout)
    assert shown["sha256"] == hashlib.sha256(EICAR).hexdigest()

    assert cli(dirs, "delete", qid).returncode == 0
    assert files_under(dirs["quarantine"]) == {}
    assert cli(dirs, "show", qid).returncode == 1
    assert cli(dirs, "restore", "../../etc/passwd").returncode == 1
    assert json.loads(cli(dirs, "list", "--json").stdout) == []
