"""The soak's uploads: seeded, each with a unique name and known bytes, clean or infected.

Names are bytes (uploaders are not bound to UTF-8): spaces, unicode, newlines, tabs, braces,
non-UTF-8 bytes, 255-byte names, nested directories. None matches watcher's default ignore
patterns (a leading dot, ``*.part``, ``*.tmp``, ``*.crdownload``, ``*~``), or it would never be
taken. Infected files are EICAR with a unique tail, EICAR inside a zip (sometimes a zip in a
zip), or one of ClamAV's own test files; the test signature set detects all of them.
"""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from dataclasses import dataclass

from harness import EICAR, TESTFILES

NAME_MAX = 255


@dataclass
class Upload:
    """One file the soak put into uploads, and what must become of it."""

    seq: int
    rel: bytes  # path relative to uploads
    sha256: str
    size: int
    infected: bool
    kind: str
    burst: bool = False
    visible_at: float = 0.0  # wall clock: complete in uploads (renamed in, or closed)


def upload(
    seq: int, rel: bytes, body: bytes, kind: str, infected: bool, burst: bool = False
) -> Upload:
    return Upload(seq, rel, hashlib.sha256(body).hexdigest(), len(body), infected, kind, burst)


class Corpus:
    """An endless, seeded stream of (Upload, bytes)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
        self.seq = 0
        self.testfiles = sorted(TESTFILES.iterdir()) if TESTFILES.is_dir() else []
        self.dirs: list[bytes] = [b""]

    def next(self) -> tuple[Upload, bytes]:
        self.seq += 1
        seq, rng = self.seq, self.rng
        name = self._name(seq)
        if rng.random() < 0.35:
            name = self._directory(seq) + name
        roll = rng.random()
        if roll < 0.07:
            body, kind = EICAR + b"\n" + _tag(seq), "eicar"
        elif roll < 0.13:
            body, kind = _zipped(seq, rng, nested=rng.random() < 0.3), "eicar-zip"
        elif roll < 0.19 and self.testfiles:
            path = rng.choice(self.testfiles)
            body, kind = path.read_bytes(), f"testfile:{path.name}"
        else:
            body, kind = _clean(seq, rng)
            return upload(seq, name, body, kind, infected=False), body
        return upload(seq, name, body, kind, infected=True), body

    def burst(self, count: int, infected_every: int = 97) -> list[tuple[Upload, bytes]]:
        """Many tiny files with plain names, a few of them infected."""
        files = []
        for n in range(count):
            self.seq += 1
            infected = n % infected_every == 0
            body = (EICAR + b" " if infected else b"") + b"burst %d %d\n" % (self.seq, n)
            kind = "burst-eicar" if infected else "burst"
            rel = b"burst/b%06d.txt" % self.seq
            files.append((upload(self.seq, rel, body, kind, infected, burst=True), body))
        return files

    def _name(self, seq: int) -> bytes:
        rng = self.rng
        style = rng.randrange(10)
        if style == 0:
            return b"report %d (final copy).pdf" % seq
        if style == 1:
            return f"résumé-{seq}-日本語-ü.txt".encode()
        if style == 2:
            return b"line\nbreak %d.txt" % seq
        if style == 3:
            return b"latin1-\xe9t\xe9-\xff\xfe-%d.bin" % seq
        if style == 4:
            stem = b"long-%d-" % seq
            return stem + b"x" * (NAME_MAX - len(stem) - 4) + b".dat"  # exactly 255 bytes
        if style == 5:
            stem, accent = b"long-%d-" % seq, "é".encode()
            room = NAME_MAX - len(stem) - 4
            return stem + accent * (room // 2) + b"x" * (room % 2) + b".txt"  # 255 bytes
        if style == 6:
            return b"{evil} %%s $HOME `x` 'q' \"dq\" \\ %d\t.txt" % seq
        if style == 7:
            return b"-dash %d --rf.bin" % seq
        return b"f%06d.%s" % (seq, rng.choice([b"txt", b"bin", b"jpg", b"zip", b"com"]))

    def _directory(self, seq: int) -> bytes:
        """Mostly existing directories; now and then a new, nested one."""
        if len(self.dirs) < 3 or self.rng.random() < 0.08:
            depth = self.rng.randrange(1, 4)
            parts = [b"dir %d" % seq, "sub ü".encode(), b"d\xe9eper", b"x" * 80][:depth]
            self.dirs.append(b"/".join(parts) + b"/")
        return self.rng.choice(self.dirs)


def _tag(seq: int) -> bytes:
    return b"soak upload %d\n" % seq


def _clean(seq: int, rng: random.Random) -> tuple[bytes, str]:
    """Unique bytes of a size from 0 to a few MB (log-normal, most a few KB)."""
    roll = rng.random()
    if roll < 0.01:
        return b"", "empty"  # not unique, but its name is
    size = int(min(4 * 1024 * 1024, rng.lognormvariate(8.0, 1.8)))
    if roll < 0.5:
        vocabulary = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet"]
        words = b" ".join(rng.choice(vocabulary) for _ in range(size // 6))
        return _tag(seq) + words, "text"
    return _tag(seq) + rng.randbytes(size), "binary"


def _zipped(seq: int, rng: random.Random, nested: bool) -> bytes:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"readme {seq}.txt", _tag(seq) + rng.randbytes(rng.randrange(10, 2000)))
        zf.writestr("payload/eicar.com", EICAR)
    if not nested:
        return inner.getvalue()
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"inner-{seq}.zip", inner.getvalue())
    return outer.getvalue()
