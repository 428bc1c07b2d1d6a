"""clamd's replies to verdicts: only an explicit OK for what was sent is clean; what clamd could
not look into is not scanned, never clean (watcher/verdict.py)."""

from __future__ import annotations

import pytest

from watcher.verdict import Clean, Infected, NotScanned, parse_reply


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("fd[10]: OK", Clean()),
        ("stream: OK", Clean()),
        ("fd[10]: Eicar-Test-Signature FOUND", Infected("Eicar-Test-Signature")),
        ("stream: Win.Test.EICAR_HDB-1 FOUND", Infected("Win.Test.EICAR_HDB-1")),
    ],
)
def test_explicit_replies(reply: str, verdict: object) -> None:
    assert parse_reply(reply) == verdict


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "OK",
        "fd[10]: OKAY",
        "/some/path: OK",  # a reply for a path we never sent
        "fd[10]: Can't open file or directory ERROR",
        "fd[10]: lstat() failed: No such file or directory. ERROR",
        "stream: OK\nstream: Eicar FOUND",
        "PONG",
    ],
)
def test_anything_but_an_explicit_ok_is_not_clean(reply: str) -> None:
    verdict = parse_reply(reply)
    assert isinstance(verdict, NotScanned) and verdict.transient


def test_size_limits_are_unscannable_never_clean() -> None:
    assert parse_reply("INSTREAM size limit exceeded. ERROR") == NotScanned(
        "exceeds clamd StreamMaxLength", transient=False, cause="limits"
    )
    limited = parse_reply("fd[3]: Heuristics.Limits.Exceeded.MaxFileSize FOUND")
    assert isinstance(limited, NotScanned) and not limited.transient
    assert limited.cause == "limits"


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("stream: Heuristics.Encrypted.Zip FOUND", NotScanned),
        ("fd[9]: Heuristics.Encrypted.7Zip FOUND", NotScanned),
        ("stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND", NotScanned),
        ("stream: Win.Test.EICAR_HDB-1 FOUND", Infected),
        ("stream: Heuristics.Phishing.Email.SpoofedDomain FOUND", Infected),
        ("stream: OK", Clean),
    ],
)
def test_clamds_heuristic_answers_are_reasons_and_signatures_are_infections(
    reply: str, verdict: type
) -> None:
    parsed = parse_reply(reply)
    assert type(parsed) is verdict
    if isinstance(parsed, NotScanned):
        assert not parsed.transient
        assert parsed.cause == ("encrypted" if "Encrypted" in reply else "limits")
