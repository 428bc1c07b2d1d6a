"""Where files ended, read the way an operator would (processed, quarantine records, staging),
and files planted by hand where the daemon would have left them."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watcher.jobs import Jobs


def write(path: Path, data: bytes) -> Path:
    """`data` at `path`, its parent directories made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file below root (hidden ones too), but for the daemon's staging area."""
    found: dict[str, bytes] = {}
    for dirpath, dirs, names in os.walk(root):
        if Path(dirpath) == root and ".watcher" in dirs:
            dirs.remove(".watcher")
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                try:
                    found[os.path.relpath(path, root)] = path.read_bytes()
                except FileNotFoundError:
                    continue  # taken away since the listing (a daemon claimed it): not here
    return found


def quarantined(qdir: Path) -> list[dict[str, Any]]:
    """The metadata records in a quarantine directory, each with its file's bytes.

    A record is written just before its file arrives, so `bytes` may briefly be None.
    """
    records = []
    for meta in sorted(qdir.glob("*.json")):
        record = json.loads(meta.read_text())
        data = qdir / record["id"]
        record["bytes"] = data.read_bytes() if data.exists() else None
        records.append(record)
    return records


def plant_quarantine_item(
    qdir: Path,
    item_id: str,
    detected_at: datetime,
    data: bytes | None,
    original_path: str | None = None,
) -> str:
    """A quarantine item as the daemon leaves one (record, then read-only file); `data` None:
    a record whose file was removed, or has not arrived yet."""
    qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    meta: dict[str, Any] = {"id": item_id, "detected_at": detected_at.isoformat()}
    if original_path is not None:
        meta = {"id": item_id, "original_path": original_path, **meta}
    (qdir / f"{item_id}.json").write_text(json.dumps(meta))
    if data is not None:
        (qdir / item_id).write_bytes(data)
        (qdir / item_id).chmod(0o400)
    return item_id


def plant_delivery(jobs: Jobs, path: Path, data: bytes, at: datetime | None = None) -> Path:
    """A file in processed plus its delivery-log entry, as the daemon would leave them."""
    from watcher.jobs.deliveries import Delivery

    write(path, data)
    st = path.stat()
    rel = str(path.relative_to(jobs.settings.processed_dir))
    at = at or datetime.now(UTC)
    sha = hashlib.sha256(data).hexdigest()
    jobs.deliveries.append(Delivery(at, rel, rel, len(data), sha, st.st_dev, st.st_ino))
    return path


def staged(uploads: Path) -> list[str]:
    """Claimed files still in staging (none once a daemon has stopped cleanly)."""
    from watcher.claims import claimed_files

    return sorted(p.name for p in claimed_files(uploads / ".watcher"))


def delivered_count(dirs: dict[str, Path]) -> int:
    complete = [r for r in quarantined(dirs["quarantine"]) if r["bytes"] is not None]
    return len(files_under(dirs["processed"])) + len(complete)


def count_files(directory: Path) -> int:
    """Entries directly in `directory` (0 if it does not exist): cheap enough to poll."""
    return sum(1 for _ in os.scandir(directory)) if directory.exists() else 0
