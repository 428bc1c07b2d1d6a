"""What clamd cannot see is not clean: the archive forms clamd 1.4 answers OK for.

Every case is built on the fly (tests/archive_cases.py) and goes through a daemon and the
session's real clamd (stock settings plus AlertExceedsMax). Each infected or encrypted form
reached processed before watcher looked into archives itself; each clean twin must still do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from archive_cases import (
    BLIND_FORMS,
    CLEAN,
    ENCRYPTED_FORMS,
    INFECTED,
    PLAIN_FORMS,
    Members,
    nest,
    python_zip,
)
from harness.clamd import Clamd
from harness.daemon import run_cli
from harness.events import Events
from harness.files import files_under, quarantined
from harness.http_client import get
from watcher.service import Service

Start = Callable[..., Service]


def upload(dirs: dict[str, Path], name: str, data: bytes) -> None:
    tmp = dirs["uploads"] / f".{name}.part"  # ignored until renamed: the daemon sees it whole
    tmp.write_bytes(data)
    tmp.rename(dirs["uploads"] / name)


def only_quarantined(dirs: dict[str, Path], data: bytes) -> dict[str, Any]:
    assert files_under(dirs["processed"]) == {}
    (record,) = quarantined(dirs["quarantine"])
    assert record["bytes"] == data
    return record


@pytest.mark.parametrize("form", sorted(BLIND_FORMS))
def test_eicar_in_a_form_clamd_cannot_read_is_quarantined_as_infected(
    start_daemon: Start, dirs: dict[str, Path], events: Events, form: str
) -> None:
    data = BLIND_FORMS[form](INFECTED)
    start_daemon()
    upload(dirs, "upload.zip", data)
    (event,) = events.wait_for("file.infected", path="upload.zip")
    record = only_quarantined(dirs, data)
    assert record["verdict"] == "infected" and record["signature"] == event["signature"]
    (found,) = events.named("archive.detected")
    assert found["member"].endswith("eicar.com") and found["forms"]


@pytest.mark.parametrize("form", sorted(BLIND_FORMS))
def test_clean_content_in_those_forms_is_looked_into_and_delivered(
    start_daemon: Start, dirs: dict[str, Path], events: Events, form: str
) -> None:
    data = BLIND_FORMS[form](CLEAN)
    start_daemon()
    upload(dirs, "upload.zip", data)
    events.wait_for("file.clean", path="upload.zip")
    assert files_under(dirs["processed"]) == {"upload.zip": data}
    (inspected,) = events.named("archive.inspected")
    assert inspected["scanned"] >= 1 and inspected["forms"]


@pytest.mark.parametrize("members", [INFECTED, CLEAN], ids=["eicar", "clean"])
@pytest.mark.parametrize("form", sorted(ENCRYPTED_FORMS))
def test_encrypted_archives_are_unscannable_whatever_they_hold(
    start_daemon: Start, dirs: dict[str, Path], events: Events, form: str, members: Members
) -> None:
    data = ENCRYPTED_FORMS[form](members)
    start_daemon()
    upload(dirs, "sealed.bin", data)
    (event,) = events.wait_for("file.unscannable", path="sealed.bin")
    assert event["cause"] == "encrypted"
    record = only_quarantined(dirs, data)
    assert record["verdict"] == "unscannable" and record["cause"] == "encrypted"


@pytest.mark.parametrize("form", sorted(PLAIN_FORMS))
def test_the_same_archives_unencrypted_are_judged_by_their_content(
    start_daemon: Start, dirs: dict[str, Path], events: Events, form: str
) -> None:
    clean, infected = PLAIN_FORMS[form](CLEAN), PLAIN_FORMS[form](INFECTED)
    start_daemon()
    upload(dirs, "clean.bin", clean)
    upload(dirs, "infected.bin", infected)
    events.wait_for("file.clean", path="clean.bin")
    events.wait_for("file.infected", path="infected.bin")
    assert files_under(dirs["processed"]) == {"clean.bin": clean}


def test_encrypted_archives_are_delivered_when_the_operator_accepts_them(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    data = ENCRYPTED_FORMS["zip-zipcrypto"](CLEAN)
    start_daemon(accept_encrypted=True)
    upload(dirs, "sealed.zip", data)
    events.wait_for("file.clean", path="sealed.zip")
    assert files_under(dirs["processed"]) == {"sealed.zip": data}


def test_a_nest_as_deep_as_clamds_max_recursion_is_unscannable_for_limits(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    deep, shallow_clean, shallow_infected = nest(17, INFECTED), nest(16, CLEAN), nest(16, INFECTED)
    start_daemon()
    upload(dirs, "deep.zip", deep)
    upload(dirs, "shallow.zip", shallow_clean)
    upload(dirs, "shallow-eicar.zip", shallow_infected)
    (event,) = events.wait_for("file.unscannable", path="deep.zip")
    assert event["cause"] == "limits"
    events.wait_for("file.clean", path="shallow.zip")
    events.wait_for("file.infected", path="shallow-eicar.zip")
    assert files_under(dirs["processed"]) == {"shallow.zip": shallow_clean}
    (meta,) = [r for r in quarantined(dirs["quarantine"]) if r["original_path"] == "deep.zip"]
    assert meta["cause"] == "limits"


def test_bombs_and_archives_past_the_limits_are_unscannable_for_limits(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    bomb = python_zip((("zeros.bin", b"\0" * (8 * 1024 * 1024)),))  # about 1000:1
    many = python_zip(tuple((f"f{n}.txt", b"x") for n in range(6)))
    large = python_zip((("big.txt", b"0123456789abcdef" * 8192),))  # 128 KiB inside
    start_daemon(archive_max_files=5, archive_max_member_bytes=64 * 1024)
    upload(dirs, "bomb.zip", bomb)
    upload(dirs, "many.zip", many)
    upload(dirs, "large.zip", large)
    for name, words in (("bomb.zip", "ratio"), ("many.zip", "members"), ("large.zip", "larger")):
        (event,) = events.wait_for("file.unscannable", path=name)
        assert event["cause"] == "limits" and words in event["reason"], event
    assert files_under(dirs["processed"]) == {}


def test_zip_entries_outside_every_central_directory_are_unscannable(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    """A zip's local entries without their directory, before an ordinary zip: clamd reads
    only the directory it finds, watcher finds entries no directory names."""
    hidden = python_zip(INFECTED)
    hidden = hidden[: hidden.index(b"PK\x01\x02")]  # local entries only
    data = hidden + python_zip(CLEAN)
    start_daemon()
    upload(dirs, "hidden.zip", data)
    (event,) = events.wait_for("file.unscannable", path="hidden.zip")
    assert event["cause"] == "malformed"
    assert only_quarantined(dirs, data)["cause"] == "malformed"


def test_the_cause_shows_in_the_verdict_api_and_the_metrics(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    daemon = start_daemon()
    upload(dirs, "sealed.7z", ENCRYPTED_FORMS["7z"](CLEAN))
    status = get(daemon, "/v1/files/sealed.7z?wait=20").json()
    assert status["state"] == "unscannable" and status["cause"] == "encrypted"
    metrics = get(daemon, "/metrics").body.decode()
    assert re.search(r'^watcher_unscannable_total\{cause="encrypted"\} 1\.0$', metrics, re.M)
    assert re.search(r'^watcher_unscannable_total\{cause="limits"\} 0\.0$', metrics, re.M)


def test_watcher_scan_looks_into_archives_too(tmp_path: Path, clamd_server: Clamd) -> None:
    (tmp_path / "zip64.zip").write_bytes(BLIND_FORMS["python-zip64"](INFECTED))
    (tmp_path / "sealed.zip").write_bytes(ENCRYPTED_FORMS["zip-aes"](CLEAN))
    (tmp_path / "fine.zip").write_bytes(BLIND_FORMS["python-zip64"](CLEAN))
    result = run_cli("scan", str(tmp_path), env={"CLAMAV_SOCKET": str(clamd_server.socket)})
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines[f"{tmp_path}/zip64.zip"].endswith(" FOUND")
    assert lines[f"{tmp_path}/sealed.zip"].startswith("encrypted archive member")
    assert lines[f"{tmp_path}/fine.zip"] == "OK"
    assert result.returncode == 2  # an error (unscannable) outranks the infection
