"""The closed set of scan outcomes, and the one pure function that turns a reply into one."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

# Why a file could not be scanned: a closed set, shown in the verdict API, the quarantine record,
# the `file.unscannable` event and the `watcher_unscannable_total` metric.
Cause = Literal["encrypted", "limits", "malformed", "unsupported", "scan_error", "unreadable"]
CAUSES: tuple[Cause, ...] = (
    "encrypted",
    "limits",
    "malformed",
    "unsupported",
    "scan_error",
    "unreadable",
)


@dataclass(frozen=True)
class Clean:
    """clamd said ``OK`` for exactly the object we sent."""


@dataclass(frozen=True)
class Infected:
    signature: str


@dataclass(frozen=True)
class NotScanned:
    """No verdict. ``transient`` causes (timeouts, engine hiccups) are retried; others are final.

    ``reason`` is for people; ``cause`` is the closed set machines read.
    """

    reason: str
    transient: bool
    cause: Cause = "scan_error"


Verdict = Clean | Infected | NotScanned

# `fd[12]: OK`, `stream: Eicar-Signature FOUND`. Anything else is not a verdict.
_REPLY = re.compile(r"^(?:fd\[\d+\]|stream): (?:(?P<signature>\S.*) FOUND|(?P<ok>OK))$")
# Heuristic "detections" that only say what clamd could not look into: reasons, not infections.
# Limits: only with AlertExceedsMax (`Heuristics.Limits.Exceeded.MaxRecursion`, ...).
# Encrypted: only with AlertEncrypted / AlertEncryptedArchive / AlertEncryptedDoc
# (`Heuristics.Encrypted.Zip`, `.7Zip`, `.RAR`, `.PDF`, ...).
_UNSEEN: tuple[tuple[re.Pattern[str], Cause, str], ...] = (
    (re.compile(r"^Heuristics\.Limits\.Exceeded"), "limits", "exceeds clamd limits"),
    (re.compile(r"^Heuristics\.Encrypted\."), "encrypted", "encrypted content clamd cannot read"),
)


def parse_reply(reply: str) -> Verdict:
    """Map one clamd scan reply to a verdict; only an explicit OK is clean.

    >>> parse_reply("fd[10]: OK")
    Clean()
    >>> parse_reply("stream: ")
    NotScanned(reason='unparsable reply from clamd: stream: ', transient=True, cause='scan_error')
    """
    if reply == "INSTREAM size limit exceeded. ERROR":
        return NotScanned("exceeds clamd StreamMaxLength", transient=False, cause="limits")
    match = _REPLY.match(reply)
    if match is None:
        if reply.endswith(" ERROR"):
            return NotScanned(f"clamd error: {reply}", transient=True)
        return NotScanned(f"unparsable reply from clamd: {reply}", transient=True)
    signature = match.group("signature")
    if signature is None:
        return Clean()
    for pattern, cause, meaning in _UNSEEN:
        if pattern.match(signature):
            return NotScanned(f"{meaning}: {signature}", transient=False, cause=cause)
    return Infected(signature)


class Outcome(enum.StrEnum):
    """What became of a file: the one vocabulary of metrics labels, the verdict API's states and
    the quarantine records' `verdict` field (each shows `verdict_word`)."""

    CLEAN = "clean"
    INFECTED = "infected"
    UNSCANNABLE = "unscannable"
    UNSCANNED = "unscanned"  # scanning switched off: delivered, never presented as scanned
    ALLOWLISTED = "allowlisted"  # detected, but its sha256 was restored by an operator
    REJECTED = "rejected"  # not a plain file of its uploader's (symlink, FIFO, hard link, ...)
    HELD = "held"  # unscannable, kept in staging by WATCHER_UNSCANNABLE_POLICY=hold
    RETRY = "retry"  # not settled: tried again later
    GONE = "gone"  # someone else claimed it, or it vanished

    @property
    def verdict_word(self) -> str | None:
        """The word every surface uses for a settled outcome (None while it is not settled):
        a held file is unscannable, wherever it is kept."""
        if self in (Outcome.RETRY, Outcome.GONE):
            return None
        return "unscannable" if self is Outcome.HELD else self.value

    @property
    def scanned(self) -> bool:
        """clamd gave its verdict (or could not): the outcomes a scan duration is measured for."""
        return self in _SCANNED


_SCANNED = {Outcome.CLEAN, Outcome.ALLOWLISTED, Outcome.INFECTED, Outcome.UNSCANNABLE, Outcome.HELD}
# Every settled word, in a stable order: metrics start each label at 0.
VERDICT_WORDS = ("clean", "infected", "unscannable", "unscanned", "allowlisted", "rejected")
