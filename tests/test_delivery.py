"""Each upload ends in exactly one place, with its bytes, decided by a real clamd."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import EICAR, TESTFILES
from harness.events import Events
from harness.files import files_under, quarantined, write
from watcher.service import Service

Start = Callable[..., Service]


def test_clean_file_arrives_in_processed_with_its_bytes(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    write(dirs["uploads"] / "report.txt", b"quarterly numbers\n")
    (record,) = events.wait_for("file.clean", path="report.txt")
    assert (dirs["processed"] / "report.txt").read_bytes() == b"quarterly numbers\n"
    assert record["sha256"] and record["size"] == 18
    assert files_under(dirs["uploads"]) == {}
    assert quarantined(dirs["quarantine"]) == []


def test_a_processed_subdirectory_removed_by_the_app_is_made_again(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    write(dirs["uploads"] / "user7" / "a.txt", b"first")
    events.wait_for("file.clean", path="user7/a.txt")
    (dirs["processed"] / "user7" / "a.txt").unlink()  # the app takes its file and tidies up
    (dirs["processed"] / "user7").rmdir()
    write(dirs["uploads"] / "user7" / "b.txt", b"second")
    events.wait_for("file.clean", path="user7/b.txt")
    assert files_under(dirs["processed"]) == {"user7/b.txt": b"second"}
    assert not events.named("file.error") and not events.named("file.retry")


def test_eicar_is_quarantined_read_only_with_metadata(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    write(dirs["uploads"] / "invoice.pdf", EICAR)
    (record,) = events.wait_for("file.infected", path="invoice.pdf")
    assert record["level"] == "WARNING"
    assert "FOUND" not in record["signature"] and record["signature"]
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["bytes"] == EICAR
    assert meta["original_path"] == "invoice.pdf"
    assert meta["verdict"] == "infected" and meta["size"] == len(EICAR)
    assert meta["clamd_version"].startswith("ClamAV")
    assert {"id", "sha256", "signature", "detected_at"} <= meta.keys()
    qfile = dirs["quarantine"] / meta["id"]
    assert stat.S_IMODE(qfile.stat().st_mode) & 0o377 == 0  # 0400 or stricter
    assert stat.S_IMODE(dirs["quarantine"].stat().st_mode) == 0o700
    assert files_under(dirs["processed"]) == {}


def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_archives_with_eicar_inside_are_quarantined(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    write(dirs["uploads"] / "a.zip", _zip("inner/eicar.txt", EICAR))
    write(dirs["uploads"] / "b.tar.gz", _tar_gz("eicar.txt", EICAR))
    write(dirs["uploads"] / "c.zip", _zip("fine.txt", b"nothing to see"))
    events.wait_for("file.infected", count=2)
    events.wait_for("file.clean", path="c.zip")
    assert sorted(m["original_path"] for m in quarantined(dirs["quarantine"])) == [
        "a.zip",
        "b.tar.gz",
    ]
    assert sorted(files_under(dirs["processed"])) == ["c.zip"]


def test_every_clamav_test_file_is_quarantined(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    samples = sorted(p for p in TESTFILES.iterdir() if p.is_file())
    assert len(samples) >= 40
    start_daemon()
    for sample in samples:
        write(dirs["uploads"] / "samples" / sample.name, sample.read_bytes())
    events.wait_for("file.infected", count=len(samples), timeout_s=60)
    by_path = {m["original_path"]: m["bytes"] for m in quarantined(dirs["quarantine"])}
    assert by_path == {f"samples/{s.name}": s.read_bytes() for s in samples}
    assert files_under(dirs["processed"]) == {}


AWKWARD_NAMES = [
    "with space.txt",
    "ünïcødé-名前.txt",
    "line\nbreak.txt",
    os.fsdecode(b"latin1-\xe9\xff.txt"),
    "x" * 251 + ".txt",
    "{evil} %s {0} $(rm -rf).txt",
    "-dash-leading.txt",
]


@pytest.mark.parametrize("infected", [False, True], ids=["clean", "infected"])
def test_awkward_names_keep_their_name_and_bytes(
    start_daemon: Start, dirs: dict[str, Path], events: Events, infected: bool
) -> None:
    start_daemon()
    payloads = {}
    for n, name in enumerate(AWKWARD_NAMES):
        payloads[name] = EICAR if infected else f"payload {n}".encode()
        write(dirs["uploads"] / "deep dir" / name, payloads[name])
    expected = {os.path.join("deep dir", name): data for name, data in payloads.items()}
    if infected:
        events.wait_for("file.infected", count=len(AWKWARD_NAMES))
        got = {m["original_path"]: m["bytes"] for m in quarantined(dirs["quarantine"])}
        assert files_under(dirs["processed"]) == {}
    else:
        events.wait_for("file.clean", count=len(AWKWARD_NAMES))
        got = files_under(dirs["processed"])
    assert got == expected


def test_taken_name_in_processed_gets_a_suffix_never_overwritten(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    write(dirs["processed"] / "photo.jpg", b"the older photo")
    start_daemon()
    write(dirs["uploads"] / "photo.jpg", b"the newer photo")
    (renamed,) = events.wait_for("file.renamed", path="photo.jpg")
    assert renamed["dest"].endswith("photo (1).jpg")
    assert (dirs["processed"] / "photo.jpg").read_bytes() == b"the older photo"
    assert (dirs["processed"] / "photo (1).jpg").read_bytes() == b"the newer photo"


def test_files_present_before_start_are_swept(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    write(dirs["uploads"] / "early.txt", b"was here first")
    write(dirs["uploads"] / "nested" / "early.com", EICAR)
    start_daemon()
    events.wait_for("file.clean", path="early.txt")
    events.wait_for("file.infected", path="nested/early.com")
    assert files_under(dirs["processed"]) == {"early.txt": b"was here first"}


def test_new_directory_filled_at_once_is_fully_delivered(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    batch = dirs["uploads"] / "batch"
    (batch / "a" / "b").mkdir(parents=True)
    for n in range(30):
        write(batch / "a" / "b" / f"{n}.txt", str(n).encode())
    events.wait_for("file.clean", count=30)
    assert files_under(dirs["processed"]) == {
        f"batch/a/b/{n}.txt": str(n).encode() for n in range(30)
    }


def test_ignored_names_wait_until_renamed(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    partial = write(dirs["uploads"] / "movie.mp4.part", b"frames")
    write(dirs["uploads"] / ".hidden", b"dotfile")
    write(dirs["uploads"] / "marker.txt", b"marker")
    events.wait_for("file.clean", path="marker.txt")
    assert partial.exists() and (dirs["uploads"] / ".hidden").exists()
    partial.rename(dirs["uploads"] / "movie.mp4")
    events.wait_for("file.clean", path="movie.mp4")
    assert (dirs["processed"] / "movie.mp4").read_bytes() == b"frames"


def test_moved_in_and_hard_linked_then_unlinked_files_are_taken(
    start_daemon: Start, dirs: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    start_daemon()
    outside = write(tmp_path / "outside.txt", b"moved in")
    outside.rename(dirs["uploads"] / "moved.txt")
    events.wait_for("file.clean", path="moved.txt")
    assert (dirs["processed"] / "moved.txt").read_bytes() == b"moved in"


def test_write_then_rename_pattern_is_delivered_once(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon()
    tmp = write(dirs["uploads"] / "upload.tmp", b"complete body")
    tmp.rename(dirs["uploads"] / "upload.bin")
    events.wait_for("file.clean", path="upload.bin")
    assert files_under(dirs["processed"]) == {"upload.bin": b"complete body"}
    assert events.named("file.clean", path="upload.tmp") == []


def test_polling_mode_delivers(start_daemon: Start, dirs: dict[str, Path], events: Events) -> None:
    start_daemon(observer="polling", poll_interval_s=0.2)
    write(dirs["uploads"] / "nfs.txt", b"from another machine")
    write(dirs["uploads"] / "nfs.com", EICAR)
    events.wait_for("file.clean", path="nfs.txt")
    events.wait_for("file.infected", path="nfs.com")
    assert files_under(dirs["processed"]) == {"nfs.txt": b"from another machine"}


def test_more_files_than_the_queue_holds_are_all_delivered(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    daemon = start_daemon(queue_size=16)
    for n in range(400):
        write(dirs["uploads"] / f"f{n:03}.txt", f"body {n}".encode())
    events.wait_for("file.clean", count=400, timeout_s=60)
    assert files_under(dirs["processed"]) == {
        f"f{n:03}.txt": f"body {n}".encode() for n in range(400)
    }
    assert daemon.daemon.intake.sweeps >= 2  # dropped hints were recovered by a sweep


def test_scanning_disabled_delivers_but_says_unscanned(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon(scanning_enabled=False)
    events.wait_for("watcher.scanning_disabled")
    write(dirs["uploads"] / "x.com", EICAR)
    (record,) = events.wait_for("file.unscanned", path="x.com")
    assert record["level"] == "WARNING"
    assert events.named("file.clean") == []


def test_file_over_the_size_limit_is_unscannable_not_clean(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon(max_file_bytes=1000)
    write(dirs["uploads"] / "big.bin", b"\0" * 5000)
    (record,) = events.wait_for("file.unscannable", path="big.bin")
    assert "WATCHER_MAX_FILE_BYTES" in record["reason"]
    (meta,) = quarantined(dirs["quarantine"])
    assert meta["verdict"] == "unscannable" and meta["bytes"] == b"\0" * 5000
    assert files_under(dirs["processed"]) == {}


def test_unscannable_hold_policy_keeps_the_file_out_of_processed(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    start_daemon(max_file_bytes=1000, unscannable_policy="hold")
    write(dirs["uploads"] / "big.bin", b"\1" * 5000)
    (record,) = events.wait_for("file.unscannable", path="big.bin", action="held")
    assert Path(record["dest"]).read_bytes() == b"\1" * 5000
    assert files_under(dirs["processed"]) == {} and quarantined(dirs["quarantine"]) == []
