"""docs/backup.md's host commands work: quarantine and state, backed up from one daemon and
restored into a fresh one's empty directories, list and restore as before, allowlist included."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import EICAR, ROOT
from harness.daemon import run_cli
from harness.events import Events
from watcher.service import Service

Start = Callable[..., Service]
MARKER = "<!-- tests/test_backup.py runs this block -->"


def documented_blocks() -> list[str]:
    """The shell blocks docs/backup.md marks as run here: the backup, then the restore."""
    text = (ROOT / "docs" / "backup.md").read_text()
    return re.findall(re.escape(MARKER) + r"\n```sh\n(.*?)```", text, re.DOTALL)


def run_block(block: str, cwd: Path, dirs: dict[str, Path]) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "WATCHER_QUARANTINE_DIR": str(dirs["quarantine"]),
        "WATCHER_STATE_DIR": str(dirs["state"]),
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def quarantine_cli(dirs: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {f"WATCHER_{name.upper()}_DIR": str(path) for name, path in dirs.items()}
    return run_cli("quarantine", *args, env=env, inherit_settings=False)


def listed_by_path(dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """`watcher quarantine list --json`, by original path."""
    listed = quarantine_cli(dirs, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {entry["original_path"]: entry for entry in json.loads(listed.stdout)}


def test_a_backup_restored_into_a_fresh_daemon_lists_restores_and_keeps_the_allowlist(
    start_daemon: Start, dirs: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    backup_block, restore_block = documented_blocks()
    restored_before, kept = EICAR, EICAR + b"\nkept in quarantine"
    first = start_daemon()
    (dirs["uploads"] / "restored-before.com").write_bytes(restored_before)
    (dirs["uploads"] / "kept.com").write_bytes(kept)
    events.wait_for("file.infected", path="restored-before.com")
    events.wait_for("file.infected", path="kept.com")
    before = listed_by_path(dirs)["restored-before.com"]
    assert quarantine_cli(dirs, "restore", before["id"]).returncode == 0  # allowlisted there
    first.close()

    archive = tmp_path / "backup"
    archive.mkdir()
    run_block(backup_block, archive, dirs)
    fresh = {name: tmp_path / "fresh" / name for name in dirs}
    fresh["uploads"].mkdir(parents=True)
    run_block(restore_block, archive, fresh)
    start_daemon(**{f"{name}_dir": path for name, path in fresh.items()})

    entries = listed_by_path(fresh)
    assert entries.keys() == {"restored-before.com", "kept.com"}
    assert entries["restored-before.com"]["state"] == "restored"
    assert entries["kept.com"]["state"] == "quarantined"
    kept_id = entries["kept.com"]["id"]
    assert (fresh["quarantine"] / kept_id).read_bytes() == kept

    result = quarantine_cli(fresh, "restore", kept_id)
    assert result.returncode == 0, result.stderr
    assert (fresh["processed"] / "kept.com").read_bytes() == kept
    allowlisted = {p.name for p in (fresh["state"] / "allowlist").iterdir()}
    assert allowlisted == {hashlib.sha256(d).hexdigest() for d in (restored_before, kept)}

    # Both arrive again at the new daemon: the allowlist came with the backup, and grew there.
    (fresh["uploads"] / "again.com").write_bytes(restored_before)
    (fresh["uploads"] / "kept-again.com").write_bytes(kept)
    events.wait_for("file.allowlisted", path="again.com")
    events.wait_for("file.allowlisted", path="kept-again.com")
    assert (fresh["processed"] / "again.com").read_bytes() == restored_before
    assert (fresh["processed"] / "kept-again.com").read_bytes() == kept
    assert not (fresh["quarantine"] / f"{kept_id}").exists()
    assert len(list(fresh["quarantine"].glob("*.json"))) == 2  # nothing new quarantined
