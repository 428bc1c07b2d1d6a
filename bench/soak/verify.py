"""The soak's end-state check: where every upload ended, against where it must be.

Every clean upload exactly once in processed with its bytes; every infected one exactly once in
quarantine (data + metadata naming its original path); nothing else in either; no temporary or
half-delivered file; nothing left in uploads or in the daemons' staging directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak.corpus import Upload
from watcher.claims import HELD, claim_data, claimed_files, journal_segments, parse_journal

# Problem kinds; any of them fails the soak.
LOST, DUPLICATE, MISPLACED, CORRUPT = "lost", "duplicate", "misplaced", "corrupt"
LEFTOVER = "leftover"
# `name (2).ext`: the name watcher gives a clean file whose name is taken in processed.
_RENAMED = re.compile(rb"^(?P<stem>.*) \((?P<n>\d+)\)(?P<ext>\.[^./]{1,16})?$", re.DOTALL)


@dataclass
class Findings:
    clean_ok: int = 0
    infected_ok: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reported: set[bytes] = field(default_factory=set)  # uploads with a problem already

    def add(self, kind: str, text: str, rel: bytes | None = None) -> None:
        self.problems.append((kind, text))
        if rel is not None:
            self.reported.add(rel)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.problems if k == kind)


def verify(uploads: list[Upload], uploads_dir: Path, processed: Path, quarantine: Path) -> Findings:
    found = Findings()
    by_rel = {u.rel: u for u in uploads}
    seen_processed = _check_processed(found, by_rel, processed)
    seen_quarantine = _check_quarantine(found, by_rel, quarantine)
    staged = _staged_claims(uploads_dir)
    for u in uploads:
        places = (seen_quarantine if u.infected else seen_processed).get(u.rel, [])
        if places == ["processed"] or (len(places) == 1 and places[0].startswith("quarantine/")):
            if u.infected:
                found.infected_ok += 1
            else:
                found.clean_ok += 1
        elif len(places) > 1:
            found.add(DUPLICATE, f"{_show(u)} delivered {len(places)} times: {places}")
        elif places:
            found.add(MISPLACED, f"{_show(u)} delivered under another name: {places}")
        elif u.rel not in found.reported:
            if os.path.lexists(os.path.join(os.fsencode(uploads_dir), u.rel)):
                found.add(LEFTOVER, f"{_show(u)} still in uploads")
            elif u.rel in staged:
                found.add(LEFTOVER, f"{_show(u)} still in staging: {staged[u.rel]}")
            else:
                found.add(LOST, f"{_show(u)} is nowhere")
    _check_uploads(found, by_rel, uploads_dir)
    return found


def _check_processed(
    found: Findings, by_rel: dict[bytes, Upload], root: Path
) -> dict[bytes, list[str]]:
    seen: dict[bytes, list[str]] = defaultdict(list)
    base = os.fsencode(root)
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            if name.startswith(b".watcher-") and name.endswith(b".tmp"):
                found.add(LEFTOVER, f"temporary file in processed: {rel!r}")
                continue
            upload = by_rel.get(rel)
            if upload is None:
                original = _renamed_from(rel)
                if original in by_rel:
                    seen[original].append(f"processed as {rel!r}")
                else:
                    found.add(MISPLACED, f"unexpected in processed: {rel!r}")
            elif upload.infected:
                found.add(MISPLACED, f"infected {_show(upload)} in processed", rel)
            elif _sha256(path) != upload.sha256:
                found.add(CORRUPT, f"{_show(upload)} in processed with other bytes", rel)
            else:
                seen[rel].append("processed")
    return seen


def _check_quarantine(
    found: Findings, by_rel: dict[bytes, Upload], root: Path
) -> dict[bytes, list[str]]:
    seen: dict[bytes, list[str]] = defaultdict(list)
    names = set(os.listdir(root)) if root.is_dir() else set()
    records = {
        n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith(".")
    }
    verdicts: Counter[str] = Counter()
    for name in sorted(names):
        if name.startswith("."):
            found.add(LEFTOVER, f"temporary file in quarantine: {name!r}")
        elif not name.endswith(".json") and name not in records:
            found.add(LEFTOVER, f"quarantine data without metadata: {name!r}")
    for record_id in sorted(records):
        meta: dict[str, Any] = json.loads((root / f"{record_id}.json").read_text())
        data = root / record_id
        rel = os.fsencode(meta.get("original_path", ""))
        upload = by_rel.get(rel)
        verdicts[str(meta.get("verdict"))] += 1
        if not data.exists():
            found.add(LEFTOVER, f"quarantine metadata without data: {record_id} ({rel!r})")
        elif upload is None:
            found.add(MISPLACED, f"unknown original_path in quarantine: {record_id} {rel!r}")
        elif _sha256(os.fsencode(data)) != upload.sha256:
            found.add(CORRUPT, f"{_show(upload)} in quarantine {record_id} with other bytes", rel)
        elif not upload.infected:
            found.add(
                MISPLACED,
                f"clean {_show(upload)} quarantined as {meta.get('verdict')}: {meta.get('reason')}",
                rel,
            )
        else:
            if meta.get("verdict") != "infected":
                found.notes.append(f"infected {_show(upload)} quarantined as {meta.get('verdict')}")
            seen[rel].append(f"quarantine/{record_id}")
    if verdicts:
        found.notes.append(f"quarantine records by verdict: {dict(verdicts)}")
    return seen


def _staged_claims(uploads_dir: Path) -> dict[bytes, str]:
    """Claims left in any staging directory, by original path (from their journals, read
    through watcher.claims, the format's owner)."""
    staging = uploads_dir / ".watcher"
    names: dict[Path, str] = {}
    for segment in journal_segments(staging):
        for entry in parse_journal(segment.read_bytes()):
            if isinstance(entry.get("rel"), str):
                names[claim_data(segment, entry["id"])] = entry["rel"]
    return {
        os.fsencode(names.get(data, f"?{data.stem}")): str(data) for data in claimed_files(staging)
    }


def _check_uploads(found: Findings, by_rel: dict[bytes, Upload], uploads_dir: Path) -> None:
    base = os.fsencode(uploads_dir)
    empty_dirs = 0
    for dirpath, dirs, names in os.walk(base):
        if dirpath == base and b".watcher" in dirs:
            dirs.remove(b".watcher")
        empty_dirs += not dirs and not names and dirpath != base
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), base)
            if rel not in by_rel:
                found.add(LEFTOVER, f"unknown entry in uploads: {rel!r}")
    staging = uploads_dir / ".watcher"
    for data in claimed_files(staging):
        found.add(LEFTOVER, f"claim data in staging after a clean stop: {data}")
    for held in sorted((staging / HELD).glob("*")):
        found.add(LEFTOVER, f"held in staging: {held}")
    leftover_dirs = sorted(p.name for p in staging.glob("d-*"))
    if leftover_dirs:
        found.notes.append(f"staging directories left (no data): {leftover_dirs}")
    if empty_dirs:
        found.notes.append(f"{empty_dirs} empty directories left in uploads (never removed)")


def _renamed_from(rel: bytes) -> bytes | None:
    match = _RENAMED.match(rel)
    return match["stem"] + (match["ext"] or b"") if match else None


def _sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _show(upload: Upload) -> str:
    return f"#{upload.seq} {upload.kind} {upload.rel!r}"
