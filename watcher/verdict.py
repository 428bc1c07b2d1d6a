"""The closed set of scan outcomes, and the one pure function that turns a reply into one."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Clean:
    """clamd said ``OK`` for exactly the object we sent."""


@dataclass(frozen=True)
class Infected:
    signature: str


@dataclass(frozen=True)
class NotScanned:
    """No verdict. ``transient`` causes (timeouts, engine hiccups) are retried; others are final."""

    reason: str
    transient: bool


Verdict = Clean | Infected | NotScanned

# `fd[12]: OK`, `stream: Eicar-Signature FOUND`. Anything else is not a verdict.
_REPLY = re.compile(r"^(?:fd\[\d+\]|stream): (?:(?P<signature>\S.*) FOUND|(?P<ok>OK))$")
# clamd reports its own limits as detections only with AlertExceedsMax; they are not verdicts.
_LIMIT_SIGNATURE = re.compile(r"^Heuristics\.Limits\.Exceeded")


def parse_reply(reply: str) -> Verdict:
    """Map one clamd scan reply to a verdict; only an explicit OK is clean.

    >>> parse_reply("fd[10]: OK")
    Clean()
    >>> parse_reply("stream: ")
    NotScanned(reason='unparsable reply from clamd: stream: ', transient=True)
    """
    if reply == "INSTREAM size limit exceeded. ERROR":
        return NotScanned("exceeds clamd StreamMaxLength", transient=False)
    match = _REPLY.match(reply)
    if match is None:
        if reply.endswith(" ERROR"):
            return NotScanned(f"clamd error: {reply}", transient=True)
        return NotScanned(f"unparsable reply from clamd: {reply}", transient=True)
    signature = match.group("signature")
    if signature is None:
        return Clean()
    if _LIMIT_SIGNATURE.match(signature):
        return NotScanned(f"exceeds clamd limits: {signature}", transient=False)
    return Infected(signature)
