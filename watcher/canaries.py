"""clamd is checked, not trusted: canaries made in memory, scanned as uploads are.

Invariant: `ClamdCheck.trusted` is set only while the last check passed. The workers take no
file while it is clear (files wait in uploads, as while clamd is down), /readyz fails, and the
heartbeat carries the problem so `watcher healthcheck` exits 1. A check runs at start, after
each reload of definitions, every WATCHER_CANARY_INTERVAL_S, and every few seconds while the
last one did not pass.

The canaries (none is ever a file: EICAR is assembled at run time):
- ``eicar``: the EICAR test file. clamd must answer FOUND: otherwise it has no signatures, or
  is not the engine we think.
- ``nest``: EICAR at the bottom of WATCHER_ARCHIVE_MAX_DEPTH + 1 nested zips. clamd must not
  answer OK: it does when its clamd.conf lacks ``AlertExceedsMax yes`` (the official image's
  stock file), and then every limit of clamd's, in every format, fails open.
- ``encrypted``: a zip whose only member is marked encrypted, judged by the whole verdict path
  (clamd, then watcher's archive inspection): it must end unscannable (``encrypted``), or clean
  when WATCHER_ACCEPT_ENCRYPTED is set.

With a pool of clamd endpoints (watcher/endpoints.py) every endpoint is checked on its own,
and the pool asks for the same check before an endpoint gets its first file, and again each
time it comes back: one endpoint answering right never vouches for another. `trusted` is set
while at least one endpoint passed; those that did not get no file (`clamd.endpoint_untrusted`).
"""

from __future__ import annotations

import base64
import io
import os
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from watcher.clamav import ClamdScanner, Scanner
from watcher.endpoints import EndpointPool, HostPort
from watcher.errors import ClamdUnavailable
from watcher.logs import emit
from watcher.verdict import Clean, Infected, NotScanned, Verdict

_EICAR = base64.b64decode(
    b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
_RETRY_S = (1.0, 2.0, 5.0)  # while a check did not pass: soon, then every 5 s
NOT_CHECKED = "clamd not checked yet"


@dataclass(frozen=True)
class Canary:
    name: str
    data: bytes
    judge_whole_path: bool  # through the archive inspection too, or clamd's answer alone
    expected: str  # for people: what a trustworthy answer is

    def accepts(self, verdict: Verdict, accept_encrypted: bool) -> bool:
        if self.name == "eicar":
            return isinstance(verdict, Infected)
        if self.name == "nest":
            return isinstance(verdict, Infected) or (
                isinstance(verdict, NotScanned) and verdict.cause == "limits"
            )
        if accept_encrypted:
            return isinstance(verdict, Clean)
        return isinstance(verdict, NotScanned) and verdict.cause == "encrypted"


def canaries(max_depth: int) -> tuple[Canary, ...]:
    return (
        Canary("eicar", _EICAR, False, "FOUND"),
        Canary("nest", _nest(max_depth + 1), False, "FOUND (AlertExceedsMax yes)"),
        Canary("encrypted", _encrypted_zip(), True, "unscannable: encrypted"),
    )


def _zip(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def _nest(levels: int) -> bytes:
    data, name = _EICAR, "eicar.com"
    for level in range(levels):
        data, name = _zip(name, data), f"level-{level}.zip"
    return data


def _encrypted_zip() -> bytes:
    """A stored member with the "encrypted" flag set in both headers: what readers go by."""
    data = bytearray(_zip("secret.txt", b"watcher encrypted canary\n" * 4, zipfile.ZIP_STORED))
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + flags_at] |= 0x1
    return bytes(data)


class ClamdCheck:
    """Runs the canaries; `trusted` and `problem` say how the last check went."""

    def __init__(
        self,
        scanner: Scanner,
        look_inside: Callable[[int, Verdict], Verdict],
        max_depth: int,
        accept_encrypted: bool,
        interval_s: float,
        stop: threading.Event,
        on_unreachable: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._scanner = scanner
        self._look_inside = look_inside
        self._canaries = canaries(max_depth)
        self._accept_encrypted = accept_encrypted
        self._interval_s = interval_s
        self._stop = stop
        self._on_unreachable = on_unreachable
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.trusted = threading.Event()
        self.problem: str | None = NOT_CHECKED
        self.listeners: list[Callable[[], None]] = []  # told when `problem` changes
        self._pool: EndpointPool | None = None
        if isinstance(scanner, ClamdScanner) and scanner.pool is not None:
            self._pool = scanner.pool
            self._pool.vet = self._vet_endpoint  # before any endpoint gets a file

    def start(self) -> None:
        """One check now (before any file is taken), then a thread that repeats it."""
        self.check()
        self._thread = threading.Thread(target=self._loop, name="watcher-canaries", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> bool:
        with self._lock:
            if self._pool is not None:
                return self._check_pool(self._pool)
            try:
                problem = self._first_wrong_answer(self._scanner)
            except ClamdUnavailable as err:
                self._on_unreachable(str(err))
                self._set(f"{NOT_CHECKED}: {err}", log=False)
                return False
            self._set(problem, log=True)
            return problem is None

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self.trusted.is_set():
                failures = 0
                wait_s = self._interval_s
            else:
                wait_s = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                failures += 1
            if self._stop.wait(wait_s):
                return
            self.check()

    def _check_pool(self, pool: EndpointPool) -> bool:
        """Every endpoint checked on its own; trusted while at least one passed."""
        pool.vet_all()
        endpoints = pool.status()
        if any(e.state == "ready" for e in endpoints):
            self._set(None, log=True)
            return True
        problems = "; ".join(f"{e.endpoint}: {e.problem}" for e in endpoints if e.problem)
        if endpoints and all(e.state == "untrusted" for e in endpoints):
            self._set(f"every clamd endpoint answered a canary wrongly: {problems}", log=True)
            return False
        reason = problems or "no clamd endpoint"
        self._on_unreachable(reason)
        self._set(f"{NOT_CHECKED}: {reason}", log=False)
        return False

    def _vet_endpoint(self, address: HostPort) -> str | None:
        """The pool's check of one endpoint: its first wrong answer, or None."""
        assert isinstance(self._scanner, ClamdScanner)
        return self._first_wrong_answer(self._scanner.at(address))

    def _first_wrong_answer(self, scanner: Scanner) -> str | None:
        """None when every canary got a trustworthy answer; raises ClamdUnavailable."""
        for canary in self._canaries:
            verdict = self._scan(canary, scanner)
            if isinstance(verdict, NotScanned) and verdict.transient:
                raise ClamdUnavailable(f"canary {canary.name}: {verdict.reason}")
            if not canary.accepts(verdict, self._accept_encrypted):
                return f"canary {canary.name}: expected {canary.expected}, got {_describe(verdict)}"
        return None

    def _scan(self, canary: Canary, scanner: Scanner) -> Verdict:
        fd = os.memfd_create(f"watcher-canary-{canary.name}", os.MFD_CLOEXEC)
        try:
            os.write(fd, canary.data)
            verdict = scanner.scan_fd(fd)
            return self._look_inside(fd, verdict) if canary.judge_whole_path else verdict
        finally:
            os.close(fd)

    def _set(self, problem: str | None, log: bool) -> None:
        """Record the outcome; log only changes (a wrong clamd is retried every few seconds)."""
        changed = problem != self.problem
        was_trusted = self.trusted.is_set()
        self.problem = problem
        if problem is None:
            self.trusted.set()
            if not was_trusted:
                names = [c.name for c in self._canaries]
                emit("clamd.trusted", canaries=names)
        else:
            self.trusted.clear()
            if log and changed:
                emit("clamd.untrusted", problem=problem)
        if changed:
            for listener in self.listeners:
                listener()


def _describe(verdict: Verdict) -> str:
    if isinstance(verdict, Clean):
        return "OK"
    if isinstance(verdict, Infected):
        return f"{verdict.signature} FOUND"
    return f"unscannable ({verdict.cause}): {verdict.reason}"
